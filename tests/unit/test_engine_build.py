"""The in-process llama.cpp engine is a portable build: it runs on any x86-64 machine with
AVX2, whatever the machine that installed it advertises.

A build of llama.cpp with its default native flags on a CPU that lists AMX contains AMX
instructions (`tilezero` ... on `%tmm` registers) and dies with SIGILL where the VM does
not let processes use them; one with AVX-512 dies on CPUs without it. The installed
xllamacpp must contain neither, and must be the prebuilt manylinux wheel (a wheel built
locally, which pip's cache could hand to another install, is tagged `linux_x86_64`).
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bench.engines import register_uses

xllamacpp = pytest.importorskip("xllamacpp", reason="the llamacpp extra is not installed")

X86 = platform.machine() in ("x86_64", "AMD64")


def _native_libraries() -> list[Path]:
    root = Path(xllamacpp.__file__).parent
    libs = sorted(root.glob("*.so")) + sorted(root.parent.glob("xllamacpp.libs/*.so*"))
    assert libs, f"no native library found beside {root}"
    return libs


needs_objdump = pytest.mark.skipif(
    not X86 or shutil.which("objdump") is None,
    reason="needs x86-64 and objdump (binutils) to read native code",
)


@needs_objdump
def test_the_engine_has_no_amx_or_avx512_instructions() -> None:
    for lib in _native_libraries():
        amx, avx512 = register_uses(lib)
        assert amx == 0, f"{lib.name}: {amx} AMX register uses"
        assert avx512 == 0, f"{lib.name}: {avx512} AVX-512 register uses"


@needs_objdump
@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_the_check_finds_amx_and_avx512_where_they_are(tmp_path: Path) -> None:
    """What a native llama.cpp build on an AMX machine contains, in miniature."""
    src = tmp_path / "native.c"
    src.write_text(
        'void amx(void) { __asm__ volatile ("tilezero %%tmm0" ::: "memory"); }\n'
        'void avx512(void) { __asm__ volatile ("vpxord %%zmm0, %%zmm0, %%zmm0" ::: '
        '"memory"); }\n'
    )
    lib = tmp_path / "libnative.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    assert register_uses(lib) == (1, 3)


def test_the_engine_is_the_prebuilt_portable_wheel() -> None:
    wheel = importlib.metadata.distribution("xllamacpp").read_text("WHEEL") or ""
    tags = re.findall(r"^Tag: (\S+)$", wheel, re.MULTILINE)
    assert tags, "xllamacpp has no wheel tags: not installed from a wheel"
    if platform.system() == "Linux":
        assert all("manylinux" in t or "musllinux" in t for t in tags), (
            f"xllamacpp was built on this machine ({tags}); reinstall the portable wheel: "
            "pip install --force-reinstall --only-binary xllamacpp xllamacpp"
        )


def test_llama_cpp_reports_a_portable_cpu_backend() -> None:
    info = xllamacpp.get_system_info()
    assert "AVX2 = 1" in info  # the baseline this build needs
    assert "AVX512" not in info and "AMX" not in info, info
