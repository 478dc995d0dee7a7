"""GPTQ (optionally with SparseGPT in the same pass) on a session's model; the packed codes become its records."""

from __future__ import annotations

import time
from typing import Any

from ...engine.compress import CompressionPlan, compress_model, uniform, zero_fraction
from ...engine.layers import original_layer_indices
from ...engine.quant import QuantSpec
from ..base import RunConfig
from .config import GPTQConfig


def run(session: Any, config: GPTQConfig, options: RunConfig) -> Any:
    """Quantize every block Linear in place (weights land exactly on the grid) and return the model."""
    layers = original_layer_indices(session.model)
    per_layer_bits = uniform(config.bits, layers)
    specs = {k: QuantSpec(int(b), config.group_size, config.symmetric, config.act_order)
             for k, b in per_layer_bits.items()}
    sparsity = config.sparsity
    plan = CompressionPlan("sparsegpt" if sparsity else None, uniform(sparsity or 0.0, layers),
                           quant=specs, blocksize=config.blocksize, dampening=config.dampening)
    ids, calib_info = session.calibration_data(options)
    seq = options.sequential("gptq" if not sparsity else "sparsegpt+gptq")
    start = time.perf_counter()
    result = compress_model(session.model, ids, plan, seq)
    session.records = result.quantized
    metrics = session.metrics.merged(compression_seconds=round(time.perf_counter() - start, 2))
    fields: dict[str, Any] = dict(layer_bits={str(k): int(v) for k, v in per_layer_bits.items()},
                                  calibration=calib_info, metrics=metrics)
    if sparsity:
        fields["metrics"] = metrics.merged(sparsity=round(zero_fraction(session.model), 5))
        fields.update(method="sparsegpt+gptq", layer_sparsity={str(k): float(v) for k, v in plan.sparsity.items()})
    else:
        fields.update(method=session.pruning_config.method or "gptq")
    session.record(**fields)
    return session.model
