"""LayerChop: remove whole blocks (angular distance, ShortGPT block influence, last, or EvoPress's choice)."""

from ...lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "LayerChopConfig": "config", "STRATEGIES": "config", "run": "entry", "choose_layers": "strategies",
})
