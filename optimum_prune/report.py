"""What pruning removed, as numbers and a table a person can read."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from .evaluation.size import count_parameters
from .modeling.adapters import base_model_type, get_adapter
from .modeling.modeling_pruned import PrunedModelMixin
from .modeling.pruning_config import PruningConfig
from .modeling.surgery import current_structure


@dataclass
class LayerRow:
    """One original layer: kept / total units, or that the layer or a sublayer is gone."""

    layer: int
    heads: str
    kv_heads: str
    neurons: str
    status: str
    """What went: "whole layer", "attention", "MLP", "units" (some heads/neurons), or "" (untouched)."""


@dataclass
class PruningSummary:
    """Before/after figures for a pruned model."""

    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    layers_before: int
    layers_after: int
    rows: list[LayerRow] = field(default_factory=list)
    target_speedup: float | None = None
    measured_speedup: float | None = None
    speedup_missed: float | None = None
    """The relative miss when the measured speedup is outside the tolerance after re-aiming (None: met)."""

    @property
    def param_reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    def to_markdown(self, changed_only: bool = True) -> str:
        lines = [
            "| | before | after | change |",
            "|---|---:|---:|---:|",
            f"| parameters | {self.params_before:,} | {self.params_after:,} | {-self.param_reduction:+.1%} |",
            f"| weights size | {_mb(self.bytes_before)} | {_mb(self.bytes_after)} | "
            f"{(self.bytes_after / self.bytes_before - 1) if self.bytes_before else 0:+.1%} |",
            f"| layers | {self.layers_before} | {self.layers_after} | {self.layers_after - self.layers_before:+d} |",
        ]
        if self.measured_speedup is not None:
            verdict = (f"target {self.target_speedup:g}x MISSED by {100 * self.speedup_missed:+.1f}%"
                       if self.speedup_missed is not None else
                       f"target {self.target_speedup:g}x" if self.target_speedup else "measured")
            lines.append(f"| speedup | 1.00x | {self.measured_speedup:.3f}x | {verdict} |")
        lines.append("")
        rows = [r for r in self.rows if r.status] if changed_only else self.rows
        if rows:
            lines += ["| layer | query heads | KV heads | FFN neurons | removed |", "|---:|---:|---:|---:|---|"]
            lines += [f"| {r.layer} | {r.heads} | {r.kv_heads} | {r.neurons} | {r.status or '-'} |" for r in rows]
        else:
            lines.append("Nothing was removed.")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def dense_parameters(model: PreTrainedModel) -> tuple[int, int]:
    """Parameters and bytes of the model before any pruning, built on the meta device (no memory)."""
    structure = current_structure(model)
    if structure.is_empty:
        return count_parameters(model)
    base_cls = next(c for c in type(model).__mro__ if not issubclass(c, PrunedModelMixin))
    config_cls = next(c for c in type(model.config).__mro__
                      if getattr(c, "model_type", None) == base_model_type(model.config.model_type))
    config = copy.deepcopy(model.config)
    config.__class__ = config_cls
    del config.pruning_config
    n_orig = structure.num_original_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        config.layer_types = [layer_types[0]] * n_orig
    config.num_hidden_layers = n_orig
    with torch.device("meta"):
        dense = base_cls(config)
    n, _ = count_parameters(dense)
    dtype_bytes = next(model.parameters()).element_size()
    return n, n * dtype_bytes


def summarize(model: PreTrainedModel) -> PruningSummary:
    """Before/after parameter counts and a per-layer table of what is kept."""
    structure: PruningConfig = current_structure(model)
    adapter = get_adapter(model)
    n_orig = structure.num_original_layers or len(adapter.layers(model))
    dims = adapter.dims(model.config, num_layers=n_orig)
    params_after, bytes_after = count_parameters(model)
    params_before, bytes_before = dense_parameters(model)
    rows = []
    for layer in range(n_orig):
        status = []
        if layer in structure.drop_layers:
            rows.append(LayerRow(layer, "-", "-", "-", "whole layer"))
            continue
        heads_gone = structure.remove_heads.get(layer, [])
        if layer in structure.drop_attention:
            status.append("attention")
            heads, kv = f"0/{dims.num_heads}", f"0/{dims.num_kv_heads}"
        else:
            kept_groups = sum(1 for c in dims.kept_heads_per_kv_group(heads_gone) if c)
            heads, kv = f"{dims.num_heads - len(heads_gone)}/{dims.num_heads}", f"{kept_groups}/{dims.num_kv_heads}"
        if layer in structure.drop_mlp:
            status.append("MLP")
            neurons = f"0/{dims.intermediate_size}"
        else:
            gone = len(structure.remove_neurons.get(layer, []))
            neurons = f"{dims.intermediate_size - gone}/{dims.intermediate_size}"
        if not status and (heads_gone or structure.remove_neurons.get(layer)):
            status.append("units")
        rows.append(LayerRow(layer, heads, kv, neurons, ", ".join(status)))
    search = structure.search or {}
    target = structure.target_speedup if isinstance(structure.target_speedup, (int, float)) else None
    return PruningSummary(params_before, params_after, bytes_before, bytes_after, n_orig,
                          len(adapter.layers(model)), rows, target_speedup=target,
                          measured_speedup=structure.measured_speedup,
                          speedup_missed=search.get("miss") if search.get("target_missed") else None)
