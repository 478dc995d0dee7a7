"""EvoPress over per-Linear compression levels: which SparseGPT sparsity, or which GPTQ bit-width, each Linear gets.

The levels come from a ``LevelStore`` (every Linear compressed once at every level). As in the paper's
code, Linears are grouped by shape and a level switch moves one Linear of a group one level up and
another of the same group one level down: levels are evenly spaced, so the average sparsity (or bits)
stays exactly on target. The search starts from the best by fitness of uniform levels and, for
sparsity, the inverse-Hessian K-means scheduler's allocation, and a greedy allocation of the store's
own OBS losses.

The store's blocks were calibrated on inputs of a uniformly compressed prefix; with ``recalibrate`` the
chosen levels are then applied once more block by block from the dense weights (each Linear calibrated on
the inputs of the model as chosen), and that model is kept if its fitness beats the stitched one's.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from safetensors import safe_open
from safetensors.torch import save_file

from ...engine.compress import CompressionPlan, QuantRecord, compress_model
from ...engine.layers import get_weight, set_weight
from ...engine.level_store import LevelStore, build_level_store, sparsity_levels
from ...engine.quant import QuantSpec
from ...engine.schedule import LayerStatistics, hessian_kmeans
from ...engine.sequential import SequentialOptions
from ...fingerprints import content_hash as fingerprint
from .config import EvoPressSettings
from .fitness import fitness_info, loaded, search_fitness
from .search import evolve
from ...evaluation.scorer import CalibrationScorer

logger = logging.get_logger(__name__)


def shape_groups(store: LevelStore) -> list[list[int]]:
    """Unit indices grouped by weight shape (a level switch inside a group moves a fixed count of weights)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, unit in enumerate(store.units):
        groups.setdefault(unit.shape, []).append(i)
    return list(groups.values())


def level_mutation(state: list[int], groups: list[list[int]], num_levels: int, generator: torch.Generator,
                   max_swaps: int) -> list[int]:
    """Level switch, 1-3 times (min of two uniform draws): in one group, one unit up a level, another down.

    A unit moves at most once per mutation, so switches never undo each other; group sums are unchanged.
    """
    child = list(state)
    touched: set[int] = set()
    draws = torch.randint(1, max_swaps + 1, (2,), generator=generator)
    for _ in range(int(draws.min())):
        options = []
        for group in groups:
            free = [u for u in group if u not in touched]
            downs = [u for u in free if child[u] > 0]
            ups = [u for u in free if child[u] + 1 < num_levels and any(d != u for d in downs)]
            if ups:
                options.append((ups, downs))
        if not options:
            break
        ups, downs = options[int(torch.randint(len(options), (1,), generator=generator))]
        a = ups[int(torch.randint(len(ups), (1,), generator=generator))]
        rest = [u for u in downs if u != a]
        b = rest[int(torch.randint(len(rest), (1,), generator=generator))]
        child[a] += 1
        child[b] -= 1
        touched.update((a, b))
    return child


def round_to_budget(positions: list[float], total: int, num_levels: int) -> list[int]:
    """Integer levels in [0, num_levels) closest to ``positions`` whose sum is exactly ``total``."""
    if not 0 <= total <= len(positions) * (num_levels - 1):
        raise ValueError(f"a sum of {total} is out of reach for {len(positions)} units of {num_levels} levels")
    levels = [min(max(int(math.floor(p)), 0), num_levels - 1) for p in positions]
    while sum(levels) != total:
        up = sum(levels) < total
        movable = [i for i, lv in enumerate(levels) if (lv + 1 < num_levels if up else lv > 0)]
        # the unit whose rounding is furthest from its position in the needed direction moves first
        i = max(movable, key=lambda i: (positions[i] - levels[i]) if up else (levels[i] - positions[i]))
        levels[i] += 1 if up else -1
    return levels


class StoreLoader:
    """Loads a state's levels into the model's Linears, touching only the units whose level changed."""

    def __init__(self, model: nn.Module, store: LevelStore) -> None:
        modules = dict(model.named_modules())
        missing = [u.name for u in store.units if u.name not in modules]
        if missing:
            raise ValueError(f"the level store was built for another model: {missing[:3]} are not in this one")
        self.store = store
        self.modules = [modules[u.name] for u in store.units]
        self.current: list[int | None] = [None] * len(store.units)

    @torch.no_grad()
    def load(self, state: list[int]) -> None:
        for i, level in enumerate(state):
            if self.current[i] != level:
                module = self.modules[i]
                set_weight(module, self.store.weight(i, level, get_weight(module).dtype))
                self.current[i] = level


class DenseSnapshot:
    """The store's Linears' dense weights, kept on disk (one file per block) while the search overwrites them."""

    def __init__(self, model: nn.Module, store: LevelStore, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.units = store.units
        modules = dict(model.named_modules())
        by_layer: dict[int, dict[str, torch.Tensor]] = {}
        for u in store.units:
            by_layer.setdefault(u.layer, {})[u.name] = get_weight(modules[u.name]).detach().cpu().contiguous()
        for layer, tensors in by_layer.items():  # one block in memory at a time
            save_file(tensors, str(self.directory / f"dense-{layer}.safetensors"))
            tensors.clear()

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        for layer in sorted({u.layer for u in self.units}):
            with safe_open(str(self.directory / f"dense-{layer}.safetensors"), "pt") as f:
                for name in f.keys():
                    set_weight(modules[name], f.get_tensor(name))  # copies into the module's dtype and device


def level_plan(store: LevelStore, state: list[int], *, dampening: float, blocksize: int) -> CompressionPlan:
    """The engine plan that applies ``state``'s level to every Linear of the store (SparseGPT or GPTQ)."""
    if store.kind == "sparsity":
        return CompressionPlan(method="sparsegpt", unit_sparsity={u.name: float(store.levels[j])
                                                                  for u, j in zip(store.units, state)},
                               dampening=dampening, blocksize=blocksize)
    return CompressionPlan(method=None, unit_quant={u.name: replace(store.quant, bits=int(store.levels[j]))
                                                    for u, j in zip(store.units, state)},
                           dampening=dampening, blocksize=blocksize)


def average(store: LevelStore, state: list[int]) -> float:
    """Parameter-weighted mean level value (sparsity or bits) of a state."""
    total = sum(u.numel for u in store.units)
    return sum(u.numel * store.levels[j] for u, j in zip(store.units, state)) / total


def check_target(kind: str, target: float, levels: list[float]) -> None:
    """The target must be reachable on the level grid: a level for sparsity, within the range for bits."""
    if kind == "sparsity" and not any(abs(v - target) < 1e-6 for v in levels):
        raise ValueError(f"the sparsity levels {levels} do not include the target {target}: add it to "
                         "evopress=dict(levels=[...]) or leave levels unset (evenly spaced around the target)")
    if kind == "bits" and not min(levels) <= target <= max(levels):
        raise ValueError(f"average bits {target} is outside the levels {levels}: widen evopress=dict(levels=[...]) "
                         "or leave levels unset")


def seeds(store: LevelStore, target: float, groups: list[list[int]]) -> dict[str, list[int]]:
    """Starting states with the exact budget: uniform levels, the store's losses allocated greedily, and for
    sparsity the K-means scheduler's allocation."""
    values = store.levels
    n = len(store.units)
    check_target(store.kind, target, values)
    if store.kind == "sparsity":
        index = min(range(len(values)), key=lambda j: abs(values[j] - target))
        out = {"uniform": [index] * n}
        schedule = _scheduler_sparsity(store, target)
        if schedule is not None:
            step = values[1] - values[0]
            state = [0] * n
            for group in groups:
                positions = [(schedule[store.units[u].layer] - values[0]) / step for u in group]
                for u, lv in zip(group, round_to_budget(positions, index * len(group), len(values))):
                    state[u] = lv
            out["hessian-kmeans"] = state
        greedy = loss_greedy(store, out["uniform"], groups)
        if greedy is not None:
            out["obs-greedy"] = greedy
        return out
    # bits: per group, floor(target) everywhere, then the units that lose most at the lower width go up
    losses = store.info.get("losses")
    state = [0] * n
    for group in groups:
        low = max(j for j in range(len(values)) if values[j] <= target)
        extra = int(math.floor((target - values[low]) * len(group) / (values[1] - values[0]) + 1e-9)) \
            if low + 1 < len(values) else 0
        order = sorted(group, key=lambda u: -(losses[u][low] if losses else 0.0))
        for rank, u in enumerate(order):
            state[u] = low + (1 if rank < extra else 0)
    out = {"uniform": state}
    greedy = loss_greedy(store, state, groups)
    if greedy is not None:
        out["obs-greedy"] = greedy
    return out


def loss_greedy(store: LevelStore, state: list[int], groups: list[list[int]]) -> list[int] | None:
    """From ``state``, level switches inside each group while the OBS loss saved exceeds the loss added.

    Losses are read relative to the residual stream entering each block (as the scheduler reads them),
    so blocks at different depths compare. A cheap allocation by the store's own estimates: a seed.
    """
    losses = store.info.get("losses")
    residual = store.info.get("residual") or {}
    if not losses:
        return None
    scale = [residual.get(str(u.layer)) or 1.0 for u in store.units]
    # index order = more compression for sparsity, less for bits: "cost" is the loss of one more step of it
    sign = 1 if store.kind == "sparsity" else -1
    top = len(store.levels) - 1
    state = list(state)

    def more(u: int) -> float | None:  # loss added by compressing u one step further
        j = state[u] + sign
        return None if not 0 <= j <= top else (losses[u][j] - losses[u][state[u]]) / scale[u]

    def less(u: int) -> float | None:  # loss saved by compressing u one step less
        j = state[u] - sign
        return None if not 0 <= j <= top else (losses[u][state[u]] - losses[u][j]) / scale[u]

    for group in groups:
        for _ in range(len(group) * len(store.levels)):
            saves = [(less(u), u) for u in group if less(u) is not None]
            costs = [(more(u), u) for u in group if more(u) is not None]
            if not saves or not costs:
                break
            save, a = max(saves)
            cost, b = min((c for c in costs if c[1] != a), default=(None, None))
            if b is None or not save > cost:
                break
            state[a] -= sign
            state[b] += sign
    return state


def _scheduler_sparsity(store: LevelStore, target: float) -> dict[int, float] | None:
    """The K-means scheduler's per-layer sparsity from the store's SparseGPT losses at the target level."""
    losses = store.info.get("losses")
    residual = store.info.get("residual") or {}
    if not losses:
        return None
    index = min(range(len(store.levels)), key=lambda j: abs(store.levels[j] - target))
    stats: dict[int, LayerStatistics] = {}
    for unit, unit_losses in zip(store.units, losses):
        entry = stats.setdefault(unit.layer, LayerStatistics(unit.layer, 0, 0.0, residual=residual.get(str(unit.layer))))
        entry.params += unit.numel
        entry.loss += unit_losses[index]
    normalize = "residual" if all(s.residual for s in stats.values()) else None
    return hessian_kmeans(stats, target, normalize=normalize).sparsity


def search_levels(model: nn.Module, input_ids: torch.Tensor, store: LevelStore, target: float, *,
                  settings: EvoPressSettings | None = None, batch_size: int = 4, progress: bool = True,
                  scorer: CalibrationScorer | None = None) -> tuple[list[int], dict[str, Any]]:
    """EvoPress over the store's levels at average ``target`` (sparsity or bits); the best state is left
    loaded in ``model``. Returns (level index per unit, search info)."""
    s = resolved_level_settings(settings, store, input_ids)
    groups = shape_groups(store)
    n = len(store.units)
    scorer = scorer or CalibrationScorer(model, input_ids, s.top_k, batch_size, s.fitness)
    loader = StoreLoader(model, store)
    fitness = search_fitness(model, scorer, lambda state: loaded(model, loader.load, state),
                             [u.layer for u in store.units], s, batch_size)

    starts = seeds(store, target, groups)
    seed_fitness = {name: fitness(state, len(s.windows) - 1) for name, state in starts.items()}
    best = min(seed_fitness, key=seed_fitness.get)
    run_key = fingerprint("evopress-levels", store.info.get("key"), input_ids, target, s.search_key())
    result = evolve(starts[best], lambda st, g: level_mutation(st, groups, len(store.levels), g, s.max_swaps),
                    fitness, s, run_key=run_key, progress=progress, description=f"EvoPress {store.kind}",
                    pool=input_ids.shape[0])
    final = fitness(result.state, len(s.windows) - 1)  # on the seeds' windows, so the two compare
    levels: dict[str, dict[str, float]] = {}
    for unit, j in zip(store.units, result.state):
        levels.setdefault(str(unit.layer), {})[unit.path] = store.levels[j]
    info = {"method": "evopress", "target": store.kind, "average": round(average(store, result.state), 6),
            "requested": target, "fitness": final, "search_fitness": result.fitness, "start": best,
            "seed_fitness": seed_fitness, "fitness_metric": scorer.name,
            "generations": result.generations, "offspring": s.offspring,
            "survivors": s.survivors, "tokens": [w * input_ids.shape[1] for w in s.windows],
            "fresh_windows": s.fresh_windows, "evaluations": result.evaluations, "seed": s.seed,
            "level_values": store.levels,
            "units": n, "unit_groups": len(groups), "level_store_mib": round(store.nbytes() / 2**20, 1),
            "history": [round(h, 6) for h in result.history], "levels": levels, **fitness_info(fitness)}
    return result.state, info


def resolved_level_settings(settings: EvoPressSettings | None, store: LevelStore, input_ids: torch.Tensor
                            ) -> EvoPressSettings:
    """Defaults for a level search: as many generations as Linears (20 to 400), the rest as ``resolved``."""
    settings = settings or EvoPressSettings()
    n = len(store.units)
    if settings.generations is None:
        settings = replace(settings, generations=int(min(400, max(20, n))))
    return settings.resolved(kept=n, dropped=1, available_windows=input_ids.shape[0])


def level_grid(kind: str, target: float, settings: EvoPressSettings) -> list[float]:
    """The levels to store for ``target`` (the settings' or the default grid), checked to reach it: call it
    before calibration and the store build, so a bad request fails at once."""
    levels = list(settings.levels) if settings.levels else default_levels(kind, target)
    check_target(kind, target, levels)
    return levels


def default_levels(kind: str, target: float) -> list[float]:
    """Sparsity: 5% steps from target − 30% to target + 20% (at most 95%); bits: floor − 1 .. ceil + 2 within 2..8."""
    if kind == "sparsity":
        return sparsity_levels(target)
    if not 2 <= target <= 8:
        raise ValueError(f"average_bits must be between 2 and 8, got {target}")
    return [float(b) for b in range(max(2, math.floor(target) - 1), min(8, math.ceil(target) + 2) + 1)]


def store_directory(model: nn.Module, input_ids: torch.Tensor, kind: str, levels: list[float], extra: Any = None
                    ) -> Path:
    """Default home of a level store: the optimum-prune cache, keyed by model weights' identity and settings."""
    from ...evaluation.table_cache import CACHE_ENV_VAR

    root = os.environ.get(CACHE_ENV_VAR)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "optimum_prune"
    first = next(model.parameters())
    key = fingerprint(type(model).__name__, model.config.to_json_string(), float(first.float().sum()), input_ids,
                      kind, levels, extra)
    return base / "levels" / f"{kind}-{key[:16]}"


@dataclass
class LevelSearchOutcome:
    """What a level search leaves: the chosen level per unit, the search info, the store, and (bits) the
    GPTQ records of the model as it stands (from the store or from the sequential final pass)."""

    state: list[int]
    info: dict[str, Any]
    store: LevelStore
    records: dict[str, QuantRecord] | None = None


def run_level_search(model: nn.Module, input_ids: torch.Tensor, kind: str, target: float,
                     settings: EvoPressSettings | None, options: SequentialOptions, *, quant: QuantSpec | None = None,
                     dampening: float = 0.01, blocksize: int = 128) -> LevelSearchOutcome:
    """Build (or reuse) the level store (the fitness reference is taken from the dense model first), search, and (``settings.recalibrate``) compare the stitched model with
    a sequential pass at the chosen levels; the better by fitness is left in ``model``."""
    settings = settings or EvoPressSettings()
    levels = level_grid(kind, target, settings)
    scorer = CalibrationScorer(model, input_ids, settings.top_k, min(options.batch_size, 4), settings.fitness)
    directory = Path(settings.level_store) if settings.level_store else \
        store_directory(model, input_ids, kind, levels, [asdict(quant) if quant else None, target])
    start = time.perf_counter()
    below = [v for v in levels if v <= target + 1e-9]
    propagate = max(below) if below else None  # blocks calibrated on inputs compressed at (about) the target
    store = build_level_store(model, input_ids, directory, kind=kind, levels=levels, quant=quant,
                              dampening=dampening, blocksize=blocksize, propagate=propagate, options=options)
    store_seconds = time.perf_counter() - start
    s = resolved_level_settings(settings, store, input_ids)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    records = None
    with tempfile.TemporaryDirectory(prefix=".dense-", dir=directory.parent) as tmp:
        snapshot = DenseSnapshot(model, store, tmp) if s.recalibrate else None
        state, info = search_levels(model, input_ids, store, target, settings=s, progress=options.progress,
                                    scorer=scorer)
        info.update(search_seconds=round(time.perf_counter() - start - store_seconds, 1), final="store")
        if snapshot is not None:
            pass_start = time.perf_counter()
            snapshot.restore(model)
            result = compress_model(model, input_ids, level_plan(store, state, dampening=dampening,
                                                                 blocksize=blocksize),
                                    replace(options, description=f"EvoPress {kind}: sequential pass"))
            sequential = scorer(model, list(range(s.windows[-1])))  # the seeds' windows, as info["fitness"]
            info.update(stitched_fitness=info["fitness"], sequential_fitness=sequential,
                        sequential_pass_seconds=round(time.perf_counter() - pass_start, 1))
            if sequential < info["fitness"]:
                info.update(final="sequential", fitness=sequential)
                records = result.quantized if kind == "bits" else None
            else:
                StoreLoader(model, store).load(state)
    if kind == "bits" and records is None:  # the stitched model's codes, straight from the store
        records = {u.name: store.record(i, j) for i, (u, j) in enumerate(zip(store.units, state))}
    info.update(level_store=str(directory), level_store_seconds=round(store_seconds, 1),
                model_mib=round(model_bytes / 2**20, 1))
    logger.info("EvoPress %s: level store %.1f MiB on disk (model %.1f MiB), average %.4g, final model: %s", kind,
                info["level_store_mib"], info["model_mib"], info["average"], info["final"])
    return LevelSearchOutcome(state, info, store, records)


__all__ = ["default_levels", "level_grid", "run_level_search", "LevelSearchOutcome", "DenseSnapshot", "level_plan", "store_directory", "shape_groups", "level_mutation", "round_to_budget", "loss_greedy", "StoreLoader", "average", "seeds", "search_levels"]
