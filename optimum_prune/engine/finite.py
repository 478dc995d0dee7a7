"""NaN / inf found before a solver runs, and named: which layer, which module, how many values, what to do.

Every compression method reads weights (magnitude, Wanda, SparseGPT, GPTQ) and most read calibration
activations through their Hessians. A non-finite value in either makes the solver fail late with a
misleading message ("increase dampening"), or — for masks chosen without a solver — survive silently in
the compressed model. ``check_finite_weights`` scans the model once before any work;
``finite_hessians`` checks what each block's Linears saw during calibration before its solver runs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling.adapters import get_adapter
from .layers import LinearGroup, original_layer_indices

WEIGHT_ADVICE = (
    "The checkpoint has NaN/inf weights: reload it from its original files (a damaged download or a bad conversion "
    "is the usual cause); if it was converted or computed in float16, a float16 overflow is likely — load it in "
    "float32 (torch_dtype=torch.float32) and convert again"
)
ACTIVATION_ADVICE = (
    "The weights are finite, so the activations overflowed: run the compression in float32 (load the model with "
    "torch_dtype=torch.float32), or check the calibration data for unusual inputs"
)
MAX_SHOWN = 5


class NonFiniteError(ValueError):
    """NaN or inf in a model's weights or calibration activations, found before a solver ran."""


def check_finite_weights(model: nn.Module) -> None:
    """Raise ``NonFiniteError`` naming every parameter (layer, module, count) that holds NaN or inf."""
    layer_of: dict[int, int] = {}
    try:
        adapter = get_adapter(model)
        for block, layer in zip(adapter.layers(model), original_layer_indices(model)):
            for p in block.parameters():
                layer_of[id(p)] = layer
    except (ValueError, AttributeError):
        pass  # not a model the adapters know: parameters are still named, without a layer
    bad: list[str] = []
    total = 0
    for name, p in model.named_parameters():
        if p.is_meta or not p.is_floating_point() or bool(torch.isfinite(p).all()):
            continue
        count = int((~torch.isfinite(p)).sum())
        total += 1
        module, _, _ = name.rpartition(".")
        where = f"layer {layer_of[id(p)]}, " if id(p) in layer_of else ""
        bad.append(f"{where}module `{module}` (`{name}`): {count} of {p.numel()} values are NaN/inf")
    if bad:
        shown = "; ".join(bad[:MAX_SHOWN]) + (f"; and {total - MAX_SHOWN} more" if total > MAX_SHOWN else "")
        raise NonFiniteError(f"non-finite weights found before compressing, in {total} tensor(s): {shown}. "
                             f"{WEIGHT_ADVICE}")


def finite_hessians(layer: int, groups: list[LinearGroup], accumulators: dict) -> dict[str, torch.Tensor]:
    """{group kind: Hessian} of one block, after checking every input the block's Linears saw was finite.

    ``accumulators`` are ``capture_hessians``'s, which count the non-finite inputs they were given. An expert
    that received no calibration token gets no Hessian.
    """
    by_kind = {g.kind: g for g in groups}
    out: dict[str, torch.Tensor] = {}
    for kind, acc in accumulators.items():
        if acc.tokens == 0 and kind in by_kind and by_kind[kind].expert is not None:
            continue  # an expert the router sent no calibration token: no Hessian (the compressor reports it)
        names = ", ".join(by_kind[kind].names) if kind in by_kind else kind
        bad = int(acc.nonfinite)
        if bad:
            raise NonFiniteError(
                f"non-finite activations before compressing layer {layer}: the inputs of its {kind} ({names}) hold "
                f"{bad} NaN/inf values of {acc.tokens * acc.columns} ({acc.tokens} calibration tokens). "
                f"{ACTIVATION_ADVICE}"
            )
        H = acc.hessian()
        if not bool(torch.isfinite(H).all()):
            count = int((~torch.isfinite(H)).sum())
            raise NonFiniteError(
                f"non-finite Hessian in layer {layer}, {kind} ({names}): {count} of {H.numel()} entries are NaN/inf "
                f"although its inputs were finite (their squares overflowed float32). {ACTIVATION_ADVICE}"
            )
        out[kind] = H
    return out
