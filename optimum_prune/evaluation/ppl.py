"""Perplexity with the project protocol: exp of the mean token NLL over the first windows of the text.

Each window of ``seq_len`` tokens predicts its own ``seq_len - 1`` next tokens (see ``../shared/data/README.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .models import LogitsSource, chunk_rows, eval_no_grad, place, require_causal_lm
from .windows import batches, windows_from


@dataclass
class PerplexityResult:
    """Perplexity of a causal LM on non-overlapping windows, with what it was computed on."""

    perplexity: float
    mean_nll: float
    num_tokens: int
    """Predicted tokens: ``num_windows * (seq_len - 1)``."""
    num_windows: int
    seq_len: int


def perplexity(
    model: nn.Module,
    tokenizer: Any = None,
    text: Any = None,
    *,
    input_ids: torch.Tensor | None = None,
    seq_len: int = 512,
    max_windows: int | None = 40,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of a causal LM with the project protocol: exp of the mean NLL of all predicted tokens.

    Give ``tokenizer`` + ``text`` (the text itself, or a file path / list / Dataset for ``read_text``), or
    ``input_ids``: 1-D token ids (cut into windows here) or [n, seq_len] windows (used as they are). Each window
    predicts its own tokens 1..seq_len-1.
    """
    require_causal_lm(model, "perplexity")
    windows = windows_from(tokenizer, text, input_ids, seq_len, max_windows)
    run_device = place(model, device)
    n, length = windows.shape
    targets = torch.full_like(windows, -100)
    targets[:, :-1] = windows[:, 1:]
    nll_sum, count = 0.0, 0
    with eval_no_grad(model):
        source = LogitsSource.probing(model, windows, run_device)
        for rows in batches(n, batch_size, "perplexity", progress):
            states = source.states(windows[rows].to(run_device))
            tgt = targets[rows].reshape(-1).to(run_device)
            step = chunk_rows(source.vocab_size(states))
            for start in range(0, states.shape[0], step):
                t = tgt[start:start + step]
                keep = t >= 0
                if not keep.any():
                    continue
                logp = source.logprobs(states[start:start + step][keep])
                nll_sum -= logp.gather(1, t[keep][:, None]).double().sum().item()
                count += int(keep.sum())
    mean_nll = nll_sum / count
    return PerplexityResult(perplexity=math.exp(mean_nll), mean_nll=mean_nll, num_tokens=count,
                            num_windows=n, seq_len=length)
