"""Latency tables for ZipLM: the measured time of every attention / FFN width a block can be pruned to.

ZipLM picks, per block, how many KV groups, query heads per group and FFN neurons to keep so that the
model meets a target speedup *in the user's inference environment*. That needs measured, not FLOP-counted,
costs. This module is the public face of the latency side and what a speedup target resolves through
(``resolve_latency_table``); the pieces live in ``environment`` (InferenceEnvironment), ``table``
(LatencyTable, ``model_signature``, ``mlp_grid``), ``table_measure`` (``measure_latency_table``),
``env_timing`` (the stack timer), ``speedup`` (``measure_model_ms``, ``measure_speedup``), ``table_cache``
(``get_latency_table`` and the cache paths), ``cli`` (the ``latency`` subcommand), and for engine="llama.cpp"
``llamacpp_table`` (tables timed on synthetic GGUF files) and ``llamacpp_timing`` (GGUF exports timed in llama.cpp).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel

from .cli import add_latency_cli as add_cli, run_latency_cli as run_cli
from .env_timing import STACK_DEPTH, TABLE_METHOD
from .environment import InferenceEnvironment
from .llamacpp_table import LLAMACPP_TABLE_METHOD, measure_llamacpp_table
from .llamacpp_timing import gguf_speedup, measure_gguf_speedup, time_gguf_files
from .speedup import SpeedupMeasurement, measure_model_ms, measure_speedup
from .table import DEFAULT_MLP_LEVELS, FORMAT_VERSION, LatencyTable, mlp_grid, model_signature
from .table_cache import CACHE_ENV_VAR, default_cache_dir, get_latency_table, latency_table_path
from .table_measure import MIN_MS, BusyMachineError, measure_latency_table, monotone


def resolve_latency_table(model: PreTrainedModel, latency: Any = None, latency_table: Any = None, *,
                          device: Any = None, progress: bool = True, remeasure: bool = False,
                          mlp_levels: int | None = None, repeats: int = 10) -> LatencyTable:
    """The table a speedup target refers to: ``latency_table`` (a table, its dict or its JSON file, checked against
    the model), else one measured (or read from the cache) in ``latency`` (an environment or its fields; unset
    device and dtype follow ``device`` or the model; ``remeasure``: ignore a cached table; ``mlp_levels`` FFN
    widths timed, ``repeats`` timed runs per level)."""
    if latency_table is not None:
        if isinstance(latency_table, LatencyTable):
            table = latency_table
        elif isinstance(latency_table, dict):
            table = LatencyTable.from_dict(latency_table)
        else:
            table = LatencyTable.load(latency_table)
        if table.model != model_signature(model):
            raise ValueError(f"the latency table was measured for {table.model}, not for this model "
                             f"({model_signature(model)}); measure one with `optimum-prune latency`")
        return table
    return get_latency_table(model, latency_environment(model, latency, device), progress=progress,
                             remeasure=remeasure, mlp_levels=mlp_levels, repeats=repeats)


def latency_environment(model: PreTrainedModel, latency: Any = None, device: Any = None) -> InferenceEnvironment:
    """``latency`` (an environment or its fields) with an unset device and dtype following ``device`` or the model
    (with engine="llama.cpp": the CPU, and GGUF type f16 unless given)."""
    if isinstance(latency, InferenceEnvironment):
        return latency
    fields = dict(latency or {})
    if InferenceEnvironment(engine=fields.get("engine", "torch")).llamacpp:
        return InferenceEnvironment(**fields)  # llama.cpp: CPU, f16 unless given; the model's dtype does not matter
    param = next(model.parameters())
    fields.setdefault("device", str(device or param.device))
    fields.setdefault("dtype", str(param.dtype).replace("torch.", ""))
    return InferenceEnvironment(**fields)


__all__ = [
    "CACHE_ENV_VAR",
    "DEFAULT_MLP_LEVELS",
    "FORMAT_VERSION",
    "MIN_MS",
    "BusyMachineError",
    "STACK_DEPTH",
    "TABLE_METHOD",
    "InferenceEnvironment",
    "LLAMACPP_TABLE_METHOD",
    "LatencyTable",
    "SpeedupMeasurement",
    "add_cli",
    "default_cache_dir",
    "get_latency_table",
    "gguf_speedup",
    "latency_environment",
    "latency_table_path",
    "measure_gguf_speedup",
    "measure_latency_table",
    "measure_llamacpp_table",
    "measure_model_ms",
    "measure_speedup",
    "mlp_grid",
    "model_signature",
    "monotone",
    "resolve_latency_table",
    "run_cli",
    "time_gguf_files",
]
