"""Registers the pruned architectures with transformers' Auto classes without slowing ``import optimum_prune``.

Building the ``Pruned*`` model classes imports transformers' modeling code and every supported
family (seconds), and ``import optimum_prune`` should not pay for that. So registration follows
transformers' own imports:

- once transformers' Auto layer (``configuration_auto``) is loaded, the pruned config classes are
  registered with ``AutoConfig``, and each ``AutoModel*`` class gets a stand-in for its pruned class
  that imports ``modeling_pruned`` the first time a pruned model is built;
- once ``modeling_pruned`` is loaded (by a stand-in or by our own code), the real classes replace
  the stand-ins.

Each step runs only when no transformers module is half-initialised (transformers imports its Auto
layer from inside ``modeling_utils``, and config modules read ``modeling_auto`` as they load), so
every import a step makes is safe: it runs at once when the modules are already loaded, otherwise
right after the outermost transformers import that loaded them returns.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from types import ModuleType
from typing import Any, Sequence

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
PRUNED_MODULE = "optimum_prune.modeling.modeling_pruned"
_done: set[str] = set()
_depth = [0]  # watched module bodies running now (plus our own steps): steps wait for zero


def _complete(name: str) -> bool:
    """Whether module ``name`` has run its whole body."""
    module = sys.modules.get(name)
    return module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False)


def _watched(name: str) -> bool:
    return name == "transformers" or name.startswith("transformers.") or name == PRUNED_MODULE


class _StandIn:
    """Takes a pruned model class's place in an Auto mapping until ``modeling_pruned`` is imported."""

    family: str
    auto_name: str
    config_class: type

    @classmethod
    def real(cls) -> type:
        """The Pruned* class; importing its module registers the real classes in place of the stand-ins."""
        return importlib.import_module(PRUNED_MODULE).PRUNED_CLASSES[cls.family][cls.auto_name]

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        return cls.real().from_pretrained(*args, **kwargs)

    @classmethod
    def from_config(cls, *args: Any, **kwargs: Any) -> Any:
        return cls.real().from_config(*args, **kwargs)

    @classmethod
    def _from_config(cls, *args: Any, **kwargs: Any) -> Any:
        return cls.real()._from_config(*args, **kwargs)


def _register_auto() -> None:
    """Pruned configs with AutoConfig, stand-ins with every AutoModel* class that has a pruned counterpart."""
    import transformers.models.auto.modeling_auto as modeling_auto

    from .modeling.configuration_pruned import PRUNED_CONFIGS, base_classes, register_configs

    register_configs()
    for family, config_cls in PRUNED_CONFIGS.items():
        for auto_name, base_name in base_classes(family).items():
            mapping = getattr(modeling_auto, auto_name)._model_mapping
            if mapping.get(config_cls, None) is None:
                stand_in = type(f"Pruned{base_name}", (_StandIn,),
                                {"family": family, "auto_name": auto_name, "config_class": config_cls})
                mapping.register(config_cls, stand_in)


def advance() -> None:
    """Run the registration steps whose modules are loaded, unless a watched import is still running."""
    if _depth[0]:
        return
    _depth[0] += 1  # imports made by a step must not re-enter
    try:
        if "models" not in _done and _complete(PRUNED_MODULE):
            _done.update(("auto", "models"))
            sys.modules[PRUNED_MODULE].register()  # also registers the configs; replaces any stand-ins
        elif "auto" not in _done and _complete(CONFIG_AUTO):
            _done.add("auto")
            _register_auto()
    finally:
        _depth[0] -= 1


class _RunAfter(importlib.abc.Loader):
    """Wraps a watched module's loader: counts the running bodies; the outermost one advances registration."""

    def __init__(self, loader: Any, name: str) -> None:
        self.loader, self.name = loader, name

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        _depth[0] += 1
        try:
            self.loader.exec_module(module)
        finally:
            _depth[0] -= 1
        if not _depth[0]:
            module.__spec__._initializing = False  # its body has run; Python clears this flag a moment later
            advance()

    def __getattr__(self, name: str) -> Any:  # get_source, is_package ... as the real loader has them
        return getattr(self.loader, name)


class _Watcher(importlib.abc.MetaPathFinder):
    """Finds the watched modules through the other finders and wraps their loaders."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if not _watched(fullname) or "models" in _done:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RunAfter(spec.loader, fullname)
                return spec
        return None


def install() -> None:
    """Register what can be registered now and watch for the rest (idempotent)."""
    advance()
    if "models" not in _done and not any(isinstance(f, _Watcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _Watcher())
