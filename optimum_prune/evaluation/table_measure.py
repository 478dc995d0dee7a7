"""Measuring a latency table: every attention level and FFN width of one block, and the dense model.

The table builds a random-weight stack of blocks (values do not change latency), removes structure with the
project's surgery to reach each level, and times it on random tokens in the environment. The sublayer cost
at a level is the block time at that level minus the time of the block with both sublayers removed;
everything else (embeddings, final norm, LM head, residual plumbing) is ``rest_ms``, the dense model's
measured time minus the per-block sums.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel
from transformers.utils import logging

from ..modeling.adapters import get_adapter
from ..modeling.pruning_config import ModelDims, PruningConfig
from .env_timing import STACK_DEPTH, StackTimer, check_inputs, random_ids, time_model
from .environment import InferenceEnvironment
from .table import LatencyTable, mlp_grid, model_signature
from .timing import pinned_threads

logger = logging.get_logger(__name__)

MIN_MS = 1e-6
"""What a negative (noise-dominated) sublayer time is clamped to, so that removing a sublayer still pays."""


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
    ids = random_ids(model, env)
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
        with pinned_threads(env.threads), torch.no_grad():
            block_timer = StackTimer(model, adapter, env, ids, timing, min(num_layers, STACK_DEPTH))
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
            dense_ms = time_model(model, env, ids, timing)
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


def _check_model(model: PreTrainedModel, env: InferenceEnvironment) -> None:
    """A dense model whose inputs fit the environment; errors name the fix."""
    structure = PruningConfig.from_model_config(model.config)
    if structure is not None and structure.is_structured:
        raise ValueError(f"latency tables are measured on the dense model, but this {type(model).__name__} already "
                         "has heads, neurons or sublayers removed (its config has a pruning_config); pass the model "
                         "before pruning")
    check_inputs(model, env)


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
