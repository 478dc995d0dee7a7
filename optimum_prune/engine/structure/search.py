"""ZipLM's search: one level per sublayer minimizing the estimated loss under a latency budget.

The budget for a target speedup s is ``dense_ms / s`` minus the unprunable rest (SPDY's formulation).
A knapsack DP over discretized time picks the levels; costs are rounded UP to the time grid, so the
chosen levels never exceed the budget in the table's own (continuous) times. A randomized search
then perturbs per-sublayer loss coefficients, re-solves the DP and keeps a candidate when the stitched
model's calibration score (KL to the dense model, or output error for encoders) improves.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from ..layers import get_weight, set_weight
from ...modeling.adapters import get_adapter, get_module
from ...modeling.pruning_config import PruningConfig
from ...modeling.surgery import apply_structure
from ...distill import apply_masks
from .database import LevelDatabase, SublayerDatabase, refit
from .masking import structure_masks


class UnreachableTargetError(ValueError):
    """A target speedup outside what removing structures can reach in the measured environment."""


@dataclass(frozen=True)
class Item:
    """One sublayer the DP chooses a level for."""

    layer: int
    kind: str  # "attention" | "mlp"
    keys: tuple[Any, ...]
    costs: tuple[float, ...]  # ms per level
    losses: tuple[float, ...]  # scale-normalized OBS loss per level


def items_from(database: LevelDatabase, table) -> list[Item]:
    """The DP's items: every layer's attention and MLP with the table's time and the database's loss per level."""
    items = []
    for layer, entry in sorted(database.layers.items()):
        for sub in (entry.attention, entry.mlp):
            keys = tuple(sorted(sub.levels, key=lambda k: k if isinstance(k, tuple) else (k,)))
            if sub.kind == "attention":
                costs = tuple(table.attention_ms(*k) if k != (0, 0) else 0.0 for k in keys)
            else:
                costs = tuple(table.mlp_ms(k) if k else 0.0 for k in keys)
            losses = tuple(sub.levels[k].loss / entry.scale for k in keys)
            items.append(Item(layer, sub.kind, keys, costs, losses))
    return items


def reachable_range(table) -> tuple[float, float]:
    """(1.0, largest speedup): every sublayer removed leaves only the table's rest (embeddings, head, norms)."""
    return 1.0, table.dense_ms / max(table.rest_ms, 1e-9)


def check_targets(targets: list[float], table) -> None:
    """Raise ``UnreachableTargetError`` (stating the reachable range) for any target outside it."""
    low, high = reachable_range(table)
    bad = [t for t in targets if not (low <= t <= high)]
    if bad:
        raise UnreachableTargetError(
            f"target speedup {', '.join(f'{t:g}x' for t in bad)} is not reachable for this model in this "
            f"environment: the measured latency table allows {low:.2f}x to {high:.2f}x (at the top only the "
            "embeddings and head would remain); choose targets in that range"
        )


def budget_for(target: float, items: list[Item], table) -> float:
    """Time the prunable sublayers may take for ``target``: dense / target − rest."""
    check_targets([target], table)
    return table.dense_ms / target - table.rest_ms


def dp_select(items: list[Item], budget: float, coefficients: list[float] | None = None,
              resolution: int = 2000) -> list[int]:
    """Level index per item minimizing Σ coefficient·loss with Σ cost ≤ budget (knapsack over a time grid)."""
    if budget < 0:
        raise ValueError("negative time budget")
    coefficients = coefficients or [1.0] * len(items)
    if budget <= 1e-12:  # no time left for any sublayer: only free (removed) levels fit
        if any(min(item.costs) > 0 for item in items):
            raise UnreachableTargetError("no combination of levels fits the latency budget")
        return [min(range(len(item.costs)), key=lambda j: (item.costs[j], coef * item.losses[j]))
                for item, coef in zip(items, coefficients)]
    step = budget / resolution
    inf = float("inf")
    best = torch.full((resolution + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for item, coef in zip(items, coefficients):
        new = torch.full_like(best, inf)
        arg = torch.zeros(resolution + 1, dtype=torch.long)
        for j, (cost, loss) in enumerate(zip(item.costs, item.losses)):
            c = math.ceil(cost / step - 1e-9) if cost > 0 else 0
            if c > resolution:
                continue
            cand = torch.full_like(best, inf)
            cand[c:] = best[: resolution + 1 - c] + coef * loss
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        best = new
        choices.append(arg)
    if not torch.isfinite(best).any():
        raise UnreachableTargetError("no combination of levels fits the latency budget")
    t = int(torch.argmin(best))
    picked = [0] * len(items)
    for i in range(len(items) - 1, -1, -1):
        j = int(choices[i][t])
        picked[i] = j
        cost = items[i].costs[j]
        t -= math.ceil(cost / step - 1e-9) if cost > 0 else 0
    return picked


def predicted_ms(items: list[Item], picked: list[int], table) -> float:
    return table.rest_ms + sum(item.costs[j] for item, j in zip(items, picked))


# --------------------------------------------------------------------------- stitching
class Stitcher:
    """Builds the pruned model of a level assignment from the dense model and the database (refits cached)."""

    def __init__(self, dense: nn.Module, database: LevelDatabase, cache_size: int = 256) -> None:
        self.dense = dense
        self.database = database
        self.adapter = get_adapter(dense)
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.cache_size = cache_size

    def structure(self, items: list[Item], picked: list[int]) -> PruningConfig:
        config = PruningConfig()
        for item, j in zip(items, picked):
            key = item.keys[j]
            level = self._sub(item).levels[key]
            if item.kind == "attention":
                if key == (0, 0):
                    config.drop_attention.append(item.layer)
                elif level.removed:
                    config.remove_heads[item.layer] = list(level.removed)
            else:
                if key == 0:
                    config.drop_mlp.append(item.layer)
                elif level.removed:
                    config.remove_neurons[item.layer] = list(level.removed)
        return config

    def _sub(self, item: Item) -> SublayerDatabase:
        entry = self.database.layers[item.layer]
        return entry.attention if item.kind == "attention" else entry.mlp

    def _refit(self, item: Item, key: Any, weight: torch.Tensor) -> torch.Tensor:
        cache_key = (item.layer, item.kind, key)
        if cache_key in self._cache:
            self._cache.move_to_end(cache_key)
            return self._cache[cache_key]
        sub = self._sub(item)
        keep = sub.columns(sub.levels[key].removed)
        fitted = torch.zeros_like(weight, dtype=torch.float32)
        fitted[:, keep] = refit(weight, sub.hessian, keep)
        self._cache[cache_key] = fitted
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return fitted

    def swappable(self, item: Item, j: int) -> bool:
        """Whether ``swapped`` can stand for level ``j``: a partial level (some units kept, some removed)."""
        key = item.keys[j]
        return key not in ((0, 0), 0) and bool(self._sub(item).levels[key].removed)

    @contextlib.contextmanager
    def swapped(self, item: Item, j: int) -> Iterator[nn.Module]:
        """The dense model itself with one sublayer at the partial level ``j``, restored on exit (no copy).

        The refitted output projection has zero columns for the removed units, and removed heads or neurons
        reach the output only through those columns, so this computes what the physically pruned model does.
        """
        if not self.swappable(item, j):
            raise ValueError(f"level {item.keys[j]!r} of layer {item.layer}'s {item.kind} is not a partial level")
        path = self.adapter.attention_out if item.kind == "attention" else self.adapter.mlp_out
        module = get_module(self.adapter.layers(self.dense)[item.layer], path)
        saved = get_weight(module).clone()
        fitted = self._refit(item, item.keys[j], saved)
        try:
            with torch.no_grad():
                set_weight(module, fitted.to(saved.dtype))
            yield self.dense
        finally:
            with torch.no_grad():
                set_weight(module, saved)

    def build(self, items: list[Item], picked: list[int], physical: bool = True) -> nn.Module:
        """A pruned copy of the model: corrected output projections, then the structures removed.

        ``physical=False`` keeps the dense shapes and zeroes what is removed instead (gradual mode).
        """
        model = copy.deepcopy(self.dense)
        layers = self.adapter.layers(model)
        dense_layers = self.adapter.layers(self.dense)
        with torch.no_grad():
            for item, j in zip(items, picked):
                key = item.keys[j]
                if key in ((0, 0), 0) or not self._sub(item).levels[key].removed:
                    continue
                path = self.adapter.attention_out if item.kind == "attention" else self.adapter.mlp_out
                dense_weight = get_weight(get_module(dense_layers[item.layer], path))
                fitted = self._refit(item, key, dense_weight)
                set_weight(get_module(layers[item.layer], path), fitted.to(dense_weight.dtype))
        if physical:
            apply_structure(model, self.structure(items, picked))
        else:
            apply_masks(structure_masks(model, self.structure(items, picked)))
        return model


# --------------------------------------------------------------------------- randomized refinement
@dataclass
class SearchResult:
    picked: list[int]
    score: float | None
    coefficients: list[float]
    evaluations: int
    accepted: int
    start: list[int] | None = None
    """The DP's choice on the initial coefficients (before refinement)."""
    start_coefficients: list[float] | None = None


def probe_coefficients(items: list[Item], stitcher: "Stitcher", score: Callable[[nn.Module], float],
                       progress: Callable[[int], None] | None = None,
                       resume: Callable[[nn.Module, int], ContextManager] | None = None) -> list[float]:
    """Per sublayer, the calibration score a unit of its (normalized) OBS loss costs the whole model.

    Each sublayer alone is cut to about half its time (the rest dense) and the stitched model scored:
    coefficient = score / estimated loss. Layer-wise losses ignore how errors grow or fade on the way
    to the output; one measured point per sublayer puts them on the model's own scale. A partial level is
    probed on the dense model itself (``Stitcher.swapped``, no copy); ``resume(model, layer)`` may then skip
    the dense blocks before the probed layer (their outputs are the dense ones, e.g. from a prefix cache).
    """
    full = [len(item.keys) - 1 for item in items]  # keys are sorted by units: the last is the dense level
    out = []
    for i, item in enumerate(items):
        half = max(item.costs) / 2
        partial = [j for j in range(len(item.keys) - 1) if item.keys[j] not in ((0, 0), 0)] or [0]
        j = min(partial, key=lambda j: abs(item.costs[j] - half))
        if stitcher.swappable(item, j):
            with stitcher.swapped(item, j) as model, \
                    (resume(model, item.layer) if resume is not None else contextlib.nullcontext()):
                value = score(model)
        else:
            picked = list(full)
            picked[i] = j
            value = score(stitcher.build(items, picked))
        out.append(max(value, 0.0) / max(item.losses[j], 1e-12) if item.losses[j] > 0 else 0.0)
        if progress is not None:
            progress(i)
    positive = [c for c in out if c > 0]
    floor = min(positive) if positive else 1.0
    return [c if c > 0 else floor for c in out]


def refine(items: list[Item], budget: float, score: Callable[[list[int]], float], *, iterations: int, seed: int,
           sigma: float = 0.5, resolution: int = 2000, progress: Callable[[int, float], None] | None = None,
           initial: list[float] | None = None) -> SearchResult:
    """SPDY-style randomized search over per-item loss coefficients (from ``initial``, default 1) scored by ``score``."""
    generator = torch.Generator().manual_seed(seed)
    coefficients = list(initial) if initial is not None else [1.0] * len(items)
    picked = dp_select(items, budget, coefficients, resolution)
    start, start_coefficients = list(picked), list(coefficients)
    if iterations <= 0:
        return SearchResult(picked, None, coefficients, 0, 0, start, start_coefficients)
    best = score(picked)
    seen = {tuple(picked): best}
    evaluations, accepted = 1, 0
    for it in range(iterations):
        width = sigma * (1.0 - 0.75 * it / max(iterations - 1, 1))  # wide early, narrow late
        noise = torch.randn(len(items), generator=generator, dtype=torch.float64) * width
        candidate = [c * math.exp(float(n)) for c, n in zip(coefficients, noise)]
        choice = dp_select(items, budget, candidate, resolution)
        key = tuple(choice)
        if key not in seen:
            seen[key] = score(choice)
            evaluations += 1
        if seen[key] < best:
            best, picked, coefficients = seen[key], choice, candidate
            accepted += 1
        if progress is not None:
            progress(it, best)
    return SearchResult(picked, best, coefficients, evaluations, accepted, start, start_coefficients)


def chosen_levels(items: list[Item], picked: list[int]) -> dict[int, dict[str, Any]]:
    """Per layer: {"attention": [groups, q per group], "mlp": neurons kept} for the PruningConfig."""
    out: dict[int, dict[str, Any]] = {}
    for item, j in zip(items, picked):
        key = item.keys[j]
        out.setdefault(item.layer, {})[item.kind] = list(key) if isinstance(key, tuple) else key
    return out
