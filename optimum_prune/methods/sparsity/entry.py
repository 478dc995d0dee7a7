"""SparseGPT / Wanda / magnitude on a session's model: calibrate, schedule, sparsify block by block, record."""

from __future__ import annotations

import time
from typing import Any

from transformers.utils import logging

from ...engine.compress import CompressionPlan, compress_model, uniform
from ...engine.layers import original_layer_indices, zero_fraction
from ...engine.obs import PruneSpec
from ...engine.schedule import build_schedule
from ..base import RunConfig
from .config import SparsityConfig

logger = logging.get_logger(__name__)


def run(session: Any, config: SparsityConfig, options: RunConfig) -> Any:
    """Sparsify ``session.model`` in place; the per-layer fractions land in ``pruning_config.layer_sparsity``."""
    method = config.name
    n, m = config.n_m_pair
    per_layer = uniform(config.sparsity or 0.0, original_layer_indices(session.model))
    for value in per_layer.values():  # bad values fail here, before any data is read or weight touched
        PruneSpec(value, n, m, method)
    seq = options.sequential(method)
    start = time.perf_counter()
    needs_data = method != "magnitude" or config.schedule != "uniform"
    ids, calib_info = session.calibration_data(options) if needs_data else (None, None)
    search = None
    if config.schedule != "uniform":
        plan_schedule = build_schedule(config.schedule, session.model, ids, float(config.sparsity), options=seq,
                                       dampening=config.dampening, **config.schedule_options)
        per_layer, search = plan_schedule.sparsity, plan_schedule.info
    plan = CompressionPlan(method, per_layer, n, m, blocksize=config.blocksize, dampening=config.dampening)
    compress_model(session.model, ids, plan, seq)
    achieved = zero_fraction(session.model)
    metrics = session.metrics.merged(sparsity=round(achieved, 5),
                                     compression_seconds=round(time.perf_counter() - start, 2))
    session.record(method=method if not m else f"{method} {n}:{m}",
                    layer_sparsity={str(k): round(float(v), 6) for k, v in per_layer.items()} if not m else None,
                    calibration=calib_info, metrics=metrics, search=search)
    logger.info("%s: %.1f%% of the Linear weights in the blocks are zero", method, 100 * achieved)
    return session.model
