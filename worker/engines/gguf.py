"""Read the metadata of a GGUF file (its key/value header), without loading the model.

The in-process llama.cpp engine needs two facts before it loads a model: whether the
file carries a chat template, and its architecture (to pick a template when it does not).
The GGUF v2/v3 header is: magic `GGUF`, version u32, tensor count u64, kv count u64, then
`kv count` entries of (key string, value type u32, value). Strings are u64 length + UTF-8.
Arrays (the vocabulary) are skipped without decoding their items. Little-endian only.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

# value type -> struct format of a scalar of that type
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
_MAX_KV = 1 << 20  # a corrupt count must not make us loop for ever


class GGUFError(ValueError):
    """The file is not a readable GGUF."""


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise GGUFError("truncated GGUF header")
    return data


def _u64(f: BinaryIO) -> int:
    return int(struct.unpack("<Q", _read(f, 8))[0])


def _string(f: BinaryIO) -> str:
    return _read(f, _u64(f)).decode("utf-8", "replace")


def _value(f: BinaryIO, vtype: int) -> str | int | float | bool | None:
    """A scalar or string value; arrays are skipped (None)."""
    if vtype == _STRING:
        return _string(f)
    if vtype == _ARRAY:
        item_type = int(struct.unpack("<I", _read(f, 4))[0])
        count = _u64(f)
        if item_type == _STRING:
            for _ in range(count):
                f.seek(_u64(f), 1)
        elif item_type in _SCALARS:
            f.seek(struct.calcsize(_SCALARS[item_type]) * count, 1)
        else:
            raise GGUFError(f"unsupported GGUF array item type {item_type}")
        return None
    fmt = _SCALARS.get(vtype)
    if fmt is None:
        raise GGUFError(f"unsupported GGUF value type {vtype}")
    value: str | int | float | bool = struct.unpack("<" + fmt, _read(f, struct.calcsize(fmt)))[0]
    return value


def read_metadata(path: str | Path) -> dict[str, str | int | float | bool]:
    """The scalar and string metadata of a GGUF file (arrays are left out).

    Raises GGUFError for a file that is not GGUF, or OSError when it cannot be read.
    """
    with open(path, "rb") as f:
        if _read(f, 4) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file")
        version = int(struct.unpack("<I", _read(f, 4))[0])
        if version < 2:
            raise GGUFError(f"GGUF version {version} is too old")
        _u64(f)  # tensor count
        count = _u64(f)
        if count > _MAX_KV:
            raise GGUFError("corrupt GGUF header (kv count)")
        meta: dict[str, str | int | float | bool] = {}
        for _ in range(count):
            key = _string(f)
            vtype = int(struct.unpack("<I", _read(f, 4))[0])
            value = _value(f, vtype)
            if value is not None:
                meta[key] = value
        return meta
