"""Short content hashes that say whether a cached or resumed artifact belongs to this model, tokenizer or run.

Shared by the sequential checkpoints (engine/checkpoint.py), the teacher-logit cache and the generated-text cache,
so the three agree on what "the same model" means.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn


def content_hash(*parts: Any) -> str:
    """16 hex digits of sha256 over ``parts``: tensors by their bytes, anything else by its sorted JSON."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(part.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """Class, config (less volatile keys), and every parameter's name, shape, dtype and a strided sample."""
    config = getattr(model, "config", None)
    settings = {}
    if config is not None and hasattr(config, "to_dict"):
        settings = {k: v for k, v in config.to_dict().items()
                    if not k.startswith("_") and k not in ("transformers_version", "pruning_config")}
    parts: list[Any] = [type(model).__name__, settings]
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)][:256] if flat.numel() and p.device.type != "meta" else None
        parts += [name, list(p.shape), str(p.dtype)] + ([sample] if sample is not None else [])
    return content_hash(*parts)


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """A short hash of the tokenizer's vocabulary and special tokens (None without a tokenizer)."""
    if tokenizer is None:
        return None
    vocab = sorted(tokenizer.get_vocab().items()) if hasattr(tokenizer, "get_vocab") else []
    special = sorted(map(str, getattr(tokenizer, "all_special_tokens", []) or []))
    return content_hash(type(tokenizer).__name__, vocab, special)
