"""Integer weight grids (bits, group size, symmetric or not) in compressed-tensors' convention.

A weight ``w`` maps to the code ``q = clamp(round(w / scale + zero), q_min, q_max)`` and back to
``(q - zero) * scale``, with signed codes ``q_min = -2**(bits-1)``: exactly what compressed-tensors
(and so transformers and vLLM) use to unpack, so a fake-quantized weight reloads bit for bit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch


@dataclass(frozen=True)
class QuantSpec:
    """How one Linear's weight is quantized."""

    bits: int = 4
    group_size: int | None = 128
    """Columns sharing a scale; None (or -1) is one scale per output channel."""
    symmetric: bool = True
    act_order: bool = False
    """Process columns by decreasing Hessian diagonal (static groups: the format is unchanged)."""

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {self.bits}")
        if self.group_size is not None and self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive, -1 or None (per channel), got {self.group_size}")

    @property
    def group(self) -> int | None:
        return None if self.group_size in (None, -1) else self.group_size

    def for_columns(self, columns: int) -> QuantSpec:
        """This spec with a group size that divides ``columns`` (compressed-tensors needs whole groups).

        A group size that does not divide the layer's inputs (128 on SmolLM2's 576) becomes the
        largest divisor below it (96), rather than leaving the layer unquantized.
        """
        group = self.group
        if group is None or columns % group == 0:
            return self
        divisor = max(d for d in range(1, min(group, columns) + 1) if columns % d == 0)
        return replace(self, group_size=divisor)

    @property
    def q_min(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def q_max(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def to_dict(self) -> dict:
        return asdict(self)


def fit_grid(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max (scale, zero) per row of ``weight`` [rows, cols] for ``spec`` (0 always representable)."""
    w = weight.float()
    lo = torch.clamp(w.amin(dim=1), max=0.0)
    hi = torch.clamp(w.amax(dim=1), min=0.0)
    span = float(spec.q_max - spec.q_min)
    if spec.symmetric:
        scale = torch.maximum(lo.abs(), hi) / (span / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / span
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.clamp(torch.round(spec.q_min - lo / safe), spec.q_min, spec.q_max)
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(weight.dtype).eps), scale)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (as floats) of ``w`` [rows, cols] on the grid of per-row ``scale``/``zero`` [rows]."""
    return torch.clamp(torch.round(w / scale[:, None] + zero[:, None]), spec.q_min, spec.q_max)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero[:, None]) * scale[:, None]


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round ``w`` onto the grid and back (what the model computes with after quantization)."""
    return dequantize_codes(quantize_codes(w, scale, zero, spec), scale, zero)
