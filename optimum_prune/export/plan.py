"""How a (pruned) transformers model maps onto llama.cpp's GGUF layout, decided before anything is written.

Dense and uniformly shaped models use llama.cpp's ``llama`` architecture. Anything heterogeneous (per-layer
query heads, KV heads, FFN widths, dropped sublayers) uses ``deci``, whose graph builds every layer with its
own sizes from the per-layer arrays ``deci.attention.head_count`` / ``head_count_kv`` /
``feed_forward_length``. Two things that graph cannot say directly are encoded exactly (see docs/gguf.md):

* a layer that keeps attention but lost its MLP gets a zero FFN of ``ZERO_FFN_WIDTH`` neurons, because the
  deci graph drops the attention output of a layer with ``n_ff == 0``;
* when the first layer has no attention but a later one does, it becomes a "linear attention" layer
  (``n_head_kv == 0``) whose ``attn_output`` is all zeros, because llama.cpp reads the head size only when
  layer 0 has heads;
* when no layer keeps attention, the first gets one all-zero attention head, because llama.cpp cannot
  create a context without any attention KV cache.

A block with neither sublayer is the identity and is left out of the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..modeling.adapters import get_adapter, get_module
from ..modeling.pruning_config import PruningConfig
from ..modeling.surgery import DroppedAttention, ZeroProjection

ZERO_FFN_WIDTH = 32
"""Neurons of the all-zero FFN that keeps an attention-only layer's output (a multiple of Q8_0's block)."""

SUPPORTED_FAMILIES = ("llama", "mistral")
WHY_NOT: dict[str, str] = {
    "opt": "OPT uses learned position embeddings, LayerNorm with biases and ReLU; llama.cpp's llama/deci graphs "
           "have RoPE, RMSNorm and SwiGLU only",
    "gpt2": "GPT-2 uses learned position embeddings, LayerNorm with biases, GELU and fused Conv1D projections; "
            "llama.cpp's llama/deci graphs have RoPE, RMSNorm and SwiGLU only",
    "bert": "BERT is an encoder (bidirectional attention, LayerNorm, GELU); llama.cpp's llama/deci graphs are "
            "causal decoders",
    "qwen2": "Qwen2 has q/k/v biases, which this exporter does not yet write for the deci graph",
    "qwen3": "Qwen3 normalizes queries and keys per head (q_norm/k_norm), which llama.cpp's deci graph lacks",
}


class GGUFExportError(ValueError):
    """The model (or a requested option) cannot be written as a GGUF file that llama.cpp runs exactly."""


@dataclass(frozen=True)
class LayerPlan:
    """One GGUF block: where it comes from and the shapes llama.cpp will build."""

    block: int
    """Index of the block in the transformers model."""
    n_head: int
    n_head_kv: int
    n_ff: int
    attention: str
    """"full" (q/k/v/o), "none" (attention-free), "zero_linear" (linear attention with a zero output) or
    "zero_attention" (one head, all weights zero)."""
    mlp: str
    """"full" or "zero" (a ZERO_FFN_WIDTH-neuron FFN of zeros)."""


@dataclass
class GGUFPlan:
    """The architecture, hyperparameters and per-layer encoding of one export."""

    arch: str
    hidden_size: int
    head_dim: int
    vocab_size: int
    context_length: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[str, float] | None
    tied_embeddings: bool
    layers: list[LayerPlan]
    notes: list[str] = field(default_factory=list)
    """The workarounds applied, in words (shown to the user and recorded in the file)."""

    @property
    def heterogeneous(self) -> bool:
        return self.arch == "deci"


def _refuse_family(config: Any) -> None:
    """Fail, naming the reason, for families and settings llama.cpp's llama/deci graphs do not run."""
    model_type = getattr(config, "model_type", "") or ""
    family = model_type[len("pruned_"):] if model_type.startswith("pruned_") else model_type
    if family not in SUPPORTED_FAMILIES:
        why = WHY_NOT.get(family, f"no llama.cpp graph for model_type {family!r} is wired up here")
        raise GGUFExportError(
            f"cannot export {family!r} to GGUF: {why}. Supported: Llama-style models "
            f"({', '.join(SUPPORTED_FAMILIES)}) with RMSNorm, SwiGLU, RoPE and no biases")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise GGUFExportError(f"cannot export to GGUF: hidden_act is {config.hidden_act!r}; llama.cpp's llama/deci "
                              "graphs use SiLU (SwiGLU)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise GGUFExportError("cannot export to GGUF: this model has attention/MLP biases, which this exporter does "
                              "not write (only bias-free Llama-style models are verified in llama.cpp)")
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        raise GGUFExportError(
            f"cannot export to GGUF: sliding-window attention (sliding_window={window}) is not in llama.cpp's "
            "llama/deci graphs; the export would attend beyond the window")


def _rope(config: Any) -> tuple[float, tuple[str, float] | None]:
    """rope_theta and (scaling type, factor); refuses RoPE variants the file could not reproduce."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, ("linear", float(params["factor"]))
    raise GGUFExportError(f"cannot export to GGUF: RoPE scaling {kind!r} is not written by this exporter yet "
                          "(supported: default and linear)")


def plan_export(model: Any) -> GGUFPlan:
    """Check the model and decide every layer's encoding; raises GGUFExportError before any file exists."""
    config = model.config
    _refuse_family(config)
    adapter = get_adapter(model)
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None:
        raise GGUFExportError(f"cannot export {type(model).__name__} to GGUF: it has no language-model head; load "
                              "the model for causal-lm (e.g. LlamaForCausalLM)")
    for name, p in model.named_parameters():
        if p.device.type == "meta" or not p.is_floating_point():
            raise GGUFExportError(f"cannot export to GGUF: weight {name!r} is not a materialized float tensor "
                                  "(quantized or meta); export before packing, and quantize with dtype='Q4_K_M'")
    theta, scaling = _rope(config)
    hidden = config.hidden_size
    dense_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // dense_heads
    structure = PruningConfig.from_model_config(config)
    kept = structure.kept_layers() if structure is not None else list(range(len(adapter.layers(model))))

    layers: list[LayerPlan] = []
    notes: list[str] = []
    for index, block in enumerate(adapter.layers(model)):
        has_attn = not isinstance(adapter.attention_core(block), DroppedAttention)
        has_mlp = not isinstance(get_module(block, adapter.mlp_out), ZeroProjection)
        if not has_attn and not has_mlp:
            notes.append(f"layer {kept[index]}: neither attention nor MLP left (identity), left out of the file")
            continue
        n_head = n_kv = 0
        if has_attn:
            n_head = get_module(block, adapter.attention_in[0].path).weight.shape[0] // head_dim
            n_kv = get_module(block, adapter.attention_in[1].path).weight.shape[0] // head_dim
        n_ff = get_module(block, adapter.mlp_in[0]).weight.shape[0] if has_mlp else ZERO_FFN_WIDTH
        if has_attn and not has_mlp:
            notes.append(f"layer {kept[index]}: MLP removed, written as a zero FFN of {ZERO_FFN_WIDTH} neurons "
                         "(llama.cpp's deci graph drops the attention output of a layer without FFN)")
        layers.append(LayerPlan(index, n_head, n_kv, n_ff, "full" if has_attn else "none",
                                "full" if has_mlp else "zero"))
    if not layers:
        raise GGUFExportError("cannot export to GGUF: no layer keeps attention or an MLP (the model is embeddings "
                              "and head only); keep at least one sublayer")
    if layers[0].attention == "none" and any(layer.attention == "full" for layer in layers):
        first = layers[0]
        layers[0] = LayerPlan(first.block, dense_heads, 0, first.n_ff, "zero_linear", first.mlp)
        notes.append(f"layer {kept[first.block]}: attention removed, written as a 'linear attention' layer with a "
                     "zero output projection (llama.cpp reads the head size only when the first layer has heads)")
    if all(layer.attention == "none" for layer in layers):
        first = layers[0]
        layers[0] = LayerPlan(first.block, 1, 1, first.n_ff, "zero_attention", first.mlp)
        notes.append(f"layer {kept[first.block]}: no layer keeps attention, so this one gets a single all-zero "
                     "attention head (llama.cpp cannot create a context without any attention KV cache)")
    shapes = {(layer.n_head, layer.n_head_kv, layer.n_ff, layer.attention, layer.mlp) for layer in layers}
    uniform = len(shapes) == 1 and layers[0].attention == "full" and layers[0].mlp == "full"
    return GGUFPlan(
        arch="llama" if uniform else "deci",
        hidden_size=hidden,
        head_dim=head_dim,
        vocab_size=model.get_input_embeddings().weight.shape[0],
        context_length=config.max_position_embeddings,
        rms_norm_eps=float(config.rms_norm_eps),
        rope_theta=theta,
        rope_scaling=scaling,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        layers=layers,
        notes=notes,
    )
