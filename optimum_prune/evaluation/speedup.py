"""Measured speedups: a model's forward timed in an environment, and a pruned model against its dense one."""

from __future__ import annotations

import statistics

import torch
from transformers import PreTrainedModel

from .env_timing import check_inputs, placed, random_ids, time_model
from .environment import InferenceEnvironment
from .timing import SpeedupMeasurement, pinned_threads


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
                    rounds: int = 5, repeats: int = 4, warmup: int = 2) -> SpeedupMeasurement:
    """Speedup of ``pruned`` over ``dense`` in ``environment``, timed in alternating rounds.

    Each round times the dense model, then the pruned one (median of ``repeats``); the speedup is the
    median of the per-round ratios. A shared machine drifts by 10% over minutes, so timing the dense
    model once and each pruned model later mistakes drift for speedup; paired rounds cancel it. With
    engine="llama.cpp" both models are exported to GGUF (the environment's type) and timed in llama.cpp.
    """
    if rounds < 1:
        raise ValueError(f"need rounds >= 1, got {rounds}")
    if environment.llamacpp:  # both GGUF exports loaded in one llama.cpp process, timed in the same paired rounds
        from .llamacpp_timing import measure_gguf_speedup

        return measure_gguf_speedup(dense, pruned, environment, rounds=rounds, repeats=repeats, warmup=warmup)
    dense_times, pruned_times, ratios = [], [], []
    for _ in range(rounds):
        d = measure_model_ms(dense, environment, repeats=repeats, warmup=warmup)
        p = measure_model_ms(pruned, environment, repeats=repeats, warmup=warmup)
        dense_times.append(d)
        pruned_times.append(p)
        ratios.append(d / p)
    return SpeedupMeasurement(statistics.median(ratios), statistics.median(dense_times),
                              statistics.median(pruned_times), tuple(ratios))
