"""SparseGPT / Wanda / magnitude on a session's model: calibrate, schedule, sparsify block by block, record."""

from __future__ import annotations

import time
from typing import Any

from transformers.utils import logging

from ...engine.compress import CompressionPlan, compress_model, uniform
from ...engine.compress import zero_fraction
from ...engine.layers import linear_groups, original_layer_indices
from ...engine.obs import PruneSpec
from ...engine.schedule import build_schedule
from ...modeling.adapters import get_adapter
from ..base import ConfigError, RunConfig
from .config import SparsityConfig

logger = logging.get_logger(__name__)


def run(session: Any, config: SparsityConfig, options: RunConfig) -> Any:
    """Sparsify ``session.model`` in place; the per-layer fractions land in ``pruning_config.layer_sparsity``."""
    method = config.name
    n, m = config.n_m_pair
    per_layer = uniform(config.sparsity or 0.0, original_layer_indices(session.model))
    for value in per_layer.values():  # bad values fail here, before any data is read or weight touched
        PruneSpec(value, n, m, method)
    if m:
        check_n_m_widths(session.model, n, m)
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


def check_n_m_widths(model: Any, n: int, m: int) -> None:
    """N:M groups M consecutive inputs: refuse, before any work, a Linear whose input width M does not divide
    (its last columns would stay dense and the model would not be N:M sparse)."""
    adapter = get_adapter(model)
    for layer, block in zip(original_layer_indices(model), adapter.layers(model)):
        for group in linear_groups(adapter, block):
            width = group.in_features
            if width % m:
                raise ConfigError(
                    f"n_m=\"{n}:{m}\" groups every {m} consecutive inputs, but layer {layer}'s "
                    f"{', '.join(group.names)} reads {width} inputs, not a multiple of {m}: its last {width % m} "
                    f"columns would stay dense ({n * (width // m) / width:.1%} sparse instead of {n / m:.0%}). "
                    f"Choose an M that divides {width} (e.g. 2:4 or 4:8 on widths that are multiples of 8), "
                    "or unstructured `sparsity`")
