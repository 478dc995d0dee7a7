"""Settings of REAP expert pruning (arXiv 2510.13999): how many routed experts go, per layer or model-wide."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..base import ConfigError, MethodConfig, option

SCOPES: tuple[str, ...] = ("layer", "global")


@dataclass
class REAPConfig(MethodConfig):
    """Remove the routed experts of least REAP saliency: the mean, over the calibration tokens routed to an
    expert, of its router weight times the norm of its output (an expert that gets no token scores 0)."""

    name: ClassVar[str] = "reap"

    experts_ratio: float = option(None, "fraction of the routed experts to remove (0.25: a quarter), rounded to the "
                                        "nearest whole expert")
    scope: str = option("layer", "layer: the same fraction from every MoE layer; global: ranked model-wide, each "
                                 "saliency divided by its layer's mean (layers differ in scale)", choices=SCOPES)

    def validate(self) -> None:
        if self.experts_ratio is None:
            raise ConfigError("REAP removes experts: pass experts_ratio= (the fraction to remove, e.g. 0.25)")
        if isinstance(self.experts_ratio, bool) or not isinstance(self.experts_ratio, (int, float)) \
                or not 0 < self.experts_ratio < 1:
            raise ConfigError(f"experts_ratio must be a fraction strictly between 0 and 1, got {self.experts_ratio!r}")
        self.experts_ratio = float(self.experts_ratio)
        if self.scope not in SCOPES:
            raise ConfigError(f"unknown REAP scope {self.scope!r}; choose one of {', '.join(SCOPES)}")
