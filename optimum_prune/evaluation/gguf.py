"""Perplexity of a GGUF file computed from llama.cpp's own logits, on the project's protocol.

The file's embedded tokenizer (run by llama.cpp) tokenizes the whole text once, without BOS; windows are
cut as ``windows.text_windows`` cuts them; each window runs from an empty KV cache and predicts its own
``seq_len - 1`` next tokens. So an exported file can be checked against the transformers perplexity.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from .ppl import PerplexityResult
from .windows import _as_text, text_windows


def gguf_token_ids(llm: Any, text: str) -> list[int]:
    """The text's token ids from the GGUF's embedded tokenizer (no BOS; special-token text stays text)."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def gguf_perplexity(path: str | os.PathLike, text: Any = None, *, input_ids: Any = None, seq_len: int = 512,
                    max_windows: int | None = 40, threads: int | None = None) -> PerplexityResult:
    """exp(mean NLL) of a GGUF model on ``text`` (file, string, ...) or on given ids, from llama.cpp's logits."""
    try:
        import llama_cpp
    except ImportError as err:
        raise ImportError("perplexity of a GGUF file runs llama.cpp: pip install llama-cpp-python") from err
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    if (text is None) == (input_ids is None):
        raise ValueError("give the text or input_ids (one of them)")
    llm = llama_cpp.Llama(str(path), n_ctx=seq_len, n_batch=seq_len, n_ubatch=seq_len, logits_all=True,
                          verbose=False, n_threads=threads)
    try:
        ids = torch.as_tensor(gguf_token_ids(llm, _as_text(text)) if input_ids is None else input_ids)
        windows = text_windows(ids, seq_len, max_windows) if ids.dim() == 1 else ids
        nll, count = 0.0, 0
        for window in windows.tolist():
            llm.reset()
            llm.eval(window)
            logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
            top = logits.max(axis=1, keepdims=True)
            logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
            nll += float((logz - logits[np.arange(len(window) - 1), window[1:]]).sum())
            count += len(window) - 1
    finally:
        llm.close()
    mean = nll / count
    return PerplexityResult(perplexity=math.exp(mean), mean_nll=mean, num_tokens=count,
                            num_windows=len(windows), seq_len=windows.shape[1])
