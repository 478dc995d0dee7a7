"""Latency-table defaults that the CLI's help shows: importable without torch or transformers."""

DEFAULT_MLP_LEVELS = 16
"""FFN widths a latency table times per block (evenly spaced from the full width down)."""

CACHE_ENV_VAR = "OPTIMUM_PRUNE_CACHE"
"""Environment variable naming the directory where measured latency tables are cached."""
