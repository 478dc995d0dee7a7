"""Token windows: the text cut the way the project's perplexity protocol cuts it, and batches over them.

Read the whole text as one string, tokenize it once, cut non-overlapping windows of ``seq_len`` tokens from
the start (the short tail dropped), and keep the first ``max_windows``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..text import read_text, tokenize_text

logger = logging.get_logger(__name__)


def text_windows(ids: torch.Tensor, seq_len: int = 512, max_windows: int | None = 40) -> torch.Tensor:
    """[n, seq_len] non-overlapping windows from the start of ``ids`` (the tail shorter than a window is dropped)."""
    ids = torch.as_tensor(ids).reshape(-1).long()
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one token to predict), got {seq_len}")
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}; "
                         "use a longer text or a smaller seq_len")
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be positive, got {max_windows}")
        if n < max_windows:
            logger.warning("the text has only %d windows of %d tokens (%d asked for)", n, seq_len, max_windows)
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)


def as_windows(input_ids: torch.Tensor) -> torch.Tensor:
    """``input_ids`` as [n, seq_len] long windows (a 1-D tensor is one window); seq_len must be at least 2."""
    ids = torch.as_tensor(input_ids).long()
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [n, seq_len] with seq_len >= 2, got shape {tuple(ids.shape)}")
    return ids


def windows_from(tokenizer: Any, text: Any, input_ids: torch.Tensor | None, seq_len: int,
                 max_windows: int | None) -> torch.Tensor:
    """The evaluation windows from ``input_ids`` (2-D: as they are; 1-D: cut) or from ``text`` + ``tokenizer``."""
    if input_ids is not None:
        if text is not None:
            raise ValueError("give either text or input_ids, not both")
        ids = torch.as_tensor(input_ids).long()
        return as_windows(ids) if ids.dim() == 2 else text_windows(ids, seq_len, max_windows)
    if text is None:
        raise ValueError("give text (with a tokenizer) or input_ids")
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to evaluate on text; pass one, or pass input_ids")
    return text_windows(tokenize_text(tokenizer, _as_text(text)), seq_len, max_windows)


def _as_text(text: Any) -> str:
    """A string is the text itself unless it names an existing file; other sources go through ``read_text``."""
    if isinstance(text, str) and not (len(text) < 4096 and "\n" not in text and os.path.isfile(text)):
        return text
    return read_text(text)


def batches(n: int, batch_size: int, desc: str, progress: bool) -> Iterator[slice]:
    """Slices of ``batch_size`` rows over ``n`` windows, with a progress bar named ``desc``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress):
        yield slice(start, min(n, start + batch_size))
