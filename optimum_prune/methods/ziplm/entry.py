"""ZipLM on a session's dense model: one level database, one search per target, measured speedups, records."""

from __future__ import annotations

import time
from typing import Any

from transformers.utils import logging

from ...calibration import load_calibration
from ...engine.experts import refuse_experts
from ...engine.structure.database import keep_database, reusable_database
from ...engine.structure.search import check_targets
from ...evaluation.latency_table import (SpeedupMeasurement, latency_environment, latency_table_path,
                                         measure_speedup, resolve_latency_table)
from ...records import Metrics
from ...teacher_cache import build_teacher_cache
from ..base import RunConfig
from .config import FinetuneConfig, ZipLMConfig
from .estimate import estimate_ziplm, say
from .family import ZipLMFamily
from .gradual import FinetuneSettings, run_gradual
from .method import ZipLMSettings, run_ziplm

logger = logging.get_logger(__name__)


def _table_known(model: Any, config: ZipLMConfig, options: RunConfig) -> bool:
    """Whether the latency table is given or cached (then it costs no time)."""
    if config.latency_table is not None:
        return True
    env = latency_environment(model, config.latency, options.device)
    return not config.remeasure_latency and latency_table_path(model, env, mlp_levels=config.latency_mlp_levels).exists()


class SpeedupMissError(RuntimeError):
    """A measured speedup outside the tolerance after re-aiming, with ``strict=True``."""


def run(session: Any, config: ZipLMConfig, options: RunConfig) -> Any:
    """One target: the session's model is pruned and returned; several: a ``ZipLMFamily`` of new sessions."""
    targets = config.targets
    refuse_experts(session.model, "ZipLM's structure search")
    start = time.perf_counter()
    if config.finetune is None:  # gradual runs say their training time through the Trainer
        known = _table_known(session.model, config, options)
        say(estimate_ziplm(session.model, config, options, table_known=known), logger, config.preset)
    table = resolve_latency_table(session.model, config.latency, config.latency_table, device=options.device,
                                  progress=options.progress, remeasure=config.remeasure_latency,
                                  mlp_levels=config.latency_mlp_levels, repeats=config.latency_repeats)
    check_targets(targets, table)
    tuning = finetune_settings(session, config.finetune, options) if config.finetune is not None else None
    ids, calib_info = session.calibration_data(options)
    env = table.environment
    settings = ZipLMSettings(search_iterations=config.search_iterations, search_samples=config.search_samples,
                             probe_samples=config.probe_samples, dampening=config.dampening, seed=options.seed,
                             obs_steps=config.database_steps, database_memory=config.database_memory_bytes,
                             speedup_tolerance=config.speedup_tolerance)
    timings: dict[int, SpeedupMeasurement] = {}

    def speedup_of(model) -> float:
        timings[id(model)] = measure_speedup(session.model, model, env, rounds=config.speedup_rounds)
        return timings[id(model)].speedup

    if tuning is not None:
        outcomes = run_gradual(session.model, ids, targets, table, tuning, settings=settings,
                               options=options.sequential("ZipLM"))
        database = None
    else:
        grid = sorted(table.mlp)
        reuse = reusable_database(session, ids, mlp_kept=grid, dampening=settings.dampening,
                                  obs_steps=settings.obs_steps)
        outcomes, database = run_ziplm(session.model, ids, targets, table, settings=settings,
                                       options=options.sequential("ZipLM"), database=reuse,
                                       measure=speedup_of if config.measure_speedup else None)
        keep_database(session, ids, database, mlp_kept=grid, dampening=settings.dampening,
                      obs_steps=settings.obs_steps)
    family = ZipLMFamily()
    for target, outcome in outcomes.items():
        member = session.spawn(outcome.model)
        speed = outcome.measured_speedup if outcome.measured_speedup is not None else \
            (speedup_of(outcome.model) if config.measure_speedup else None)
        timing = timings.get(id(outcome.model))
        dense_ms, pruned_ms = (timing.dense_ms, timing.pruned_ms) if timing else (None, None)
        measured = round(speed, 4) if speed else None
        metrics = Metrics(predicted_speedup=round(outcome.predicted_speedup, 4), estimated_loss=outcome.estimated_loss,
                          dense_ms=dense_ms, pruned_ms=pruned_ms, table_dense_ms=table.dense_ms,
                          level_database_mib=round(database.nbytes() / 2**20, 2) if database else None,
                          compression_seconds=round(time.perf_counter() - start, 2))
        member.record(method=outcome.search.get("method", "ziplm"), target_speedup=target, measured_speedup=measured,
                       latency_environment=env.to_dict(), calibration=calib_info, metrics=metrics,
                       search={**outcome.search, "levels": {str(k): v for k, v in outcome.levels.items()}})
        if measured is not None:
            logger.info("ZipLM %gx: measured %.3fx (predicted %.3fx)", target, measured, outcome.predicted_speedup)
        if outcome.search.get("target_missed"):
            message = miss_message(target, measured, config.speedup_tolerance, outcome.search)
            if config.strict:
                raise SpeedupMissError(message)
            logger.warning(message)
        family[target] = member
    if not isinstance(config.target_speedup, list):
        session.model = family[targets[0]].model
        return session.model
    return family


def miss_message(target: float, measured: float | None, tolerance: float, search: dict[str, Any]) -> str:
    """One line: how far the measured speedup is from the target after re-aiming, and what to do about it."""
    return (f"ZipLM {target:g}x: the measured speedup is {measured}x ({100 * search.get('miss', 0):+.1f}%), outside "
            f"the ±{100 * tolerance:g}% tolerance after {len(search.get('aimed_at', [])) - 1} re-aim(s) (aimed at "
            f"{search.get('aimed_at')}). The latency table may not match this machine now (was it measured while "
            "other work ran?): re-measure it on an idle machine, or widen speedup_tolerance")


def finetune_settings(session: Any, finetune: FinetuneConfig, options: RunConfig) -> FinetuneSettings:
    """Gradual mode's settings; the training windows are read like calibration data (same tokenizer)."""
    args = dict(finetune.training_args)
    args.update(learning_rate=finetune.learning_rate, per_device_train_batch_size=finetune.per_device_train_batch_size)
    num_samples = finetune.num_samples or finetune.max_steps * finetune.per_device_train_batch_size
    seq_len = finetune.seq_len or options.seq_len
    train_ids, _ = load_calibration(finetune.train_dataset, session.tokenizer, num_samples=num_samples,
                                    seq_len=seq_len, seed=options.seed + 1, model=session.model)
    cache = None
    if finetune.teacher_cache is not None and finetune.alpha > 0:  # the dense model, before any pruning step
        cache = build_teacher_cache(session.model, train_ids, finetune.teacher_cache, tokenizer=session.tokenizer,
                                    top_k=finetune.teacher_top_k or None, temperature=finetune.temperature,
                                    batch_size=finetune.per_device_train_batch_size, progress=options.progress)
    return FinetuneSettings(train_ids=train_ids, training_args=args, max_steps=finetune.max_steps,
                            stages=finetune.stages, alpha=finetune.alpha, temperature=finetune.temperature,
                            teacher_cache=cache)
