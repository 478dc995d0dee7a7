"""Reading GGUF files fast: one header key without parsing the file, and one parse shared by a whole load.

``gguf.GGUFReader`` parses every metadata field (SmolLM2's 49k-token vocabulary and merges: 5-12 s on 2 shared
cores), and a transformers GGUF load parses the file once for the config, once for the weights and once for the
tokenizer, and rebuilds gguf's tensor-name map once per module. ``read_gguf_string`` reads only the header up to
one key; ``shared_gguf_parsing`` makes the parses of one load share a single reader and name map.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
from collections.abc import Iterator
from typing import BinaryIO

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""Byte size of each fixed-size GGUF value type (uint8 ... float64); 8 is a string, 9 an array."""
_STRING, _ARRAY = 8, 9


class GGUFHeaderError(ValueError):
    """The file is not a GGUF file this reader understands (bad magic, version, or a truncated header)."""


def read_gguf_string(path: str, key: str) -> str | None:
    """The string value of metadata ``key`` in the GGUF file at ``path``, None when the file has no such key.

    Reads the header key by key and stops at ``key`` (``general.architecture`` is the first key that writers emit),
    so it takes milliseconds however large the vocabulary stored after it. Little-endian GGUF v2/v3 only
    (``GGUFHeaderError`` otherwise, and for a file that is not GGUF or is cut short).
    """
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFHeaderError("no GGUF magic at the start of the file")
        version, _tensors, count = _unpack(f, "<IQQ")
        if version not in (2, 3):
            raise GGUFHeaderError(f"GGUF version {version} (this reader knows little-endian versions 2 and 3)")
        for _ in range(count):
            name = _read_string(f)
            (kind,) = _unpack(f, "<I")
            if name == key:
                return _read_string(f) if kind == _STRING else None
            _skip_value(f, kind)
    return None


def _unpack(f: BinaryIO, fmt: str) -> tuple:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise GGUFHeaderError("the header is cut short")
    return struct.unpack(fmt, data)


def _read_string(f: BinaryIO) -> str:
    (length,) = _unpack(f, "<Q")
    data = f.read(length)
    if len(data) != length:
        raise GGUFHeaderError("the header is cut short")
    return data.decode("utf-8", errors="replace")


def _skip_value(f: BinaryIO, kind: int) -> None:
    if kind == _STRING:
        (length,) = _unpack(f, "<Q")
        f.seek(length, 1)
    elif kind == _ARRAY:
        item, n = _unpack(f, "<IQ")
        if item in _SCALAR_SIZES:
            f.seek(n * _SCALAR_SIZES[item], 1)
        else:
            for _ in range(n):
                _skip_value(f, item)
    elif kind in _SCALAR_SIZES:
        f.seek(_SCALAR_SIZES[kind], 1)
    else:
        raise GGUFHeaderError(f"unknown GGUF value type {kind}")


@contextlib.contextmanager
def shared_gguf_parsing() -> Iterator[None]:
    """Within the block, ``gguf.GGUFReader(path)`` returns one parsed reader per path and
    ``gguf.get_tensor_name_map(arch, n_blocks)`` one map per key, so transformers' config, weight and tokenizer
    loaders (which import both from ``gguf`` when called) parse the file once. Both are read-only after
    construction. Outside the block, and without the gguf package, nothing changes."""
    try:
        import gguf
    except ImportError:
        yield
        return
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map

    parsed = functools.lru_cache(maxsize=4)(reader)

    def shared_reader(path, mode="r"):
        return parsed(os.fspath(path), mode)

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.lru_cache(maxsize=16)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
