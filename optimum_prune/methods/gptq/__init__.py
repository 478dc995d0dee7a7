"""GPTQ: low-bit weights with OBS error compensation, saved as packed compressed-tensors checkpoints."""

from ...lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {"GPTQConfig": "config", "run": "entry"})
