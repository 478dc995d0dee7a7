"""Expert pruning of Mixture-of-Experts models by REAP saliency (router-weighted expert output norm)."""

from ...lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "REAPConfig": "config", "SCOPES": "config", "run": "entry", "reap_saliency": "saliency",
    "choose_experts": "saliency",
})
