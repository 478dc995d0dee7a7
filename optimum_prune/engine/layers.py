"""The compressible Linears of a block, grouped by shared input, found through the architecture adapter.

Algorithms see a block as a list of ``LinearGroup``s (q/k/v share one input, gate/up share one, ...),
so one Hessian serves a whole group and no algorithm knows where a family keeps its projections. A
Mixture-of-Experts block adds two groups per expert (its fused gate/up matrix, its down matrix), whose
Hessians come from the tokens routed to that expert alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..modeling.adapters import ArchitectureAdapter, ExpertLayout, get_adapter, get_module
from ..modeling.surgery import current_structure


@dataclass
class LinearGroup:
    """Linears of one block that read the same input (one Hessian for all of them)."""

    kind: str
    """"attention_in", "attention_out", "mlp_in", "mlp_out", or "expert_in.<e>" / "expert_out.<e>"."""
    names: list[str]
    """Paths relative to the block."""
    modules: list[nn.Module]
    expert: int | None = None
    """For an expert's group: the expert's position among the layer's current experts."""

    @property
    def in_features(self) -> int:
        return in_features(self.modules[0])


class ExpertMatrix:
    """One expert's projection inside a fused 3-D expert tensor, seen as a Linear's [out, in] weight (a view:
    writing it writes the expert's slice of the tensor)."""

    bias = None

    def __init__(self, layout: ExpertLayout, experts: nn.Module, param: str, position: int) -> None:
        self.layout, self.experts, self.param, self.position = layout, experts, param, position

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.experts, self.param).data[self.position]


def is_compressible(module: nn.Module | ExpertMatrix) -> bool:
    if isinstance(module, ExpertMatrix):
        return module.weight.numel() > 0
    return isinstance(module, (nn.Linear, Conv1D)) and module.weight.numel() > 0


def in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if isinstance(module, Conv1D) else module.weight.shape[1]


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] (a transposed view for GPT-2's Conv1D)."""
    return module.weight.data.t() if isinstance(module, Conv1D) else module.weight.data


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write a [out, in] weight back in the module's own layout and dtype."""
    target = module.weight.data
    target.copy_(weight.t() if isinstance(module, Conv1D) else weight)


def linear_groups(adapter: ArchitectureAdapter, block: nn.Module) -> list[LinearGroup]:
    """The block's compressible Linears, grouped by input, in forward order; removed sublayers are skipped."""
    spec = [("attention_in", [p.path for p in adapter.attention_in]), ("attention_out", [adapter.attention_out]),
            ("mlp_in", list(adapter.mlp_in)), ("mlp_out", [adapter.mlp_out])]
    groups = []
    for kind, paths in spec:
        found = [(p, get_module(block, p)) for p in paths if _has(block, p)]
        found = [(p, m) for p, m in found if is_compressible(m)]
        if found:
            groups.append(LinearGroup(kind, [p for p, _ in found], [m for _, m in found]))
    layout = adapter.experts
    if layout is not None and _has(block, layout.experts):
        experts = get_module(block, layout.experts)
        for e in range(getattr(experts, layout.gate_up).shape[0]):
            for role, param in (("expert_in", layout.gate_up), ("expert_out", layout.down)):
                groups.append(LinearGroup(f"{role}.{e}", [f"{layout.experts}.{param}.{e}"],
                                          [ExpertMatrix(layout, experts, param, e)], expert=e))
    return groups


def _has(block: nn.Module, path: str) -> bool:
    try:
        get_module(block, path)
    except AttributeError:
        return False
    return True


def original_layer_indices(model: nn.Module) -> list[int]:
    """Original (dense-model) index of each block the model still has."""
    structure = current_structure(model)
    adapter = get_adapter(model)
    depth = len(adapter.layers(model))
    total = structure.num_original_layers or depth
    kept = [i for i in range(total) if i not in set(structure.drop_layers)]
    return kept if len(kept) == depth else list(range(depth))

