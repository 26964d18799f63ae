"""The import layers of llmfleet, read from the source (every import, lazy ones too):

    common  <  gateway | worker  <  llmfleet
    common  <  control  <  gateway, llmfleet

`common` is the contract both sides speak (protocol, names, errors, queue and body-store
layout, and the telemetry and logging both use); `gateway` and `worker` build on it and
never import each other; `control` (virtual keys, quota ledgers) builds on `common` and
serves the gateway and the admin CLI; `llmfleet` (CLI, composition roots, dev stack,
broker launcher, status tool) sits on top. `python -m tests.layers` prints the graph
(`make lint` runs it); tests/unit/test_layers.py fails on any import that breaks it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {
    "common": {"common"},
    "control": {"common", "control"},
    "gateway": {"common", "control", "gateway"},
    "worker": {"common", "worker"},
    "llmfleet": {"common", "control", "gateway", "worker", "llmfleet"},
}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import of one of our packages in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top in ALLOWED:
                found.append((node.lineno, top))
    return found


def graph() -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> the `file:line`s that import it."""
    out: dict[str, dict[str, list[str]]] = {pkg: {} for pkg in ALLOWED}
    for pkg in ALLOWED:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for line, top in imports(path):
                if top != pkg:
                    where = f"{path.relative_to(ROOT)}:{line}"
                    out[pkg].setdefault(top, []).append(where)
    return out


def violations() -> list[str]:
    return [
        f"{where}: {pkg} imports {dep}"
        for pkg, deps in graph().items()
        for dep, places in deps.items()
        if dep not in ALLOWED[pkg]
        for where in places
    ]


def main() -> int:
    g = graph()
    for pkg in ALLOWED:
        deps = ", ".join(f"{d} ({len(w)})" for d, w in sorted(g[pkg].items())) or "-"
        print(f"{pkg:9} imports {deps}")
    bad = violations()
    for v in bad:
        print("layer violation:", v, file=sys.stderr)
    print("import layers: ok" if not bad else f"import layers: {len(bad)} violations")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
