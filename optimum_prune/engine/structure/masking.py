"""Removing structures by masking: the dense-shaped equivalent of surgery (used while a model still trains)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...distill import Masks
from ...modeling.adapters import get_adapter, get_module
from ...modeling.pruning_config import PruningConfig


def structure_masks(model: nn.Module, structure: PruningConfig) -> Masks:
    """Keep-masks that zero, in the dense-shaped ``model``, everything ``structure`` removes."""
    adapter = get_adapter(model)
    dims = adapter.dims(model.config)
    hd, r = dims.head_dim, dims.heads_per_group
    masks: Masks = []
    for layer, block in enumerate(adapter.layers(model)):
        heads = set(range(dims.num_heads)) if layer in structure.drop_attention else set(structure.remove_heads.get(layer, []))
        if heads:
            kept_q = [h for h in range(dims.num_heads) if h not in heads]
            kept_g = sorted({h // r for h in kept_q})
            for proj in adapter.attention_in:
                module = get_module(block, proj.path)
                kept = proj.rows(kept_q, kept_g, dims.num_heads, dims.num_kv_heads, hd)
                _mask_rows(module, _complement(kept, _out_features(module)), masks)
            out = get_module(block, adapter.attention_out)
            _mask_columns(out, _channels(sorted(heads), hd), masks, bias=layer in structure.drop_attention)
        neurons = list(range(dims.intermediate_size)) if layer in structure.drop_mlp else \
            structure.remove_neurons.get(layer, [])
        if neurons:
            idx = torch.tensor(sorted(neurons), dtype=torch.long)
            for path in adapter.mlp_in:
                _mask_rows(get_module(block, path), adapter.neuron_rows(path, idx, dims.intermediate_size), masks)
            _mask_columns(get_module(block, adapter.mlp_out), idx, masks, bias=layer in structure.drop_mlp)
    return masks


def _channels(units: list[int], width: int) -> torch.Tensor:
    if not units:
        return torch.zeros(0, dtype=torch.long)
    pos = torch.tensor(units, dtype=torch.long)
    return (pos[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


def _out_features(module: nn.Module) -> int:
    return module.weight.shape[1] if isinstance(module, Conv1D) else module.weight.shape[0]


def _complement(kept: torch.Tensor, total: int) -> torch.Tensor:
    keep = torch.zeros(total, dtype=torch.bool)
    keep[kept] = True
    return (~keep).nonzero().flatten()


def _mask_rows(module: nn.Module, rows: torch.Tensor, masks: Masks) -> None:
    """Zero output features ``rows`` of a Linear / Conv1D (and their bias)."""
    keep = torch.ones_like(module.weight, dtype=torch.bool)
    if isinstance(module, Conv1D):
        keep[:, rows] = False
    else:
        keep[rows, :] = False
    masks.append((module.weight, keep))
    if getattr(module, "bias", None) is not None:
        keep_b = torch.ones_like(module.bias, dtype=torch.bool)
        keep_b[rows] = False
        masks.append((module.bias, keep_b))


def _mask_columns(module: nn.Module, cols: torch.Tensor, masks: Masks, bias: bool) -> None:
    """Zero input features ``cols`` (and the whole bias when the sublayer goes)."""
    keep = torch.ones_like(module.weight, dtype=torch.bool)
    if isinstance(module, Conv1D):
        keep[cols, :] = False
    else:
        keep[:, cols] = False
    masks.append((module.weight, keep))
    if bias and getattr(module, "bias", None) is not None:
        masks.append((module.bias, torch.zeros_like(module.bias, dtype=torch.bool)))
