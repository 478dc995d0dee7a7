"""Settings of GPTQ (arXiv 2210.17323): weights rounded to a low-bit grid with OBS error compensation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..base import ConfigError, MethodConfig, check_positive, option
from ..common import is_number, layer_keys, per_layer


@dataclass
class GPTQConfig(MethodConfig):
    """GPTQ on every block Linear, saved as packed integers (compressed-tensors ``pack-quantized``)."""

    name: ClassVar[str] = "gptq"
    kind: ClassVar[str] = "quantize"

    bits: Any = option(4, "2..8, or {layer: bits} (CLI: 4 or '0:8,1:4')", parse=per_layer(int))
    group_size: Any = option(128, "columns per scale; None or -1: one scale per output channel", parse=int)
    symmetric: bool = option(True, "symmetric grid (an asymmetric grid is kept in memory only for now)")
    act_order: bool = option(False, "process columns by decreasing Hessian diagonal (static groups)")
    sparsity: Any = option(None, "also prune with SparseGPT in the same pass (a fraction, or {layer: fraction})",
                           parse=per_layer(float))
    dampening: float = option(0.01, "Hessian dampening, as a fraction of the mean diagonal")
    blocksize: int = option(128, "columns per lazy update block")

    def validate(self) -> None:
        self.bits = layer_keys(self.bits)
        self.sparsity = layer_keys(self.sparsity)
        for value in (self.bits.values() if isinstance(self.bits, dict) else [self.bits]):
            if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
                raise ConfigError(f"bits must be a whole number from 2 to 8 (or a per-layer dict of them), "
                                  f"got {value!r}")
        if self.group_size == -1:
            self.group_size = None
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size <= 0):
            raise ConfigError(f"group_size must be a positive integer, -1 or None (per channel), got "
                              f"{self.group_size!r}")
        for value in (self.sparsity.values() if isinstance(self.sparsity, dict) else
                      [] if self.sparsity is None else [self.sparsity]):
            if not is_number(value) or not 0.0 <= value < 1.0:
                raise ConfigError(f"sparsity must be in [0, 1), got {value!r}")
        check_positive(self, "dampening", integer=False)
