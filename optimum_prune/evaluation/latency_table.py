"""Latency tables for ZipLM: the measured time of every attention / FFN width a block can be pruned to.

ZipLM picks, per block, how many KV groups, query heads per group and FFN neurons to keep so that the
model meets a target speedup *in the user's inference environment*. That needs measured, not FLOP-counted,
costs: ``measure_latency_table`` builds a one-block copy of the model (random weights: values do not
change latency), removes structure with the project's surgery to reach each level, and times the block
alone on inputs captured from a real forward. The sublayer cost at a level is the block time at that level
minus the time of the block with both sublayers removed; everything else (embeddings, final norm, LM head,
residual plumbing) is ``rest_ms``, the dense model's measured time minus the per-block sums.
``get_latency_table`` caches tables on disk keyed by environment, model shapes and FFN grid.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging

from . import _accepts, _eval_no_grad, _max_positions, is_causal_lm, measure_latency
from ..modeling.adapters import ArchitectureAdapter, base_model_type, get_adapter
from ..modeling.pruning_config import CONFIG_KEY, ModelDims, PruningConfig
from ..modeling.surgery import apply_structure

logger = logging.get_logger(__name__)

FORMAT_VERSION = 1
DEFAULT_MLP_LEVELS = 16
CACHE_ENV_VAR = "OPTIMUM_PRUNE_CACHE"
MIN_MS = 1e-6
"""What a negative (noise-dominated) sublayer time is clamped to, so that removing a sublayer still pays."""

_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32",
           "float16": "float16", "fp16": "float16", "half": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}
_MODES = ("prefill", "decode")


# ------------------------------------------------------------------------------------ environment


@dataclass(frozen=True)
class InferenceEnvironment:
    """Where and how the pruned model will run; a latency table holds only in the environment it was measured in."""

    device: str = "cpu"
    """"cpu", "cuda" or "cuda:N"."""
    dtype: str = "float32"
    """"float32", "float16" or "bfloat16" (aliases fp32/fp16/bf16/half are accepted)."""
    batch_size: int = 1
    seq_len: int = 512
    """prefill: tokens per sequence; decode: length of the KV cache the new token attends to."""
    mode: str = "prefill"
    """"prefill" (one forward over seq_len tokens, no cache) or "decode" (one new token after seq_len cached)."""
    threads: int | None = None
    """torch threads during measurement; None means torch's current count (recorded as the actual number)."""

    def __post_init__(self) -> None:
        if isinstance(self.dtype, torch.dtype):
            object.__setattr__(self, "dtype", str(self.dtype).replace("torch.", ""))
        if not isinstance(self.device, (str, torch.device)):
            raise ValueError("InferenceEnvironment.device must be a string like 'cpu', 'cuda' or 'cuda:0', "
                             f"got {self.device!r}")
        object.__setattr__(self, "device", str(self.device).strip().lower())
        try:
            device = torch.device(self.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ValueError(f"InferenceEnvironment.device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        dtype = _DTYPES.get(str(self.dtype).strip().lower())
        if dtype is None:
            raise ValueError("InferenceEnvironment.dtype must be 'float32', 'float16' or 'bfloat16', "
                             f"got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype)
        _check_positive_int("batch_size", self.batch_size, "the number of sequences per forward, e.g. 1")
        _check_positive_int("seq_len", self.seq_len,
                            "tokens per sequence (prefill) or KV-cache length (decode), e.g. 512")
        if self.mode not in _MODES:
            raise ValueError(f"InferenceEnvironment.mode must be 'prefill' or 'decode', got {self.mode!r}")
        if self.threads is not None:
            _check_positive_int("threads", self.threads, "a CPU thread count, or None for torch's current count")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def torch_device(self) -> torch.device:
        """The device, with the current CUDA index filled in for a bare 'cuda'."""
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return device

    def resolved(self) -> InferenceEnvironment:
        """This environment with ``threads`` set to the actual count that a measurement would use."""
        return self if self.threads is not None else replace(self, threads=torch.get_num_threads())

    def check_available(self) -> None:
        """Raise a ValueError naming the fix when this machine cannot run the environment."""
        device = torch.device(self.device)
        if device.type != "cuda":
            return
        if not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} was asked for, but CUDA is not available here (torch "
                             f"{torch.__version__}); use device='cpu', or a CUDA build of torch on a GPU machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {self.device!r} does not exist: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s); use cuda:0..cuda:{torch.cuda.device_count() - 1}")
        if self.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"{torch.cuda.get_device_name(self.torch_device)} does not support bfloat16; "
                             "use dtype='float16'")

    def key(self) -> str:
        """A stable string for cache lookups: torch version, device model and every measurement setting."""
        env = self.resolved()
        device = env.torch_device
        parts = [f"torch={torch.__version__}", f"device={device.type}", f"name={_device_name(env)}"]
        if device.type == "cuda":
            parts.append(f"cuda={torch.version.cuda}")
        parts += [f"dtype={env.dtype}", f"batch={env.batch_size}", f"seq_len={env.seq_len}", f"mode={env.mode}",
                  f"threads={env.threads}"]
        return ";".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_positive_int(name: str, value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"InferenceEnvironment.{name} must be a positive integer ({what}), got {value!r}")


def _device_name(env: InferenceEnvironment) -> str:
    """GPU model name, or the CPU model from /proc/cpuinfo (platform fallbacks elsewhere)."""
    device = env.torch_device
    if device.type == "cuda":
        env.check_available()
        return torch.cuda.get_device_name(device)
    return _cpu_name()


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    return platform.processor() or platform.machine() or "unknown cpu"


# ------------------------------------------------------------------------------------------ table


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
        """Write the table as JSON atomically (temporary file, then ``os.replace``); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path

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
        lines = [f"latency table for {self.model}",
                 f"environment: {env.device} {env.dtype}, {env.mode}, batch {env.batch_size} x {env.seq_len} tokens, "
                 f"{env.threads} threads"]
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
    return (f"{_stock_class(model).__name__}:{base_model_type(config.model_type)} hidden={dims.hidden_size} "
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


# -------------------------------------------------------------------------------------- measuring


def measure_latency_table(
    model: PreTrainedModel,
    environment: InferenceEnvironment,
    *,
    mlp_levels: int | Sequence[int] | None = None,
    repeats: int = 10,
    warmup: int = 3,
    progress: bool = True,
) -> LatencyTable:
    """Time every attention level and FFN width of one block, and the dense model, in ``environment``.

    The model itself is only run (never modified); when it is not already on the environment's device in
    its dtype, a random-weight copy of the same shapes is timed instead (weights do not change latency).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    env = environment.resolved()
    env.check_available()
    _check_model(model, env)
    adapter = get_adapter(model)
    dims = adapter.dims(model.config)
    grid = mlp_grid(dims.intermediate_size, mlp_levels)
    attention_levels = [(g, q) for g in range(1, dims.num_kv_heads + 1) for q in range(1, dims.heads_per_group + 1)]
    num_layers = len(adapter.layers(model))
    ids = _random_ids(model, env)
    timing = dict(repeats=repeats, warmup=warmup, device=env.torch_device)
    key = env.key()
    logger.info("measuring the latency table of %s (%s): %d attention levels, %d MLP widths",
                type(model).__name__, key, len(attention_levels), len(grid))

    bar = logging.tqdm(total=len(attention_levels) + len(grid) + 2, desc="latency table", unit="level",
                       disable=not progress)
    clamped: list[str] = []
    attention: dict[tuple[int, int], float] = {}
    mlp: dict[int, float] = {}
    try:
        with _pinned_threads(env.threads), torch.no_grad():
            block_timer = _StackTimer(model, adapter, env, ids, timing, min(num_layers, STACK_DEPTH))
            base = block_timer.time(PruningConfig(drop_attention=[0], drop_mlp=[0]))
            bar.update(1)
            for g, q in attention_levels:
                heads = _removed_heads(dims, g, q)
                total = block_timer.time(PruningConfig(remove_heads={0: heads}, drop_mlp=[0]))
                attention[(g, q)] = _difference(total, base, f"attention {(g, q)}", clamped)
                bar.update(1)
            for n in grid:
                total = block_timer.time(PruningConfig(remove_neurons={0: list(range(n, dims.intermediate_size))},
                                                       drop_attention=[0]))
                mlp[n] = _difference(total, base, f"MLP {n}", clamped)
                bar.update(1)
            del block_timer
            dense_ms = _dense_ms(model, env, ids, timing)
            bar.update(1)
    finally:
        bar.close()
    if clamped:
        logger.warning("%d sublayer time(s) came out negative (timing noise: the sublayer is too small to time "
                       "here) and were set to %g ms: %s. More repeats or a longer seq_len give steadier numbers.",
                       len(clamped), MIN_MS, ", ".join(clamped))
    mlp = monotone(mlp, sorted(mlp))
    G, R = dims.num_kv_heads, dims.heads_per_group
    for _ in range(2):  # more query heads per group, or more groups, never cost less
        for g in range(1, G + 1):
            attention.update(monotone(attention, [(g, q) for q in range(1, R + 1)]))
        for q in range(1, R + 1):
            attention.update(monotone(attention, [(g, q) for g in range(1, G + 1)]))
    per_layer = attention[attention_levels[-1]] + mlp[grid[-1]]
    rest = dense_ms - num_layers * per_layer
    if rest < 0:
        logger.warning("the dense model (%.4f ms) measured faster than its %d blocks timed alone (%.4f ms); "
                       "rest_ms is set to 0", dense_ms, num_layers, num_layers * per_layer)
        rest = 0.0
    return LatencyTable(environment=env, model=model_signature(model), attention=attention, mlp=mlp, rest_ms=rest,
                        dense_ms=dense_ms, num_layers=num_layers, environment_key=key)


def measure_model_ms(model: PreTrainedModel, environment: InferenceEnvironment, *, repeats: int = 20,
                     warmup: int = 3) -> float:
    """Median ms of one forward of ``model`` (pruned or dense) in ``environment`` (prefill, or one decode step).

    Timed exactly as a table's ``dense_ms``, so measured speedups compare with predicted ones. The model must
    already be on the environment's device in its dtype: a pruned model is timed as is.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    env = environment.resolved()
    env.check_available()
    if not _placed(model, env):
        raise ValueError(f"{type(model).__name__} is not on {env.device} in {env.dtype}: move it there first "
                         f"(model.to({env.device!r}, torch.{env.dtype})) so the speedup is measured where it runs")
    _check_inputs(model, env)
    ids = _random_ids(model, env)
    with _pinned_threads(env.threads), torch.no_grad():
        return _dense_ms(model, env, ids, dict(repeats=repeats, warmup=warmup, device=env.torch_device))


@dataclass(frozen=True)
class SpeedupMeasurement:
    """A measured speedup and the timings behind it."""

    speedup: float
    """Median over rounds of (dense ms / pruned ms) within the round."""
    dense_ms: float
    pruned_ms: float
    round_speedups: tuple[float, ...]


def measure_speedup(dense: PreTrainedModel, pruned: PreTrainedModel, environment: InferenceEnvironment, *,
                    rounds: int = 5, repeats: int = 4, warmup: int = 2) -> SpeedupMeasurement:
    """Speedup of ``pruned`` over ``dense`` in ``environment``, timed in alternating rounds.

    Each round times the dense model, then the pruned one (median of ``repeats``); the speedup is the
    median of the per-round ratios. A shared machine drifts by 10% over minutes, so timing the dense
    model once and each pruned model later mistakes drift for speedup; paired rounds cancel it.
    """
    if rounds < 1:
        raise ValueError(f"need rounds >= 1, got {rounds}")
    dense_times, pruned_times, ratios = [], [], []
    for _ in range(rounds):
        d = measure_model_ms(dense, environment, repeats=repeats, warmup=warmup)
        p = measure_model_ms(pruned, environment, repeats=repeats, warmup=warmup)
        dense_times.append(d)
        pruned_times.append(p)
        ratios.append(d / p)
    return SpeedupMeasurement(statistics.median(ratios), statistics.median(dense_times),
                              statistics.median(pruned_times), tuple(ratios))


def _check_model(model: PreTrainedModel, env: InferenceEnvironment) -> None:
    """A dense model whose inputs fit the environment; errors name the fix."""
    structure = PruningConfig.from_model_config(model.config)
    if structure is not None and structure.is_structured:
        raise ValueError(f"latency tables are measured on the dense model, but this {type(model).__name__} already "
                         "has heads, neurons or sublayers removed (its config has a pruning_config); pass the model "
                         "before pruning")
    _check_inputs(model, env)


def _check_inputs(model: PreTrainedModel, env: InferenceEnvironment) -> None:
    """Positions within the model's range, and a decoder for decode mode."""
    needed = env.seq_len + (1 if env.mode == "decode" else 0)
    limit = _max_positions(model)
    if limit is not None and needed > limit:
        extra = " plus the decoded token" if env.mode == "decode" else ""
        raise ValueError(f"seq_len {env.seq_len}{extra} exceeds the model's {limit} positions; use seq_len <= "
                         f"{limit - (needed - env.seq_len)}")
    if env.mode == "decode" and not (is_causal_lm(model) or getattr(model.config, "is_decoder", False)):
        raise ValueError(f"{type(model).__name__} is not a causal decoder, so it has no KV cache to decode with; "
                         "encoders such as BERT support mode='prefill' only (load decoders with AutoModelForCausalLM "
                         "to measure decode)")


def _removed_heads(dims: ModelDims, groups: int, q_per_group: int) -> list[int]:
    """Query heads to remove so that ``groups`` KV groups keep ``q_per_group`` heads each (the GQA rule)."""
    r = dims.heads_per_group
    return [h for h in range(dims.num_heads) if h // r >= groups or h % r >= q_per_group]


def _difference(total: float, base: float, label: str, clamped: list[str]) -> float:
    diff = total - base
    if diff <= 0:
        clamped.append(label)
        return MIN_MS
    return diff


def _random_ids(model: PreTrainedModel, env: InferenceEnvironment) -> torch.Tensor:
    """Seeded random tokens, [batch, seq_len (+1 decoded token)], on the environment's device."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    length = env.seq_len + (1 if env.mode == "decode" else 0)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, config.vocab_size, (env.batch_size, length), generator=generator).to(env.torch_device)


@contextlib.contextmanager
def _pinned_threads(threads: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _median_ms(run: Callable[[], Any], *, repeats: int, warmup: int, device: torch.device,
               reset: Callable[[], None] | None = None) -> float:
    """Median wall-clock ms of ``run`` after ``warmup`` untimed calls; ``reset`` runs untimed after each call."""
    cuda = device.type == "cuda"
    times = []
    for i in range(warmup + repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = (time.perf_counter() - start) * 1e3
        if reset is not None:
            reset()
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


STACK_DEPTH = 16
"""Blocks timed together (fewer if the model has fewer): in context, weights stream as in the full model."""
TABLE_METHOD = "stack-v2"
"""How tables are measured; part of the cache key, so tables measured another way are not reused."""


def _everywhere(template: PruningConfig, depth: int) -> PruningConfig:
    """The structure ``template`` gives block 0, applied to every one of ``depth`` blocks."""
    heads, neurons = template.remove_heads.get(0), template.remove_neurons.get(0)
    return PruningConfig(remove_heads={i: list(heads) for i in range(depth)} if heads else {},
                         remove_neurons={i: list(neurons) for i in range(depth)} if neurons else {},
                         drop_attention=list(range(depth)) if 0 in template.drop_attention else [],
                         drop_mlp=list(range(depth)) if 0 in template.drop_mlp else [])


class _StackTimer:
    """Times a stack of blocks (a random copy ``depth`` blocks deep, the same structure in every block), per block.

    One block timed alone keeps its weights in cache and runs faster than it does inside the model;
    a stack streams them as the full model does, so sublayer times add up the way they do in context.
    """

    def __init__(self, model: PreTrainedModel, adapter: ArchitectureAdapter, env: InferenceEnvironment,
                 ids: torch.Tensor, timing: dict[str, Any], depth: int) -> None:
        self.model = _random_copy(model, env, num_layers=depth)
        self.adapter = adapter
        self.depth = depth
        self.pristine = [copy.deepcopy(b) for b in adapter.layers(self.model)]
        self.env, self.ids, self.timing = env, ids, timing

    def time(self, structure: PruningConfig) -> float:
        """Median ms per block after removing ``structure`` (given for block 0) from every fresh dense block."""
        layers = self.adapter.layers(self.model)
        for i, block in enumerate(self.pristine):
            layers[i] = copy.deepcopy(block)
        self.model.config.num_hidden_layers = self.depth
        apply_structure(self.model, _everywhere(structure, self.depth),
                        current=PruningConfig(num_original_layers=self.depth))
        base = self.model.base_model
        if self.env.mode == "prefill":
            inputs = _forward_inputs(base, self.ids, use_cache=False)
            return _median_ms(lambda: base(**inputs), **self.timing) / self.depth
        cache = _prefill_cache(base, self.ids[:, :self.env.seq_len])
        step = _forward_inputs(base, self.ids[:, self.env.seq_len:], cache=cache, past=self.env.seq_len)
        return _median_ms(lambda: base(**step), reset=functools.partial(_rewind, cache, self.env.seq_len),
                          **self.timing) / self.depth


def monotone(values: dict, order: Sequence) -> dict:
    """Pool-adjacent-violators fit: times non-decreasing along ``order`` (more units never cost less)."""
    blocks: list[list[float]] = []  # [sum, count]
    for key in order:
        blocks.append([values[key], 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    fitted, i = {}, 0
    for total, count in blocks:
        for _ in range(int(count)):
            fitted[order[i]] = total / count
            i += 1
    return fitted


def _forward_inputs(module: nn.Module, ids: torch.Tensor, *, cache: Any = None, past: int = 0,
                    use_cache: bool = True) -> dict[str, Any]:
    """Keyword inputs for a forward over ``ids`` after ``past`` cached tokens (all attended)."""
    inputs: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": torch.ones(ids.shape[0], past + ids.shape[1], dtype=torch.long, device=ids.device),
    }
    if cache is not None:
        inputs["cache" if _accepts(module, "cache") else "past_key_values"] = cache
    if _accepts(module, "use_cache"):
        inputs["use_cache"] = use_cache
    return inputs


def _prefill_cache(module: nn.Module, ids: torch.Tensor) -> Any:
    """The KV cache after a prefill of ``ids``; a model that returns none cannot be timed in decode mode."""
    out = module(**_forward_inputs(module, ids, use_cache=True))
    for name in ("cache", "past_key_values"):
        cache = getattr(out, name, None)
        if cache is not None:
            return cache
    raise ValueError(f"{type(module).__name__} returned no KV cache, so decode mode cannot be measured; use "
                     "mode='prefill' (encoders such as BERT support prefill only)")


def _rewind(cache: Any, length: int) -> None:
    """Crop the cache back to ``length`` tokens, so repeated decode steps all see the same cache length."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _dense_ms(model: PreTrainedModel, env: InferenceEnvironment, ids: torch.Tensor, timing: dict[str, Any]) -> float:
    """Median ms of the full model: ``measure_latency`` for prefill, a cached one-token step for decode."""
    dense = model if _placed(model, env) else None
    if dense is None:
        logger.info("%s is not on %s in %s: timing a random-weight copy of the same shapes",
                    type(model).__name__, env.device, env.dtype)
        dense = _random_copy(model, env)
    if env.mode == "prefill":
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return measure_latency(dense, inputs, repeats=timing["repeats"], warmup=timing["warmup"],
                               threads=env.threads).median_ms
    with _eval_no_grad(dense):
        cache = _prefill_cache(dense, ids[:, :env.seq_len])
        step = _forward_inputs(dense, ids[:, env.seq_len:], cache=cache, past=env.seq_len)
        return _median_ms(lambda: dense(**step), reset=functools.partial(_rewind, cache, env.seq_len), **timing)


def _placed(model: nn.Module, env: InferenceEnvironment) -> bool:
    device, dtype = env.torch_device, env.torch_dtype
    return all(p.device == device and p.dtype == dtype for p in model.parameters())


def _stock_class(model: nn.Module) -> type:
    """The plain transformers class behind a model (the Pruned* subclasses rebuild structure from config)."""
    from ..modeling.modeling_pruned import PrunedModelMixin

    for cls in type(model).__mro__:
        if issubclass(cls, PreTrainedModel) and not issubclass(cls, PrunedModelMixin):
            return cls
    return type(model)


def _random_copy(model: PreTrainedModel, env: InferenceEnvironment, num_layers: int | None = None) -> PreTrainedModel:
    """Random weights, same class and shapes (``num_layers`` deep if given), on the environment's device and dtype."""
    config = copy.deepcopy(model.config)
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
        key = get_adapter(model).layer_types_key
        layer_types = getattr(config, key, None) if key else None
        if isinstance(layer_types, (list, tuple)) and layer_types:
            setattr(config, key, list(layer_types[:num_layers]))
    cls = _stock_class(model)
    device = env.torch_device
    rng_devices = []
    if device.type == "cuda":
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    attn = getattr(config, "_attn_implementation", None)
    kwargs = {"attn_implementation": attn} if attn else {}
    with torch.random.fork_rng(devices=rng_devices):  # a seeded init that leaves the caller's RNG as it was
        torch.manual_seed(0)
        with torch.device(device):
            model = cls._from_config(config, dtype=env.torch_dtype, **kwargs)
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$OPTIMUM_PRUNE_CACHE/latency``, else ``~/.cache/optimum_prune/latency``."""
    root = os.environ.get(CACHE_ENV_VAR)
    return Path(root).expanduser() / "latency" if root else Path.home() / ".cache" / "optimum_prune" / "latency"


def latency_table_path(model: PreTrainedModel, environment: InferenceEnvironment, *,
                       cache_dir: str | os.PathLike | None = None,
                       mlp_levels: int | Sequence[int] | None = None) -> Path:
    """Where ``get_latency_table`` keeps the table for this model, environment and FFN grid."""
    return _cache_path(cache_dir, *_cache_identity(model, environment, mlp_levels))


def _cache_identity(model: PreTrainedModel, environment: InferenceEnvironment,
                    mlp_levels: int | Sequence[int] | None) -> tuple[str, str, list[int]]:
    grid = mlp_grid(get_adapter(model).dims(model.config).intermediate_size, mlp_levels)
    return environment.key(), model_signature(model), grid


def _cache_path(cache_dir: str | os.PathLike | None, key: str, signature: str, grid: list[int]) -> Path:
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    identity = json.dumps([key, signature, grid, TABLE_METHOD]).encode()
    return directory / f"{hashlib.sha256(identity).hexdigest()[:20]}.json"


def get_latency_table(
    model: PreTrainedModel,
    environment: InferenceEnvironment,
    *,
    cache_dir: str | os.PathLike | None = None,
    remeasure: bool = False,
    **kwargs: Any,
) -> LatencyTable:
    """The cached table for this model's shapes, environment and FFN grid, measured and cached when missing.

    ``kwargs`` go to ``measure_latency_table`` (``mlp_levels``, ``repeats``, ``warmup``, ``progress``).
    """
    environment.check_available()
    mlp_levels = kwargs.pop("mlp_levels", None)
    key, signature, grid = _cache_identity(model, environment, mlp_levels)
    path = _cache_path(cache_dir, key, signature, grid)
    if not remeasure and path.exists():
        table = _load_cached(path, key, signature, grid)
        if table is not None:
            logger.info("reusing the latency table cached at %s (pass remeasure=True to measure again)", path)
            return table
    table = measure_latency_table(model, environment, mlp_levels=grid, **kwargs)
    table.save(path)
    logger.info("saved the latency table to %s", path)
    return table


def _load_cached(path: Path, key: str, signature: str, grid: list[int]) -> LatencyTable | None:
    """The table at ``path`` if it is readable and was measured for exactly this key, model and grid."""
    try:
        table = LatencyTable.load(path)
    except (OSError, ValueError) as err:
        logger.warning("ignoring the unreadable cached latency table %s (%s); measuring again", path, err)
        return None
    if (table.environment_key, table.model, table.mlp_grid) != (key, signature, grid):
        logger.warning("the cached latency table %s was measured for another model or environment; measuring again",
                       path)
        return None
    return table


# ------------------------------------------------------------------------------------------- CLI


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``latency`` subcommand on an ``argparse`` subparsers object; returns its parser."""
    from ..loading import DEFAULT_MODEL, EMBEDDED_MODELS, TASKS

    p = subparsers.add_parser("latency", help="measure (or reuse) the ZipLM latency table of a model",
                              description="Time every attention level and FFN width of one block, and the dense "
                                          "model, in an inference environment; cached per environment and model.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"directory, Hub id, .gguf file or embedded model ({', '.join(EMBEDDED_MODELS)})")
    p.add_argument("--gguf-file", help="GGUF file inside --model's directory or repo")
    p.add_argument("--task", choices=list(TASKS), help="model head to load (default: from config.json)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default: float32)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512, help="prefill tokens, or KV-cache length in decode mode")
    p.add_argument("--mode", default="prefill", help="prefill (default) or decode (one token with a KV cache)")
    p.add_argument("--threads", type=int, default=None, help="torch threads while timing (default: torch's count)")
    p.add_argument("--mlp-levels", type=int, default=None, help=f"FFN widths to time (default: {DEFAULT_MLP_LEVELS})")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per level (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per level")
    p.add_argument("--cache-dir",
                   help=f"table cache (default: ${CACHE_ENV_VAR}/latency or ~/.cache/optimum_prune/latency)")
    p.add_argument("--remeasure", action="store_true", help="measure even when a cached table matches")
    p.add_argument("--output", metavar="TABLE.json", help="also write the table here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(command="latency")
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run ``optimum-prune latency``: load, measure or reuse, print, save; 0 on success, 2 on bad input."""
    from ..loading import load_model

    try:
        env = InferenceEnvironment(device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                                   seq_len=args.seq_len, mode=args.mode, threads=args.threads)
        env.check_available()
        model, _, _ = load_model(args.model, gguf_file=args.gguf_file, task=args.task, tokenizer=False,
                                 dtype=env.torch_dtype)
        model.to(env.torch_device)
        path = latency_table_path(model, env, cache_dir=args.cache_dir, mlp_levels=args.mlp_levels)
        before = _mtime(path)
        table = get_latency_table(model, env, cache_dir=args.cache_dir, remeasure=args.remeasure,
                                  mlp_levels=args.mlp_levels, repeats=args.repeats, warmup=args.warmup,
                                  progress=not args.no_progress)
        if args.output:
            table.save(args.output)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table.to_text())
    reused = before is not None and _mtime(path) == before
    print(f"\n{'reused the table cached' if reused else 'measured; cached'} at {path}")
    if args.output:
        print(f"wrote {args.output}")
    return 0


def _mtime(path: Path) -> int | None:
    """Modification time of ``path`` in ns, None when absent (tells the CLI whether a table was reused)."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


__all__ = [
    "DEFAULT_MLP_LEVELS",
    "InferenceEnvironment",
    "LatencyTable",
    "default_cache_dir",
    "get_latency_table",
    "latency_table_path",
    "measure_latency_table",
    "measure_model_ms",
    "measure_speedup",
    "SpeedupMeasurement",
    "mlp_grid",
    "model_signature",
]



def resolve_latency_table(model: PreTrainedModel, latency: Any = None, latency_table: Any = None, *,
                          device: Any = None, progress: bool = True) -> LatencyTable:
    """The table a speedup target refers to: ``latency_table`` (a table, its dict or its JSON file, checked against
    the model), else one measured (or read from the cache) in ``latency`` (an environment or its fields; unset
    device and dtype follow ``device`` or the model)."""
    if latency_table is not None:
        if isinstance(latency_table, LatencyTable):
            table = latency_table
        elif isinstance(latency_table, dict):
            table = LatencyTable.from_dict(latency_table)
        else:
            table = LatencyTable.load(latency_table)
        if table.model != model_signature(model):
            raise ValueError(f"the latency table was measured for {table.model}, not for this model "
                             f"({model_signature(model)}); measure one with `optimum-prune latency`")
        return table
    if isinstance(latency, InferenceEnvironment):
        env = latency
    else:
        fields = dict(latency or {})
        param = next(model.parameters())
        fields.setdefault("device", str(device or param.device))
        fields.setdefault("dtype", str(param.dtype).replace("torch.", ""))
        env = InferenceEnvironment(**fields)
    return get_latency_table(model, env, progress=progress)
