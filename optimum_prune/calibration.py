"""Calibration data: token windows from a dataset name, a text file, strings, a ``datasets.Dataset`` or ids.

Every source becomes a LongTensor [num_samples, seq_len] of windows cut at seeded random offsets
from the tokenized text (the protocol of the GPTQ / SparseGPT papers). With no source and no Hub,
the model writes its own calibration text (data-free calibration) so compression still runs offline.
``"generated"`` / ``"generated:N"`` asks for that explicitly: deduplicated text sampled from the model and
cached on disk (``generated_text``), cut into consecutive windows.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from transformers.utils import logging
from transformers.utils.logging import tqdm

from .text import TextFileError, read_text, tokenize_text

logger = logging.get_logger(__name__)


DEFAULT_DATASET = "wikitext2"

CalibrationSource = Any
"""A dataset name (``text.DATASETS``), ``"generated"`` / ``"generated:N"`` (text sampled from the model itself,
``generated_text``), a text file path, a string list, a ``datasets.Dataset``, a LongTensor, or None."""


class CalibrationError(ValueError):
    """Calibration data that cannot be used, with the fix in the message."""


def _tokens(tokenizer: Any, text: str) -> torch.Tensor:
    if tokenizer is None:
        raise CalibrationError("text calibration needs a tokenizer: pass one to the Pruner/Quantizer")
    return tokenize_text(tokenizer, text)


def random_windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``num_samples`` windows of ``seq_len`` tokens at seeded random offsets of the 1-D ``ids``."""
    if ids.numel() <= seq_len:
        raise CalibrationError(f"the calibration text has {ids.numel()} tokens, fewer than one window of "
                               f"{seq_len}: give more text or a smaller seq_len")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num_samples,), generator=generator)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def self_generated(model: Any, tokenizer: Any, num_samples: int, seq_len: int, seed: int = 0,
                   batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    """Data-free calibration: sequences sampled from the model itself (random tokens for encoders).

    Sampling is one forward per token: a progress bar counts the batches, and after the first batch the
    expected total time is logged (a warning, with the faster alternatives, when it is over two minutes).
    """
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    special = set(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer is not None else set()
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    if not getattr(model, "can_generate", lambda: False)():
        return allowed[torch.randint(0, allowed.numel(), (num_samples, seq_len), generator=generator)]
    device = next(model.parameters()).device
    bos = getattr(model.config, "bos_token_id", None)
    rows = []
    batches = range(0, num_samples, batch_size)
    bar = tqdm(total=len(batches), desc=f"data-free calibration: sampling {num_samples} x {seq_len} tokens",
               disable=not progress)
    begin = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in batches:
            n = min(batch_size, num_samples - start)
            if bos is not None:
                prompt = torch.full((n, 1), bos)
            else:
                prompt = allowed[torch.randint(0, allowed.numel(), (n, 1), generator=generator)]
            out = model.generate(prompt.to(device), attention_mask=torch.ones_like(prompt, device=device),
                                 do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                 max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                                 pad_token_id=getattr(model.config, "eos_token_id", None) or 0)
            rows.append(out[:, :seq_len].cpu())
            bar.update(1)
            if len(rows) == 1 and len(batches) > 1:
                _say_how_long((time.perf_counter() - begin) * len(batches), num_samples, seq_len)
    bar.close()
    return torch.cat(rows)


def _say_how_long(seconds: float, num_samples: int, seq_len: int) -> None:
    """Log the expected duration of data-free sampling; over two minutes, as a warning naming the faster ways."""
    text = f"data-free calibration will take about {seconds / 60:.1f} min ({num_samples} sequences of {seq_len} tokens)"
    if seconds > 120:
        logger.warning("%s; pass calibration= a text file (e.g. ../shared/data/wikitext-2/valid.txt) or fewer "
                       "num_samples / a shorter seq_len to finish sooner", text)
    else:
        logger.info(text)


def get_calibration_data(
    source: CalibrationSource = None,
    tokenizer: Any = None,
    *,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    model: Any = None,
) -> torch.Tensor:
    """Calibration windows [num_samples, seq_len] from any supported source.

    ``None`` means the default dataset (WikiText-2 train); when it cannot be read (offline), the
    model generates its own calibration text, with a warning.
    """
    return load_calibration(source, tokenizer, num_samples=num_samples, seq_len=seq_len, seed=seed, model=model)[0]


def load_calibration(
    source: CalibrationSource = None,
    tokenizer: Any = None,
    *,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    model: Any = None,
    progress: bool = True,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``get_calibration_data`` plus a description of what was used (for the PruningConfig and the card)."""
    if num_samples <= 0 or seq_len <= 1:
        raise CalibrationError(f"need num_samples > 0 and seq_len > 1, got {num_samples} and {seq_len}")
    info = describe(source, num_samples, seq_len, seed)
    generated = _generated(source)
    if generated is not None:
        from dataclasses import replace

        from . import generated_text

        if model is None:
            raise CalibrationError(f"{source!r} is text sampled from the dense model: pass the model (e.g. "
                                   "load_calibration(..., model=dense))")
        count = num_samples if generated is True else generated
        ids, info = generated_text.generated_windows(model, tokenizer, count, seq_len, progress=progress,
                                                     settings=replace(generated_text.DEFAULTS, seed=seed))
        return ids, {**info, "dataset": source}
    if isinstance(source, torch.Tensor):
        if source.dim() != 2 or source.dtype not in (torch.int64, torch.int32):
            raise CalibrationError("token calibration must be an integer tensor [num_samples, seq_len]")
        info.update(num_samples=source.shape[0], seq_len=source.shape[1])
        return source.long(), info
    if source is None:
        try:
            text = read_text(DEFAULT_DATASET, split="train")
        except Exception as err:  # offline, no datasets cache, ...
            if model is None:
                raise CalibrationError(f"no calibration data given and {DEFAULT_DATASET} is unreachable ({err}); "
                                       "pass calibration= a text file, strings or a Dataset") from err
            logger.warning(
                "no calibration data given and %s could not be loaded (%s): using data-free calibration, "
                "%d sequences sampled from the model itself. Pass calibration= (a text file, strings or a "
                "Dataset) for better results.", DEFAULT_DATASET, err, num_samples)
            info["dataset"] = "self-generated"
            return self_generated(model, tokenizer, num_samples, seq_len, seed, progress=progress), info
    else:
        try:
            text = read_text(source, split="train")
        except TextFileError as err:
            raise CalibrationError(f"calibration file {err}") from None
    return random_windows(_tokens(tokenizer, text), num_samples, seq_len, seed), info


def _generated(source: CalibrationSource) -> int | bool | None:
    """``"generated"`` (True) or ``"generated:N"`` (N windows) when ``source`` asks for model-generated text."""
    if not isinstance(source, str) or os.path.isfile(source):
        return None
    from .generated_text import GeneratedTextError, parse_source

    try:
        return parse_source(source)
    except GeneratedTextError as err:
        raise CalibrationError(str(err)) from None


def describe(source: CalibrationSource, num_samples: int, seq_len: int, seed: int) -> dict[str, Any]:
    """What was calibrated on, for the PruningConfig / model card."""
    if isinstance(source, (str, os.PathLike)):
        name = os.path.basename(str(source)) if os.path.isfile(source) else str(source)
    elif source is None:
        name = DEFAULT_DATASET
    else:
        name = type(source).__name__
    return {"dataset": name, "num_samples": num_samples, "seq_len": seq_len, "seed": seed}
