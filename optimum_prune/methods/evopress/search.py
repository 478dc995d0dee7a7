"""EvoPress (arXiv 2410.14649): evolutionary search of per-unit compression levels on the real model.

One engine for every search space: a state holds one level per unit; offspring come from
level-switch mutations that keep the budget exact (1-3 swaps, min of two uniform draws); selection
is multi-step (offspring scored on a few tokens, survivors re-scored on more, the parent re-entering
at the last step, so the search never gets worse); fitness is KL(dense ‖ candidate) on calibration
tokens (Top-K KL bounds memory; relative output error for encoders). The search state is written to
disk after every generation, RNG included, so an interrupted search resumes to the same result.

Search spaces here: depth (attention and MLP sublayers dropped independently, or whole blocks), and
structure (ZipLM's head / neuron levels per sublayer under a MEASURED latency budget); per-Linear
sparsity and bit-width levels live in ``evopress_levels``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from transformers.utils import logging
from transformers.utils.logging import tqdm

from ...engine.importance import angular_distance, block_influence
from ...engine.layers import original_layer_indices
from ...fingerprints import content_hash as fingerprint
from ...modeling.adapters import get_adapter, get_module, set_module
from ...modeling.surgery import DroppedAttention, EmptyProjection, ZeroProjection, out_features
from ...saving import atomic_write_text
from ...evaluation.scorer import CalibrationScorer
from .config import EvoPressSettings
from .fitness import fitness_info, score_step, search_fitness

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------- the evolutionary engine
@dataclass
class SearchResult:
    state: list[int]
    fitness: float
    generations: int
    evaluations: int
    history: list[float] = field(default_factory=list)
    resumed_from: int = 0
    initial_fitness: float | None = None


def swap_mutation(state: list[int], groups: list[list[int]], generator: torch.Generator, max_swaps: int) -> list[int]:
    """Level-switch for binary states: swap a dropped (1) and a kept (0) unit within one group, 1-3 times.

    Every group keeps its number of dropped units, so the budget stays exact.
    """
    child = list(state)
    touched: set[int] = set()  # a unit moves at most once, so swaps never undo each other
    draws = torch.randint(1, max_swaps + 1, (2,), generator=generator)
    for _ in range(int(draws.min())):
        free = [[u for u in g if u not in touched] for g in groups]
        usable = [g for g in free if any(child[u] for u in g) and not all(child[u] for u in g)]
        if not usable:
            break
        group = usable[int(torch.randint(len(usable), (1,), generator=generator))]
        ones = [u for u in group if child[u]]
        zeros = [u for u in group if not child[u]]
        a = ones[int(torch.randint(len(ones), (1,), generator=generator))]
        b = zeros[int(torch.randint(len(zeros), (1,), generator=generator))]
        child[a], child[b] = 0, 1
        touched.update((a, b))
    return child


def evolve(initial: list[int], mutate: Callable[[list[int], torch.Generator], list[int]],
           fitness: Callable[..., float], settings: EvoPressSettings, *, run_key: str,
           progress: bool = True, description: str = "EvoPress", pool: int | None = None) -> SearchResult:
    """(1+λ) evolution with multi-step selection (lower fitness is better).

    Without ``pool``, ``fitness(state, step)`` scores on the step's fixed windows. With ``pool`` (and
    ``settings.fresh_windows``), every selection step draws its ``settings.windows[step]`` windows from
    ``range(pool)`` and calls ``fitness(state, step, rows)``; the parent is re-scored on the last step's
    windows next to the survivors, so it competes on the same tokens.
    """
    fresh = pool is not None and settings.fresh_windows
    generator = torch.Generator().manual_seed(settings.seed)
    parent, parent_fit, start, evaluations, history = list(initial), None, 0, 0, []
    initial_fit = None
    state_path = Path(settings.state_file) if settings.state_file else None
    if state_path is not None and state_path.is_file():
        saved = json.loads(state_path.read_text())
        if saved.get("run") == run_key:
            parent, parent_fit, start = saved["parent"], saved["fitness"], saved["generation"]
            initial_fit = saved.get("initial_fitness")
            evaluations, history = saved["evaluations"], saved["history"]
            generator.set_state(torch.tensor(saved["rng"], dtype=torch.uint8))
            logger.warning("EvoPress resumes from %s at generation %d", state_path, start)
        else:
            logger.warning("%s holds the state of a different search: starting over", state_path)
    last = len(settings.windows) - 1

    def score(state: list[int], step: int, rows: list[int] | None) -> float:
        return fitness(state, step, rows) if fresh else fitness(state, step)

    def draw(step: int) -> list[int] | None:
        return torch.randperm(pool, generator=generator)[: settings.windows[step]].tolist() if fresh else None

    bounded = getattr(fitness, "bounded", False)  # a CachedFitness: parent-aware, thresholds, deduplication
    if bounded:
        fitness.set_parent(parent)
    if parent_fit is None:
        parent_fit = initial_fit = score(parent, last, list(range(min(pool, settings.windows[last]))) if fresh
                                         else None)
        evaluations += 1
    bar = tqdm(total=settings.generations, initial=start, desc=description, disable=not progress, unit="gen")
    for generation in range(start, settings.generations):
        candidates = [mutate(parent, generator) for _ in range(settings.offspring)]
        for step in range(len(settings.windows)):
            rows = draw(step)
            if bounded:  # same scores where they decide anything; the parent first at the last step (its bound)
                if step == last and fresh:
                    parent_fit = score(parent, step, rows)
                    evaluations += 1
                scored = score_step(fitness, candidates, step, rows,
                                    settings.survivors[step] if step < last else None, parent_fit)
            else:
                scored = [(score(c, step, rows), c) for c in candidates]
            evaluations += len(scored)
            if step < last:
                scored.sort(key=lambda t: t[0])
                candidates = [c for _, c in scored[: settings.survivors[step]]]
            elif fresh and not bounded:  # the parent re-enters at the last step, on the same windows
                parent_fit = score(parent, step, rows)
                evaluations += 1
        best_fit, best = min(scored, key=lambda t: t[0])
        if best_fit < parent_fit:  # elitist: the parent stays unless an offspring beats it
            parent, parent_fit = best, best_fit
            if bounded:
                fitness.set_parent(parent)
        history.append(parent_fit)
        bar.update(1)
        bar.set_postfix(fitness=f"{parent_fit:.4g}")
        if state_path is not None:
            _save_state(state_path, {"run": run_key, "generation": generation + 1, "parent": parent,
                                     "fitness": parent_fit, "evaluations": evaluations, "history": history,
                                     "initial_fitness": initial_fit,
                                     "rng": generator.get_state().tolist()})
    bar.close()
    return SearchResult(parent, parent_fit, settings.generations, evaluations, history, start, initial_fit)


def _save_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(state))


# --------------------------------------------------------------------------- depth search space
@contextlib.contextmanager
def dropped_sublayers(model: nn.Module, attention: set[int], mlp: set[int]) -> Iterator[nn.Module]:
    """Temporarily remove the attention / MLP sublayers of the given block positions (restored on exit).

    The same replacements as ``apply_structure`` uses, so a candidate scores exactly as it will run.
    """
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    saved: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for position in attention:
            block = layers[position]
            core = adapter.attention_core(block)
            out_inside = adapter.attention_out.startswith(adapter.attention + ".")
            hidden = out_features(get_module(block, adapter.attention_out))
            saved.append((block, adapter.attention, core))
            set_module(block, adapter.attention, DroppedAttention(getattr(core, "layer_idx", None),
                                                                  hidden if out_inside else 0))
            if not out_inside:
                saved.append((block, adapter.attention_out, get_module(block, adapter.attention_out)))
                set_module(block, adapter.attention_out, ZeroProjection(hidden))
        for position in mlp:
            block = layers[position]
            if adapter.experts is not None:  # the whole Mixture-of-Experts sublayer, as surgery removes it
                saved.append((block, adapter.experts.block, get_module(block, adapter.experts.block)))
                set_module(block, adapter.experts.block, ZeroProjection(model.config.hidden_size))
                continue
            hidden = out_features(get_module(block, adapter.mlp_out))
            for path in adapter.mlp_in:
                saved.append((block, path, get_module(block, path)))
                set_module(block, path, EmptyProjection())
            saved.append((block, adapter.mlp_out, get_module(block, adapter.mlp_out)))
            set_module(block, adapter.mlp_out, ZeroProjection(hidden))
        yield model
    finally:
        for block, path, module in reversed(saved):
            set_module(block, path, module)


@dataclass
class DepthSearchResult:
    """What to drop (original indices) and how the search went."""

    drop_layers: list[int]
    drop_attention: list[int]
    drop_mlp: list[int]
    info: dict[str, Any]


def search_depth(model: nn.Module, input_ids: torch.Tensor, *, num_blocks: int | None = None,
                 drop_ratio: float | None = None, sublayers: bool = False,
                 settings: EvoPressSettings | None = None, batch_size: int = 4, progress: bool = True
                 ) -> DepthSearchResult:
    """EvoPress depth search: which ``num_blocks`` blocks (or, with ``sublayers``, that many attention AND
    that many MLP sublayers, chosen independently) to drop, minimizing KL to the dense model.

    The search starts from the best (by fitness) of the fixed strategies: last blocks, smallest
    angular distance window, lowest block influence.
    """
    settings = settings or EvoPressSettings()
    originals = original_layer_indices(model)
    depth = len(originals)
    if (num_blocks is None) == (drop_ratio is None):
        raise ValueError("give exactly one of num_blocks (e.g. 6) and drop_ratio (e.g. 0.25)")
    n = num_blocks if num_blocks is not None else round(drop_ratio * depth)
    if not 1 <= n < depth:
        raise ValueError(f"can drop 1 to {depth - 1} of the model's {depth} blocks, got {n}")
    s = settings.resolved(kept=(2 if sublayers else 1) * (depth - n), dropped=(2 if sublayers else 1) * n,
                          available_windows=input_ids.shape[0])
    scorer = CalibrationScorer(model, input_ids, s.top_k, batch_size, s.fitness)

    def sets(state: list[int]) -> tuple[set[int], set[int]]:
        if sublayers:
            return ({p for p in range(depth) if state[p]}, {p for p in range(depth) if state[depth + p]})
        blocks = {p for p in range(depth) if state[p]}
        return blocks, blocks

    fitness = search_fitness(model, scorer, lambda state: dropped_sublayers(model, *sets(state)),
                             [u % depth for u in range((2 if sublayers else 1) * depth)], s, batch_size)

    # seeds: the fixed strategies, as block sets (positions)
    probe = input_ids[: s.windows[-1]]
    influence = block_influence(model, probe, batch_size=batch_size)
    angular = angular_distance(model, probe, span=n, batch_size=batch_size)
    position = {orig: p for p, orig in enumerate(originals)}
    seeds = {
        "last": list(range(depth - 1 - n, depth - 1)),
        "angular": list(range(position[min(angular, key=angular.get)], position[min(angular, key=angular.get)] + n)),
        "block_influence": sorted(position[o] for o in sorted(influence, key=influence.get)[:n]),
    }
    seed_fitness = {}
    for name, blocks in seeds.items():
        state = [1 if p in blocks else 0 for p in range(depth)]
        seed_fitness[name] = fitness(state + state if sublayers else state, len(s.windows) - 1)
    best_seed = min(seed_fitness, key=seed_fitness.get)
    initial = [1 if p in seeds[best_seed] else 0 for p in range(depth)]
    initial = initial + initial if sublayers else initial
    groups = [list(range(depth)), list(range(depth, 2 * depth))] if sublayers else [list(range(depth))]
    run_key = fingerprint("evopress-depth", input_ids, depth, n, sublayers, s.search_key())
    result = evolve(initial, lambda st, g: swap_mutation(st, groups, g, s.max_swaps), fitness, s, run_key=run_key,
                    progress=progress, description="EvoPress depth", pool=input_ids.shape[0])
    attention, mlp = sets(result.state)
    final = fitness(result.state, len(s.windows) - 1)  # on the seeds' windows, so the two compare
    info = {"method": "evopress", "target": "depth", "units": "sublayers" if sublayers else "blocks", "removed": n,
            "fitness": final, "search_fitness": result.fitness, "fitness_metric": scorer.name,
            "generations": result.generations, "offspring": s.offspring,
            "survivors": s.survivors, "tokens": [w * input_ids.shape[1] for w in s.windows],
            "fresh_windows": s.fresh_windows, "evaluations": result.evaluations, "seed": s.seed, "start": best_seed,
            "seed_fitness": seed_fitness, "history": [round(h, 6) for h in result.history],
            **fitness_info(fitness)}
    if sublayers:
        return DepthSearchResult([], sorted(originals[p] for p in attention), sorted(originals[p] for p in mlp), info)
    return DepthSearchResult(sorted(originals[p] for p in attention), [], [], info)


# --------------------------------------------------------------------------- structure search space
def budget_mutation(state: list[int], costs: list[tuple[float, ...]], budget: float, generator: torch.Generator,
                    max_swaps: int, tries: int = 20) -> list[int]:
    """Level-switch under a time budget: one sublayer up a level, others down until the budget holds again.

    Levels are ordered by cost (index 0 cheapest); the child never exceeds the budget.
    """
    child = list(state)
    draws = torch.randint(1, max_swaps + 1, (2,), generator=generator)
    for _ in range(int(draws.min())):
        up = [i for i, j in enumerate(child) if j + 1 < len(costs[i])]
        if not up:
            break
        a = up[int(torch.randint(len(up), (1,), generator=generator))]
        trial = list(child)
        trial[a] += 1
        for _ in range(tries):
            total = sum(costs[i][j] for i, j in enumerate(trial))
            if total <= budget:
                break
            down = [i for i, j in enumerate(trial) if j > 0 and i != a]
            if not down:
                break
            b = down[int(torch.randint(len(down), (1,), generator=generator))]
            trial[b] -= 1
        if sum(costs[i][j] for i, j in enumerate(trial)) <= budget:
            child = trial
    return child


def search_structure(model: nn.Module, input_ids: torch.Tensor, table, target_speedup: float, database, *,
                     settings: EvoPressSettings | None = None, batch_size: int = 4, progress: bool = True
                     ) -> tuple[list[int], list, dict[str, Any]]:
    """EvoPress over ZipLM's levels: one level per attention / MLP, total table time within the budget
    for ``target_speedup``, minimizing KL to the dense model; starts from ZipLM's DP choice.

    Returns (chosen level index per item, the items, search info).
    """
    from ...engine.structure.search import Stitcher, budget_for, dp_select, items_from, predicted_ms

    settings = settings or EvoPressSettings()
    items = items_from(database, table)
    order = [sorted(range(len(item.keys)), key=lambda j: item.costs[j]) for item in items]  # cheapest first
    costs = [tuple(item.costs[j] for j in o) for item, o in zip(items, order)]
    budget = budget_for(target_speedup, items, table)
    start = dp_select(items, budget)
    initial = [o.index(j) for o, j in zip(order, start)]
    s = settings.resolved(kept=len(items), dropped=4, available_windows=input_ids.shape[0])
    scorer = CalibrationScorer(model, input_ids, s.top_k, batch_size, s.fitness)
    stitcher = Stitcher(model, database)

    def picked(state: list[int]) -> list[int]:
        return [o[j] for o, j in zip(order, state)]

    fitness = search_fitness(model, scorer, lambda state: contextlib.nullcontext(stitcher.build(items, picked(state))),
                             [item.layer for item in items], s, batch_size)

    run_key = fingerprint("evopress-structure", input_ids, target_speedup, table.to_dict(), s.search_key())
    result = evolve(initial, lambda st, g: budget_mutation(st, costs, budget, g, s.max_swaps), fitness, s,
                    run_key=run_key, progress=progress, description=f"EvoPress structure {target_speedup:g}x",
                    pool=input_ids.shape[0])
    chosen = picked(result.state)
    info = {"method": "evopress", "target": "structure", "target_speedup": target_speedup,
            "predicted_speedup": round(table.dense_ms / predicted_ms(items, chosen, table), 4),
            "fitness": result.fitness, "start_fitness": result.initial_fitness,
            "fitness_metric": scorer.name,
            "generations": result.generations, "offspring": s.offspring, "survivors": s.survivors,
            "tokens": [w * input_ids.shape[1] for w in s.windows], "evaluations": result.evaluations, "seed": s.seed,
            "start": "ziplm dp", "history": [round(h, 6) for h in result.history], **fitness_info(fitness)}
    return chosen, items, info


__all__ = ["EvoPressSettings", "SearchResult", "DepthSearchResult", "evolve", "swap_mutation", "search_depth",
           "dropped_sublayers", "budget_mutation", "search_structure"]
