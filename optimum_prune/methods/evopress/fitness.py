"""EvoPress fitness with exact savings: a candidate starts from its parent's cached activations at its first
changed block, an evaluation that can no longer be selected stops early, identical candidates are scored once;
a candidate scored at the last selection step keeps its own block states, so if it becomes the parent they are
adopted instead of being recomputed.
KL fitness (causal LMs) is computed window by window: a (state, window) scored once is never scored again (the
parent, re-scored at every last selection step, mostly costs nothing), and a stop skips the windows after it and
the vocabulary head of the rest of its own window; the head's logits and log-probs reuse two buffers.

Every saving leaves the scores the search compares, and so its trajectory, as they were (tested against the
plain fitness): the skipped blocks would have computed what the parent computed, and a stopped evaluation
only returns a lower bound where ``evolve`` needs to know no more than "not better than the threshold".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, ContextManager

import torch
from torch import nn

from ...evaluation.kl import KLWorkspace, WindowKL, mean_kl_of_windows, window_kl
from ...evaluation.models import LogitsSource, eval_no_grad, model_device
from ...evaluation.prefix_cache import PrefixCache
from ...evaluation.scorer import CalibrationScorer
from ...modeling.adapters import get_adapter
from .config import EvoPressSettings

Signature = Callable[[list[int]], Sequence[Any]]
"""One hashable per block of the scored model: what of a state that block depends on."""


class CachedFitness:
    """``fitness(state, step, rows)`` for ``evolve``, reusing the parent's prefix (``PrefixCache``)."""

    bounded = True  # evolve passes thresholds (``limit``) and the parent (``set_parent``)
    MEMO_MIB = 64.0
    """Per-position KL of scored (state, window) pairs kept for reuse (2 KiB per 512-token window)."""

    def __init__(self, scorer: CalibrationScorer, model_for: Callable[[list[int]], ContextManager[nn.Module]],
                 signature: Signature, default_rows: Callable[[int], list[int]], cache: PrefixCache | None,
                 batch_size: int, by_window: bool = True, capture_step: int | None = None) -> None:
        self.scorer = scorer
        self.model_for = model_for
        self.signature = signature
        self.default_rows = default_rows
        self.cache = cache if cache is not None and cache.enabled else None
        self.batch_size = batch_size
        self.capture_step = capture_step  # the selection step whose candidates may become the parent
        self.parent: list[int] | None = None
        self.threshold: float | None = None
        # window by window (KL of causal LMs only): per-position KL memo and how it was used
        self.by_window = by_window and scorer.metric == "kl" and scorer.causal
        self.memo: dict[tuple[tuple[int, ...], int], torch.Tensor] = {}
        self.memo_bytes = 0
        self.windows = {"scored": 0, "reused": 0, "skipped": 0, "stopped_inside": 0}
        self.workspace = KLWorkspace()  # the head's logits / log-probs chunk buffers (128 MiB), kept for the search
        self._source: tuple[nn.Module, LogitsSource] | None = None
        self._vocab: int | None = None

    def set_parent(self, state: list[int]) -> None:
        """The search's parent is now ``state``: its cached activations are the ones candidates resume from."""
        self.parent = list(state)
        if self.cache is not None:
            self.cache.set_parent(self.signature(self.parent))

    @contextlib.contextmanager
    def limit(self, threshold: float | None):
        """Scores at or above ``threshold`` are not needed exactly inside (the selection rejects them anyway)."""
        previous, self.threshold = self.threshold, threshold
        try:
            yield
        finally:
            self.threshold = previous

    def _capture(self, state: list[int], step: int) -> list[Any] | None:
        """The signature under which ``state``'s resumed forwards keep their states: candidates of the last
        selection step only (the others cannot become the parent; their captures of earlier steps are dropped)."""
        if self.cache is None or self.capture_step is None:
            return None
        if step != self.capture_step:
            self.cache.discard_captured()
            return None
        return None if state == self.parent else self.signature(state)

    def __call__(self, state: list[int], step: int, rows: list[int] | None = None) -> float:
        rows = rows if rows is not None else self.default_rows(step)
        capture = self._capture(state, step)
        if self.by_window:
            return self._by_window(state, rows, capture)
        start = 0
        if self.cache is not None and self.parent is not None:
            start = self.cache.start_for(self.signature(state))
            missing = self.cache.missing(rows, start) if start else []
            if missing:
                with self.model_for(self.parent) as parent_model:
                    self.cache.fill(parent_model, missing, self.batch_size)
        with self.model_for(state) as model, self.scorer.stopping_above(self.threshold):
            if self.cache is None:
                return self.scorer(model, rows)
            with self.cache.resume(model, start, capture=capture):
                return self.scorer(model, rows)

    # ------------------------------------------------------------------------------ window by window
    def _by_window(self, state: list[int], rows: list[int], capture: list[Any] | None = None) -> float:
        """The KL on ``rows`` as ``scorer`` computes it (same chunks, same order, same stop), each window scored
        on its own when first needed: windows this state was scored on before come from the memo, windows after
        a stop are never run."""
        key = tuple(state)
        todo = [r for r in dict.fromkeys(rows) if (key, r) not in self.memo]
        start = 0
        if todo and self.cache is not None and self.parent is not None:
            start = self.cache.start_for(self.signature(state))
            missing = self.cache.missing(todo, start) if start else []
            if missing:  # the parent's forward stops at the boundary needed; deeper ones are filled on demand
                with self.model_for(self.parent) as parent_model:
                    self.cache.fill(parent_model, missing, self.batch_size, upto=start)
        reference = self.scorer.reference
        with contextlib.ExitStack() as stack:
            # entered on every call, as the plain path does: a search may rely on the model being left in the
            # scored state (a level store's ``loaded`` sets the weights); only the forwards are skipped
            model = stack.enter_context(self.model_for(state))
            opened: dict[str, Any] = {}
            asked = [0]
            running: dict[int, WindowKL] = {}

            def kl_of(i: int) -> torch.Tensor | WindowKL:
                asked[0] += 1
                row = rows[i]
                value = self.memo.get((key, row), running.get(row))
                if value is not None:
                    self.windows["reused"] += 1
                    return value
                if not opened:  # eval mode and the resumed forward, once and only if a window must run
                    stack.enter_context(eval_no_grad(model))
                    if self.cache is not None:
                        stack.enter_context(self.cache.resume(model, start, capture=capture))
                    opened.update(source=self._logits_source(model), device=model_device(model))
                window, self._vocab = window_kl(opened["source"], reference, row, opened["device"], lazy=True,
                                                workspace=self.workspace)
                self.windows["scored"] += 1
                running[row] = window
                return window  # its head runs chunk by chunk as the mean reads it

            value = mean_kl_of_windows(kl_of, len(rows), reference.input_ids.shape[1], self.scorer.batch_size,
                                       lambda: self._vocab, self.threshold)
            self.windows["skipped"] += len(rows) - asked[0]
            for row, window in running.items():  # only whole windows are remembered
                if window.complete:
                    self._remember((key, row), window.values())
                else:
                    self.windows["stopped_inside"] += 1
            return value

    def _logits_source(self, model: nn.Module) -> LogitsSource:
        """How logits are computed (backbone + head, or full logits), probed once per model object: the search
        swaps sublayers or loads weights in place, which does not change that answer."""
        if self._source is None or self._source[0] is not model:
            probe = self.scorer.ids[:1, : min(16, self.scorer.ids.shape[1])].to(model_device(model))
            self._source = (model, LogitsSource.of(model, probe))
        return self._source[1]

    def _remember(self, key: tuple[tuple[int, ...], int], value: torch.Tensor) -> None:
        """Keep a window's per-position KL within ``MEMO_MIB``, dropping the oldest non-parent entries first."""
        self.memo[key] = value
        self.memo_bytes += value.numel() * value.element_size()
        parent = tuple(self.parent) if self.parent is not None else None
        while self.memo_bytes > self.MEMO_MIB * 2**20:
            old = next((k for k in self.memo if k[0] != parent), None)
            if old is None:
                break
            dropped = self.memo.pop(old)
            self.memo_bytes -= dropped.numel() * dropped.element_size()

    def info(self) -> dict[str, Any]:
        """What the reuse did, for the search record."""
        windows = {"window_scores": dict(self.windows)} if self.by_window else {}
        if self.cache is None:
            return {"activation_cache": None, **windows}
        return {"activation_cache": self.cache.stats.to_dict(), **windows}


def score_step(fitness: Callable[..., float], candidates: list[list[int]], step: int, rows: list[int] | None,
               keep: int | None, ceiling: float | None) -> list[tuple[float, list[int]]]:
    """Score ``candidates`` in order as the plain loop would, for a fitness with ``limit``: identical states
    are scored once, and once ``keep`` scores are known (or ``ceiling``, the parent's, is) an evaluation stops
    as soon as it cannot be selected: it cannot enter the best ``keep`` (ties go to earlier candidates, as in
    the stable sort), or at the last step (``keep=None``) beat both the parent and the best so far."""
    scored: list[tuple[float, list[int]]] = []
    known: dict[tuple[int, ...], float] = {}
    complete: list[float] = []
    for state in candidates:
        key = tuple(state)
        if key not in known:
            if keep is not None:
                threshold = sorted(complete)[keep - 1] if len(complete) >= keep else None
            else:
                threshold = min([v for v in (ceiling, min(complete, default=None)) if v is not None], default=None)
            with fitness.limit(threshold):
                value = fitness(state, step, rows) if rows is not None else fitness(state, step)
            known[key] = value
            if threshold is None or value < threshold:  # below the threshold the evaluation ran to the end
                complete.append(value)
        scored.append((known[key], state))
    return scored


def search_fitness(model: nn.Module, scorer: CalibrationScorer,
                   model_for: Callable[[list[int]], ContextManager[nn.Module]], unit_blocks: Sequence[int],
                   settings: EvoPressSettings, batch_size: int) -> Callable[..., float]:
    """The fitness of a search whose unit ``i`` sits in block ``unit_blocks[i]`` of ``model`` and whose states
    ``model_for`` turns into a model to score: a ``CachedFitness`` within ``settings.cache_mib``, or with
    ``cache_mib=0`` the plain one (every candidate a full forward, as before the cache existed)."""
    def rows_of(step: int) -> list[int]:
        return list(range(settings.windows[step]))

    depth = len(get_adapter(model).layers(model))
    if not settings.cache_mib or settings.cache_mib <= 0 or not all(0 <= b < depth for b in unit_blocks):
        def plain(state: list[int], step: int, rows: list[int] | None = None) -> float:
            with model_for(state) as candidate:
                return scorer(candidate, rows if rows is not None else rows_of(step))
        return plain
    cache = PrefixCache(model, scorer.ids, settings.cache_mib)
    by_block = [[i for i, b in enumerate(unit_blocks) if b == p] for p in range(cache.depth)]

    def signature(state: list[int]) -> list[tuple[int, ...]]:
        return [tuple(state[i] for i in units) for units in by_block]

    return CachedFitness(scorer, model_for, signature, rows_of, cache, batch_size,
                         capture_step=len(settings.windows) - 1)


def fitness_info(fitness: Callable[..., float]) -> dict[str, Any]:
    """The reuse statistics of a search's fitness for its record (None when it ran without the cache)."""
    return fitness.info() if isinstance(fitness, CachedFitness) else {"activation_cache": None}


@contextlib.contextmanager
def loaded(model: nn.Module, load: Callable[[list[int]], None], state: list[int]):
    """``model`` after ``load(state)`` (a search that sets its units in place, e.g. from a level store)."""
    load(state)
    yield model


__all__ = ["CachedFitness", "score_step", "search_fitness", "fitness_info", "loaded"]
