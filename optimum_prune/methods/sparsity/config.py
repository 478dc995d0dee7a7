"""Settings of the unstructured / N:M sparsifiers: SparseGPT, Wanda and magnitude."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..base import ConfigError, MethodConfig, check_positive, option
from ..common import is_number, json_object, layer_keys, parse_n_m, per_layer

SCHEDULES = ("uniform", "hessian-kmeans", "owl")


@dataclass
class SparsityConfig(MethodConfig):
    """Zero a fraction of every block Linear's weights (one value, per layer, or N:M), optionally scheduled."""

    sparsity: Any = option(None, "fraction of weights set to zero: one number, or {layer: fraction} "
                                 "(CLI: 0.5 or '0:0.5,1:0.7')", parse=per_layer(float))
    n_m: Any = option(None, "N:M semi-structured sparsity instead, e.g. \"2:4\"")
    schedule: str = option("uniform", "spread one sparsity over the layers, budget met exactly: uniform, "
                                      "hessian-kmeans (inverse-Hessian loss + K-means) or owl", choices=SCHEDULES)
    schedule_options: dict = option(None, "extra settings of the schedule (JSON)", factory=dict, parse=json_object)
    dampening: float = option(0.01, "Hessian dampening, as a fraction of the mean diagonal (SparseGPT, hessian-kmeans)")
    blocksize: int = option(128, "columns per lazy OBS update block (SparseGPT)")

    def validate(self) -> None:
        self.sparsity = layer_keys(self.sparsity)
        if isinstance(self.n_m, list):
            self.n_m = f"{self.n_m[0]}:{self.n_m[1]}"
        n, m = parse_n_m(self.n_m)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.sparsity is None and not m:
            raise ConfigError("give `sparsity` (e.g. 0.5, or a per-layer dict) or `n_m` (e.g. \"2:4\")")
        if self.sparsity is not None and m:
            raise ConfigError(f"give `sparsity` or `n_m`, not both: N:M {n}:{m} zeroes exactly {n / m:.0%} of the "
                              "weights, whatever `sparsity` says")
        values = self.sparsity.values() if isinstance(self.sparsity, dict) else [self.sparsity or 0.0]
        for value in values:
            if not is_number(value) or not 0.0 <= value < 1.0:
                kind = f" (a {type(value).__name__}; give a number)" if not is_number(value) else ""
                raise ConfigError(f"sparsity must be in [0, 1), got {value!r}{kind}")
        if self.schedule != "uniform" and (isinstance(self.sparsity, dict) or m):
            raise ConfigError(f"schedule={self.schedule!r} spreads ONE target sparsity over the layers: "
                              "give sparsity as a number and no n_m")
        check_positive(self, "dampening", integer=False)
        self.schedule_options = dict(self.schedule_options or {})

    @property
    def n_m_pair(self) -> tuple[int, int]:
        return parse_n_m(self.n_m)


@dataclass
class SparseGPTConfig(SparsityConfig):
    """SparseGPT: OBS weight reconstruction from calibration Hessians (arXiv 2301.00774)."""

    name: ClassVar[str] = "sparsegpt"


@dataclass
class WandaConfig(SparsityConfig):
    """Wanda: |weight| x input norm, no weight update (arXiv 2306.11695)."""

    name: ClassVar[str] = "wanda"


@dataclass
class MagnitudeConfig(SparsityConfig):
    """Magnitude: the smallest |weight| go (no calibration data unless a schedule needs it)."""

    name: ClassVar[str] = "magnitude"
