"""Value checks and parsers that several method configs share (pure Python: configs import no torch)."""

from __future__ import annotations

import argparse
import json
from numbers import Real
from typing import Any

from .base import ConfigError


def per_layer(kind: type):
    """CLI parser for '0.5' or '0:0.5,3:0.7' (layer:value pairs)."""

    def parse(text: str):
        if ":" not in text:
            return kind(text)
        out = {}
        for item in filter(None, (t.strip() for t in text.replace(";", ",").split(","))):
            layer, _, value = item.partition(":")
            try:
                out[int(layer)] = kind(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected LAYER:VALUE pairs like '0:0.5,1:0.7', got {item!r}") from None
        return out

    parse.__name__ = f"per_layer_{kind.__name__}"
    return parse


def json_object(text: str) -> dict[str, Any]:
    """CLI parser for a JSON object, e.g. '{"generations": 3}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"key\": 1}}', got {text!r} ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def layer_keys(value: Any) -> Any:
    """{"0": x} (as JSON stores it) -> {0: x}; other values unchanged."""
    if isinstance(value, dict):
        try:
            return {int(k): v for k, v in value.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"per-layer values need integer layer indices as keys, got {sorted(value)}") from None
    return value


def is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def parse_n_m(n_m: str | tuple[int, int] | list[int] | None) -> tuple[int, int]:
    """"2:4" -> (2, 4); None -> (0, 0)."""
    if n_m is None:
        return 0, 0
    if isinstance(n_m, str):
        try:
            n, m = (int(x) for x in n_m.split(":"))
        except ValueError:
            raise ConfigError(f"n_m must look like \"2:4\" (N zeros in every M weights), got {n_m!r}") from None
    else:
        n, m = n_m
    if not 0 < n < m:
        raise ConfigError(f"N:M sparsity needs 0 < N < M, got {n}:{m}")
    return n, m
