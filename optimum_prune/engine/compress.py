"""Whole-model compression: SparseGPT / Wanda / magnitude pruning and GPTQ, per-layer levels, one code path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..modeling.adapters import get_adapter
from .layers import LinearGroup, get_weight, linear_groups, original_layer_indices, set_weight
from .finite import check_finite_weights
from .obs import CompressedWeight, HessianError, PruneSpec, compress_weight
from .quant import QuantSpec
from .sequential import SequentialOptions, SequentialResult, run_sequential
from .streaming import resident

logger = logging.get_logger(__name__)


@dataclass
class QuantRecord:
    """What the packed checkpoint needs for one quantized Linear."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: QuantSpec


@dataclass
class CompressionPlan:
    """Per original layer index: the sparsity and/or the quantization grid of its Linears."""

    method: str | None = "sparsegpt"
    """Pruning method ("sparsegpt", "wanda", "magnitude") or None for quantization only."""
    sparsity: dict[int, float] = field(default_factory=dict)
    n: int = 0
    m: int = 0
    quant: dict[int, QuantSpec] = field(default_factory=dict)
    blocksize: int = 128
    dampening: float = 0.01
    unit_sparsity: dict[str, float] = field(default_factory=dict)
    """Per full Linear name: a sparsity that overrides its layer's (EvoPress's per-Linear levels)."""
    unit_quant: dict[str, QuantSpec] = field(default_factory=dict)
    """Per full Linear name: a quantization grid that overrides its layer's (per-Linear bit-widths)."""

    def prune_spec(self, layer: int, name: str | None = None) -> PruneSpec | None:
        if self.method is None:
            return None
        spec = PruneSpec(self.unit_sparsity.get(name, self.sparsity.get(layer, 0.0)), self.n, self.m, self.method)
        return spec if spec.active else None

    def quant_spec(self, layer: int, name: str | None = None) -> QuantSpec | None:
        return self.unit_quant.get(name, self.quant.get(layer))

    @property
    def needs_hessians(self) -> str | None:
        if self.quant or self.unit_quant or self.method == "sparsegpt":
            return "full"
        if self.method == "wanda":
            return "diag"
        return None

    def describe(self) -> dict[str, Any]:
        out = {"method": self.method, "sparsity": self.sparsity, "n": self.n, "m": self.m,
               "quant": {k: v.to_dict() for k, v in self.quant.items()}, "blocksize": self.blocksize,
               "dampening": self.dampening}
        if self.unit_sparsity:
            out["unit_sparsity"] = self.unit_sparsity
        if self.unit_quant:
            out["unit_quant"] = {k: v.to_dict() for k, v in self.unit_quant.items()}
        return out


@dataclass
class CompressionResult:
    stats: list[dict[str, Any]]
    quantized: dict[str, QuantRecord]
    seconds: float
    resumed_from: int = 0


def uniform(value: Any, layers: list[int]) -> dict[int, Any]:
    """A per-layer mapping from one value or a {layer: value} dict (keys checked against the model)."""
    if isinstance(value, dict):
        unknown = sorted(set(int(k) for k in value) - set(layers))
        if unknown:
            raise ValueError(f"per-layer values for layers {unknown} that the model does not have "
                             f"(its layers are {layers[0]}..{layers[-1]})")
        return {int(k): v for k, v in value.items()}
    return {layer: value for layer in layers}


class _BlockCompressor:
    """The per-block step of the sequential loop: compress every Linear of a block by the plan."""

    def __init__(self, model: nn.Module, plan: CompressionPlan) -> None:
        self.plan = plan
        self.names = {id(m): n for n, m in model.named_modules()}
        self.quantized: dict[str, QuantRecord] = {}
        self._layer_of: dict[str, int] = {}

    def __call__(self, layer: int, block: nn.Module, groups: list[LinearGroup],
                 hessians: dict[str, torch.Tensor]) -> dict[str, Any]:
        total_loss, zeros, numel, damp = 0.0, 0, 0, 0.0
        untouched: set[int] = set()
        for group in groups:
            H = hessians.pop(group.kind, None)  # freed once its group is done (the block's peak is lower)
            if H is None and group.expert is not None and self.plan.needs_hessians:
                untouched.add(group.expert)  # no calibration token was routed to it: nothing to calibrate on
                continue
            if H is not None and H.dim() == 1:
                H = torch.diag(H)  # Wanda collected only the diagonal
            for path, module in zip(group.names, group.modules):
                name = self.names.get(id(module)) or f"{self.names[id(block)]}.{path}"
                self._layer_of[name] = layer
                prune, quant = self.plan.prune_spec(layer, name), self.plan.quant_spec(layer, name)
                try:
                    result = compress_weight(get_weight(module), H, prune=prune, quant=quant,
                                             blocksize=self.plan.blocksize, percdamp=self.plan.dampening)
                except HessianError as err:
                    raise HessianError(f"layer {layer}, module `{name}`: {err}") from err
                set_weight(module, result.weight)
                self._record(name, result, quant)
                if result.loss == result.loss:  # not NaN (Wanda / magnitude have no OBS loss)
                    total_loss += result.loss
                damp = max(damp, result.damp)
                zeros += int((result.weight == 0).sum())
                numel += result.weight.numel()
        stats: dict[str, Any] = {"sparsity": round(zeros / max(numel, 1), 5)}
        if untouched:
            stats["experts_without_tokens"] = sorted(untouched)
            logger.warning("layer %d: experts %s (positions among the layer's experts) received no calibration token "
                           "and are left unchanged; more calibration data (num_samples, seq_len) reaches them",
                           layer, sorted(untouched))
        if self.plan.needs_hessians == "full":
            stats["loss"] = total_loss
        if damp > self.plan.dampening:
            stats["dampening"] = damp
        return stats

    def export_state(self, layer: int) -> dict[str, torch.Tensor]:
        """Quantization records of ``layer``'s Linears, for the resume checkpoint."""
        out = {}
        for name, rec in self.quantized.items():
            if self._layer_of.get(name) == layer:
                out[f"{name}.codes"], out[f"{name}.scale"] = rec.codes, rec.scale
                if rec.zero is not None:
                    out[f"{name}.zero"] = rec.zero
        return out

    def import_state(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        for key in tensors:
            if key.endswith(".codes"):
                name = key[: -len(".codes")]
                quant = self.plan.quant_spec(layer, name)
                self.quantized[name] = QuantRecord(tensors[key], tensors[f"{name}.scale"],
                                                   tensors.get(f"{name}.zero"), quant.for_columns(tensors[key].shape[1]))
                self._layer_of[name] = layer

    def _record(self, name: str, result: CompressedWeight, quant: QuantSpec | None) -> None:
        if quant is not None and result.codes is not None:
            self.quantized[name] = QuantRecord(result.codes.cpu(), result.scale.cpu(),
                                               None if result.zero is None else result.zero.cpu(), result.spec or quant)


def compress_model(model: nn.Module, input_ids: torch.Tensor | None, plan: CompressionPlan,
                   options: SequentialOptions | None = None) -> CompressionResult:
    """Apply ``plan`` to ``model`` in place; SparseGPT, Wanda and GPTQ calibrate block by block."""
    options = options or SequentialOptions()
    step = _BlockCompressor(model, plan)
    needs = plan.needs_hessians
    if needs is None:  # magnitude pruning: no data needed
        check_finite_weights(model)  # a NaN would survive the mask silently
        adapter = get_adapter(model)
        stats = []
        for layer, block in zip(original_layer_indices(model), adapter.layers(model)):
            with resident(model, block, changed=True):  # a streamed model's block is read, pruned, written back
                check_finite_weights(block)
                stats.append({"layer": layer, **step(layer, block, linear_groups(adapter, block), {})})
        return CompressionResult(stats, step.quantized, 0.0)
    if input_ids is None:
        raise ValueError(f"{plan.method or 'GPTQ'} needs calibration data")
    result: SequentialResult = run_sequential(model, input_ids, step, hessians=needs, options=options,
                                              run_id=str(plan.describe()))
    return CompressionResult(result.stats, step.quantized, result.seconds, result.resumed_from)


def zero_fraction(model: nn.Module) -> float:
    """Fraction of exactly-zero weights over all compressible Linears of the blocks."""
    adapter = get_adapter(model)
    zeros = total = 0
    for block in adapter.layers(model):
        with resident(model, block):  # a streamed model's blocks are read one at a time
            for group in linear_groups(adapter, block):
                for module in group.modules:
                    w = get_weight(module)
                    zeros += int((w == 0).sum())
                    total += w.numel()
    return zeros / max(total, 1)
