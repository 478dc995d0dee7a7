"""LayerChop on a session's model: choose the blocks (checked before any calibration), drop them, record why."""

from __future__ import annotations

import time
from typing import Any

from ...modeling.pruning_config import PruningConfig
from ..base import RunConfig
from . import strategies
from .config import LayerChopConfig


def run(session: Any, config: LayerChopConfig, options: RunConfig) -> Any:
    strategies.check_request(session.model, config.num_layers, config.strategy, config.strategy_options)
    start = time.perf_counter()
    needs_data = config.strategy in strategies.NEEDS_CALIBRATION
    ids, calib_info = session.calibration_data(options) if needs_data else (None, None)
    drop, info = strategies.choose_layers(session.model, ids, config.num_layers, config.strategy,
                                          batch_size=options.batch_size, progress=options.progress,
                                          **config.strategy_options)
    session.apply(PruningConfig(drop_layers=drop))
    metrics = session.metrics.merged(layers_removed=len(drop),
                                     compression_seconds=round(time.perf_counter() - start, 2))
    session.record(method="layerchop", search=info, calibration=calib_info, metrics=metrics)
    return session.model


def describe(session: Any, config: LayerChopConfig) -> str:
    """The CLI's one-line result."""
    return f"dropped layers {session.pruning_config.drop_layers} ({config.strategy})"
