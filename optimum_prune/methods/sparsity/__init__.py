"""Unstructured and N:M sparsity (SparseGPT, Wanda, magnitude), optionally scheduled per layer."""

from ...lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "SparsityConfig": "config", "SparseGPTConfig": "config", "WandaConfig": "config", "MagnitudeConfig": "config",
    "run": "entry",
})
