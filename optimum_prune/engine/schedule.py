"""Layer-wise sparsity schedules: the inverse-Hessian K-means scheduler (arXiv 2409.20094) and OWL.

Both read statistics of the DENSE model gathered in one sequential pass, then give every layer
(block) its own sparsity so that the parameter-weighted average equals the target exactly:
- ``hessian-kmeans``: each layer's pruning loss at the target sparsity is estimated from OBS terms
  (w²/[H⁻¹]_cc of the weights it would lose), the log-losses are clustered with K-means, and
  low-loss clusters are pruned harder than high-loss ones, in proportion to their centroid distance.
- ``owl``: outlier-weighted layer-wise sparsity (Yin et al. 2023): layers with a larger share of
  Wanda scores above M·mean keep more weights, within a ±λ band.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .hessian import ResidualNorms
from .layers import LinearGroup, get_weight
from .obs import estimate_pruning_loss
from .sequential import SequentialOptions, run_sequential

SCHEDULES = ("uniform", "hessian-kmeans", "owl")


@dataclass
class LayerStatistics:
    """Dense-model statistics of one layer (block) that schedules read."""

    layer: int
    params: int
    loss: float | None = None
    outlier_ratio: float | None = None
    energy: float | None = None
    """½·Σ tr(W H Wᵀ) over the layer's Linears: their output energy."""
    residual: float | None = None
    """Median squared norm of a token's residual stream entering the block: the scale its error is read at."""


@dataclass
class Schedule:
    """Per-layer sparsities plus what the schedule saw (for the PruningConfig and the card)."""

    name: str
    sparsity: dict[int, float]
    info: dict[str, Any] = field(default_factory=dict)


def collect_statistics(model: nn.Module, input_ids: torch.Tensor, *, sparsity: float, loss: bool,
                       outliers: bool, owl_m: float = 5.0, dampening: float = 0.01,
                       options: SequentialOptions | None = None) -> dict[int, LayerStatistics]:
    """One sequential pass over the dense model (nothing is changed) collecting each layer's statistics."""
    out: dict[int, LayerStatistics] = {}
    residual = ResidualNorms(model) if loss else None

    def step(layer: int, block: nn.Module, groups: list[LinearGroup], hessians: dict[str, torch.Tensor]) -> dict:
        params, total_loss, energy, outlier, count = 0, 0.0, 0.0, 0, 0
        for group in groups:
            H = hessians[group.kind]
            diag = H if H.dim() == 1 else torch.diag(H)
            for module in group.modules:
                W = get_weight(module)
                params += W.numel()
                if loss:
                    total_loss += estimate_pruning_loss(W, H, sparsity, dampening)
                    Wf = W.float()
                    energy += float(((Wf @ H) * Wf).sum() / 2)
                if outliers:
                    score = W.float().abs() * torch.sqrt(diag.clamp(min=0))[None, :]
                    outlier += int((score > owl_m * score.mean()).sum())
                    count += score.numel()
        out[layer] = LayerStatistics(layer, params, total_loss if loss else None,
                                     outlier / max(count, 1) if outliers else None, energy if loss else None)
        return {"loss": total_loss} if loss else {}

    step.modifies_weights = False  # type: ignore[attr-defined]

    options = options or SequentialOptions()
    # A read-only pass: no checkpoint (the compression pass that follows has its own).
    options = SequentialOptions(**{**options.__dict__, "description": "layer statistics", "checkpoint_dir": None})
    try:
        run_sequential(model, input_ids, step, hessians="full" if loss else "diag", options=options,
                       run_id=f"statistics {sparsity} {loss} {outliers} {owl_m}")
    finally:
        if residual is not None:
            residual.remove()
    if residual is not None:
        for layer, value in residual.medians().items():
            if layer in out:
                out[layer].residual = value
    return out


def meet_budget(offsets: dict[int, float], params: dict[int, int], target: float,
                low: float = 0.0, high: float = 0.99) -> dict[int, float]:
    """Sparsities ``clip(target + offset + c)`` with the constant c found so Σ params·s = target·Σ params."""
    total = sum(params.values())

    def mean(c: float) -> float:
        return sum(params[k] * min(max(target + offsets[k] + c, low), high) for k in offsets) / total

    lo, hi = -2.0, 2.0
    for _ in range(100):  # bisection: mean(c) is monotone in c
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) < target else (lo, mid)
    c = (lo + hi) / 2
    return {k: min(max(target + offsets[k] + c, low), high) for k in offsets}


def kmeans_1d(values: list[float], k: int, iterations: int = 100) -> tuple[list[int], list[float]]:
    """Deterministic K-means on scalars (centroids start at quantiles): (cluster of each value, centroids)."""
    data = torch.tensor(values, dtype=torch.float64)
    k = max(1, min(k, len(set(values))))
    centroids = torch.quantile(data, torch.linspace(0, 1, k + 2, dtype=torch.float64)[1:-1])
    for _ in range(iterations):
        labels = torch.argmin((data[:, None] - centroids[None, :]).abs(), dim=1)
        new = torch.stack([data[labels == j].mean() if (labels == j).any() else centroids[j] for j in range(k)])
        if torch.allclose(new, centroids):
            break
        centroids = new
    order = torch.argsort(centroids)  # cluster 0 = lowest loss
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k)
    return rank[labels].tolist(), centroids[order].tolist()


NORMALIZATIONS = (None, "residual", "energy")


def hessian_kmeans(stats: dict[int, LayerStatistics], target: float, *, num_groups: int = 3,
                   max_shift: float = 0.15, normalize: str | None = "residual", power: float = 1.0) -> Schedule:
    """Cluster log-losses; a cluster's sparsity moves by up to ``max_shift`` against its loss, budget exact.

    ``normalize`` reads each layer's loss at a scale that is comparable across depth: "residual"
    divides by the squared norm of the residual stream entering the block (the error a block adds is
    seen by later blocks through their normalization, relative to that stream); "energy" by the
    output energy of the layer's own Linears; None keeps the raw OBS loss. The loss is divided by
    that scale to the ``power`` (1: fully relative; 0: raw).
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    layers = sorted(stats)
    scale = {k: 1.0 for k in layers}
    if normalize is not None:
        field_ = "residual" if normalize == "residual" else "energy"
        values = {k: getattr(stats[k], field_) for k in layers}
        if any(not v for v in values.values()):
            raise ValueError(f"normalize={normalize!r} needs the {field_} statistic of every layer")
        scale = values
    losses = [stats[k].loss / scale[k] ** power for k in layers]
    logs = [math.log(max(v, 1e-30)) for v in losses]
    labels, centroids = kmeans_1d(logs, num_groups)
    centre = sum(centroids) / len(centroids)
    spread = max(abs(c - centre) for c in centroids) or 1.0
    offsets = {k: -max_shift * (centroids[labels[i]] - centre) / spread for i, k in enumerate(layers)}
    sparsity = meet_budget(offsets, {k: stats[k].params for k in layers}, target)
    info = {"schedule": "hessian-kmeans", "num_groups": len(centroids), "max_shift": max_shift, "normalize": normalize, "power": power,
            "group": {str(k): labels[i] for i, k in enumerate(layers)},
            "log_loss_centroids": [round(c, 4) for c in centroids],
            "estimated_loss": {str(k): stats[k].loss for k in layers}}
    return Schedule("hessian-kmeans", sparsity, info)


def owl(stats: dict[int, LayerStatistics], target: float, *, lam: float = 0.08, m: float = 5.0) -> Schedule:
    """OWL: density grows with the layer's outlier ratio, mapped linearly onto [−λ, +λ], budget exact."""
    layers = sorted(stats)
    ratios = [stats[k].outlier_ratio for k in layers]
    lo, hi = min(ratios), max(ratios)
    span = (hi - lo) or 1.0
    offsets = {k: -(2 * lam * (r - lo) / span - lam) for k, r in zip(layers, ratios)}
    sparsity = meet_budget(offsets, {k: stats[k].params for k in layers}, target)
    info = {"schedule": "owl", "lambda": lam, "m": m,
            "outlier_ratio": {str(k): round(r, 6) for k, r in zip(layers, ratios)}}
    return Schedule("owl", sparsity, info)


def build_schedule(name: str, model: nn.Module, input_ids: torch.Tensor, target: float, *,
                   options: SequentialOptions | None = None, dampening: float = 0.01,
                   **kwargs: Any) -> Schedule:
    """Per-layer sparsities for ``target`` by the named schedule (one statistics pass over the dense model)."""
    if name not in SCHEDULES[1:]:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if name == "hessian-kmeans":
        stats = collect_statistics(model, input_ids, sparsity=target, loss=True, outliers=False,
                                   dampening=dampening, options=options)
        return hessian_kmeans(stats, target, **kwargs)
    m = kwargs.get("m", 5.0)
    stats = collect_statistics(model, input_ids, sparsity=target, loss=False, outliers=True, owl_m=m,
                               options=options)
    return owl(stats, target, **kwargs)
