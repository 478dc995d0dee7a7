"""Latency tables timed in llama.cpp: what one attention / MLP sublayer at each level costs in a GGUF file.

A pruned model is exported as llama.cpp's ``deci`` architecture, whose layers each have their own head
counts and FFN width. For each level, a synthetic random-weight ``deci`` file (``export.synthetic``) holds a
fixed first layer (the anchor: 1 head, a 32-neuron FFN; llama.cpp needs heads in layer 0) and then ``D``
layers all at that level, with D = min(model depth, ``STACK_DEPTH``) so that weights stream as in the full
model. Differences of whole-file times, divided by D, give one sublayer:

* MLP with n neurons: the file of D attention-free layers with n-wide FFNs, minus the anchor alone;
* attention with g KV groups x q query heads per group: D layers of that attention with a 32-neuron FFN (the
  deci graph drops the attention output of an FFN-free layer), minus D attention-free layers with the same
  32-neuron FFN.

The dense model's own GGUF export (the real file, in the environment's type) gives ``dense_ms``; the rest
(embeddings, LM head, final norm) is timed as the anchor alone with the model's real vocabulary, minus the anchor
alone with a tiny one. Layers stacked alone time slower than inside the real model, so the sublayer times are
then scaled by one factor that makes rest + depth x (full attention + full MLP) equal ``dense_ms`` (their
ratios, which decide ZipLM's choices, are the synthetic files'; without the scaling, the rest came out as
zero and speedups were over-predicted). All files are timed in one llama.cpp child process in
interleaved rounds and each difference is taken within a round, so drift cancels; files are written and
timed in groups that fit in memory. The self-checks and ``BusyMachineError`` are the torch table's.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedModel
from transformers.utils import logging

from ..modeling.adapters import get_adapter
from ..modeling.pruning_config import ModelDims
from .env_timing import STACK_DEPTH
from .environment import InferenceEnvironment
from .llamacpp_timing import export_for_timing, time_gguf_files
from .table import LatencyTable, mlp_grid
from .table_measure import CHECK_REPEATS, MIN_MS, _check_model, finish_table, measure_steadily

logger = logging.get_logger(__name__)

LLAMACPP_TABLE_METHOD = "llamacpp-deci-stack-v2"
"""How llama.cpp tables are measured; part of their cache key, so tables measured another way are not reused."""

ROUND_REPEATS = 3
"""Timed calls per file in each round (their median is the round's time); the table's ``repeats`` are rounds."""
MEMORY_FRACTION = 0.4
"""Synthetic files timed together may take at most this fraction of the available memory."""
_BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "Q8_0": 1.07}


def measure_llamacpp_table(
    model: PreTrainedModel,
    environment: InferenceEnvironment,
    *,
    mlp_levels: int | Sequence[int] | None = None,
    repeats: int = 10,
    warmup: int = 3,
    progress: bool = True,
    check: bool = True,
    attempts: int = 3,
) -> LatencyTable:
    """Time every attention level and FFN width of one layer, and the dense model, in llama.cpp (see the module).

    ``repeats`` rounds over all files (each file: the median of ``ROUND_REPEATS`` calls after one warm-up per
    round, ``warmup`` untimed calls once after loading). With ``check`` (and at least ``CHECK_REPEATS`` rounds)
    a disturbed measurement is taken again, up to ``attempts`` times, then refused with ``BusyMachineError``.
    """
    from ..export import plan_export
    from ..export.synthetic import RandomWeights, SyntheticShape

    if repeats < 1 or warmup < 0 or attempts < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0 and attempts >= 1, got {repeats}, {warmup}, {attempts}")
    env = environment.resolved()
    if not env.llamacpp:
        raise ValueError(f"measure_llamacpp_table times in llama.cpp; the environment's engine is {env.engine!r}")
    env.check_available()
    _check_model(model, env)
    plan = plan_export(model)  # a family llama.cpp cannot run fails here, naming why
    adapter = get_adapter(model)
    dims = adapter.dims(model.config)
    grid = mlp_grid(dims.intermediate_size, mlp_levels)
    attention_levels = [(g, q) for g in range(1, dims.num_kv_heads + 1) for q in range(1, dims.heads_per_group + 1)]
    num_layers = len(adapter.layers(model))
    depth = min(num_layers, STACK_DEPTH)
    key = env.key()
    logger.info("measuring the llama.cpp latency table of %s (%s): %d attention levels, %d MLP widths, %d-layer "
                "files", type(model).__name__, key, len(attention_levels), len(grid), depth)
    with tempfile.TemporaryDirectory(prefix="optimum_prune_llamacpp_table_") as work:
        probes = _Probes(Path(work), env, SyntheticShape.of(plan), depth, RandomWeights(seed=0), plan.vocab_size)
        bar = logging.tqdm(total=len(attention_levels) + len(grid) + 4, desc="llama.cpp latency files",
                           unit="file", disable=not progress)
        try:
            dense = export_for_timing(model, work, env, "dense")
            bar.update(1)
            levels = [("attention", level) for level in attention_levels] + [("mlp", n) for n in grid]
            groups = _groups(levels, probes, dense.stat().st_size, dims, env)
            if len(groups) == 1:  # everything fits at once: write the files once, for every attempt
                for kind, level in levels:
                    probes.path(kind, level)
                    bar.update(1)
                probes.path("base", 0), probes.path("reference", 0), probes.path("head", 0)
                bar.update(3)
        finally:
            bar.close()
        raw = measure_steadily(
            lambda label: _measure_once(probes, dense, groups, depth, repeats, warmup, label, progress),
            dims, num_layers, check=check and repeats >= CHECK_REPEATS, attempts=attempts)
    return finish_table(_calibrated(raw, num_layers, attention_levels[-1], grid[-1]), model, env, dims, grid,
                        attention_levels, num_layers, key)


def _calibrated(raw: dict, num_layers: int, full_attention: tuple[int, int], full_mlp: int) -> dict:
    """Sublayer times scaled so that the measured rest plus every dense layer gives the dense file's time."""
    per_layer = raw["attention"][full_attention] + raw["mlp"][full_mlp]
    rest = min(max(raw["rest_ms"], 0.0), raw["dense_ms"])
    scale = (raw["dense_ms"] - rest) / (num_layers * per_layer) if per_layer > 0 else 1.0
    if not 0 < scale < float("inf"):
        return raw
    logger.info("llama.cpp table: rest %.4f ms; sublayer times scaled by %.3f to the dense file's %.4f ms",
                rest, scale, raw["dense_ms"])
    return {**raw, "attention": {k: v * scale for k, v in raw["attention"].items()},
            "mlp": {k: v * scale for k, v in raw["mlp"].items()}, "scale": scale}


class _Probes:
    """The synthetic files of one table, written on first use (see the module docstring)."""

    def __init__(self, directory: Path, env: InferenceEnvironment, shape, depth: int, weights,
                 vocab_size: int = 256) -> None:
        self.directory, self.env, self.shape, self.depth, self.weights = directory, env, shape, depth, weights
        self.vocab_size = vocab_size
        """The model's real vocabulary (the "head" file)."""
        self.written: dict[tuple[str, object], Path] = {}

    def layers(self, kind: str, level: object) -> list:
        """The per-layer shapes of the file for ``kind`` ('attention', 'mlp', 'base', 'reference') at ``level``."""
        from ..export.plan import ZERO_FFN_WIDTH, LayerPlan

        anchor = LayerPlan(0, 1, 1, ZERO_FFN_WIDTH, "full", "zero")
        if kind in ("base", "head"):  # "head": the same file with the model's real vocabulary
            return [anchor]
        if kind == "reference":
            return [anchor] + [LayerPlan(0, 0, 0, ZERO_FFN_WIDTH, "none", "zero")] * self.depth
        if kind == "attention":
            groups, per_group = level
            return [anchor] + [LayerPlan(0, groups * per_group, groups, ZERO_FFN_WIDTH, "full", "zero")] * self.depth
        return [anchor] + [LayerPlan(0, 0, 0, int(level), "none", "full")] * self.depth

    def weights_of(self, kind: str, level: object) -> int:
        """Weights of the file's layers (for the memory plan)."""
        d, head_dim = self.shape.hidden_size, self.shape.head_dim
        return sum(d * head_dim * (2 * layer.n_head + 2 * layer.n_head_kv) + 3 * d * layer.n_ff
                   for layer in self.layers(kind, level))

    def path(self, kind: str, level: object) -> Path:
        from dataclasses import replace

        from ..export.synthetic import write_synthetic_gguf

        if (kind, level) not in self.written:
            name = f"{kind}_{level[0]}x{level[1]}" if kind == "attention" else f"{kind}_{level}"
            self.written[(kind, level)] = write_synthetic_gguf(
                self.directory / f"{name}.gguf", self.layers(kind, level),
                replace(self.shape, vocab_size=self.vocab_size) if kind == "head" else self.shape,
                dtype=self.env.dtype,
                weights=self.weights)
        return self.written[(kind, level)]

    def drop(self, kind: str, level: object) -> None:
        path = self.written.pop((kind, level), None)
        if path is not None:
            path.unlink(missing_ok=True)


def _available_bytes() -> int:
    """MemAvailable from /proc/meminfo (else 8 GiB): how much the timed files may occupy."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 * 2**30


def _groups(levels: list[tuple[str, object]], probes: _Probes, dense_bytes: int, dims: ModelDims,
            env: InferenceEnvironment) -> list[list[tuple[str, object]]]:
    """Levels split into groups whose files (plus the dense file and the two references) fit in memory."""
    per_weight = _BYTES_PER_WEIGHT.get(env.dtype, 0.75)
    budget = MEMORY_FRACTION * _available_bytes() - dense_bytes - per_weight * (
        probes.weights_of("base", 0) + probes.weights_of("reference", 0)
        + 2 * probes.vocab_size * probes.shape.hidden_size)  # the "head" file: embeddings and output
    groups: list[list[tuple[str, object]]] = [[]]
    used = 0.0
    for level in levels:
        size = per_weight * probes.weights_of(*level)
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0.0
        groups[-1].append(level)
        used += size
    return groups


def _measure_once(probes: _Probes, dense: Path, groups: list[list[tuple[str, object]]], depth: int, rounds: int,
                  warmup: int, label: str, progress: bool) -> dict:
    """One pass over the groups: per-round differences to the references, medians over rounds; the dense file is
    timed in the first and the last group (its first- and last-half medians are the before / after check)."""
    bar = logging.tqdm(total=len(groups), desc=label, unit="group", disable=not progress)
    attention: dict[tuple[int, int], float] = {}
    mlp: dict[int, float] = {}
    diffs: dict[str, float] = {}
    dense_rounds: list[list[float]] = []
    rests: list[float] = []
    try:
        for index, group in enumerate(groups):
            with_dense = index in (0, len(groups) - 1)
            files = [probes.path("base", 0), probes.path("reference", 0), probes.path("head", 0)] + [
                probes.path(*lv) for lv in group]
            if with_dense:
                files.append(dense)
            ms = time_gguf_files(files, probes.env, rounds=rounds, repeats=ROUND_REPEATS, warmup=1,
                                 preheat=warmup)
            rests.extend(row[2] - row[0] for row in ms)
            for i, (kind, level) in enumerate(group, start=3):
                ref = 0 if kind == "mlp" else 1
                diff = statistics.median((row[i] - row[ref]) / depth for row in ms)
                if kind == "mlp":
                    mlp[level] = max(diff, MIN_MS)
                    diffs[f"MLP {level}"] = diff
                else:
                    attention[level] = max(diff, MIN_MS)
                    diffs[f"attention {level}"] = diff
            if with_dense:
                dense_rounds.append([row[-1] for row in ms])
            if len(groups) > 1:
                for level in group:
                    probes.drop(*level)
            bar.update(1)
    finally:
        bar.close()
    first, last = dense_rounds[0], dense_rounds[-1]
    half = max(len(first) // 2, 1)
    before = statistics.median(first[:half])
    after = statistics.median(last[half:] or last)
    dense_ms = statistics.median(t for rounds_ in dense_rounds for t in rounds_)
    return {"attention": attention, "mlp": mlp, "diffs": diffs, "base": 0.0, "dense_ms": dense_ms,
            "dense_before": before, "dense_after": after, "rest_ms": statistics.median(rests)}

