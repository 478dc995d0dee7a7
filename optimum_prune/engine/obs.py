"""Layer-wise OBS compression of one weight matrix: SparseGPT, GPTQ and both at once; Wanda and magnitude masks.

One column loop serves every method (after IST-DASLab's sparsegpt / gptq): columns are processed in
blocks of 128; in each column the pruned and/or rounded weights are fixed and their error is spread
onto the columns not yet processed through the Cholesky factor of H⁻¹. Wanda and magnitude choose
their masks without that update (unless the weights are also quantized, which then runs the loop with
the mask held fixed).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from transformers.utils import logging

from .quant import QuantSpec, fit_grid, quantize_codes

logger = logging.get_logger(__name__)

METHODS = ("sparsegpt", "wanda", "magnitude")


@dataclass(frozen=True)
class PruneSpec:
    """How one Linear's weight is sparsified: a fraction (unstructured) or N zeros in every M inputs."""

    sparsity: float = 0.0
    n: int = 0
    m: int = 0
    method: str = "sparsegpt"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown pruning method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if (self.n or self.m) and not 0 < self.n < self.m:
            raise ValueError(f"N:M sparsity needs 0 < N < M, got {self.n}:{self.m}")

    @property
    def semi_structured(self) -> bool:
        return self.m > 0

    @property
    def active(self) -> bool:
        return self.semi_structured or self.sparsity > 0


@dataclass
class CompressedWeight:
    """The result for one matrix: new weight (original dtype), OBS loss, and the grid when quantized."""

    weight: torch.Tensor
    loss: float
    damp: float
    codes: torch.Tensor | None = None
    """int8 codes [rows, cols] in the original column order (quantized weights only)."""
    scale: torch.Tensor | None = None
    """[rows, num_groups] in the weight's dtype."""
    zero: torch.Tensor | None = None
    """[rows, num_groups] integer zero points (asymmetric grids)."""
    spec: QuantSpec | None = None
    """The grid actually used (the group size adapted to the layer's width)."""


class HessianError(RuntimeError):
    """H stayed not positive definite after every dampening retry."""


def prepare_hessian(hessian: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 H (a copy only when it has dead inputs: H_ii = 1 for inputs never active in calibration; callers
    never write to it) and an fp32 copy of W.

    Unlike the reference code we do not zero the weights of dead inputs: they cost nothing on the
    calibration data, but inputs unseen there may use them (a ReLU neuron that never fired).
    """
    H = hessian.detach().to(torch.float32)
    dead = torch.diag(H) == 0
    if bool(dead.any()):
        H = H.clone()
        H[dead, dead] = 1.0
    return H, weight.detach().to(torch.float32).clone()


def _shifted(H: torch.Tensor, shift: float) -> torch.Tensor:
    """H + shift·I as a new matrix (no identity matrix is built: one in_features² copy less at the peak)."""
    Hd = H.clone()
    Hd.diagonal().add_(shift)
    return Hd


def _dampened(H: torch.Tensor, percdamp: float, retries: int, factor):
    """Run ``factor(H, λ·mean(diag H))`` on H + λ·mean(diag H)·I (None on failure), growing λ ×10 until it
    succeeds. ``factor`` builds the shifted matrix itself (``_shifted``) so it can free it early."""
    diag_mean = torch.mean(torch.diag(H)).item()
    damp = percdamp
    for attempt in range(retries + 1):
        result = factor(H, damp * diag_mean)
        if result is not None:
            if attempt:
                logger.warning("Hessian needed dampening %.3g (retry %d) to be positive definite", damp, attempt)
            return result, damp
        damp *= 10
    raise HessianError(
        f"the Hessian is not positive definite even with dampening {damp / 10:.3g}; "
        "use more calibration samples or a larger `dampening`"
    )


def inverse_cholesky(H: torch.Tensor, percdamp: float = 0.01, retries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹; λ grows ×10 on failure instead of giving NaNs."""

    def factor(H: torch.Tensor, shift: float) -> torch.Tensor | None:
        # one in_features² matrix beside H: the shifted H, its factor L, H⁻¹ and U overwrite each other
        A = _shifted(H, shift)
        info = torch.zeros((), dtype=torch.int32, device=A.device)
        torch.linalg.cholesky_ex(A, out=(A, info))
        if info.item() != 0:
            return None
        torch.cholesky_inverse(A, out=A)
        torch.linalg.cholesky_ex(A, upper=True, out=(A, info))
        return A if info.item() == 0 and torch.isfinite(A).all() else None

    return _dampened(H, percdamp, retries, factor)


def dampened_inverse(H: torch.Tensor, percdamp: float = 0.01, retries: int = 6
                     ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(H + λ·mean(diag H)·I, its inverse, λ), with the same ×10 retries as ``inverse_cholesky``."""

    def factor(H: torch.Tensor, shift: float):
        Hd = _shifted(H, shift)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() != 0:
            return None
        Hinv = torch.cholesky_inverse(L)
        del L
        return (Hd, Hinv) if torch.isfinite(Hinv).all() else None

    (Hd, Hinv), damp = _dampened(H, percdamp, retries, factor)
    return Hd, Hinv, damp


def obs_saliency(weight: torch.Tensor, hinv_diag: torch.Tensor) -> torch.Tensor:
    """OBS loss (×2) of removing each weight alone: w² / [H⁻¹]_cc (rows × cols)."""
    return weight.float() ** 2 / hinv_diag.float()[None, :]


def estimate_pruning_loss(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, percdamp: float = 0.01) -> float:
    """Sum of the smallest ``sparsity`` fraction of OBS saliencies per row (no update): the layer's loss estimate."""
    H, W = prepare_hessian(hessian, weight)
    diag_mean = torch.mean(torch.diag(H))
    H = H + percdamp * diag_mean * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    hinv_diag = torch.diag(torch.cholesky_inverse(torch.linalg.cholesky(H)))
    scores = obs_saliency(W, hinv_diag)
    k = int(W.shape[1] * sparsity)
    if k == 0:
        return 0.0
    return float(torch.topk(scores, k, dim=1, largest=False).values.sum() / 2)


def _nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True for the n lowest-scoring entries in every group of m consecutive columns."""
    rows, cols = scores.shape
    usable = cols - cols % m
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    groups = scores[:, :usable].reshape(rows, -1, m)
    idx = torch.topk(groups, n, dim=2, largest=False).indices
    mask[:, :usable] = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, usable)
    return mask


def _row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True for the ``sparsity`` fraction of lowest scores in every row."""
    k = int(scores.shape[1] * sparsity)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    return mask


def fixed_mask(weight: torch.Tensor, hessian_diag: torch.Tensor | None, spec: PruneSpec) -> torch.Tensor:
    """The Wanda (|W|·‖X_j‖, per row) or magnitude (|W|, per matrix) mask; N:M per group of M inputs."""
    W = weight.float().contiguous()
    if spec.method == "wanda":
        if hessian_diag is None:
            raise ValueError("Wanda needs activation norms: run it with calibration data")
        scores = W.abs() * torch.sqrt(hessian_diag.float().clamp(min=0))[None, :]
    else:
        scores = W.abs()
    if spec.semi_structured:
        return _nm_mask(scores, spec.n, spec.m)
    if spec.method == "wanda":
        return _row_mask(scores, spec.sparsity)
    k = int(scores.numel() * spec.sparsity)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k:
        mask.view(-1)[torch.topk(scores.view(-1), k, largest=False).indices] = True
    return mask


def flush_denormals(fn):
    """Run ``fn`` with denormal floats flushed to zero: real inverse Hessians hold many, and CPU
    arithmetic on denormals is ~30x slower. The default (off) is restored afterwards."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        flushed = torch.set_flush_denormal(True)
        try:
            return fn(*args, **kwargs)
        finally:
            if flushed:
                torch.set_flush_denormal(False)

    return wrapper


@flush_denormals
@torch.no_grad()
def compress_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    *,
    prune: PruneSpec | None = None,
    quant: QuantSpec | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> CompressedWeight:
    """Prune and/or quantize ``weight`` [rows, cols] (Linear layout) given its input Hessian [cols, cols].

    Returns the new weight in the original dtype; the OBS loss ½Σ(w−q)²/[H⁻¹]²_cc of what was changed.
    """
    prune = prune if prune is not None and prune.active else None
    dtype, device = weight.dtype, weight.device
    rows, cols = weight.shape
    if prune is None and quant is None:
        return CompressedWeight(weight.detach().clone(), 0.0, 0.0)
    if prune is not None and prune.semi_structured and cols % prune.m:
        raise ValueError(f"N:M {prune.n}:{prune.m} needs an input width that is a multiple of {prune.m}; this matrix "
                         f"has {cols} columns, so its last {cols % prune.m} would stay dense")

    fixed: torch.Tensor | None = None
    if prune is not None and prune.method != "sparsegpt":
        diag = torch.diag(hessian) if hessian is not None else None
        fixed = fixed_mask(weight, diag, prune)
        if quant is None:  # Wanda / magnitude alone: no weight update
            new = weight.detach().clone()
            new[fixed] = 0
            return CompressedWeight(new, float("nan"), 0.0)
    if hessian is None:
        raise ValueError("SparseGPT and GPTQ need the layer's Hessian: run them with calibration data")

    H, W = prepare_hessian(hessian, weight)
    if quant is not None:
        quant = quant.for_columns(cols)
    group = quant.group if quant is not None else None

    perm = invperm = None
    static_scale = static_zero = None
    if quant is not None and quant.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        invperm = torch.argsort(perm)
        if group is not None:  # static groups: grid fitted on the original column groups, format unchanged
            grids = [fit_grid(W[:, g:g + group], quant) for g in range(0, cols, group)]
            static_scale = torch.stack([s for s, _ in grids], 1).to(dtype).float()
            static_zero = torch.stack([z for _, z in grids], 1)
        W, H = W[:, perm], H[perm][:, perm]
        if fixed is not None:
            fixed = fixed[:, perm]

    Hinv, damp = inverse_cholesky(H, percdamp)
    del H
    num_groups = 1 if group is None else cols // group
    scale_out = torch.zeros(rows, num_groups, device=device)
    zero_out = torch.zeros(rows, num_groups, device=device)
    codes = torch.zeros(rows, cols, device=device) if quant is not None else None
    if quant is not None and group is None:
        s, z = fit_grid(W, quant)
        scale_out[:, 0], zero_out[:, 0] = s.to(dtype).float(), z
    if static_scale is not None:
        scale_out, zero_out = static_scale, static_zero

    losses = torch.zeros(rows, device=device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone(memory_format=torch.contiguous_format)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)

        if fixed is not None:
            mask1 = fixed[:, i1:i2]
        elif prune is not None and not prune.semi_structured:
            # Adaptive mask: the lowest OBS saliencies of this column block (all rows together).
            tmp = W1 ** 2 / d1[None, :] ** 2
            k = int(tmp.numel() * prune.sparsity)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            if k:
                mask1.view(-1)[torch.topk(tmp.view(-1), k, largest=False).indices] = True
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)

        for i in range(count):
            col = i1 + i
            w = W1[:, i]
            d = Hinv1[i, i]
            if prune is not None and fixed is None and prune.semi_structured and i % prune.m == 0:
                span = W1[:, i:i + prune.m]
                if span.shape[1] == prune.m:
                    tmp = span ** 2 / d1[i:i + prune.m][None, :] ** 2
                    idx = torch.topk(tmp, prune.n, dim=1, largest=False).indices
                    mask1[:, i:i + prune.m].scatter_(1, idx, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            if quant is not None:
                if group is not None:
                    orig_col = perm[col].item() if perm is not None else col
                    g = orig_col // group
                    if static_scale is None and col % group == 0:
                        window = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :group]
                        s, z = fit_grid(window, quant)
                        scale_out[:, g], zero_out[:, g] = s.to(dtype).float(), z
                    s, z = scale_out[:, g], zero_out[:, g]
                else:
                    s, z = scale_out[:, 0], zero_out[:, 0]
                c = quantize_codes(q[:, None], s, z, quant)[:, 0]
                c = torch.where(mask1[:, i], z, c)  # a pruned weight is exactly 0 on the grid
                codes[:, col] = c
                q = (c - z) * s
            Q1[:, i] = q
            losses += (w - q) ** 2 / d ** 2
            err = (w - q) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        W = W[:, invperm]
        if codes is not None:
            codes = codes[:, invperm]
    loss = float(losses.sum() / 2)
    if not math.isfinite(loss) or not torch.isfinite(W).all():
        raise HessianError("compression produced non-finite weights; increase `dampening`")
    if quant is None:
        return CompressedWeight(W.to(dtype), loss, damp)
    scale_t = scale_out.to(dtype)
    group_of = (torch.arange(cols, device=device) // (group or cols))
    # Rebuild the weight exactly as compressed-tensors dequantizes it: (q - zero) * scale in the scale dtype.
    new = ((codes.to(dtype) - zero_out.to(dtype)[:, group_of]) * scale_t[:, group_of]).to(dtype)
    return CompressedWeight(new, loss, damp, codes=codes.to(torch.int8), scale=scale_t,
                            zero=zero_out.to(torch.int8) if not quant.symmetric else None, spec=quant)
