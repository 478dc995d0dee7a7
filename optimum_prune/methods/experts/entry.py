"""REAP on a session's model: check the ratio, score every expert on calibration data, remove, record."""

from __future__ import annotations

import time
from typing import Any

from transformers.utils import logging

from ...modeling.pruning_config import PruningConfig
from ..base import RunConfig
from .config import REAPConfig
from .saliency import check_ratio, choose_experts, moe_layers, reap_saliency

logger = logging.get_logger(__name__)


def run(session: Any, config: REAPConfig, options: RunConfig) -> Any:
    layers = moe_layers(session.model)
    check_ratio(layers, config.experts_ratio)  # before any calibration
    start = time.perf_counter()
    ids, calib_info = session.calibration_data(options)
    seq = options.sequential("REAP saliency")
    seq.checkpoint_dir = None  # read-only pass: a resumed run would miss the skipped blocks' statistics
    scores = reap_saliency(session.model, ids, seq)
    remove = choose_experts(scores, layers, config.experts_ratio, config.scope)
    unrouted = scores.unrouted()
    if unrouted:
        logger.warning("REAP: experts that received no calibration token (saliency 0, removed first): %s; more "
                       "calibration data (num_samples) gives them a measured score", unrouted)
    session.apply(PruningConfig(remove_experts=remove))
    search = {"scope": config.scope, "experts_ratio": config.experts_ratio,
              "experts_removed": sum(len(v) for v in remove.values()),
              "experts_before": sum(count for count, _ in layers.values()),
              "saliency": {str(layer): {str(e): round(float(v), 6) for e, v in zip(scores.experts[layer], s)}
                           for layer, s in scores.saliency.items()},
              "routed_tokens": {str(layer): {str(e): int(v) for e, v in zip(scores.experts[layer], t)}
                                for layer, t in scores.tokens.items()},
              "unrouted": {str(k): v for k, v in unrouted.items()}}
    metrics = session.metrics.merged(compression_seconds=round(time.perf_counter() - start, 2))
    session.record(method="reap", search=search, calibration=calib_info, metrics=metrics)
    return session.model


def describe(session: Any, config: REAPConfig) -> str:
    """The CLI's one-line result."""
    removed = session.pruning_config.remove_experts
    return (f"removed {sum(len(v) for v in removed.values())} experts ({config.scope} scope): "
            + ", ".join(f"layer {k}: {v}" for k, v in removed.items()))
