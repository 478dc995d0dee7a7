"""EvoPress on a session's model: depth, structure and sparsity targets (Pruner) and bit-widths (Quantizer)."""

from __future__ import annotations

import time
from typing import Any

from ...engine.experts import refuse_experts
from ...engine.compress import zero_fraction
from ...engine.layers import original_layer_indices
from ...engine.quant import QuantSpec
from ...engine.structure.database import build_database, keep_database, reusable_database
from ...engine.structure.search import Stitcher, check_targets, chosen_levels
from ...evaluation.latency_table import measure_speedup, resolve_latency_table
from ...modeling.pruning_config import PruningConfig
from ...records import Metrics
from ..base import RunConfig
from .config import EvoPressBitsConfig, EvoPressConfig
from .levels import level_grid, run_level_search
from .search import search_depth, search_structure


def run(session: Any, config: EvoPressConfig, options: RunConfig) -> Any:
    """The search ``config.target`` names, applied to ``session.model``."""
    return {"depth": _depth, "structure": _structure, "sparsity": _sparsity}[config.target](session, config, options)


def _depth(session: Any, config: EvoPressConfig, options: RunConfig) -> Any:
    """Which attention and which MLP sublayers to drop (independently), then the drops applied."""
    depth = len(original_layer_indices(session.model))
    count = config.num_layers if config.num_layers is not None else round(config.drop_ratio * depth)
    if not 1 <= count < depth:
        raise ValueError(f"EvoPress depth can remove 1 to {depth - 1} blocks' worth of sublayers of this "
                         f"{depth}-block model; drop_ratio={config.drop_ratio} / num_layers={config.num_layers} "
                         f"gives {count}")
    start = time.perf_counter()
    ids, calib_info = session.calibration_data(options)
    result = search_depth(session.model, ids, num_blocks=count, sublayers=True, settings=config.evopress,
                          batch_size=min(options.batch_size, 4), progress=options.progress)
    session.apply(PruningConfig(drop_attention=result.drop_attention, drop_mlp=result.drop_mlp))
    metrics = session.metrics.merged(search_seconds=round(time.perf_counter() - start, 2))
    session.record(method="evopress", search=result.info, calibration=calib_info, metrics=metrics)
    return session.model


def _sparsity(session: Any, config: EvoPressConfig, options: RunConfig) -> Any:
    """Per-Linear SparseGPT levels at an exact average sparsity (level store built once)."""
    settings = config.evopress
    refuse_experts(session.model, "EvoPress's per-Linear sparsity search")
    level_grid("sparsity", float(config.sparsity), settings)  # an unreachable target fails before calibration
    start = time.perf_counter()
    ids, calib_info = session.calibration_data(options)
    outcome = run_level_search(session.model, ids, "sparsity", float(config.sparsity), settings,
                               options.sequential("EvoPress sparsity"), dampening=config.dampening,
                               blocksize=config.blocksize)
    state, info, store = outcome.state, outcome.info, outcome.store
    kept: dict[str, float] = {}
    total: dict[str, int] = {}
    for unit, level in zip(store.units, state):  # parameter-weighted mean sparsity of each block
        kept[str(unit.layer)] = kept.get(str(unit.layer), 0.0) + unit.numel * store.levels[level]
        total[str(unit.layer)] = total.get(str(unit.layer), 0) + unit.numel
    layer_sparsity = {k: round(kept[k] / total[k], 6) for k in kept}
    metrics = session.metrics.merged(sparsity=round(zero_fraction(session.model), 5),
                                     level_store_mib=info["level_store_mib"], model_mib=info["model_mib"],
                                     compression_seconds=round(time.perf_counter() - start, 2))
    session.record(method="evopress", layer_sparsity=layer_sparsity, search=info, calibration=calib_info,
                    metrics=metrics)
    return session.model


def _structure(session: Any, config: EvoPressConfig, options: RunConfig) -> Any:
    """ZipLM's levels under the measured latency budget (starts from ZipLM's DP choice)."""
    target = float(config.target_speedup)
    refuse_experts(session.model, "EvoPress's structure search")
    start = time.perf_counter()
    table = resolve_latency_table(session.model, config.latency, config.latency_table, device=options.device,
                                  progress=options.progress, remeasure=config.remeasure_latency)
    check_targets([target], table)
    ids, calib_info = session.calibration_data(options)
    grid = sorted(table.mlp)
    database = reusable_database(session, ids, mlp_kept=grid, dampening=config.dampening)
    if database is None:
        database = build_database(session.model, ids, mlp_kept=grid, dampening=config.dampening,
                                  options=options.sequential("ZipLM level database"))
        keep_database(session, ids, database, mlp_kept=grid, dampening=config.dampening)
    chosen, items, info = search_structure(session.model, ids, table, target, database, settings=config.evopress,
                                           batch_size=min(options.batch_size, 4), progress=options.progress)
    dense = session.model
    session.model = Stitcher(session.model, database).build(items, chosen)
    session._adopt_pruned_class()
    timing = measure_speedup(dense, session.model, table.environment) if config.measure_speedup else None
    dense_ms, pruned_ms = (timing.dense_ms, timing.pruned_ms) if timing else (None, None)
    levels = {str(k): v for k, v in chosen_levels(items, chosen).items()}
    metrics = Metrics(predicted_speedup=info["predicted_speedup"], dense_ms=dense_ms, pruned_ms=pruned_ms,
                      search_seconds=round(time.perf_counter() - start, 2))
    session.record(method="evopress", target_speedup=target,
                    measured_speedup=round(timing.speedup, 4) if timing else None,
                    latency_environment=table.environment.to_dict(), calibration=calib_info, metrics=metrics,
                    search={**info, "levels": levels})
    return session.model


def run_bits(session: Any, config: EvoPressBitsConfig, options: RunConfig) -> Any:
    """Per-Linear GPTQ bit-widths at an exact average; the chosen codes become the session's packed records."""
    settings = config.evopress
    refuse_experts(session.model, "EvoPress's per-Linear bit-width search")
    level_grid("bits", config.average_bits, settings)  # an unreachable target fails before calibration
    ids, calib_info = session.calibration_data(options)
    start = time.perf_counter()
    grid = QuantSpec(4, config.group_size, config.symmetric, config.act_order)
    outcome = run_level_search(session.model, ids, "bits", config.average_bits, settings,
                               options.sequential("EvoPress bits"), quant=grid, dampening=config.dampening,
                               blocksize=config.blocksize)
    session.records, info = outcome.records, outcome.info
    metrics = session.metrics.merged(average_bits=info["average"], level_store_mib=info["level_store_mib"],
                                     model_mib=info["model_mib"],
                                     compression_seconds=round(time.perf_counter() - start, 2))
    session.record(method="evopress+gptq", search=info, calibration=calib_info, metrics=metrics)
    return session.model


def describe(session: Any, config: Any) -> str:
    """The CLI's one-line result."""
    search = session.pruning_config.search or {}
    if isinstance(config, EvoPressBitsConfig) or getattr(config, "target", None) == "sparsity":
        what = "bits" if isinstance(config, EvoPressBitsConfig) else "sparsity"
        return (f"average {what} {search['average']:.4g} ({search['fitness_metric']} {search['fitness']:.4g}, "
                f"{search['final']} model; level store {search['level_store_mib']:.0f} MiB on disk, "
                f"model {search['model_mib']:.0f} MiB)")
    if config.target == "structure":
        return f"measured speedup {session.pruning_config.measured_speedup} ({search.get('fitness_metric')} " \
               f"{search.get('fitness', float('nan')):.4g})"
    config_ = session.pruning_config
    return (f"dropped attention {config_.drop_attention}, MLP {config_.drop_mlp} "
            f"({search['fitness_metric']} {search['fitness']:.4g})")
