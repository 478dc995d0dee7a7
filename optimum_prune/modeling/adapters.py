"""Architecture adapters: the ONE place that knows where each model family keeps its heads and neurons.

Surgery and every algorithm talk to a model through ``ArchitectureAdapter`` (blocks, attention
projections grouped by head, FFN projections grouped by neuron, norms, attribute names), so none of
them branches on the model family. The types live in ``adapter_base.py``; this module holds one entry
per family. Copied beside the weights for ``trust_remote_code`` loading, so it imports only torch and
transformers.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .adapter_base import (ArchitectureAdapter, ExpertLayout, LayerConfig, ModelDims, Projection,
                           UnsupportedArchitectureError, get_module, head_channels, set_module)
from .pruning_config import PruningConfigError

__all__ = ["ADAPTERS", "SUPPORTED_MODEL_TYPES", "ArchitectureAdapter", "ExpertLayout", "LayerConfig", "ModelDims",
           "Projection", "UnsupportedArchitectureError", "base_model_type", "get_adapter", "get_module", "head_channels",
           "set_module"]


def _llama_kv(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _opt_pre_norm(name: str) -> Callable[[Any], str | None]:
    return lambda config: name if getattr(config, "do_layer_norm_before", True) else None


def _gpt2_check(config: Any, structure: Any) -> None:
    """GPT-2 may scale attention by 1/(layer_idx+1); renumbered blocks would reload with other scales."""
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and structure.drop_layers:
        raise PruningConfigError(
            "this GPT-2 scales attention by its layer index (scale_attn_by_inverse_layer_idx=True), so its "
            "blocks cannot be renumbered: use `drop_attention` and `drop_mlp` for those layers instead of "
            "`drop_layers`"
        )


def _named(name: str) -> Callable[[Any], str]:
    return lambda config: name


_QKV = (Projection("self_attn.q_proj", ("q",)), Projection("self_attn.k_proj", ("k",)),
        Projection("self_attn.v_proj", ("v",)))
_LLAMA_STYLE = dict(
    layers_path="layers",
    attention="self_attn",
    attention_in=_QKV,
    attention_out="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    attention_pre_norm=_named("input_layernorm"),
    mlp_pre_norm=_named("post_attention_layernorm"),
    head_attributes={"num_key_value_groups": "groups", "num_heads": "heads", "num_key_value_heads": "kv_heads"},
    num_kv_heads=_llama_kv,
    layer_types_key="layer_types",
)


def _qwen_moe_check(config: Any, structure: Any) -> None:
    """Qwen2/3-MoE may interleave dense FFN layers (``mlp_only_layers``, ``decoder_sparse_step``): not described yet."""
    if list(getattr(config, "mlp_only_layers", None) or []) or getattr(config, "decoder_sparse_step", 1) != 1:
        raise PruningConfigError(
            "this Qwen-MoE model mixes dense FFN layers with Mixture-of-Experts layers (`mlp_only_layers` / "
            "`decoder_sparse_step`), which optimum-prune does not support yet; only models whose every layer is "
            "a Mixture of Experts are"
        )


_MOE = ExpertLayout(block="mlp", router="mlp.gate", experts="mlp.experts")
_QWEN_MOE = ExpertLayout(block="mlp", router="mlp.gate", experts="mlp.experts",
                         expert_size=lambda config: config.moe_intermediate_size)
# Llama-shaped attention with a Mixture-of-Experts FFN: no dense FFN neurons, unless a shared expert.
_LLAMA_MOE = dict(_LLAMA_STYLE, mlp_in=(), mlp_out=None, intermediate_size=lambda config: 0, experts=_MOE)
# Gemma 2 / 3: a norm before and after each sublayer ("post_attention_layernorm" is the attention's post-norm).
_SANDWICH = dict(_LLAMA_STYLE, mlp_pre_norm=_named("pre_feedforward_layernorm"),
                 attention_post_norm=_named("post_attention_layernorm"),
                 mlp_post_norm=_named("post_feedforward_layernorm"))

ADAPTERS: tuple[ArchitectureAdapter, ...] = (
    ArchitectureAdapter(name="llama", model_types=("llama", "mistral", "qwen2", "qwen3"), **_LLAMA_STYLE),
    ArchitectureAdapter(
        name="opt",
        model_types=("opt",),
        layers_path="decoder.layers",
        attention="self_attn",
        attention_in=(Projection("self_attn.q_proj", ("q",)), Projection("self_attn.k_proj", ("k",)),
                      Projection("self_attn.v_proj", ("v",))),
        attention_out="self_attn.out_proj",
        mlp_in=("fc1",),
        mlp_out="fc2",
        attention_pre_norm=_opt_pre_norm("self_attn_layer_norm"),
        mlp_pre_norm=_opt_pre_norm("final_layer_norm"),
        head_attributes={"num_heads": "heads"},
        intermediate_size=lambda config: config.ffn_dim,
    ),
    ArchitectureAdapter(
        name="gpt2",
        model_types=("gpt2",),
        layers_path="h",
        attention="attn",
        attention_in=(Projection("attn.c_attn", ("q", "k", "v")),),
        attention_out="attn.c_proj",
        mlp_in=("mlp.c_fc",),
        mlp_out="mlp.c_proj",
        attention_pre_norm=_named("ln_1"),
        mlp_pre_norm=_named("ln_2"),
        head_attributes={"num_heads": "heads", "split_size": "width"},
        intermediate_size=lambda config: config.n_inner or 4 * config.hidden_size,
        check_structure=_gpt2_check,
    ),
    ArchitectureAdapter(
        name="bert",
        model_types=("bert",),
        layers_path="encoder.layer",
        attention="attention.self",
        attention_in=(Projection("attention.self.query", ("q",)), Projection("attention.self.key", ("k",)),
                      Projection("attention.self.value", ("v",))),
        attention_out="attention.output.dense",
        mlp_in=("intermediate.dense",),
        mlp_out="output.dense",
        head_attributes={"num_attention_heads": "heads", "all_head_size": "width"},
    ),
    # Llama-shaped: Granite's multipliers scale whole sublayer outputs; Gemma's norms are (1 + w) RMSNorms.
    ArchitectureAdapter(name="granite", model_types=("granite",), **_LLAMA_STYLE),
    ArchitectureAdapter(name="gemma", model_types=("gemma",), **_LLAMA_STYLE),
    ArchitectureAdapter(name="gemma2", model_types=("gemma2", "gemma3_text"), **_SANDWICH),
    ArchitectureAdapter(
        name="olmo2",
        model_types=("olmo2",),
        **dict(_LLAMA_STYLE, attention_pre_norm=lambda config: None, mlp_pre_norm=lambda config: None,
               attention_post_norm=_named("post_attention_layernorm"),
               mlp_post_norm=_named("post_feedforward_layernorm"),
               head_norms=(("self_attn.q_norm", "q"), ("self_attn.k_norm", "k"))),
    ),
    ArchitectureAdapter(
        name="phi3",
        model_types=("phi3",),
        **dict(_LLAMA_STYLE, attention_in=(Projection("self_attn.qkv_proj", ("q", "k", "v")),),
               mlp_in=("mlp.gate_up_proj",), fused_mlp_in={"mlp.gate_up_proj": 2},
               head_config_attributes={"num_attention_heads": "heads", "num_key_value_heads": "kv_heads"}),
    ),
    ArchitectureAdapter(
        name="gpt_neox",
        model_types=("gpt_neox",),
        layers_path="layers",
        attention="attention",
        attention_in=(Projection("attention.query_key_value", ("q", "k", "v"), interleaved=True),),
        attention_out="attention.dense",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h",
        attention_pre_norm=_named("input_layernorm"),
        mlp_pre_norm=_named("post_attention_layernorm"),  # parallel residual: it feeds only the MLP
    ),
    # Mixture of Experts (transformers 5's fused expert tensors). Qwen2-MoE's shared expert is a dense FFN that
    # every token passes through (scaled by a sigmoid gate): its neurons are the family's FFN neurons.
    ArchitectureAdapter(name="mixtral", model_types=("mixtral",), **_LLAMA_MOE),
    ArchitectureAdapter(name="qwen3_moe", model_types=("qwen3_moe",),
                        **dict(_LLAMA_MOE, check_structure=_qwen_moe_check, experts=_QWEN_MOE)),
    ArchitectureAdapter(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        **dict(_LLAMA_MOE, mlp_in=("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
               mlp_out="mlp.shared_expert.down_proj", check_structure=_qwen_moe_check, experts=_QWEN_MOE,
               intermediate_size=lambda config: config.shared_expert_intermediate_size),
    ),
    ArchitectureAdapter(
        name="olmoe",
        model_types=("olmoe",),
        **dict(_LLAMA_MOE, head_norms=(("self_attn.q_norm", "q"), ("self_attn.k_norm", "k"))),
    ),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in ADAPTERS for t in a.model_types)

_MOE_MISSING = ("no adapter describes where this Mixture-of-Experts family keeps its router and experts "
                "(supported MoE families: mixtral, qwen2_moe, qwen3_moe, olmoe)")
MISSING: dict[str, str] = {
    **{t: _MOE_MISSING for t in ("phimoe", "granitemoe", "granitemoeshared", "deepseek_v2", "deepseek_v3", "gpt_oss",
                                 "dbrx", "jamba")},
    "gemma3": "this is the multimodal Gemma 3; its language model (model_type gemma3_text, Gemma3ForCausalLM) is "
              "supported: load that alone",
}
"""What a known but unsupported family lacks, for the error message."""


def base_model_type(model_type: str) -> str:
    """'pruned_llama' -> 'llama'; other names unchanged."""
    return model_type[len("pruned_"):] if model_type.startswith("pruned_") else model_type


def get_adapter(config_or_model: Any) -> ArchitectureAdapter:
    """The adapter for a model or config; an unsupported family names the supported ones and what it lacks."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = base_model_type(getattr(config, "model_type", "") or "")
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    if isinstance(config_or_model, nn.Module):
        arch = type(config_or_model).__name__
    else:
        arch = (getattr(config, "architectures", None) or [model_type or type(config).__name__])[0]
    missing = MISSING.get(model_type, "no architecture adapter says where this family keeps its blocks, its "
                                      "attention projections (grouped by head) and its FFN projections (grouped by "
                                      "neuron)")
    raise UnsupportedArchitectureError(
        f"optimum-prune does not support the architecture {arch!r} (model_type {model_type!r}): {missing}. "
        f"Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}. "
        "Llama-style models (SmolLM, Mistral, Qwen2/3) are supported through their standard transformers classes."
    )
