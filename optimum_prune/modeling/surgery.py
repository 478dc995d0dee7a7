"""Physical removal of heads, FFN neurons, sublayers and blocks: the weights are really gone.

``apply_structure`` moves a model from the structure it has now to a target ``PruningConfig``; it
is used both when pruning and at load time (on meta tensors, before the weights arrive). Copied
beside the weights for ``trust_remote_code`` loading, so it imports only torch and transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapters import ArchitectureAdapter, get_adapter, get_module, head_channels, set_module
from .pruning_config import PruningConfig, PruningConfigError


class DroppedAttention(nn.Module):
    """Stands in for a removed attention sublayer: adds nothing to the residual stream.

    It still advances the KV cache by one 1-wide stub per token so that cache lengths (and so
    positions and masks during ``generate``) stay right even when layer 0's attention is gone.
    """

    def __init__(self, layer_idx: int | None, out_features: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.out_features = out_features

    def forward(self, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        if hidden_states is None:
            hidden_states = kwargs["hidden_states"]
        # transformers >= 5.24 passes the cache as `cache`; earlier 5.x releases as `past_key_values`; GPT-NeoX as
        # `layer_past`.
        cache = next((kwargs[k] for k in ("cache", "past_key_values", "past_key_value", "layer_past")
                      if kwargs.get(k) is not None), None)
        if cache is not None and self.layer_idx is not None:
            cache = getattr(cache, "self_attention_cache", cache)
            stub = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[-2], 1)
            cache.update(stub, stub, self.layer_idx)
        return hidden_states.new_zeros(*hidden_states.shape[:-1], self.out_features), None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, out_features={self.out_features}"


class EmptyProjection(nn.Module):
    """A removed FFN input projection: outputs zero features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], 0)


class ZeroProjection(nn.Module):
    """A removed output projection (no weights, no bias): its branch contributes zeros."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}"


# ---------------------------------------------------------------------- tensor slicing
def _out_dim(module: nn.Module) -> int:
    """Axis of ``weight`` that indexes output features (Conv1D stores the transpose of Linear)."""
    return 1 if isinstance(module, Conv1D) else 0


def out_features(module: nn.Module) -> int:
    return module.weight.shape[_out_dim(module)]


def keep_outputs(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep only the output features ``keep`` of a Linear/Conv1D (weight rows and bias)."""
    dim = _out_dim(module)
    _replace_param(module, "weight", module.weight.data.index_select(dim, keep.to(module.weight.device)))
    if module.bias is not None:
        _replace_param(module, "bias", module.bias.data.index_select(0, keep.to(module.bias.device)))
    if isinstance(module, Conv1D):
        module.nf = len(keep)
    else:
        module.out_features = len(keep)


def keep_inputs(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep only the input features ``keep`` of a Linear/Conv1D (bias unchanged)."""
    dim = 1 - _out_dim(module)
    _replace_param(module, "weight", module.weight.data.index_select(dim, keep.to(module.weight.device)))
    if not isinstance(module, Conv1D):
        module.in_features = len(keep)


def keep_norm(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep only the channels ``keep`` of a norm over a projection's output (weight, bias, recorded size)."""
    for name in ("weight", "bias"):
        if getattr(module, name, None) is not None:
            _replace_param(module, name, getattr(module, name).data.index_select(0, keep.to(module.weight.device)))
    if isinstance(getattr(module, "normalized_shape", None), tuple):
        module.normalized_shape = (len(keep),)


def _replace_param(module: nn.Module, name: str, data: torch.Tensor) -> None:
    old = getattr(module, name)
    new = nn.Parameter(data.contiguous(), requires_grad=old.requires_grad)
    for attr in ("_is_hf_initialized",):
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    setattr(module, name, new)


# ---------------------------------------------------------------------- state of a model
def current_structure(model: nn.Module) -> PruningConfig:
    """The structure the model has now (an empty config, with its depth, for a dense model)."""
    config = PruningConfig.from_model_config(model.config)
    adapter = get_adapter(model)
    if config is None:
        return PruningConfig(num_original_layers=len(adapter.layers(model)))
    return config


def apply_structure(model: nn.Module, target: PruningConfig, current: PruningConfig | None = None) -> PruningConfig:
    """Remove from ``model`` whatever ``target`` removes beyond ``current`` (default: the model's own).

    Returns the full structure the model has afterwards (``current`` merged with ``target``). The
    model's config is updated (depth, layer types, ``pruning_config``); classes are not touched.
    """
    adapter = get_adapter(model)
    config = model.config
    current = current_structure(model) if current is None else current
    num_original = current.num_original_layers
    if num_original is None:
        raise PruningConfigError("the model's `pruning_config` lacks `num_original_layers`")
    dims = adapter.dims(config, num_layers=num_original)
    merged = current.merge(target)
    merged.num_original_layers = num_original
    merged.validate(dims)
    if adapter.check_structure is not None:
        adapter.check_structure(config, merged)

    layers = adapter.layers(model)
    kept_before = current.kept_layers()
    if len(kept_before) != len(layers):
        raise PruningConfigError(
            f"the model has {len(layers)} blocks but its `pruning_config` keeps {len(kept_before)} of "
            f"{num_original}; the config does not describe this model"
        )
    with torch.no_grad():
        for block, orig in zip(layers, kept_before):
            if orig in merged.drop_layers:
                continue
            _apply_attention(adapter, config, block, orig, current, merged, dims)
            _apply_mlp(adapter, config, block, orig, current, merged, dims)
            _apply_experts(adapter, block, orig, current, merged, dims)
        kept_after = merged.kept_layers()
        if kept_after != kept_before:
            _drop_blocks(adapter, model, kept_before, kept_after)
    config.pruning_config = merged.to_dict()
    return merged


def _apply_attention(adapter: ArchitectureAdapter, config: Any, block: nn.Module, orig: int,
                     current: PruningConfig, target: PruningConfig, dims) -> None:
    if orig in current.drop_attention:
        return
    core = adapter.attention_core(block)
    if orig in target.drop_attention:
        out_inside = adapter.attention_out.startswith(adapter.attention + ".")
        hidden = out_features(get_module(block, adapter.attention_out))
        set_module(block, adapter.attention, DroppedAttention(getattr(core, "layer_idx", None),
                                                              hidden if out_inside else 0))
        if not out_inside:
            set_module(block, adapter.attention_out, ZeroProjection(hidden))
        for norm in adapter.sublayer_norms(config, "attention"):
            set_module(block, norm, nn.Identity())
        return
    have = set(current.remove_heads.get(orig, []))
    want = set(target.remove_heads.get(orig, []))
    if want == have:
        return
    r = dims.heads_per_group
    kept_q_before = [h for h in range(dims.num_heads) if h not in have]
    kept_q_after = [h for h in range(dims.num_heads) if h not in want]
    kept_g_before = sorted({h // r for h in kept_q_before})
    kept_g_after = sorted({h // r for h in kept_q_after})
    hd = dims.head_dim
    q_pos = [kept_q_before.index(h) for h in kept_q_after]
    g_pos = [kept_g_before.index(g) for g in kept_g_after]
    for proj in adapter.attention_in:
        keep_outputs(get_module(block, proj.path), proj.rows(q_pos, g_pos, len(kept_q_before), len(kept_g_before), hd))
    q_keep = head_channels(q_pos, hd)
    keep_inputs(get_module(block, adapter.attention_out), q_keep)
    for path, part in adapter.head_norms:
        keep_norm(get_module(block, path), q_keep if part == "q" else head_channels(g_pos, hd))
    n_q, n_kv = len(kept_q_after), len(kept_g_after)
    adapter.set_head_counts(core, {"heads": n_q, "kv_heads": n_kv, "groups": n_q // n_kv, "width": n_q * hd})


def _apply_mlp(adapter: ArchitectureAdapter, config: Any, block: nn.Module, orig: int,
               current: PruningConfig, target: PruningConfig, dims) -> None:
    if orig in current.drop_mlp:
        return
    if orig in target.drop_mlp:
        if adapter.experts is not None:  # the whole MoE sublayer (router, experts, shared expert) goes
            set_module(block, adapter.experts.block, ZeroProjection(dims.hidden_size))
            for norm in adapter.sublayer_norms(config, "mlp"):
                set_module(block, norm, nn.Identity())
            return
        hidden = out_features(get_module(block, adapter.mlp_out))
        for path in adapter.mlp_in:
            set_module(block, path, EmptyProjection())
        set_module(block, adapter.mlp_out, ZeroProjection(hidden))
        for norm in adapter.sublayer_norms(config, "mlp"):
            set_module(block, norm, nn.Identity())
        return
    have = set(current.remove_neurons.get(orig, []))
    want = set(target.remove_neurons.get(orig, []))
    if want == have:
        return
    kept_before = [i for i in range(dims.intermediate_size) if i not in have]
    position = {n: p for p, n in enumerate(kept_before)}
    keep = torch.tensor([position[n] for n in kept_before if n not in want], dtype=torch.long)
    out = get_module(block, adapter.mlp_out)
    for path in adapter.mlp_in:
        keep_outputs(get_module(block, path), adapter.neuron_rows(path, keep, len(kept_before)))
    keep_inputs(out, keep)


def _apply_experts(adapter: ArchitectureAdapter, block: nn.Module, orig: int, current: PruningConfig,
                   target: PruningConfig, dims) -> None:
    """Remove experts (the router's row e and index e of each fused expert tensor) and FFN neurons inside the
    kept experts (gate and up rows, down columns) from one MoE layer."""
    layout = adapter.experts
    if layout is None or orig in current.drop_mlp or orig in target.drop_mlp:
        return
    have, want = set(current.remove_experts.get(orig, [])), set(target.remove_experts.get(orig, []))
    have_n = current.remove_expert_neurons.get(orig, {})
    want_n = target.remove_expert_neurons.get(orig, {})
    if want == have and want_n == have_n:
        return
    kept_before = [e for e in range(dims.num_experts) if e not in have]
    kept_after = [e for e in kept_before if e not in want]
    positions_list = [kept_before.index(e) for e in kept_after]  # plain ints: the model may be built on meta
    positions = torch.tensor(positions_list, dtype=torch.long)
    router, experts = layout.modules(block)
    for name in ("weight", "bias"):
        param = getattr(router, name, None)
        if isinstance(param, nn.Parameter):
            _replace_param(router, name, param.data.index_select(0, positions.to(param.device)))
    gate_up, down = getattr(experts, layout.gate_up).data, getattr(experts, layout.down).data
    new_gate_up, new_down = [], []
    for e, p in zip(kept_after, positions_list):
        gone_before, gone_after = set(have_n.get(e, [])), set(want_n.get(e, []))
        kept_n = [n for n in range(dims.expert_size) if n not in gone_before]
        keep = torch.tensor([i for i, n in enumerate(kept_n) if n not in gone_after], dtype=torch.long,
                            device=gate_up.device)
        new_gate_up.append(gate_up[p].index_select(0, torch.cat([keep, keep + len(kept_n)])))  # gate rows, up rows
        new_down.append(down[p].index_select(1, keep))
    _replace_param(experts, layout.gate_up, torch.stack(new_gate_up))
    _replace_param(experts, layout.down, torch.stack(new_down))
    layout.set_count(block, len(kept_after))
    if hasattr(experts, "intermediate_dim"):
        experts.intermediate_dim = new_down[0].shape[1]


def _drop_blocks(adapter: ArchitectureAdapter, model: nn.Module, kept_before: list[int], kept_after: list[int]) -> None:
    layers = adapter.layers(model)
    config = model.config
    new_layers = nn.ModuleList([layers[kept_before.index(orig)] for orig in kept_after])
    for new_idx, block in enumerate(new_layers):
        core = adapter.attention_core(block)
        for module in (block, core):
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    set_module(model.base_model, adapter.layers_path, new_layers)
    key = adapter.layer_types_key
    layer_types = getattr(config, key, None) if key else None
    if layer_types is not None and len(layer_types) == len(kept_before):
        setattr(config, key, [layer_types[kept_before.index(orig)] for orig in kept_after])
    config.num_hidden_layers = len(kept_after)
