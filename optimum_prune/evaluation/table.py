"""A latency table: measured milliseconds of every attention / FFN width a block can be pruned to.

The data, its lookups, JSON and text forms, and what identifies it (``model_signature``, ``mlp_grid``);
measuring one is ``table_measure``, caching one is ``table_cache``.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from ..modeling.adapters import base_model_type, get_adapter
from ..saving import atomic_write_text
from .defaults import DEFAULT_MLP_LEVELS
from .environment import InferenceEnvironment
from .models import stock_class

FORMAT_VERSION = 1


@dataclass
class LatencyTable:
    """Measured milliseconds of one attention / MLP sublayer at every level, plus the rest of the model."""

    environment: InferenceEnvironment
    model: str
    """``model_signature`` of the dense model the table was measured for."""
    attention: dict[tuple[int, int], float]
    """(KV groups kept, query heads per group) -> ms of ONE attention sublayer; (0, 0) -> 0.0 (removed)."""
    mlp: dict[int, float]
    """FFN neurons kept -> ms of ONE MLP sublayer, on the measured grid; 0 -> 0.0 (removed)."""
    rest_ms: float
    """Embeddings, final norm, head and per-block leftovers: dense_ms - L * (full attention + full MLP)."""
    dense_ms: float
    num_layers: int
    environment_key: str | None = None
    """``environment.key()`` where it was measured (torch version and device model included)."""

    def __post_init__(self) -> None:
        self.attention = {(int(g), int(q)): float(ms) for (g, q), ms in self.attention.items()}
        self.mlp = {int(n): float(ms) for n, ms in self.mlp.items()}
        self.attention[(0, 0)] = 0.0
        self.mlp[0] = 0.0
        bad = [ms for ms in (*self.attention.values(), *self.mlp.values(), self.rest_ms, self.dense_ms)
               if not math.isfinite(ms) or ms < 0]
        if bad:
            raise ValueError(f"latency table times must be finite and >= 0 ms, got {bad[0]!r}")
        if len(self.attention) < 2 or len(self.mlp) < 2:
            raise ValueError("a latency table needs at least one measured attention level and one MLP level")

    # ------------------------------------------------------------------ levels
    @property
    def full_attention(self) -> tuple[int, int]:
        """The dense attention level (all KV groups, all query heads per group)."""
        return max(self.attention)

    @property
    def full_mlp(self) -> int:
        return max(self.mlp)

    @property
    def mlp_grid(self) -> list[int]:
        """Measured FFN widths, ascending (0 excluded)."""
        return sorted(n for n in self.mlp if n > 0)

    def dense_levels(self) -> list[tuple[tuple[int, int], int]]:
        """The levels of the unpruned model, one per layer (for ``model_ms`` / ``speedup``)."""
        return [(self.full_attention, self.full_mlp)] * self.num_layers

    # ------------------------------------------------------------------ lookups
    def attention_ms(self, groups: int, q_per_group: int) -> float:
        """Time of one attention sublayer keeping ``groups`` KV groups of ``q_per_group`` query heads (0: removed)."""
        if groups == 0 or q_per_group == 0:
            return 0.0
        try:
            return self.attention[(groups, q_per_group)]
        except KeyError:
            g, q = self.full_attention
            raise ValueError(f"no attention level ({groups}, {q_per_group}) in the latency table; levels are "
                             f"1..{g} KV groups x 1..{q} query heads per group, or (0, 0) for a removed sublayer"
                             ) from None

    def mlp_ms(self, neurons: int) -> float:
        """Time of one MLP sublayer keeping ``neurons`` FFN neurons: exact on the grid, linear in between."""
        full = self.full_mlp
        if not 0 <= neurons <= full:
            raise ValueError(f"neurons must be in 0..{full} (the FFN width), got {neurons}")
        if neurons in self.mlp:
            return self.mlp[neurons]
        points = sorted(self.mlp)
        hi = bisect.bisect_right(points, neurons)
        n0, n1 = points[hi - 1], points[hi]
        t0, t1 = self.mlp[n0], self.mlp[n1]
        return t0 + (t1 - t0) * (neurons - n0) / (n1 - n0)

    def model_ms(self, levels: Sequence[tuple[tuple[int, int], int]]) -> float:
        """Estimated model time: rest + per layer attention_ms + mlp_ms, ``levels`` giving ((groups, q), neurons)."""
        if len(levels) != self.num_layers:
            raise ValueError(f"levels must give one ((groups, q_per_group), neurons) per layer: the model has "
                             f"{self.num_layers} layers, got {len(levels)}")
        return self.rest_ms + sum(self.attention_ms(*attn) + self.mlp_ms(neurons) for attn, neurons in levels)

    def speedup(self, levels: Sequence[tuple[tuple[int, int], int]]) -> float:
        """Estimated speedup over the measured dense model: dense_ms / model_ms(levels)."""
        return self.dense_ms / self.model_ms(levels)

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuple keys become "groups,q" strings)."""
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "environment": self.environment.to_dict(),
            "environment_key": self.environment_key,
            "num_layers": self.num_layers,
            "dense_ms": self.dense_ms,
            "rest_ms": self.rest_ms,
            "attention": {f"{g},{q}": ms for (g, q), ms in sorted(self.attention.items())},
            "mlp": {str(n): ms for n, ms in sorted(self.mlp.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyTable:
        """Inverse of ``to_dict``; anything malformed raises a ValueError saying what."""
        if not isinstance(data, dict):
            raise ValueError(f"a latency table must be a JSON object, got {type(data).__name__}")
        required = {"model", "environment", "num_layers", "dense_ms", "rest_ms", "attention", "mlp"}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"not a latency table: missing {', '.join(missing)}")
        version = data.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"latency table format {version!r} is newer than this optimum-prune reads "
                             f"({FORMAT_VERSION}); upgrade optimum-prune or measure the table again")
        try:
            return cls(
                environment=InferenceEnvironment(**data["environment"]),
                model=str(data["model"]),
                attention={tuple(int(x) for x in k.split(",")): float(v) for k, v in data["attention"].items()},
                mlp={int(k): float(v) for k, v in data["mlp"].items()},
                rest_ms=float(data["rest_ms"]),
                dense_ms=float(data["dense_ms"]),
                num_layers=int(data["num_layers"]),
                environment_key=data.get("environment_key"),
            )
        except (TypeError, AttributeError, ValueError) as err:
            raise ValueError(f"malformed latency table: {err}") from err

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON atomically (all or nothing, see ``saving.atomic_file``); returns the path."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(data)

    # ------------------------------------------------------------------ display
    def to_text(self) -> str:
        """A small human-readable rendering (attention grid, MLP levels, rest and dense time)."""
        env = self.environment
        engine = "llama.cpp " if env.llamacpp else ""
        lines = [f"latency table for {self.model}",
                 f"environment: {engine}{env.device} {env.dtype}, {env.mode}, batch {env.batch_size} x {env.seq_len} "
                 f"tokens, {env.threads} threads"
                 + (f", logits on the last {env.logits_to_keep} position(s)" if env.logits_to_keep and not env.llamacpp
                    else "")]
        if self.environment_key:
            lines.append(f"environment key: {self.environment_key}")
        groups, per_group = self.full_attention
        if per_group == 1:
            lines.append("attention sublayer (ms) by heads kept:")
            lines += _wrap_pairs([(str(g), self.attention[(g, 1)]) for g in range(1, groups + 1)])
        else:
            lines.append("attention sublayer (ms): rows = KV groups kept, columns = query heads per group")
            lines.append("  g \\ q " + "".join(f"{q:>10}" for q in range(1, per_group + 1)))
            for g in range(1, groups + 1):
                lines.append(f"  {g:>5} " + "".join(f"{_fmt_ms(self.attention[(g, q)]):>10}"
                                                    for q in range(1, per_group + 1)))
        lines.append("MLP sublayer (ms) by FFN neurons kept:")
        lines += _wrap_pairs([(str(n), self.mlp[n]) for n in self.mlp_grid])
        lines.append(f"rest: {_fmt_ms(self.rest_ms)} ms   dense: {_fmt_ms(self.dense_ms)} ms "
                     f"({self.num_layers} layers)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def _fmt_ms(ms: float) -> str:
    return f"{ms:.4f}" if ms < 1 else f"{ms:.3f}" if ms < 100 else f"{ms:.1f}"


def _wrap_pairs(pairs: list[tuple[str, float]], per_line: int = 6) -> list[str]:
    cells = [f"{label:>6}: {_fmt_ms(ms):<9}" for label, ms in pairs]
    return ["  " + " ".join(cells[i:i + per_line]).rstrip() for i in range(0, len(cells), per_line)]


# -------------------------------------------------------------------------------------- signature


def model_signature(model: PreTrainedModel) -> str:
    """The shapes that decide latency (class, family, widths, depth, vocabulary, attention kernel)."""
    config = model.config
    adapter = get_adapter(model)
    dims = adapter.dims(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    attn = getattr(config, "_attn_implementation", None) or "eager"
    return (f"{stock_class(model).__name__}:{base_model_type(config.model_type)} hidden={dims.hidden_size} "
            f"heads={dims.num_heads} kv_heads={dims.num_kv_heads} head_dim={dims.head_dim} "
            f"intermediate={dims.intermediate_size} layers={len(adapter.layers(model))} "
            f"vocab={text.vocab_size} attn={attn}")


def mlp_grid(intermediate_size: int, levels: int | Sequence[int] | None = None) -> list[int]:
    """FFN widths to measure, ascending, always ending at the full width.

    ``levels`` None: 16 evenly spaced widths from 1/16 of the FFN to all of it; an int: that many; a list:
    those widths. Generated widths are multiples of 8 (hardware-friendly) when the FFN is wide enough.
    """
    full = intermediate_size
    if levels is None:
        levels = DEFAULT_MLP_LEVELS
    if isinstance(levels, bool) or not isinstance(levels, (int, Sequence)) or isinstance(levels, str):
        raise ValueError(f"mlp_levels must be a number of levels or a list of FFN widths, got {levels!r}")
    if isinstance(levels, int):
        if levels < 1:
            raise ValueError(f"mlp_levels must be at least 1 (the full FFN), got {levels}")
        n = min(levels, full)
        multiple = 8 if full >= 8 * n else 1
        grid = {min(full, max(multiple, round(full * k / n / multiple) * multiple)) for k in range(1, n)}
        return sorted(grid | {full})
    widths = set()
    for value in levels:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= full:
            raise ValueError(f"mlp_levels holds {value!r}; each FFN width must be an integer in 0..{full}")
        widths.add(value)
    return sorted((widths - {0}) | {full})
