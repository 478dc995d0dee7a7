"""KL(reference || model) of next-token distributions: streamed against a live reference, or against its log-probs
kept once (``reference_logprobs``) to score many candidates.

``kl_divergence``, ``reference_logprobs`` and ``kl_to_reference`` share one loop (``_walk``: the windows in
batches, each model's fp32 log-probs in position chunks) and one KL sum (``_mean_kl``). With ``top_k`` the
reference keeps its top-k tokens plus one "rest" bucket (EvoPress's Top-K KL, a lower bound of the full KL).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import logging

from .models import LogitsSource, chunk_rows, eval_no_grad, place, require_causal_lm
from .windows import as_windows, batches

logger = logging.get_logger(__name__)

_Rows = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
"""The reference's rows as KL needs them: (log-probs or top-k log-probs, top-k indices, log rest mass)."""


@dataclass
class ReferenceLogprobs:
    """The reference (dense) model's next-token log-probs on ``input_ids``, computed once.

    With ``top_k`` only the reference's top-k tokens and one "rest" bucket are kept, so memory is
    ``n * seq_len * (top_k + 1)`` numbers instead of ``n * seq_len * vocab``.
    """

    input_ids: torch.Tensor
    """[n, seq_len] token ids the log-probs were computed on."""
    logprobs: torch.Tensor
    """[n, seq_len, top_k] (or [n, seq_len, vocab] without top_k), fp32."""
    indices: torch.Tensor | None
    """[n, seq_len, top_k] token ids of ``logprobs``; None for the full vocabulary."""
    rest_logprob: torch.Tensor | None
    """[n, seq_len] log of the probability mass outside the top-k; None for the full vocabulary."""
    top_k: int | None

    def subset(self, rows: list[int]) -> "ReferenceLogprobs":
        """The same log-probs for a subset of the windows (to score on a fresh minibatch)."""
        index = torch.as_tensor(rows, dtype=torch.long)
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return ReferenceLogprobs(self.input_ids[index], self.logprobs[index], pick(self.indices),
                                 pick(self.rest_logprob), self.top_k)


# ------------------------------------------------------------------------------------ the one loop


def _walk(models: Sequence[nn.Module], windows: torch.Tensor, device: torch.device, batch_size: int, desc: str,
          progress: bool) -> Iterator[tuple[slice, list[torch.Tensor]]]:
    """Each model's fp32 log-probs on ``windows``, batch by batch and position chunk by position chunk.

    Yields the chunk's rows of the flattened [n * seq_len] positions and one log-probs block per model (the
    models must share a vocabulary). Run it under ``eval_no_grad`` of the models.
    """
    length = windows.shape[1]
    sources = [LogitsSource.probing(m, windows, device) for m in models]
    for rows in batches(windows.shape[0], batch_size, desc, progress):
        ids = windows[rows].to(device)
        states = [source.states(ids) for source in sources]
        vocab = sources[0].vocab_size(states[0])
        for source, other in zip(sources[1:], states[1:]):
            _check_vocab(vocab, source.vocab_size(other))
        step = chunk_rows(vocab)
        for start in range(0, states[0].shape[0], step):
            logps = [source.logprobs(s[start:start + step]) for source, s in zip(sources, states)]
            offset = rows.start * length + start
            yield slice(offset, offset + logps[0].shape[0]), logps


def _mean_kl(chunks: Iterable[tuple[torch.Tensor, _Rows]], stop_above: float | None = None,
             positions: int | None = None) -> float:
    """Mean over positions of KL(p || q), from (model log-probs q, reference rows p) chunks, summed in fp64.

    With ``stop_above`` (and the total ``positions``), it returns ``total / positions`` as soon as that lower
    bound of the mean (KL terms are never negative) reaches ``stop_above``: the candidate cannot win anymore.
    """
    total, count = 0.0, 0
    for logq, (logp, idx, rest) in chunks:
        kl = _kl_rows(logq, logp, idx, rest)
        total += kl.double().sum().item()
        count += kl.numel()
        if stop_above is not None and count < positions and total / positions >= stop_above:
            return total / positions
    return total / count


def _reference_rows(logp: torch.Tensor, top_k: int | None) -> _Rows:
    """Rows of reference log-probs as KL uses them: Top-K split (top_k capped at the vocabulary) or full."""
    k = min(top_k, logp.shape[-1]) if top_k else None
    return _top_k_split(logp, k) if k else (logp, None, None)


def _top_k_split(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k log-probs, their indices, log of the remaining mass) for rows of log-probs."""
    top, idx = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, idx, float("-inf")).logsumexp(-1)
    return top, idx, rest


def _kl_rows(logq: torch.Tensor, logp: torch.Tensor, idx: torch.Tensor | None = None,
             rest: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p || q) per row; with ``idx`` the distributions are p's top-k tokens plus one "rest" bucket."""
    if idx is None:
        p = logp.exp()
        return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)
    return _kl_from(logq.gather(-1, idx), logq.scatter(-1, idx, float("-inf")).logsumexp(-1), logp, rest)


def _check_vocab(model_vocab: int, ref_vocab: int) -> None:
    if model_vocab != ref_vocab:
        raise ValueError(f"the model's vocabulary ({model_vocab}) differs from the reference's ({ref_vocab})")


# ------------------------------------------------------------------------------------- public API


def kl_divergence(
    model: nn.Module,
    reference: nn.Module,
    input_ids: torch.Tensor,
    *,
    top_k: int | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> float:
    """Mean over all positions of KL(reference || model) of the next-token distributions on ``input_ids``.

    ``reference`` is the dense model. With ``top_k``, both distributions are reduced to the reference's top-k
    tokens plus a "rest" bucket (EvoPress's Top-K KL): a lower bound of the full KL, in bounded memory.
    """
    require_causal_lm(model, "KL divergence")
    require_causal_lm(reference, "KL divergence")
    windows = as_windows(input_ids)
    run_device = place(model, device)
    place(reference, run_device)
    with eval_no_grad(model, reference):
        chunks = _walk([model, reference], windows, run_device, batch_size, "KL divergence", progress)
        return _mean_kl((logq, _reference_rows(logp, top_k)) for _, (logq, logp) in chunks)


def reference_logprobs(
    reference: nn.Module,
    input_ids: torch.Tensor,
    top_k: int | None = 100,
    *,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> ReferenceLogprobs:
    """The reference's next-token log-probs on ``input_ids``, once, for scoring many candidates (on CPU).

    With ``top_k`` it keeps the top-k tokens and the rest mass per position; ``top_k=None`` keeps the full
    vocabulary (n * seq_len * vocab * 4 bytes: large for real models).
    """
    require_causal_lm(reference, "KL divergence")
    windows = as_windows(input_ids)
    run_device = place(reference, device)
    logps, indices, rests = [], [], []
    with eval_no_grad(reference):
        for _, (logp,) in _walk([reference], windows, run_device, batch_size, "reference log-probs", progress):
            if top_k is None and not logps:
                gib = windows.numel() * logp.shape[-1] * 4 / 2**30
                if gib > 2:
                    logger.warning("keeping the full reference log-probs needs %.1f GiB; consider top_k", gib)
            kept, idx, rest = _reference_rows(logp, top_k)
            logps.append(kept.cpu())
            if idx is not None:
                indices.append(idx.cpu())
                rests.append(rest.cpu())
    n, length = windows.shape
    return ReferenceLogprobs(
        input_ids=windows.clone(),
        logprobs=torch.cat(logps).view(n, length, -1),
        indices=torch.cat(indices).view(n, length, -1) if indices else None,
        rest_logprob=torch.cat(rests).view(n, length) if rests else None,
        top_k=top_k,
    )


def kl_to_reference(
    model: nn.Module,
    cached: ReferenceLogprobs,
    input_ids: torch.Tensor | None = None,
    *,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: bool = True,
    stop_above: float | None = None,
) -> float:
    """``kl_divergence`` of ``model`` against precomputed ``reference_logprobs`` (one forward of the model only).

    ``stop_above``: stop early and return a lower bound (at least ``stop_above``) once the mean cannot end below it.
    """
    require_causal_lm(model, "KL divergence")
    windows = cached.input_ids
    if input_ids is not None and not torch.equal(as_windows(input_ids).cpu(), windows.cpu()):
        raise ValueError("input_ids differ from those the reference log-probs were computed on")
    run_device = place(model, device)
    with eval_no_grad(model):
        chunks = _walk([model], windows, run_device, batch_size, "KL to reference", progress)
        rows = _cached_rows(cached, run_device)
        return _mean_kl(((logq, rows(sel, logq.shape[-1])) for sel, (logq,) in chunks), stop_above,
                        windows.numel())


def _cached_rows(cached: ReferenceLogprobs, device: torch.device) -> Callable[[slice, int], _Rows]:
    """A lookup of the cached reference rows at flat positions ``sel`` (on ``device``), checking the vocabulary."""
    n, length = cached.input_ids.shape
    flat_logp = cached.logprobs.reshape(n * length, -1)
    if cached.indices is None:
        def full(sel: slice, vocab: int) -> _Rows:
            _check_vocab(vocab, flat_logp.shape[-1])
            return flat_logp[sel].to(device), None, None
        return full
    flat_idx = cached.indices.reshape(n * length, -1)
    flat_rest = cached.rest_logprob.reshape(-1)
    return lambda sel, vocab: (flat_logp[sel].to(device), flat_idx[sel].to(device), flat_rest[sel].to(device))


# ------------------------------------------------------------------------- one window at a time (searches)


class KLWorkspace:
    """Buffers reused by ``WindowKL`` for a chunk's fp32 logits and log-probs (two of at most ``CHUNK_ELEMENTS``
    numbers: 128 MiB), so that scoring many windows does not allocate them afresh: on CPU a fresh buffer of that
    size comes from mmap and every page of it is faulted in and zeroed by the kernel (SmolLM2: 98k minor faults,
    0.4 GB, per 512-token window). The Top-K "rest" mass is also computed in place in the log-probs buffer.

    The numbers are the allocating path's (``_kl_rows`` of ``LogitsSource.logprobs``) bit for bit: the first chunk
    is computed both ways and the workspace is used only if they are equal (else every chunk falls back).
    """

    def __init__(self) -> None:
        self._logits: torch.Tensor | None = None
        self._logq: torch.Tensor | None = None
        self.trusted: bool | None = None  # None until the first chunk has been compared

    def _buffer(self, name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        buf = getattr(self, name)
        if buf is None or buf.numel() < rows * cols or buf.device != like.device:
            buf = torch.empty(rows * cols, dtype=torch.float32, device=like.device)
            setattr(self, name, buf)
        return buf[: rows * cols].view(rows, cols)

    def kl_rows(self, source: LogitsSource, states: torch.Tensor, logp: torch.Tensor, idx: torch.Tensor | None,
                rest: torch.Tensor | None) -> torch.Tensor:
        """``_kl_rows(source.logprobs(states), logp, idx, rest)``, without fresh vocabulary-sized buffers."""
        if self.trusted is False or idx is None or not self._fits(source, states):
            return _kl_rows(source.logprobs(states), logp, idx, rest)
        rows, vocab = states.shape[0], source.vocab_size(states)
        if source.head is not None:
            logits = torch.mm(states, source.head.weight.t(), out=self._buffer("_logits", rows, vocab, states))
        else:
            logits = states
        logq = torch.log_softmax(logits, dim=-1, out=self._buffer("_logq", rows, vocab, states))
        q_top = logq.gather(-1, idx)
        q_rest = _logsumexp_in_place(logq.scatter_(-1, idx, float("-inf")))
        got = _kl_from(q_top, q_rest, logp, rest)
        if self.trusted is None:
            self.trusted = torch.equal(got, _kl_rows(source.logprobs(states), logp, idx, rest))
            if not self.trusted:
                logger.debug("reused logits buffers do not reproduce the allocating KL here; not using them")
                return _kl_rows(source.logprobs(states), logp, idx, rest)
        return got

    @staticmethod
    def _fits(source: LogitsSource, states: torch.Tensor) -> bool:
        """fp32 states, and a bias-free fp32 head (or full fp32 logits): what ``torch.mm`` / ``log_softmax`` with
        ``out=`` compute exactly as ``head(states).float()`` and ``log_softmax`` do."""
        if states.dtype != torch.float32:
            return False
        head = source.head
        return head is None or (head.bias is None and head.weight.dtype == torch.float32)


def _logsumexp_in_place(x: torch.Tensor) -> torch.Tensor:
    """``x.logsumexp(-1)`` computed as ATen does (max, masked infinities, sum of exp, log, add), overwriting ``x``."""
    maxes = torch.amax(x, -1, keepdim=True)
    maxes.masked_fill_(maxes.abs() == float("inf"), 0)
    return torch.sum(x.sub_(maxes).exp_(), -1).log_().add_(maxes.squeeze(-1))


def _kl_from(q_top: torch.Tensor, q_rest: torch.Tensor, logp: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """The Top-K KL of ``_kl_rows`` from the model's top-k log-probs and rest mass."""
    p = logp.exp()
    kl = torch.where(p > 0, p * (logp - q_top), torch.zeros_like(p)).sum(-1)
    p_rest = rest.exp()
    return kl + torch.where(p_rest > 0, p_rest * (rest - q_rest), torch.zeros_like(p_rest))


class WindowKL:
    """Per-position KL (fp32, [seq_len]) of the model behind ``source`` to ``cached`` on its window ``row``, computed
    as positions are read (``[lo:hi]``): the backbone runs at construction, the vocabulary head and KL of a chunk of
    ``chunk_rows`` positions (from the window's start) only when one of its positions is first read. A search that
    stops inside a window (``mean_kl_of_windows``) so never computes the head of the rest. Every chunk is the one
    ``window_kl`` computes, so the numbers do not depend on how the window is read."""

    def __init__(self, source: LogitsSource, cached: ReferenceLogprobs, row: int, device: torch.device,
                 workspace: KLWorkspace | None = None) -> None:
        self.source, self.cached, self.row, self.device, self.workspace = source, cached, row, device, workspace
        self.length = cached.input_ids.shape[1]
        self._states: torch.Tensor | None = source.states(cached.input_ids[row:row + 1].to(device))
        self.vocab = source.vocab_size(self._states)
        if cached.indices is None:
            _check_vocab(self.vocab, cached.logprobs.shape[-1])
        self.step = chunk_rows(self.vocab)
        self._kl = torch.empty(self.length, dtype=torch.float32)
        self.done = 0  # positions computed so far

    @property
    def complete(self) -> bool:
        return self.done >= self.length

    def _advance(self) -> None:
        sel = slice(self.done, self.done + self.step)
        cached, row, device = self.cached, self.row, self.device
        rest = None if cached.rest_logprob is None else cached.rest_logprob[row, sel].to(device)
        idx = None if cached.indices is None else cached.indices[row, sel].to(device)
        logp = cached.logprobs[row, sel].to(device)
        if self.workspace is not None:
            kl = self.workspace.kl_rows(self.source, self._states[sel], logp, idx, rest)
        else:
            kl = _kl_rows(self.source.logprobs(self._states[sel]), logp, idx, rest)
        self._kl[sel] = kl.float().cpu()
        self.done = min(self.length, self.done + self.step)
        if self.complete:
            self._states = None

    def __getitem__(self, sel: slice) -> torch.Tensor:
        start, stop, _ = sel.indices(self.length)
        while self.done < stop:
            self._advance()
        return self._kl[start:stop]

    def values(self) -> torch.Tensor:
        """All positions' KL."""
        return self[0:self.length]


def window_kl(source: LogitsSource, cached: ReferenceLogprobs, row: int, device: torch.device, *,
              lazy: bool = False, workspace: KLWorkspace | None = None) -> tuple[torch.Tensor | WindowKL, int]:
    """Per-position KL (fp32, [seq_len]) of the model behind ``source`` to ``cached`` on its window ``row``, and
    the model's vocabulary size; with ``lazy`` a ``WindowKL`` that computes positions as they are read.

    The same per-position numbers as ``kl_to_reference`` computes for that window in any batch (each position's
    log-probs and KL depend on its own row only); run it under ``eval_no_grad``. With ``mean_kl_of_windows`` a
    search scores window by window, reuses windows it scored before and stops between windows (or, lazily,
    between chunks of a window).
    """
    window = WindowKL(source, cached, row, device, workspace)
    return (window if lazy else window.values()), window.vocab


def mean_kl_of_windows(kl_of: Callable[[int], torch.Tensor | WindowKL], windows: int, length: int, batch_size: int,
                       vocab: Callable[[], int], stop_above: float | None = None) -> float:
    """``kl_to_reference``'s mean over ``windows`` windows, from per-window per-position KL (``kl_of(i)`` for the
    i-th window, asked for lazily, in order; a tensor or a ``WindowKL``, read by position slices): the same chunks
    (``batch_size`` windows flattened, ``chunk_rows`` positions each), summed in the same order in fp64 and stopped
    at the same chunk with ``stop_above``, so the result equals ``kl_to_reference(..., stop_above=...)`` on those
    windows bit for bit when the per-position values are equal. A window after the stop is never asked for.
    ``vocab()`` is read after the first window."""
    positions = windows * length
    total, count, step = 0.0, 0, None
    for begin in range(0, windows, batch_size):
        members = list(range(begin, min(windows, begin + batch_size)))
        have: dict[int, torch.Tensor] = {}
        flat = len(members) * length
        start = 0
        while start < flat:
            if step is None:
                have[0] = kl_of(members[0])
                step = chunk_rows(vocab())
            end = min(flat, start + step)
            pieces = []
            for j in range(start // length, (end - 1) // length + 1):
                if j not in have:
                    have[j] = kl_of(members[j])
                lo, hi = max(start, j * length) - j * length, min(end, (j + 1) * length) - j * length
                pieces.append(have[j][lo:hi])
            kl = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            total += kl.double().sum().item()
            count += kl.numel()
            if stop_above is not None and count < positions and total / positions >= stop_above:
                return total / positions
            start = end
    return total / count
