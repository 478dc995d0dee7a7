"""The methods: one folder each (config, entry, algorithm), and the registry that names them.

Adding a method is one new folder with a config class (``MethodConfig`` subclass, fields declared with
``option``) and an entry ``run(session, config, options)``, plus one ``REGISTRY.add`` line in
``registry.py``; the Pruner / Quantizer keyword forms, recipes and the CLI flags follow from the config.
"""

from .base import ConfigError, MethodConfig, RunConfig, option
from .registry import REGISTRY, MethodSpec


def describe(name: str) -> str:
    """A method's settings, one line each: name, default and documentation."""
    return REGISTRY.get(name).config_class.describe()


__all__ = ["REGISTRY", "ConfigError", "MethodConfig", "MethodSpec", "RunConfig", "describe", "option"]
