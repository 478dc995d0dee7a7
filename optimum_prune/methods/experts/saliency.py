"""REAP saliency of every routed expert, computed block by block on calibration data, and the experts to remove.

REAP (Lasby et al., 2025): S_e = mean over the tokens x routed to expert e of g_e(x) * ||f_e(x)||, with
g_e the router's weight of e for x and f_e(x) the expert's output. Low saliency: the expert's contribution
to the layer output is small where it is used, and it is rarely used.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...engine.experts import ExpertLayout, Routed, kept_experts, moe_block, on_routed_tokens
from ...engine.layers import original_layer_indices
from ...engine.sequential import SequentialOptions, run_sequential
from ...modeling.adapters import get_adapter


@dataclass
class ExpertSaliency:
    """Per MoE layer (original index): each current expert's saliency and routed-token count, by position."""

    saliency: dict[int, torch.Tensor] = field(default_factory=dict)
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)
    experts: dict[int, list[int]] = field(default_factory=dict)
    """Original expert index of each position."""

    def unrouted(self) -> dict[int, list[int]]:
        """Experts (original indices) that received no calibration token, per layer."""
        out = {layer: [self.experts[layer][p] for p in torch.where(t == 0)[0].tolist()]
               for layer, t in self.tokens.items()}
        return {layer: experts for layer, experts in out.items() if experts}


def moe_layers(model: nn.Module) -> dict[int, tuple[int, int]]:
    """Per original layer index with a (kept) MoE sublayer: (current number of experts, experts per token)."""
    adapter = get_adapter(model)
    out = {}
    for block, layer in zip(adapter.layers(model), original_layer_indices(model)):
        found = moe_block(adapter, block)
        if found is not None:
            layout, experts = found
            out[layer] = (getattr(experts, layout.gate_up).shape[0], layout.experts_per_token(model.config))
    return out


@torch.no_grad()
def reap_saliency(model: nn.Module, input_ids: torch.Tensor, options: SequentialOptions | None = None) -> ExpertSaliency:
    """Every MoE layer's REAP saliency on ``input_ids``, one block at a time (the model is not changed)."""
    adapter = get_adapter(model)
    result = ExpertSaliency()
    sums: dict[int, torch.Tensor] = {}
    dense_experts = adapter.experts.num_experts(model.config) if adapter.experts else 0
    with ExitStack() as stack:
        for block, layer in zip(adapter.layers(model), original_layer_indices(model)):
            found = moe_block(adapter, block)
            if found is None:
                continue
            count = getattr(found[1], found[0].gate_up).shape[0]
            sums[layer] = torch.zeros(count, dtype=torch.float64)
            result.tokens[layer] = torch.zeros(count, dtype=torch.long)
            result.experts[layer] = kept_experts(model, layer, dense_experts)

            def add(layout: ExpertLayout, experts: nn.Module, routed: Routed, layer: int = layer) -> None:
                out = layout.expert_output(experts, routed.position, routed.tokens).float()
                sums[layer][routed.position] += float((routed.weights.float() * out.norm(dim=-1)).sum())
                result.tokens[layer][routed.position] += routed.tokens.shape[0]

            stack.enter_context(on_routed_tokens(adapter, block, add))
        if not sums:
            raise ValueError(f"{type(model).__name__} has no Mixture-of-Experts layer left to prune experts from")
        run_sequential(model, input_ids, _statistics_only, hessians=None, options=options)
    for layer, total in sums.items():
        result.saliency[layer] = (total / result.tokens[layer].clamp(min=1)).float()
    return result


def _statistics_only(layer: int, block: nn.Module, groups: list, hessians: dict) -> dict[str, Any]:
    """The block step of the saliency pass: nothing to change (the hooks collect during the block's forward)."""
    return {}


def experts_to_remove(num_experts: int, ratio: float) -> int:
    """How many of ``num_experts`` a ratio removes (rounded half up)."""
    return math.floor(ratio * num_experts + 0.5)


def check_ratio(layers: dict[int, tuple[int, int]], ratio: float) -> None:
    """Fail before calibration when ``ratio`` would leave a layer fewer experts than the router picks per token."""
    if not layers:
        raise ValueError("this model has no Mixture-of-Experts layer left to remove experts from")
    for layer, (count, top_k) in layers.items():
        if count - experts_to_remove(count, ratio) < top_k:
            most = (count - top_k) / count
            raise ValueError(
                f"experts_ratio={ratio:g} would leave layer {layer} {count - experts_to_remove(count, ratio)} of its "
                f"{count} experts, fewer than the {top_k} its router picks per token: use experts_ratio <= {most:.3g}"
            )


def choose_experts(scores: ExpertSaliency, layers: dict[int, tuple[int, int]], ratio: float,
                   scope: str = "layer") -> dict[int, list[int]]:
    """Original expert indices to remove per layer: the least salient, ``ratio`` of them per layer or model-wide.

    Ties go to the lower expert index; no layer keeps fewer experts than its router picks per token.
    """
    remove: dict[int, list[int]] = {}
    if scope == "layer":
        for layer, s in scores.saliency.items():
            n = experts_to_remove(len(s), ratio)
            order = sorted(range(len(s)), key=lambda p: (float(s[p]), p))[:n]
            remove[layer] = sorted(scores.experts[layer][p] for p in order)
        return remove
    total = experts_to_remove(sum(len(s) for s in scores.saliency.values()), ratio)
    ranked = []
    for layer, s in scores.saliency.items():
        scale = float(s.mean()) or 1.0
        ranked += [(float(s[p]) / scale, layer, p) for p in range(len(s))]
    left = {layer: len(s) for layer, s in scores.saliency.items()}
    for _, layer, p in sorted(ranked):
        if total == 0:
            break
        if left[layer] - 1 < layers[layer][1]:
            continue
        remove.setdefault(layer, []).append(scores.experts[layer][p])
        left[layer] -= 1
        total -= 1
    return {layer: sorted(v) for layer, v in sorted(remove.items())}
