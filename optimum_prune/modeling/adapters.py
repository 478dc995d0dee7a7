"""Architecture adapters: the ONE place that knows where each model family keeps its heads and neurons.

Surgery and every algorithm talk to a model through ``ArchitectureAdapter`` (blocks, attention
projections grouped by head, FFN projections grouped by neuron, norms, attribute names), so none of
them branches on the model family. Copied beside the weights for ``trust_remote_code`` loading, so it
imports only torch and transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .pruning_config import ModelDims, PruningConfigError


class UnsupportedArchitectureError(ValueError):
    """The model's family has no adapter."""


@dataclass(frozen=True)
class Projection:
    """A Linear/Conv1D whose output concatenates per-head slices, in the order of ``parts``.

    ``parts`` holds "q", "k" or "v": Llama's q_proj is ("q",); GPT-2's fused c_attn is ("q", "k", "v").
    """

    path: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Where one family keeps its prunable structures (paths are relative to one block)."""

    name: str
    model_types: tuple[str, ...]
    layers_path: str
    """Path of the block list, relative to ``model.base_model``."""
    attention: str
    """The attention core; replaced by a pass-through when the attention sublayer is dropped."""
    attention_in: tuple[Projection, ...]
    attention_out: str
    """Projection whose INPUT columns are grouped by head (o_proj / out_proj / c_proj / output.dense)."""
    mlp_in: tuple[str, ...]
    """Projections whose OUTPUT rows are FFN neurons."""
    mlp_out: str
    """Projection whose INPUT columns are FFN neurons."""
    attention_pre_norm: Callable[[Any], str | None] = lambda config: None
    """Norm that only feeds the attention (pre-LN models); removed with the attention."""
    mlp_pre_norm: Callable[[Any], str | None] = lambda config: None
    head_attributes: dict[str, str] = field(default_factory=dict)
    """Attributes of the attention core recomputed after head removal: name -> one of
    "heads", "kv_heads", "groups" (query heads per KV head), "width" (heads * head_dim)."""
    intermediate_size: Callable[[Any], int] = lambda config: config.intermediate_size
    num_kv_heads: Callable[[Any], int] = lambda config: config.num_attention_heads
    layer_types_key: str | None = None
    """Config list with one entry per layer, sliced when blocks are dropped."""
    check_structure: Callable[[Any, Any], None] | None = None
    """Family-specific limits, called with (config, PruningConfig) before any weight is touched."""

    # ------------------------------------------------------------------ dimensions
    def dims(self, config: Any, num_layers: int | None = None) -> ModelDims:
        """Dense dimensions from the (unpruned-valued) config; ``num_layers`` overrides the depth."""
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return ModelDims(
            num_layers=config.num_hidden_layers if num_layers is None else num_layers,
            num_heads=num_heads,
            num_kv_heads=self.num_kv_heads(config),
            head_dim=head_dim,
            hidden_size=config.hidden_size,
            intermediate_size=self.intermediate_size(config),
        )

    # ------------------------------------------------------------------ access
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return get_module(model.base_model, self.layers_path)

    def attention_core(self, block: nn.Module) -> nn.Module:
        return get_module(block, self.attention)

    def mlp_linears(self, block: nn.Module) -> tuple[list[nn.Module], nn.Module]:
        return [get_module(block, p) for p in self.mlp_in], get_module(block, self.mlp_out)


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


_LLAMA_STYLE = dict(
    layers_path="layers",
    attention="self_attn",
    attention_in=(Projection("self_attn.q_proj", ("q",)), Projection("self_attn.k_proj", ("k",)),
                  Projection("self_attn.v_proj", ("v",))),
    attention_out="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    attention_pre_norm=lambda config: "input_layernorm",
    mlp_pre_norm=lambda config: "post_attention_layernorm",
    head_attributes={"num_key_value_groups": "groups", "num_heads": "heads", "num_key_value_heads": "kv_heads"},
    num_kv_heads=_llama_kv,
    layer_types_key="layer_types",
)

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
        attention_pre_norm=lambda config: "ln_1",
        mlp_pre_norm=lambda config: "ln_2",
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
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in ADAPTERS for t in a.model_types)


def base_model_type(model_type: str) -> str:
    """'pruned_llama' -> 'llama'; other names unchanged."""
    return model_type[len("pruned_"):] if model_type.startswith("pruned_") else model_type


def get_adapter(config_or_model: Any) -> ArchitectureAdapter:
    """The adapter for a model or config; an unsupported family names the supported ones."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = base_model_type(getattr(config, "model_type", "") or "")
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    if isinstance(config_or_model, nn.Module):
        arch = type(config_or_model).__name__
    else:
        arch = (getattr(config, "architectures", None) or [model_type or type(config).__name__])[0]
    raise UnsupportedArchitectureError(
        f"optimum-prune does not support the architecture {arch!r} (model_type {model_type!r}). "
        f"Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}. "
        "Llama-style models (SmolLM, Mistral, Qwen2/3) are supported through their standard transformers classes."
    )


def get_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_module(root, parent_path) if parent_path else root
    setattr(parent, name, new)
