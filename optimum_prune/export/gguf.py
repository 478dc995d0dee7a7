"""GGUF export: one file with weights, per-layer shapes, tokenizer and chat template that llama.cpp runs.

``export_gguf(model, "out.gguf", dtype="f16")`` checks everything first (``plan.plan_export``), then writes
through ``saving.atomic_file``: a failed export leaves no file behind. f32 / f16 / bf16 are written
directly; llama.cpp's quantized types (Q8_0, Q4_K_M, ...) by llama.cpp's own quantizer from an f32
temporary, in a subprocess (``quantize.py``) so that a crashing llama.cpp build cannot take the caller down.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..modeling.adapters import get_adapter, get_module
from ..modeling.pruning_config import PruningConfig
from ..saving import atomic_file
from .plan import ZERO_FFN_WIDTH, GGUFExportError, GGUFPlan, LayerPlan, plan_export
from .quantize import QUANT_TYPES, check_quantize_available, run_quantize
from .vocab import add_vocab, source_gguf

FLOAT_TYPES = ("f32", "f16", "bf16")
DTYPES = FLOAT_TYPES + QUANT_TYPES


@dataclass
class GGUFExport:
    """What one export wrote: the file, its llama.cpp architecture and type, and the workarounds applied."""

    path: Path
    arch: str
    dtype: str
    num_layers: int
    tokenizer: str
    notes: list[str] = field(default_factory=list)

    @property
    def file_bytes(self) -> int:
        return self.path.stat().st_size


def normalize_dtype(dtype: str) -> str:
    """'F16' -> 'f16', 'q4_k_m' -> 'Q4_K_M'; an unknown name fails listing the choices."""
    text = str(dtype).strip()
    if text.lower() in FLOAT_TYPES:
        return text.lower()
    if text.upper() in QUANT_TYPES:
        return text.upper()
    raise GGUFExportError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def export_gguf(model: Any, path: str | os.PathLike, *, tokenizer: Any = None, dtype: str = "f16",
                pre_tokenizer: str | None = None, name: str | None = None) -> GGUFExport:
    """Write ``model`` (dense or pruned, Llama-style) as one GGUF file for llama.cpp; returns what was written.

    ``tokenizer``: embedded unless the model was loaded from a GGUF file, whose tokenizer keys are copied.
    ``pre_tokenizer``: llama.cpp's pre-tokenizer name for a Hugging Face BPE tokenizer (default 'default').
    Unsupported families, settings or dtypes raise ``GGUFExportError`` before anything is written.
    """
    dtype = normalize_dtype(dtype)
    target = Path(path)
    if target.suffix != ".gguf":
        raise GGUFExportError(f"the GGUF output path should end in .gguf, got {str(target)!r}")
    if target.is_dir():
        raise GGUFExportError(f"{target} is a directory; give a file path ending in .gguf")
    plan = plan_export(model)
    if dtype in QUANT_TYPES:
        check_quantize_available(dtype)
    source = source_gguf(model)
    name = name or _model_name(model)
    with atomic_file(target, suffix=".gguf") as tmp:
        if dtype in FLOAT_TYPES:
            used = _write(model, plan, tmp, dtype, tokenizer, source, pre_tokenizer, name)
        else:
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as work:
                f32 = Path(work) / "f32.gguf"
                used = _write(model, plan, f32, "f32", tokenizer, source, pre_tokenizer, name)
                run_quantize(f32, tmp, dtype)
    return GGUFExport(target, plan.arch, dtype, len(plan.layers), used, plan.notes)


def _model_name(model: Any) -> str:
    raw = str(getattr(model.config, "_name_or_path", "") or "model").rstrip("/")
    return os.path.basename(raw) or "model"


def _write(model: Any, plan: GGUFPlan, path: Path, dtype: str, tokenizer: Any, source: str | None,
           pre_tokenizer: str | None, name: str) -> str:
    """Metadata, tokenizer and tensors of ``plan`` into ``path``; returns the tokenizer source used."""
    import gguf

    writer = gguf.GGUFWriter(str(path), plan.arch)
    _add_hparams(writer, plan, dtype, name)
    structure = PruningConfig.from_model_config(model.config)
    if structure is not None:
        writer.add_string("optimum_prune.pruning_config", json.dumps(structure.structure_only().to_dict()))
    if plan.notes:
        writer.add_array("optimum_prune.notes", plan.notes)
    used = add_vocab(writer, plan.vocab_size, tokenizer, source, pre_tokenizer)
    for tensor_name, tensor in _tensors(model, plan):
        data, raw = _convert(tensor, dtype)
        writer.add_tensor(tensor_name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return used


def _add_hparams(writer: Any, plan: GGUFPlan, dtype: str, name: str) -> None:
    import gguf

    layers = plan.layers
    writer.add_name(name)
    writer.add_context_length(plan.context_length)
    writer.add_embedding_length(plan.hidden_size)
    writer.add_block_count(len(layers))
    if plan.heterogeneous:
        writer.add_feed_forward_length([layer.n_ff for layer in layers])
        writer.add_head_count([layer.n_head for layer in layers])
        writer.add_head_count_kv([layer.n_head_kv for layer in layers])
    else:
        writer.add_feed_forward_length(layers[0].n_ff)
        writer.add_head_count(layers[0].n_head)
        writer.add_head_count_kv(layers[0].n_head_kv)
    writer.add_key_length(plan.head_dim)
    writer.add_value_length(plan.head_dim)
    writer.add_rope_dimension_count(plan.head_dim)
    writer.add_rope_freq_base(plan.rope_theta)
    if plan.rope_scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(plan.rope_scaling[1])
    writer.add_layer_norm_rms_eps(plan.rms_norm_eps)
    writer.add_vocab_size(plan.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]
    writer.add_file_type(file_type)


def rope_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k rows from transformers' half-split RoPE layout to llama.cpp's interleaved pairs."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensors(model: Any, plan: GGUFPlan):
    """(GGUF name, tensor) for every tensor of the plan, in llama.cpp's naming."""
    adapter = get_adapter(model)
    config = model.config
    embed = model.get_input_embeddings().weight
    yield "token_embd.weight", embed
    yield "output_norm.weight", model.base_model.norm.weight
    head = model.lm_head.weight
    if head.data_ptr() != embed.data_ptr():
        yield "output.weight", head
    blocks = adapter.layers(model)
    hidden = plan.hidden_size
    for i, layer in enumerate(plan.layers):
        block = blocks[layer.block]
        yield from _attention(i, layer, block, adapter, config, plan)
        prefix = f"blk.{i}."
        if layer.mlp == "full":
            gate, up = adapter.mlp_in
            yield prefix + "ffn_norm.weight", get_module(block, adapter.mlp_pre_norm(config)).weight
            yield prefix + "ffn_gate.weight", get_module(block, gate).weight
            yield prefix + "ffn_up.weight", get_module(block, up).weight
            yield prefix + "ffn_down.weight", get_module(block, adapter.mlp_out).weight
        else:  # zero FFN: keeps the deci graph from discarding this layer's attention output
            yield prefix + "ffn_norm.weight", torch.ones(hidden)
            yield prefix + "ffn_gate.weight", torch.zeros(ZERO_FFN_WIDTH, hidden)
            yield prefix + "ffn_up.weight", torch.zeros(ZERO_FFN_WIDTH, hidden)
            yield prefix + "ffn_down.weight", torch.zeros(hidden, ZERO_FFN_WIDTH)


def _attention(i: int, layer: LayerPlan, block: Any, adapter: Any, config: Any, plan: GGUFPlan):
    """The attention tensors of GGUF block ``i`` (none for an attention-free layer)."""
    prefix = f"blk.{i}."
    hidden, head_dim = plan.hidden_size, plan.head_dim
    q, k, v = (p.path for p in adapter.attention_in)
    if layer.attention == "full":
        yield prefix + "attn_norm.weight", get_module(block, adapter.attention_pre_norm(config)).weight
        yield prefix + "attn_q.weight", rope_permute(get_module(block, q).weight, layer.n_head)
        yield prefix + "attn_k.weight", rope_permute(get_module(block, k).weight, layer.n_head_kv)
        yield prefix + "attn_v.weight", get_module(block, v).weight
        yield prefix + "attn_output.weight", get_module(block, adapter.attention_out).weight
    elif layer.attention == "zero_linear":  # gives llama.cpp a first layer with heads; adds exactly zero
        yield prefix + "attn_norm.weight", torch.ones(hidden)
        yield prefix + "attn_output.weight", torch.zeros(hidden, hidden)
    elif layer.attention == "zero_attention":  # a model with no attention left: one head that adds exactly zero
        yield prefix + "attn_norm.weight", torch.ones(hidden)
        for name in ("attn_q", "attn_k", "attn_v"):
            yield prefix + f"{name}.weight", torch.zeros(head_dim, hidden)
        yield prefix + "attn_output.weight", torch.zeros(hidden, head_dim)


def _convert(tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """A numpy array in the file's type (norms and other 1-D tensors stay f32, as llama.cpp expects)."""
    import gguf

    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    if data.ndim == 1 or dtype == "f32":
        return data, None
    if dtype == "f16":
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
