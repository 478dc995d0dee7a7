"""A parent's hidden states at block boundaries on the scoring windows, so a search candidate that shares the
parent's first blocks starts at its first changed block instead of at the embeddings.

Exact: the skipped blocks would compute, on the same windows, what the parent computed. The cache keeps, per
scoring window, the residual stream entering some blocks (``boundary b`` = the output of block ``b - 1``; the
last one, ``depth``, is what enters the final norm, so the parent itself is re-scored with its head only).
Memory is ``windows x boundaries x seq_len x hidden x bytes``; the boundaries kept are chosen to fit a budget.
A forward of the model on a cached window with ``resume(model, start)`` replays boundary ``start`` for blocks
``0 .. start - 1`` (their ``forward`` is patched for the duration); any other input runs normally.

A candidate's resumed forward can also ``capture`` its own boundary states (``resume(..., capture=signature)``):
if that candidate becomes the next parent, ``set_parent`` adopts them for the windows it ran on, instead of
re-running the new parent on those windows from the last boundary the two share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..modeling.adapters import get_adapter
from .models import call_without_cache, eval_no_grad, model_device

logger = logging.get_logger(__name__)


@dataclass
class PrefixCacheStats:
    """How the cache was used: forwards resumed, blocks they skipped, parent windows filled, bytes held."""

    resumed: int = 0
    full: int = 0
    blocks_skipped: int = 0
    blocks_total: int = 0
    filled_windows: int = 0
    adopted_windows: int = 0
    peak_mib: float = 0.0
    boundaries: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"resumed": self.resumed, "full": self.full, "filled_windows": self.filled_windows,
                "adopted_windows": self.adopted_windows,
                "skipped_block_fraction": round(self.blocks_skipped / max(1, self.blocks_total), 4),
                "peak_mib": round(self.peak_mib, 1), "boundaries": list(self.boundaries)}


def choose_boundaries(depth: int, windows: int, bytes_per_state: int, budget_mib: float) -> list[int]:
    """Boundaries to keep for ``windows`` windows within ``budget_mib``: the last (parent re-scores) first, then
    evenly spaced ones (a candidate resumes at the nearest kept boundary at or before its first change)."""
    fits = int(budget_mib * 2**20 // max(1, windows * bytes_per_state))
    if fits <= 0:
        return []
    if fits >= depth:
        return list(range(1, depth + 1))
    inner = fits - 1
    picked = {round(1 + i * (depth - 1) / inner) for i in range(inner)} if inner else set()
    return sorted({b for b in picked if 1 <= b < depth} | {depth})


class PrefixCache:
    """The parent's boundary states per scoring window (see the module docstring); ``budget_mib`` bounds them,
    and the candidates' captured states take at most ``CAPTURE_SHARE`` of it on top."""

    CAPTURE_SHARE = 0.25

    def __init__(self, model: nn.Module, windows: torch.Tensor, budget_mib: float) -> None:
        self.adapter = get_adapter(model)
        self.depth = len(self.adapter.layers(model))
        self.windows = windows
        self.index: dict[bytes, int] = {}
        for i, row in enumerate(windows):
            self.index.setdefault(row.numpy().tobytes(), i)
        hidden = model.config.get_text_config().hidden_size
        itemsize = next(model.parameters()).element_size()
        self.state_bytes = windows.shape[1] * hidden * itemsize
        self.boundaries = choose_boundaries(self.depth, windows.shape[0], self.state_bytes, budget_mib)
        self.capture_bytes = int(self.CAPTURE_SHARE * budget_mib * 2**20)
        self.states: dict[int, dict[int, torch.Tensor]] = {}
        self.pending: dict[tuple[Any, ...], dict[int, dict[int, torch.Tensor]]] = {}  # captured, per signature
        self.parent: list[Any] | None = None
        self.tuple_output: bool | None = None
        self.stats = PrefixCacheStats(boundaries=list(self.boundaries))
        self._current: torch.Tensor | None = None
        if not self.boundaries:
            logger.warning("EvoPress activation cache: %.0f MiB cannot hold one boundary of %d windows (%.1f MiB); "
                           "candidates run full forwards", budget_mib, windows.shape[0],
                           windows.shape[0] * self.state_bytes / 2**20)

    @property
    def enabled(self) -> bool:
        return bool(self.boundaries)

    def nbytes(self) -> int:
        return self._bytes(self.states) + sum(self._bytes(held) for held in self.pending.values())

    @staticmethod
    def _bytes(states: dict[int, dict[int, torch.Tensor]]) -> int:
        return sum(t.numel() * t.element_size() for per in states.values() for t in per.values())

    # ------------------------------------------------------------------------------ parent and candidates
    def set_parent(self, signature: Sequence[Any]) -> None:
        """The parent changed to ``signature`` (one hashable per block): boundaries past the first changed
        block are dropped, the ones before it stay valid."""
        keep = 0 if self.parent is None else first_change(self.parent, signature)
        self.parent = list(signature)
        for per in self.states.values():
            for b in [b for b in per if b > keep]:
                del per[b]
        adopted = self.pending.get(tuple(signature), {})
        for w, per in adopted.items():  # the new parent's own states, captured when it was scored as a candidate
            held = self.states.setdefault(w, {})
            for b, state in per.items():
                held.setdefault(b, state)  # at or before ``keep`` both parents' states are the same numbers
        self.stats.adopted_windows += len(adopted)
        self.pending.clear()

    def discard_captured(self) -> None:
        """Forget the candidates' captured states (none of them became the parent)."""
        self.pending.clear()

    def start_for(self, signature: Sequence[Any]) -> int:
        """The boundary a candidate resumes at: the last kept one at or before its first change (0: none)."""
        if self.parent is None:
            return 0
        change = first_change(self.parent, signature)
        return max((b for b in self.boundaries if b <= change), default=0)

    def missing(self, rows: Sequence[int], start: int) -> list[int]:
        """Windows of ``rows`` (deduplicated) without boundary ``start``."""
        canon = [self.index[self.windows[r].numpy().tobytes()] for r in rows]
        return [w for w in dict.fromkeys(canon) if start not in self.states.get(w, {})]

    @torch.no_grad()
    def fill(self, parent_model: nn.Module, rows: Sequence[int], batch_size: int, upto: int | None = None) -> None:
        """Run the parent on ``rows`` (resuming from what it already holds) and keep every kept boundary; with
        ``upto`` (a kept boundary) the forward stops there: later boundaries are filled when first needed."""
        if not rows:
            return
        last = self.depth if upto is None else upto
        layers = self.adapter.layers(parent_model)
        device = model_device(parent_model)
        with eval_no_grad(parent_model):
            for begin in range(0, len(rows), batch_size):
                batch = list(rows[begin:begin + batch_size])
                have = [set(self.states.get(w, {})) for w in batch]
                start = max((b for b in self.boundaries if all(b in h for h in have)), default=0)
                captured: dict[int, torch.Tensor] = {}
                if start >= last:
                    continue
                handles = [layers[b - 1].register_forward_hook(self._capture(captured, b, b == last))
                           for b in self.boundaries if start < b <= last]
                try:
                    with self.resume(parent_model, start, count=False):
                        call_without_cache(parent_model.base_model, self.windows[batch].to(device))
                except _Filled:
                    pass
                finally:
                    for h in handles:
                        h.remove()
                for b, states in captured.items():
                    for j, w in enumerate(batch):
                        self.states.setdefault(w, {})[b] = states[j].clone()
                self.stats.filled_windows += len(batch)
        self.stats.peak_mib = max(self.stats.peak_mib, self.nbytes() / 2**20)

    def _capture(self, captured: dict[int, torch.Tensor], boundary: int, stop: bool = False):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.tuple_output = isinstance(output, tuple)
            captured[boundary] = (output[0] if isinstance(output, tuple) else output).detach()
            if stop:  # the rest of the forward is not needed
                raise _Filled
        return hook

    # ------------------------------------------------------------------------------ resumed forwards
    @contextlib.contextmanager
    def resume(self, model: nn.Module, start: int, count: bool = True,
               capture: Sequence[Any] | None = None) -> Iterator[nn.Module]:
        """Inside, a forward of ``model`` on cached windows skips blocks ``0 .. start - 1`` (boundary ``start``
        replayed); other inputs (probes, unknown windows) run every block. With ``capture`` (``model``'s
        signature), the kept boundaries after ``start`` that ``model`` computes on cached windows are kept for
        ``set_parent(capture)`` (at most ``CAPTURE_SHARE`` of the budget, for every candidate together)."""
        start = max(0, start)
        layers = self.adapter.layers(model)
        base = model.base_model
        current: dict[str, Any] = {"states": None, "found": None}

        def pre(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            current["states"] = current["found"] = None
            if ids is None:
                return
            found = [self.index.get(row.cpu().numpy().tobytes()) for row in ids]
            if any(w is None for w in found):
                return
            current["found"] = found
            if start and all(start in self.states.get(w, {}) for w in found):
                current["states"] = torch.stack([self.states[w][start] for w in found])

        def replay(original):
            def forward(*args: Any, **kwargs: Any) -> Any:
                states = current["states"]
                if states is None:
                    return original(*args, **kwargs)
                return (states,) if self.tuple_output else states
            return forward

        handles = []
        if start > 0 or capture is not None:
            handles.append(base.register_forward_pre_hook(pre, with_kwargs=True))
        if capture is not None:
            kept = self.pending.setdefault(tuple(capture), {})
            handles += [layers[b - 1].register_forward_hook(self._keep(kept, current, b))
                        for b in self.boundaries if b > start]
        patched = [layers[i] for i in range(min(start, len(layers)))]
        saved = [block.__dict__.get("forward") for block in patched]  # an instance forward (accelerate) stays
        for block in patched:
            block.forward = replay(block.forward)
        if count:
            self.stats.resumed += int(start > 0)
            self.stats.full += int(start <= 0)
            self.stats.blocks_skipped += start
            self.stats.blocks_total += self.depth
        try:
            yield model
        finally:
            for h in handles:
                h.remove()
            for block, previous in zip(patched, saved):
                if previous is None:
                    del block.forward  # the instance attribute; the class's forward shows through again
                else:
                    block.forward = previous
            self.stats.peak_mib = max(self.stats.peak_mib, self.nbytes() / 2**20)

    def _keep(self, kept: dict[int, dict[int, torch.Tensor]], current: dict[str, Any], boundary: int):
        """A forward hook keeping a candidate's state at ``boundary`` for the windows of the current forward."""
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            found = current["found"]
            if found is None:
                return
            self.tuple_output = isinstance(output, tuple)
            out = (output[0] if isinstance(output, tuple) else output).detach()
            size = out[0].numel() * out.element_size()
            for j, w in enumerate(found):
                if boundary in kept.get(w, {}):
                    continue
                if sum(self._bytes(held) for held in self.pending.values()) + size > self.capture_bytes:
                    return
                kept.setdefault(w, {})[boundary] = out[j].clone()
        return hook


class _Filled(Exception):
    """Raised by the capture hook of ``fill(upto=...)``'s last boundary to end the parent's forward there."""


def first_change(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Index of the first block whose signature differs (``len(a)`` when none does)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return len(a)


__all__ = ["PrefixCache", "PrefixCacheStats", "choose_boundaries", "first_change"]
