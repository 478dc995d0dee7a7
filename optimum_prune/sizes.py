"""Memory sizes as users write them ("1GB", "800MiB", bytes): parsed without importing torch (config validation)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def parse_memory(value: int | str, *, zero: bool = False) -> int:
    """Bytes of ``value``: an int, or a string such as "1GB", "800MiB", "2.5 GB" (``zero``: 0 allowed)."""
    if isinstance(value, int) and not isinstance(value, bool) and (value > 0 or (zero and value == 0)):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)\s*", str(value), re.IGNORECASE)
    if not match or (float(match.group(1)) <= 0 and not zero):
        raise ValueError(f"{value!r} is not a memory size: use bytes or a string like '1GB' or '800MiB'")
    unit = match.group(2).upper()
    unit = unit if unit.endswith("B") or not unit else unit + "B"
    return int(float(match.group(1)) * _UNITS[unit])
