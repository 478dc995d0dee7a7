"""Measured speedups: a model's forward timed in an environment, and a pruned model against its dense one."""

from __future__ import annotations

import statistics

import torch
from transformers import PreTrainedModel

from transformers.utils import logging

from .contention import CHECK_FLOOR_MS, BusyMachineError, CpuMeter
from .env_timing import check_inputs, placed, random_ids, time_model
from .environment import InferenceEnvironment
from .timing import SpeedupMeasurement, pinned_threads

logger = logging.get_logger(__name__)

SPREAD_TOLERANCE = 0.2
"""Paired rounds may give speedups (or dense times) that differ by at most this fraction of their median."""


def measure_model_ms(model: PreTrainedModel, environment: InferenceEnvironment, *, repeats: int = 20,
                     warmup: int = 3) -> float:
    """Median ms of one forward of ``model`` (pruned or dense) in ``environment`` (prefill, or one decode step).

    Timed exactly as a table's ``dense_ms``, so measured speedups compare with predicted ones. The model must
    already be on the environment's device in its dtype: a pruned model is timed as is. With engine="llama.cpp",
    its GGUF export is timed in llama.cpp.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if environment.llamacpp:  # the model's GGUF export, timed in llama.cpp
        from .llamacpp_timing import measure_gguf_model_ms

        return measure_gguf_model_ms(model, environment, repeats=repeats, warmup=warmup)
    env = environment.resolved()
    env.check_available()
    if not placed(model, env):
        raise ValueError(f"{type(model).__name__} is not on {env.device} in {env.dtype}: move it there first "
                         f"(model.to({env.device!r}, torch.{env.dtype})) so the speedup is measured where it runs")
    check_inputs(model, env)
    ids = random_ids(model, env)
    with pinned_threads(env.threads), torch.no_grad():
        return time_model(model, env, ids, dict(repeats=repeats, warmup=warmup, device=env.torch_device))


def measure_speedup(dense: PreTrainedModel, pruned: PreTrainedModel, environment: InferenceEnvironment, *,
                    rounds: int = 5, repeats: int = 4, warmup: int = 2, check: bool = True,
                    attempts: int = 3) -> SpeedupMeasurement:
    """Speedup of ``pruned`` over ``dense`` in ``environment``, timed in alternating rounds.

    Each round times the dense model, then the pruned one (median of ``repeats``); the speedup is the
    median of the per-round ratios. A shared machine drifts by 10% over minutes, so timing the dense
    model once and each pruned model later mistakes drift for speedup; paired rounds cancel it. With
    ``check``, a measurement that looks disturbed (other processes took cores our threads needed, or the rounds
    disagree) is taken again, up to ``attempts`` times in all. Other work still on the cores at the last attempt
    is refused with ``BusyMachineError`` (a speedup timed on a busy machine is the scheduler's, and re-aiming on it
    misses the target); rounds that stay uneven with no other work seen are this machine's own noise, and the
    median of all the undisturbed rounds is kept, with a warning. With engine="llama.cpp"
    both models are exported to GGUF (the environment's type) and timed in llama.cpp.
    """
    if rounds < 1 or attempts < 1:
        raise ValueError(f"need rounds >= 1 and attempts >= 1, got {rounds} and {attempts}")
    if environment.llamacpp:  # both GGUF exports loaded in one llama.cpp process, timed in the same paired rounds
        from .llamacpp_timing import measure_gguf_speedup

        return measure_gguf_speedup(dense, pruned, environment, rounds=rounds, repeats=repeats, warmup=warmup)
    env = environment.resolved()
    dense_all: list[float] = []
    pruned_all: list[float] = []
    ratios_all: list[float] = []
    for attempt in range(1, attempts + 1):
        dense_times, pruned_times, ratios = [], [], []
        with CpuMeter() as meter:
            for _ in range(rounds):
                d = measure_model_ms(dense, env, repeats=repeats, warmup=warmup)
                p = measure_model_ms(pruned, env, repeats=repeats, warmup=warmup)
                dense_times.append(d)
                pruned_times.append(p)
                ratios.append(d / p)
        busy, unsteady = speedup_disturbances(ratios, dense_times, meter, env) if check else (None, [])
        if busy is None:  # rounds timed while other work took our cores are dropped, not averaged in
            dense_all += dense_times
            pruned_all += pruned_times
            ratios_all += ratios
        if busy is None and not unsteady:
            break
        found = ([busy] if busy else []) + unsteady
        if attempt < attempts:
            logger.warning("the speedup measurement looks disturbed (%s); measuring again", "; ".join(found))
        elif busy is not None:
            raise BusyMachineError(
                f"the speedup could not be measured steadily in {attempts} attempts ({'; '.join(found)}): the "
                "machine looks busy. Measure on an idle machine (stop other work, or use fewer threads with "
                "latency=dict(threads=...)), or pass measure_speedup=False (--no-measure-speedup) to skip the check")
        else:  # no other work on the cores: this machine's own noise, which more paired rounds average out
            logger.warning("the paired timing rounds stayed uneven (%s) with no other work seen on the cores; the "
                           "median of all %d rounds is used", "; ".join(unsteady), len(ratios_all))
    return SpeedupMeasurement(statistics.median(ratios_all), statistics.median(dense_all),
                              statistics.median(pruned_all), tuple(ratios_all))


def speedup_disturbances(ratios: list[float], dense_times: list[float], meter: CpuMeter,
                         env: InferenceEnvironment) -> tuple[str | None, list[str]]:
    """Other work on the cores our threads need (None: none seen), and how the rounds disagree (empty: steady)."""
    if min(dense_times) < CHECK_FLOOR_MS:
        return None, []  # too fast to tell noise from disturbance
    share = meter.share
    busy = share.describe() if share is not None and env.torch_device.type == "cpu" and \
        share.contended(env.threads) else None
    unsteady, middle = [], statistics.median(ratios)
    if max(ratios) - min(ratios) > SPREAD_TOLERANCE * middle:
        unsteady.append(f"the paired rounds gave speedups from {min(ratios):.3f}x to {max(ratios):.3f}x")
    if max(dense_times) - min(dense_times) > SPREAD_TOLERANCE * statistics.median(dense_times):
        unsteady.append(f"the dense model timed {min(dense_times):.4g} to {max(dense_times):.4g} ms across rounds")
    return busy, unsteady
