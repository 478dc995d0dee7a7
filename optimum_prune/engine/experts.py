"""The tokens a Mixture-of-Experts router sends to each expert, seen from the block's experts module.

Statistics over routed tokens (REAP's saliency, each expert's input Hessians) come from one forward
pre-hook on the experts module, which receives the tokens together with the router's choice (top-k
indices and weights); the adapter's ``ExpertLayout`` says where that module is and how an expert computes.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..modeling.adapters import ArchitectureAdapter, ExpertLayout, get_adapter, get_module
from ..modeling.surgery import current_structure


@dataclass
class Routed:
    """The tokens of one forward that the router sent to one expert."""

    position: int
    """The expert's index among the layer's current experts (see ``kept_experts`` for the original index)."""
    tokens: torch.Tensor
    """[n, hidden] inputs of the expert."""
    weights: torch.Tensor
    """[n] the router's weight of this expert for each token (what its output is scaled by)."""


def moe_block(adapter: ArchitectureAdapter, block: nn.Module) -> tuple[ExpertLayout, nn.Module] | None:
    """(layout, experts module) of a block whose FFN is a Mixture of Experts; None for a dense or dropped FFN."""
    layout = adapter.experts
    if layout is None:
        return None
    try:
        experts = get_module(block, layout.experts)
    except AttributeError:
        return None
    return layout, experts


def refuse_experts(model: nn.Module, what: str) -> None:
    """Fail before any work when ``what`` (a method's search) does not cover Mixture-of-Experts FFNs yet."""
    if get_adapter(model).experts is not None:
        raise ValueError(
            f"{what} does not cover Mixture-of-Experts FFNs yet ({type(model).__name__}): remove experts with "
            "method='reap', sparsify or quantize the weights with sparsegpt / wanda / gptq, drop blocks with "
            "layerchop or sublayers with EvoPress depth"
        )


def kept_experts(model: nn.Module, layer: int, num_experts: int) -> list[int]:
    """Original indices of the experts layer ``layer`` (original index) still has, in order."""
    removed = set(current_structure(model).remove_experts.get(layer, []))
    return [e for e in range(num_experts) if e not in removed]


def _routing_arguments(experts: nn.Module) -> Callable[[tuple, dict], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Reads (hidden_states, top_k_index, top_k_weights) from an experts module's call, by parameter name."""
    forward = inspect.unwrap(type(experts).forward)
    names = [p for p in inspect.signature(forward).parameters if p != "self"]

    def read(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bound = dict(zip(names, args), **kwargs)
        return bound["hidden_states"], bound["top_k_index"], bound["top_k_weights"]

    return read


def split_by_expert(hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                    num_experts: int) -> Iterator[Routed]:
    """One ``Routed`` per expert that received tokens in this forward."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    index = index.reshape(hidden.shape[0], -1)
    weights = weights.reshape(hidden.shape[0], -1)
    for e in torch.unique(index).tolist():
        if not 0 <= e < num_experts:
            continue  # some implementations mark unused slots with an out-of-range sentinel
        token, slot = torch.where(index == e)
        yield Routed(e, hidden[token], weights[token, slot])


def routing_hook(experts: nn.Module, callback: Callable[[nn.Module, Routed], None],
                 count: Callable[[nn.Module], int] | None = None) -> Any:
    """Register a forward pre-hook calling ``callback(experts, routed)`` per expert that receives tokens; returns
    the handle. ``count``: the module's current number of experts (default: its ``num_experts``)."""
    read = _routing_arguments(experts)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, index, weights = read(args, kwargs)
        total = count(module) if count is not None else module.num_experts
        with torch.no_grad():
            for routed in split_by_expert(hidden.detach(), index.detach(), weights.detach(), total):
                callback(module, routed)

    return experts.register_forward_pre_hook(hook, with_kwargs=True)


@contextmanager
def on_routed_tokens(adapter: ArchitectureAdapter, block: nn.Module,
                     callback: Callable[[ExpertLayout, nn.Module, Routed], None]) -> Iterator[None]:
    """While active, every forward through ``block``'s experts calls ``callback(layout, experts, routed)`` once
    per expert that receives tokens. A block without experts (dense, or its MoE sublayer dropped) does nothing."""
    found = moe_block(adapter, block)
    if found is None:
        yield
        return
    layout, experts = found
    handle = routing_hook(experts, lambda module, routed: callback(layout, module, routed),
                          count=lambda module: getattr(module, layout.gate_up).shape[0])
    try:
        yield
    finally:
        handle.remove()
