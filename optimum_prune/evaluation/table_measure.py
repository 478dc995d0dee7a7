"""Measuring a latency table: every attention level and FFN width of one block, and the dense model.

The table builds a random-weight stack of blocks (values do not change latency), removes structure with the
project's surgery to reach each level, and times it on random tokens in the environment. The sublayer cost
at a level is the block time at that level minus the time of the block with both sublayers removed;
everything else (embeddings, final norm, LM head, residual plumbing) is ``rest_ms``, the dense model's
measured time minus the per-block sums.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel
from transformers.utils import logging

from ..modeling.adapters import get_adapter
from ..modeling.pruning_config import ModelDims, PruningConfig
from .contention import CHECK_FLOOR_MS, BusyMachineError, CpuMeter
from .env_timing import STACK_DEPTH, StackTimer, check_inputs, random_ids, time_model
from .environment import InferenceEnvironment
from .table import LatencyTable, mlp_grid, model_signature
from .timing import pinned_threads

logger = logging.get_logger(__name__)

MIN_MS = 1e-6
"""What a negative (noise-dominated) sublayer time is clamped to, so that removing a sublayer still pays."""


DROP_TOLERANCE = 0.25
"""A sublayer time may come out negative, or fall as units are added, by at most this fraction of a full block."""
DENSE_TOLERANCE = 0.25
"""Dense-model timings before and after the table may differ by at most this fraction."""
CHECK_REPEATS = 5
"""With fewer timed runs per level the medians are too coarse to judge, and the checks are skipped."""


def measure_latency_table(
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
    """Time every attention level and FFN width of one block, and the dense model, in ``environment``.

    The model itself is only run (never modified); when it is not already on the environment's device in
    its dtype, a random-weight copy of the same shapes is timed instead (weights do not change latency).
    With ``check`` (and at least ``CHECK_REPEATS`` repeats), a measurement that looks disturbed (sublayer times clearly negative or falling as units
    are added, dense timings before and after that disagree, blocks alone slower than the whole model) is
    taken again, up to ``attempts`` times in all, then refused with ``BusyMachineError``.
    """
    if repeats < 1 or warmup < 0 or attempts < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0 and attempts >= 1, got {repeats}, {warmup}, {attempts}")
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
    raw = measure_steadily(
        lambda label: _measure_once(model, adapter, dims, env, ids, timing, attention_levels, grid, num_layers,
                                    progress=progress, label=label),
        dims, num_layers, check=check and repeats >= CHECK_REPEATS, attempts=attempts)
    return finish_table(raw, model, env, dims, grid, attention_levels, num_layers, key)


def measure_steadily(measure_once: Callable[[str], dict], dims: ModelDims, num_layers: int, *, check: bool,
                     attempts: int) -> dict:
    """``measure_once(label)`` until its raw measurement shows no ``disturbances`` (``attempts`` in all), else
    ``BusyMachineError``; shared by the torch and the llama.cpp tables."""
    found: list[str] = []
    for attempt in range(1, attempts + 1):
        raw = measure_once("latency table" + (f" (attempt {attempt})" if attempt > 1 else ""))
        found = disturbances(raw, dims, num_layers) if check else []
        if not found:
            return raw
        logger.warning("the latency measurement looks disturbed (%s)%s", "; ".join(found),
                       "; measuring again" if attempt < attempts else "")
    raise BusyMachineError(
        f"the latency table could not be measured steadily in {attempts} attempts ({'; '.join(found)}): the "
        "machine looks busy. Measure on an idle machine (stop other work, or pin threads with "
        "latency=dict(threads=...)), or pass latency_table= a table measured elsewhere")


def finish_table(raw: dict, model: PreTrainedModel, env: InferenceEnvironment, dims: ModelDims, grid: list[int],
                 attention_levels: list[tuple[int, int]], num_layers: int, key: str) -> LatencyTable:
    """The table from one steady raw measurement: noise clamped, times made monotone, the rest of the model."""
    attention, mlp, dense_ms = raw["attention"], raw["mlp"], raw["dense_ms"]
    clamped = [label for label, diff in raw["diffs"].items() if diff <= 0]
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


def _measure_once(model, adapter, dims: ModelDims, env: InferenceEnvironment, ids: torch.Tensor, timing: dict,
                  attention_levels: list[tuple[int, int]], grid: list[int], num_layers: int, *, progress: bool,
                  label: str) -> dict:
    """One pass: the dense model, every level (raw differences to the sublayer-free block), the dense model again."""
    bar = logging.tqdm(total=len(attention_levels) + len(grid) + 3, desc=label, unit="level", disable=not progress)
    diffs: dict[str, float] = {}
    attention: dict[tuple[int, int], float] = {}
    mlp: dict[int, float] = {}
    try:
        with pinned_threads(env.threads), torch.no_grad(), CpuMeter() as meter:
            dense_before = time_model(model, env, ids, timing)
            bar.update(1)
            block_timer = StackTimer(model, adapter, env, ids, timing, min(num_layers, STACK_DEPTH))
            base = block_timer.time(PruningConfig(drop_attention=[0], drop_mlp=[0]))
            bar.update(1)
            for g, q in attention_levels:
                total = block_timer.time(PruningConfig(remove_heads={0: _removed_heads(dims, g, q)}, drop_mlp=[0]))
                diffs[f"attention {(g, q)}"] = total - base
                attention[(g, q)] = max(total - base, MIN_MS)
                bar.update(1)
            for n in grid:
                total = block_timer.time(PruningConfig(remove_neurons={0: list(range(n, dims.intermediate_size))},
                                                       drop_attention=[0]))
                diffs[f"MLP {n}"] = total - base
                mlp[n] = max(total - base, MIN_MS)
                bar.update(1)
            del block_timer
            dense_ms = time_model(model, env, ids, timing)
            if dense_before - dense_ms > DENSE_TOLERANCE * dense_ms:
                # the first timing after loading can run 20-40% slow on an idle machine (other work is caught by the
                # CPU meter): time once more, and keep the drift only if the dense model still times differently
                dense_before = time_model(model, env, ids, timing)
            bar.update(1)
    finally:
        bar.close()
    return {"attention": attention, "mlp": mlp, "diffs": diffs, "base": base, "dense_ms": dense_ms,
            "dense_before": dense_before, "contention": contention(meter, env)}


def contention(meter: CpuMeter, env: InferenceEnvironment) -> str | None:
    """What other work did to a CPU measurement in ``meter``'s window, when it took cores our threads needed."""
    share = meter.share
    if share is None or env.torch_device.type != "cpu" or not share.contended(env.threads):
        return None
    return share.describe()


def dense_disagreement(model: PreTrainedModel, table: LatencyTable, *, repeats: int = 5, warmup: int = 2) -> str | None:
    """Time the dense model now, as ``table`` timed it: None when the two agree (or are too fast to judge), else
    the disagreement in words. ``BusyMachineError`` when other work takes the cores right now."""
    env = table.environment.resolved()
    ids = random_ids(model, env)
    timing = dict(repeats=repeats, warmup=warmup, device=env.torch_device)
    with pinned_threads(env.threads), torch.no_grad(), CpuMeter() as meter:
        now = time_model(model, env, ids, timing)
        if abs(now - table.dense_ms) > DENSE_TOLERANCE * min(now, table.dense_ms):
            now = time_model(model, env, ids, timing)  # the first timing after loading can run slow
    if min(now, table.dense_ms) < CHECK_FLOOR_MS:
        return None
    busy = contention(meter, env)
    if busy:
        raise BusyMachineError(f"the machine looks busy ({busy}), so speedups timed now would be the scheduler's. "
                               "Measure on an idle machine (stop other work, or use fewer threads with "
                               "latency=dict(threads=...))")
    if abs(now - table.dense_ms) <= DENSE_TOLERANCE * min(now, table.dense_ms):
        return None
    return f"the latency table timed the dense model at {table.dense_ms:.4g} ms, and it times {now:.4g} ms now"


def disturbances(raw: dict, dims: ModelDims, num_layers: int) -> list[str]:
    """What in one raw measurement says the machine was disturbed (empty: it looks steady)."""
    dense, before = raw.get("dense_after", raw["dense_ms"]), raw["dense_before"]
    if min(dense, before) < CHECK_FLOOR_MS:
        return []  # too fast to tell noise from disturbance
    found = [raw["contention"]] if raw.get("contention") else []
    if abs(dense - before) > DENSE_TOLERANCE * min(dense, before):
        found.append(f"the dense model timed {before:.4g} ms before the table and {dense:.4g} ms after")
    attention, mlp = raw["attention"], raw["mlp"]
    full_attention = (dims.num_kv_heads, dims.heads_per_group)
    block = raw["base"] + attention[full_attention] + mlp[max(mlp)]
    slack = DROP_TOLERANCE * block
    negative = [label for label, diff in raw["diffs"].items() if diff < -slack]
    if negative:
        found.append(f"{len(negative)} sublayer time(s) clearly negative ({', '.join(negative)})")
    falls = _falls(mlp, sorted(mlp), slack, "MLP")
    for g in range(1, dims.num_kv_heads + 1):
        falls += _falls(attention, [(g, q) for q in range(1, dims.heads_per_group + 1)], slack, "attention")
    for q in range(1, dims.heads_per_group + 1):
        falls += _falls(attention, [(g, q) for g in range(1, dims.num_kv_heads + 1)], slack, "attention")
    if falls:
        found.append(f"times fall as units are added ({', '.join(dict.fromkeys(falls))})")
    if num_layers * (attention[full_attention] + mlp[max(mlp)]) > (1 + DENSE_TOLERANCE) * dense:
        found.append(f"the blocks timed alone ({num_layers * (attention[full_attention] + mlp[max(mlp)]):.4g} ms) "
                     f"exceed the whole model ({dense:.4g} ms)")
    return found


def _falls(values: dict, order: list, slack: float, label: str) -> list[str]:
    """Keys along ``order`` whose time is more than ``slack`` below an earlier (smaller) level's."""
    out, highest = [], None
    for key in order:
        if highest is not None and values[key] < highest - slack:
            out.append(f"{label} {key}")
        highest = values[key] if highest is None else max(highest, values[key])
    return out


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
