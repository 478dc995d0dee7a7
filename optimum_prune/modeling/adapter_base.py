"""The vocabulary of the adapter layer: projections grouped by head, the adapter record, module paths.

``adapters.py`` describes each family with these types; surgery, masking and every algorithm use them,
so none of them branches on the model family. Copied beside the weights for ``trust_remote_code``
loading, so it imports only torch and transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .pruning_config import ModelDims


class UnsupportedArchitectureError(ValueError):
    """The model's family has no adapter."""


@dataclass(frozen=True)
class Projection:
    """A Linear/Conv1D whose output concatenates per-head slices, in the order of ``parts``.

    ``parts`` holds "q", "k" or "v": Llama's q_proj is ("q",); GPT-2's fused c_attn and Phi-3's qkv_proj
    are ("q", "k", "v"), all query heads first, then all keys, then all values. ``interleaved``: the rows
    are laid out per key/value group instead, each group holding its query heads, then its key, then its
    value (GPT-NeoX's query_key_value, where every head is its own group: [q0 k0 v0 q1 k1 v1 ...]).
    """

    path: str
    parts: tuple[str, ...]
    interleaved: bool = False

    def rows(self, kept_q: list[int], kept_g: list[int], num_q: int, num_g: int, head_dim: int) -> torch.Tensor:
        """Output rows that carry query heads ``kept_q`` and KV groups ``kept_g``.

        Indices are positions among the ``num_q`` query heads / ``num_g`` groups the projection has now;
        every kept query head's group must be kept (the GQA rule guarantees it).
        """
        width = {"q": num_q * head_dim, "k": num_g * head_dim, "v": num_g * head_dim}
        if not self.interleaved:
            pieces, offset = [], 0
            for part in self.parts:
                pieces.append(head_channels(kept_q if part == "q" else kept_g, head_dim) + offset)
                offset += width[part]
            return torch.cat(pieces)
        r = num_q // num_g
        span = {"q": r * head_dim, "k": head_dim, "v": head_dim}
        block = sum(span[p] for p in self.parts)
        pieces = []
        for g in kept_g:
            offset = g * block
            for part in self.parts:
                heads = [h - g * r for h in kept_q if h // r == g] if part == "q" else [0]
                pieces.append(head_channels(heads, head_dim) + offset)
                offset += span[part]
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class ExpertLayout:
    """Where a Mixture-of-Experts sublayer keeps its router and its experts (transformers 5's fused 3-D tensors).

    Paths are relative to one block. The router's ``weight`` has one row per expert; the experts module
    holds ``gate_up`` [E, 2I, H] (each expert's gate rows, then its up rows) and ``down`` [E, H, I]; an
    expert computes ``down[e] @ (act(gate[e] x) * up[e] x)``. Removing expert e removes index e of each.
    """

    block: str
    """The whole MoE sublayer (router, experts, any shared expert): replaced when the sublayer is dropped."""
    router: str
    experts: str
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    activation: str = "act_fn"
    """Attribute of the experts module holding the activation function."""
    count_attributes: tuple[str, ...] = ("router.num_experts", "experts.num_experts")
    """Attributes (``router.`` / ``experts.`` + name) recomputed to the layer's number of experts."""
    num_experts: Callable[[Any], int] = lambda config: config.num_experts
    experts_per_token: Callable[[Any], int] = lambda config: config.num_experts_per_tok
    expert_size: Callable[[Any], int] = lambda config: config.intermediate_size
    """FFN width of each expert."""

    def modules(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(router, experts) modules of one block."""
        return get_module(block, self.router), get_module(block, self.experts)

    def expert_hidden(self, experts: nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``index``'s intermediate activations (the input of its down projection) for tokens ``x``."""
        w = getattr(experts, self.gate_up)[index]
        gate, up = torch.nn.functional.linear(x.to(w.dtype), w).chunk(2, dim=-1)
        return getattr(experts, self.activation)(gate) * up

    def expert_output(self, experts: nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``index``'s output for tokens ``x`` (before the router weight)."""
        return torch.nn.functional.linear(self.expert_hidden(experts, index, x), getattr(experts, self.down)[index])

    def set_count(self, block: nn.Module, count: int) -> None:
        """Write the layer's number of experts wherever the router and experts modules read it."""
        router, experts = self.modules(block)
        for attr in self.count_attributes:
            owner, _, name = attr.partition(".")
            module = router if owner == "router" else experts
            if hasattr(module, name):
                setattr(module, name, count)


def head_channels(positions: list[int], width: int) -> torch.Tensor:
    """Channels ``p * width ... p * width + width - 1`` of each position, in order."""
    if not positions:
        return torch.zeros(0, dtype=torch.long)
    pos = torch.tensor(positions, dtype=torch.long)
    return (pos[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


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
    """Projections whose OUTPUT rows are FFN neurons (empty when the FFN is a Mixture of Experts alone)."""
    mlp_out: str | None
    """Projection whose INPUT columns are FFN neurons (None when the FFN is a Mixture of Experts alone; a
    Qwen2-MoE shared expert is a dense FFN of this kind)."""
    attention_pre_norm: Callable[[Any], str | None] = lambda config: None
    """Norm that only feeds the attention (pre-LN models); removed with the attention."""
    mlp_pre_norm: Callable[[Any], str | None] = lambda config: None
    attention_post_norm: Callable[[Any], str | None] = lambda config: None
    """Norm applied to the attention's output before the residual add (Gemma 2/3, OLMo 2); removed with
    the attention (a bias-free RMSNorm of zeros is zero, so removing it is exact)."""
    mlp_post_norm: Callable[[Any], str | None] = lambda config: None
    head_norms: tuple[tuple[str, str], ...] = ()
    """Norms over a whole q or k projection output, as (path, "q" / "k") (OLMo 2's q_norm / k_norm): their
    weights are sliced with the heads. The norm's statistic then covers the remaining heads only, so
    removing heads rescales the others' queries and keys (not the same as zeroing them). Per-head norms
    (Qwen 3, Gemma 3, of size head_dim) need no entry."""
    fused_mlp_in: dict[str, int] = field(default_factory=dict)
    """FFN input projections that stack several neuron-indexed blocks: path -> number of blocks (Phi-3's
    gate_up_proj holds gate rows then up rows: 2). Neuron n is row n of every block."""
    head_attributes: dict[str, str] = field(default_factory=dict)
    """Attributes of the attention core recomputed after head removal: name -> one of
    "heads", "kv_heads", "groups" (query heads per KV head), "width" (heads * head_dim)."""
    head_config_attributes: dict[str, str] = field(default_factory=dict)
    """Config attributes the attention core reads from ``self.config`` (Phi-3's ``num_attention_heads``):
    the core gets a per-layer view of the model config with these values (same kinds as head_attributes)."""
    intermediate_size: Callable[[Any], int] = lambda config: config.intermediate_size
    num_kv_heads: Callable[[Any], int] = lambda config: config.num_attention_heads
    layer_types_key: str | None = None
    """Config list with one entry per layer, sliced when blocks are dropped."""
    check_structure: Callable[[Any, Any], None] | None = None
    """Family-specific limits, called with (config, PruningConfig) before any weight is touched."""
    experts: ExpertLayout | None = None
    """Where a Mixture-of-Experts family keeps its router and experts (None: a dense family)."""

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
            num_experts=self.experts.num_experts(config) if self.experts else 0,
            experts_per_token=self.experts.experts_per_token(config) if self.experts else 0,
            expert_size=self.experts.expert_size(config) if self.experts else 0,
        )

    # ------------------------------------------------------------------ access
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return get_module(model.base_model, self.layers_path)

    def attention_core(self, block: nn.Module) -> nn.Module:
        return get_module(block, self.attention)

    def mlp_linears(self, block: nn.Module) -> tuple[list[nn.Module], nn.Module]:
        return [get_module(block, p) for p in self.mlp_in], get_module(block, self.mlp_out)

    def mlp_paths(self, config: Any) -> list[str]:
        """Everything that belongs to the FFN sublayer alone: projections, the MoE sublayer, its norms."""
        paths = [*self.mlp_in, *([self.mlp_out] if self.mlp_out else []), *self.sublayer_norms(config, "mlp")]
        return paths + ([self.experts.block] if self.experts else [])

    def sublayer_norms(self, config: Any, sublayer: str) -> list[str]:
        """Norms that belong to the "attention" or "mlp" sublayer alone (removed with it)."""
        norms = (self.attention_pre_norm, self.attention_post_norm) if sublayer == "attention" else \
            (self.mlp_pre_norm, self.mlp_post_norm)
        return [path for path in (n(config) for n in norms) if path]

    def post_norms(self, block: nn.Module, config: Any) -> dict[str, nn.Module]:
        """The norms a sublayer's output passes through before the residual add, by sublayer ("attention",
        "mlp"); empty for families that add the output projection's output itself (pre-norm and post-LN ones).

        Such a norm rescales the output projection's output token by token, so an error there reaches the
        residual stream multiplied by the norm's gain: ZipLM's level database weights the output projection's
        rows by that gain, measured on the calibration tokens (``engine.hessian.PostNormGains``)."""
        out = {}
        for sublayer, norm in (("attention", self.attention_post_norm), ("mlp", self.mlp_post_norm)):
            path = norm(config)
            if path:
                out[sublayer] = get_module(block, path)
        return out

    def neuron_rows(self, path: str, neurons: torch.Tensor, width: int) -> torch.Tensor:
        """Output rows of FFN input projection ``path`` that carry ``neurons`` (of ``width`` per block)."""
        blocks = self.fused_mlp_in.get(path, 1)
        return torch.cat([neurons + b * width for b in range(blocks)]) if blocks > 1 else neurons

    def set_head_counts(self, core: nn.Module, values: dict[str, int]) -> None:
        """Write the attention core's per-layer head counts (attributes and, where read, its config)."""
        for attr, kind in self.head_attributes.items():
            if hasattr(core, attr):
                setattr(core, attr, values[kind])
        if self.head_config_attributes and hasattr(core, "config"):
            base = core.config.base if isinstance(core.config, LayerConfig) else core.config
            core.config = LayerConfig(base, {a: values[k] for a, k in self.head_config_attributes.items()})


class LayerConfig:
    """A view of the model config with a few per-layer values (head counts) of one attention core.

    Every other attribute is read from, and written to, the model's own config, so changes made later
    (the attention implementation, ...) reach every layer.
    """

    def __init__(self, base: Any, overrides: dict[str, Any]) -> None:
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "overrides", dict(overrides))

    def __getattr__(self, name: str) -> Any:
        if name in ("base", "overrides"):  # not yet set (copy / unpickle): no recursion
            raise AttributeError(name)
        overrides = self.overrides
        return overrides[name] if name in overrides else getattr(self.base, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.overrides:
            self.overrides[name] = value
        else:
            setattr(self.base, name, value)

    def __getstate__(self) -> dict[str, Any]:
        return {"base": self.base, "overrides": self.overrides}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "base", state["base"])
        object.__setattr__(self, "overrides", state["overrides"])

    def __repr__(self) -> str:
        return f"LayerConfig({type(self.base).__name__}, {self.overrides})"


def get_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_module(root, parent_path) if parent_path else root
    setattr(parent, name, new)
