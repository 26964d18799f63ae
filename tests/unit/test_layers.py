"""common < gateway | worker < llmfleet, as tests/layers.py reads the imports."""

from __future__ import annotations

from pathlib import Path

from tests import layers


def test_no_import_breaks_the_layers() -> None:
    assert layers.violations() == []


def test_the_check_sees_lazy_imports_and_flags_a_wrong_one(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "def f():\n    from gateway.app import GatewayApp\n\nimport worker.engines.sim\n"
    )
    assert sorted(layers.imports(src)) == [(2, "gateway"), (4, "worker")]
    g = layers.graph()
    assert "worker" not in g["gateway"] and "gateway" not in g["worker"]
    assert set(g["llmfleet"]) >= {"common", "gateway", "worker"}
