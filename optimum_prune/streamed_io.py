"""Saving and loading streamed models (``max_memory``): a checkpoint larger than the budget stays in its shards.

The block-by-block machinery is ``engine/streaming.py``; this module sits above the engine because it also
needs the loaders and the packed (GPTQ) writer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .engine.layers import linear_groups
from .engine.streaming import (INDEX, StreamingError, _prefix, block_stream, checkpoint_bytes, load_streamed,
                               parse_memory, read_tensors)
from .loading import auto_class, check_local_path, infer_task
from .modeling.adapters import get_adapter
from .packing import check_packable, packed_state_dict, write_quantization_config


def save_streamed(model: nn.Module, directory: str | os.PathLike, blocks: nn.ModuleList,
                  records: dict[str, Any] | None = None) -> None:
    """Write a streamed model as a sharded safetensors checkpoint (one shard per block, one per other tensor);
    with GPTQ ``records`` each quantized weight is written packed (compressed-tensors)."""
    if records:
        check_packable(model, records)
    stream = block_stream(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prefixes = [_prefix(model, block) for block in blocks]
    groups: list[list[str]] = [[k for k in stream.files if k.startswith(p)] for p in prefixes]
    in_blocks = {k for g in groups for k in g}
    groups += [[k] for k in stream.files if k not in in_blocks]
    weight_map, total = {}, 0
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        state: dict[str, torch.Tensor] = {}
        for key in keys:
            state.update(read_tensors(stream._location(key), [key]))
        if records:
            state = packed_state_dict(model, records, state)
        save_file(state, str(directory / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in state.values())
        weight_map.update({key: name for key in state})
        del state
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                              indent=2, sort_keys=True) + "\n")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():
        generation.save_pretrained(directory)
    if records:
        write_quantization_config(model, directory, records)


def load_within(name_or_path: str, max_memory: int | str, *, task: str | None = None,
                **kwargs: Any) -> tuple[nn.Module, Any, str | None] | None:
    """(model, tokenizer, base_model) streamed from disk when the checkpoint exceeds ``max_memory``; None when it
    fits (the caller loads it as usual). Fails before any weight is read when one block cannot fit."""
    from transformers import AutoTokenizer


    budget = parse_memory(max_memory)
    check_local_path(name_or_path)
    size = checkpoint_bytes(name_or_path) if os.path.isdir(name_or_path) else None
    if size is None:
        raise StreamingError(f"max_memory streams a local checkpoint directory with safetensors weights; "
                             f"{name_or_path} is not one: save it with save_pretrained first (or drop max_memory)")
    if size <= budget:
        return None
    unknown = sorted(set(kwargs) - {"dtype", "torch_dtype"})
    if unknown:
        raise StreamingError(f"{', '.join(unknown)} cannot be combined with max_memory (streamed loading)")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path)
    model = load_streamed(name_or_path, auto_class(task or infer_task(config)))
    need = _resident_bytes(model)
    if need > budget:
        raise StreamingError(f"max_memory={max_memory!r} is below what one step needs: the largest block or the "
                             f"embeddings with their fp32 Hessians and work copy, about {_size(need)}. Give "
                             f"max_memory='{_size(need, up=True).replace(' ', '')}' or more")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError):
        tokenizer = None
    return model, tokenizer, None


def _size(n: int, up: bool = False) -> str:
    """``n`` bytes in MB or GB (rounded up with ``up``, so the figure given back is enough)."""
    unit, name = (10**9, "GB") if n >= 10**9 else (10**6, "MB")
    value = n / unit
    return f"{(int(value * 10) + 1) / 10 if up else value:.1f} {name}"


def _resident_bytes(model: nn.Module) -> int:
    """Bytes the largest streamed step keeps resident: a block, its work copy and its fp32 Hessians; or the stem."""
    adapter = get_adapter(model)
    blocks = adapter.layers(model)
    worst = 0
    for block in blocks:
        weights = sum(p.numel() * p.element_size() for p in block.parameters())
        hessians = sum(4 * g.in_features ** 2 for g in linear_groups(adapter, block))
        worst = max(worst, 2 * weights + 2 * hessians)
    stem = sum(p.numel() * p.element_size() for p in model.get_input_embeddings().parameters())
    return max(worst, stem)
