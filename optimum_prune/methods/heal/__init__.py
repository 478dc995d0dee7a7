"""Healing: continued causal-LM training of a pruned model (plain LM loss or token-level distillation)."""

from ...lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {"HealConfig": "config", "run": "entry", "heal": "training"})
