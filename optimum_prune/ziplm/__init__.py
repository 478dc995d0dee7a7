"""ZipLM: inference-aware structured pruning (per-block heads and FFN neurons chosen against measured latency)."""

from .latency import (
    DEFAULT_MLP_LEVELS,
    InferenceEnvironment,
    LatencyTable,
    default_cache_dir,
    get_latency_table,
    latency_table_path,
    measure_latency_table,
    measure_model_ms,
    measure_speedup,
    mlp_grid,
    model_signature,
)

__all__ = [
    "DEFAULT_MLP_LEVELS",
    "InferenceEnvironment",
    "LatencyTable",
    "default_cache_dir",
    "get_latency_table",
    "latency_table_path",
    "measure_latency_table",
    "measure_model_ms",
    "measure_speedup",
    "mlp_grid",
    "model_signature",
]
