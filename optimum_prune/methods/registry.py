"""The method registry: a name → (config class, entry) map that the Pruner, the Quantizer, recipes and the CLI share.

Entries are named by import path so that reading the registry (e.g. to build CLI flags from configs)
does not import the heavy algorithm modules; an entry is imported when its method first runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

KINDS = ("prune", "quantize", "heal")


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class MethodSpec:
    """One method: its registry name, which session step runs it, its config class and its entry.

    ``entry(session, config, run)`` runs the method on ``session.model`` in place, records what it did and
    returns what the keyword form returns: the model, or {key: session} when it made several models
    (a ``ZipLMFamily`` for several targets).
    ``keyword`` is the name the keyword form uses (``quantize(method="evopress")``) when it differs.
    """

    name: str
    kind: str
    config: str
    entry: str
    keyword: str | None = None
    calibrated: bool = True
    """Whether the method takes the shared ``RunConfig`` (calibration, seed, device ...)."""

    @property
    def config_class(self) -> type:
        return _load(self.config)

    @property
    def run(self) -> Callable[..., Any]:
        return _load(self.entry)


class Registry:
    """Method name → ``MethodSpec``; ``add`` is the one line a new method needs."""

    def __init__(self) -> None:
        self._specs: dict[str, MethodSpec] = {}

    def add(self, name: str, kind: str, config: str, entry: str, *, keyword: str | None = None,
            calibrated: bool = True) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if name in self._specs:
            raise ValueError(f"method {name!r} is registered already")
        self._specs[name] = MethodSpec(name, kind, config, entry, keyword, calibrated)

    def get(self, name: str) -> MethodSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise ValueError(f"unknown method {name!r}; choose one of {', '.join(self._specs)}") from None

    def for_keyword(self, kind: str, keyword: str) -> MethodSpec:
        """The method a keyword call (``prune(method=...)``, ``quantize(method=...)``) names."""
        for spec in self._specs.values():
            if spec.kind == kind and (spec.keyword or spec.name) == keyword:
                return spec
        names = [s.keyword or s.name for s in self._specs.values() if s.kind == kind]
        raise ValueError(f"unknown method {keyword!r}; choose one of {', '.join(names)}")

    def names(self, kind: str | None = None) -> list[str]:
        return [s.name for s in self._specs.values() if kind is None or s.kind == kind]

    def specs(self, kind: str | None = None) -> list[MethodSpec]:
        return [s for s in self._specs.values() if kind is None or s.kind == kind]

    def __contains__(self, name: str) -> bool:
        return name in self._specs


REGISTRY = Registry()
# One line per method: name, step, config class, entry.
REGISTRY.add("ziplm", "prune", "optimum_prune.methods.ziplm.config:ZipLMConfig",
             "optimum_prune.methods.ziplm.entry:run")
REGISTRY.add("layerchop", "prune", "optimum_prune.methods.layerchop.config:LayerChopConfig",
             "optimum_prune.methods.layerchop.entry:run")
REGISTRY.add("evopress", "prune", "optimum_prune.methods.evopress.config:EvoPressConfig",
             "optimum_prune.methods.evopress.entry:run")
REGISTRY.add("sparsegpt", "prune", "optimum_prune.methods.sparsity.config:SparseGPTConfig",
             "optimum_prune.methods.sparsity.entry:run")
REGISTRY.add("wanda", "prune", "optimum_prune.methods.sparsity.config:WandaConfig",
             "optimum_prune.methods.sparsity.entry:run")
REGISTRY.add("magnitude", "prune", "optimum_prune.methods.sparsity.config:MagnitudeConfig",
             "optimum_prune.methods.sparsity.entry:run")
REGISTRY.add("reap", "prune", "optimum_prune.methods.experts.config:REAPConfig",
             "optimum_prune.methods.experts.entry:run")
REGISTRY.add("gptq", "quantize", "optimum_prune.methods.gptq.config:GPTQConfig",
             "optimum_prune.methods.gptq.entry:run")
REGISTRY.add("evopress-bits", "quantize", "optimum_prune.methods.evopress.config:EvoPressBitsConfig",
             "optimum_prune.methods.evopress.entry:run_bits", keyword="evopress")
REGISTRY.add("heal", "heal", "optimum_prune.methods.heal.config:HealConfig",
             "optimum_prune.methods.heal.entry:run", calibrated=False)
