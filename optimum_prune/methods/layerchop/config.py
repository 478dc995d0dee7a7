"""Settings of LayerChop (arXiv 2305.14864): how many whole blocks go and which strategy picks them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..base import ConfigError, MethodConfig, option
from ..common import json_object

STRATEGIES: tuple[str, ...] = ("last", "angular", "block_influence", "evopress")
"""Layer-choice strategies, in the order the error messages list them."""


@dataclass
class LayerChopConfig(MethodConfig):
    """Remove ``num_layers`` whole blocks chosen by ``strategy``; heal afterwards with the ``heal`` method."""

    name: ClassVar[str] = "layerchop"

    num_layers: int = option(None, "how many whole blocks to remove")
    strategy: str = option("angular", "which blocks go: angular (the contiguous window of least angular distance), "
                                      "block_influence (ShortGPT), last (no calibration) or evopress",
                           choices=STRATEGIES)
    strategy_options: dict = option(None, "settings of the evopress strategy's search (JSON)", factory=dict,
                                    parse=json_object)

    def validate(self) -> None:
        if self.num_layers is None:
            raise ConfigError("LayerChop removes whole blocks: pass num_layers= (how many, e.g. 8)")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown LayerChop strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        self.strategy_options = dict(self.strategy_options or {})
