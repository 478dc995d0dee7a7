"""ZipLM end to end: level database → per-target search under the latency table → stitched models.

One database (one sequential pass over the dense model) serves every target, so a family of models
for several speedups costs one calibration pass plus one search per target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from transformers.utils import logging
from transformers.utils.logging import tqdm

from ...engine.sequential import SequentialOptions
from ...engine.structure.database import LevelDatabase, build_database
from ...engine.structure.search import (Item, Stitcher, budget_for, check_targets, chosen_levels, dp_select, items_from,
                                        predicted_ms, probe_coefficients, reachable_range, refine)
from ...evaluation.prefix_cache import PrefixCache
from ...evaluation.scorer import CalibrationScorer
from ...modeling.pruning_config import PruningConfig
from ...modeling.surgery import current_structure

logger = logging.get_logger(__name__)


@dataclass
class ZipLMSettings:
    """Search settings; the defaults suit models up to a few billion parameters on one device."""

    search_iterations: int = 30
    """Randomized refinement steps per target (0: the DP's choice on OBS losses alone)."""
    search_samples: int = 8
    """Calibration windows used to score candidates (KL to the dense model; output error for encoders)."""
    probe_samples: int = 4
    """Calibration windows for the per-sublayer sensitivity probes (0: no probes, raw coefficients of 1)."""
    top_k: int = 100
    """Top-K KL (bounded memory for large vocabularies)."""
    resolution: int = 2000
    """Time grid of the DP."""
    dampening: float = 0.01
    seed: int = 0
    speedup_tolerance: float = 0.03
    """With a measuring function: re-aim while the measured speedup misses the target by more than this."""
    max_corrections: int = 3
    obs_steps: int = 2048
    """Greedy OBS steps per FFN in the level database (wider FFNs remove several neurons per step)."""
    database_memory: int | None = None
    """Bytes of the level database's Hessians kept in memory; the rest are memory-mapped files (None: all kept)."""


@dataclass
class ZipLMOutcome:
    """One target's pruned model and how it was chosen."""

    target: float
    model: nn.Module
    structure: PruningConfig
    levels: dict[int, dict[str, Any]]
    predicted_speedup: float
    estimated_loss: float
    score: float | None
    search: dict[str, Any] = field(default_factory=dict)
    measured_speedup: float | None = None


def run_ziplm(model: nn.Module, input_ids: torch.Tensor, targets: list[float], table, *,
              settings: ZipLMSettings | None = None, options: SequentialOptions | None = None,
              database: LevelDatabase | None = None, measure: Callable[[nn.Module], float] | None = None
              ) -> tuple[dict[float, ZipLMOutcome], LevelDatabase]:
    """Prune ``model`` (dense, left unchanged) to each target speedup of ``table``; returns the outcomes.

    ``measure(pruned) -> speedup`` closes the loop: when the measured speedup misses the target by more
    than ``settings.speedup_tolerance``, the DP is re-solved (same refined coefficients) for a target
    corrected by the miss, up to ``settings.max_corrections`` times; the closest model is kept.
    """
    settings = settings or ZipLMSettings()
    options = options or SequentialOptions()
    if not current_structure(model).is_empty:
        raise ValueError("ZipLM starts from a model without removed structures; load the dense model "
                         "(the latency table and the level database refer to its full dimensions)")
    check_targets(targets, table)  # before the (long) database pass
    if database is None:
        database = build_database(model, input_ids, mlp_kept=sorted(table.mlp), dampening=settings.dampening,
                                  options=options, obs_steps=settings.obs_steps,
                                  spill_above=settings.database_memory)
    items = items_from(database, table)
    low, high = reachable_range(table)
    stitcher = Stitcher(model, database)
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(input_ids.shape[0], generator=generator)
    score_ids = input_ids[order[: settings.search_samples]]
    holdout_ids = input_ids[order[settings.search_samples: 2 * settings.search_samples]]
    scorer = (CalibrationScorer(model, score_ids, settings.top_k, options.batch_size)
              if settings.search_iterations else None)
    holdout = (CalibrationScorer(model, holdout_ids, settings.top_k, options.batch_size)
               if scorer is not None and holdout_ids.shape[0] > 0 else None)
    coefficients = sensitivity(model, items, stitcher, database, input_ids, settings, options)
    outcomes: dict[float, ZipLMOutcome] = {}
    for target in targets:
        budget = budget_for(target, items, table)
        bar = tqdm(total=settings.search_iterations, desc=f"ZipLM search {target:g}x", disable=not options.progress)

        def score(picked: list[int]) -> float:
            candidate = stitcher.build(items, picked)
            value = scorer(candidate)
            del candidate
            return value

        def tick(iteration: int, best: float) -> None:
            bar.update(1)
            bar.set_postfix(score=f"{best:.4g}")

        result = refine(items, budget, score, iterations=settings.search_iterations, seed=settings.seed,
                        resolution=settings.resolution, progress=tick, initial=coefficients)
        bar.close()
        check = _holdout_check(result, items, stitcher, holdout)
        picked, score_value = result.picked, result.score
        pruned = stitcher.build(items, picked)
        measured, aims = None, {"aimed_at": [target], "aim": target}
        if measure is not None:
            picked, pruned, measured, aims = _hit_measured(target, items, table, stitcher, result, settings,
                                                           measure, pruned, options.progress)
        if scorer is not None and (score_value is None or picked != result.picked):
            score_value = scorer(pruned)
        structure = stitcher.structure(items, picked)
        levels = chosen_levels(items, picked)
        estimated = sum(item.losses[j] for item, j in zip(items, picked))
        predicted = table.dense_ms / predicted_ms(items, picked, table)
        search = {"method": "ziplm", "target_speedup": target, "predicted_speedup": round(predicted, 4),
                  "reachable_speedup": [round(low, 3), round(high, 3)], "search_iterations": settings.search_iterations,
                  "evaluations": result.evaluations, "accepted": result.accepted, **check, **aims,
                  "score": score_value, "score_metric": ("top-%d KL" % settings.top_k) if scorer is not None and
                  scorer.causal else "relative output error", "seed": settings.seed}
        logger.info("ZipLM %gx: predicted %.3fx, score %s", target, predicted, result.score)
        outcomes[target] = ZipLMOutcome(target, pruned, structure, levels, predicted, estimated, score_value, search,
                                        measured)
    return outcomes, database


def sensitivity(model: nn.Module, items: list[Item], stitcher: Stitcher, database: LevelDatabase,
                input_ids: torch.Tensor, settings: ZipLMSettings, options: SequentialOptions) -> list[float] | None:
    """Probed per-sublayer coefficients (cached in the database for later targets and runs)."""
    if settings.probe_samples <= 0:
        return None
    key = f"coefficients:{settings.probe_samples}:{settings.top_k}"
    cached = database.info.get(key)
    if cached is not None and set(cached) == {f"{i.layer}.{i.kind}" for i in items}:
        return [cached[f"{i.layer}.{i.kind}"] for i in items]
    probe = CalibrationScorer(model, input_ids[: settings.probe_samples], settings.top_k, options.batch_size)
    bar = tqdm(total=len(items), desc="ZipLM sensitivity probes", disable=not options.progress)
    values = probe_coefficients(items, stitcher, probe, progress=lambda i: bar.update(1),
                                resume=_dense_prefix(model, probe, options) if probe.causal else None)
    bar.close()
    database.info[key] = {f"{i.layer}.{i.kind}": v for i, v in zip(items, values)}
    return values


PROBE_CACHE_MIB = 512.0
"""Bound on the dense hidden states kept for the probes (a probe of layer L starts at block L)."""


def _dense_prefix(model: nn.Module, probe: CalibrationScorer, options: SequentialOptions):
    """``resume(model, layer)`` for the probes: the dense model's states entering each block on the probe windows,
    so probing layer L runs blocks L.. only (exact: the blocks before L are the dense ones)."""
    cache = PrefixCache(model, probe.ids, PROBE_CACHE_MIB)
    if not cache.enabled:
        return None
    cache.set_parent(["dense"] * cache.depth)
    cache.fill(model, list(range(probe.ids.shape[0])), options.batch_size)

    def resume(candidate: nn.Module, layer: int):
        return cache.resume(candidate, max((b for b in cache.boundaries if b <= layer), default=0))
    return resume


def _holdout_check(result, items: list[Item], stitcher: Stitcher, holdout: CalibrationScorer | None
                   ) -> dict[str, Any]:
    """Keep the refinement only if it also beats the DP's start on windows it was not scored on.

    Refinement accepts whatever scores best on its few windows, so part of its gain is selection on
    noise; a held-out set of windows catches a refinement that fits the scoring windows only. On a
    loss, ``result`` is reset in place to the start (choice and coefficients).
    """
    if holdout is None or result.accepted == 0 or result.start is None or result.start == result.picked:
        return {}
    refined = holdout(stitcher.build(items, result.picked))
    start = holdout(stitcher.build(items, result.start))
    kept = "refined" if refined <= start else "start"
    if kept == "start":
        logger.info("ZipLM refinement did not hold on held-out windows (%.4g vs %.4g for the DP's start): "
                    "keeping the start", refined, start)
        result.picked, result.coefficients, result.score = list(result.start), list(result.start_coefficients), None
    return {"holdout": {"refined": refined, "start": start, "kept": kept}}


def _hit_measured(target: float, items: list[Item], table, stitcher: Stitcher, result, settings: ZipLMSettings,
                  measure: Callable[[nn.Module], float], pruned: nn.Module, progress: bool = True):
    """Measure; while off by more than the tolerance, re-aim the DP (``next_aim``). Keeps the closest model and says
    whether it still misses (``target_missed``, with the relative ``miss``)."""
    low, high = reachable_range(table)
    picked, aim = result.picked, target
    bar = tqdm(total=1 + settings.max_corrections, desc=f"ZipLM measuring {target:g}x", disable=not progress)
    speed = measure(pruned)
    bar.update(1)
    bar.set_postfix(measured=f"{speed:.3f}x")
    logger.info("ZipLM %gx: aimed at %.4gx, measured %.4fx", target, aim, speed)
    best = (abs(speed / target - 1), picked, pruned, speed, aim)
    aims, points, measured = [aim], [(aim, speed)], [picked]
    for _ in range(settings.max_corrections):
        if best[0] <= settings.speedup_tolerance:
            break
        aim = min(max(next_aim(points, target), low), high)
        aims.append(aim)
        choice = dp_select(items, table.dense_ms / aim - table.rest_ms, result.coefficients, settings.resolution)
        if choice in measured:
            break
        picked = choice
        measured.append(picked)
        candidate = stitcher.build(items, picked)
        speed = measure(candidate)
        points.append((aim, speed))
        logger.info("ZipLM %gx: re-aimed at %.4gx, measured %.4fx", target, aim, speed)
        bar.update(1)
        bar.set_postfix(measured=f"{speed:.3f}x", aim=f"{aim:.3f}x")
        if abs(speed / target - 1) < best[0]:
            best = (abs(speed / target - 1), picked, candidate, speed, aim)
    bar.close()
    info = {"aimed_at": [round(a, 4) for a in aims], "measured_at": [round(s, 4) for _, s in points],
            "aim": best[4], "miss": round(best[3] / target - 1, 4),
            "target_missed": best[0] > settings.speedup_tolerance}
    return best[1], best[2], best[3], info


def next_aim(points: list[tuple[float, float]], target: float) -> float:
    """The aim expected to measure ``target``, from the (aim, measured speedup) pairs so far.

    With measurements on both sides of the target, interpolate between the closest two (the measured speedup
    grows with the aim, up to noise), so the aims close in instead of swinging from side to side; with all on
    one side, scale the closest one's aim by its miss (measured faster than aimed: aim lower).
    """
    below = [p for p in points if p[1] < target]
    above = [p for p in points if p[1] >= target]
    if below and above:
        (a0, s0), (a1, s1) = max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])
        return a0 + (target - s0) * (a1 - a0) / (s1 - s0) if s1 > s0 else (a0 + a1) / 2
    aim, speed = min(points, key=lambda p: abs(p[1] / target - 1))
    return aim * target / speed
