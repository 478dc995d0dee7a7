"""Pruned model classes: the standard transformers classes plus a per-layer structure from config.json.

For every supported family (``llama`` ...) this module defines ``Pruned<Family>Config`` (model_type
``pruned_<family>``) and ``Pruned<Class>`` for each of the family's auto classes. Constructing one
builds the dense skeleton and removes what ``config.pruning_config`` says, so ``from_pretrained``
loads the smaller weights exactly. ``optimum_prune`` registers them with the Auto classes on import;
the same file is saved beside the weights so ``trust_remote_code=True`` works without the plugin.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import transformers
from transformers import PretrainedConfig, PreTrainedModel

from .adapters import base_model_type
from .configuration_pruned import PRUNED_CONFIGS, base_classes, config_class_name, pruned_config_class, register_configs
from .integrity import check_config, checked_from_pretrained
from .pruning_config import CONFIG_KEY, PruningConfig, PruningConfigError
from .surgery import apply_structure

REMOTE_CODE_FILES = ("modeling_pruned.py", "configuration_pruned.py", "surgery.py", "adapters.py", "adapter_base.py",
                     "pruning_config.py", "integrity.py", "headers.py")
"""The files saved beside the weights (this module and what it imports, by relative import)."""

class PrunedModelMixin:
    """Rebuilds the saved structure at construction; refuses partial loads; saves its own code."""

    def __init__(self, config: PretrainedConfig, *args: Any, **kwargs: Any) -> None:
        saved = check_config(config)  # before the skeleton is built: no number in config.json can exhaust memory
        super().__init__(config, *args, **kwargs)
        dense_so_far = PruningConfig(drop_layers=saved.drop_layers, num_original_layers=saved.num_original_layers)
        apply_structure(self, saved, current=dense_so_far)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """Like transformers' ``from_pretrained``, but the weights must be exactly those the structure implies:
        a missing, unexpected or misshapen tensor raises ``CheckpointIntegrityError`` (never a random init)."""
        return checked_from_pretrained(super().from_pretrained, args, kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Saves weights and config, plus the code that ``trust_remote_code=True`` needs."""
        self.config.auto_map = auto_map_for(self.config.model_type)
        super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(save_directory)


def write_remote_code(directory: str | os.PathLike) -> None:
    """Copy this module and its relative imports beside a checkpoint."""
    here = os.path.dirname(os.path.abspath(__file__))
    os.makedirs(directory, exist_ok=True)
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(os.path.join(here, name), os.path.join(directory, name))


def auto_map_for(model_type: str) -> dict[str, str]:
    """``auto_map`` entries pointing every applicable Auto class at this module's classes."""
    family = base_model_type(model_type)
    module = REMOTE_CODE_FILES[0][: -len(".py")]
    entries = {"AutoConfig": f"{module}.{config_class_name(family)}"}
    for auto_name, base_name in base_classes(family).items():
        entries[auto_name] = f"{module}.Pruned{base_name}"
    return entries


def _build_classes() -> dict[str, dict[str, type]]:
    """Create the Pruned* model classes for every supported family; returns family -> {auto name: class}.

    The config class is included under its own name (``PrunedLlamaConfig``), shared with configuration_pruned.
    """
    families: dict[str, dict[str, type]] = {}
    for family, config_cls in PRUNED_CONFIGS.items():
        classes: dict[str, type] = {config_cls.__name__: config_cls}
        for auto_name, base_name in base_classes(family).items():
            base_cls = getattr(transformers, base_name, None)
            if base_cls is None or not issubclass(base_cls, PreTrainedModel):
                continue
            classes[auto_name] = type(
                f"Pruned{base_name}", (PrunedModelMixin, base_cls),
                {"config_class": config_cls, "__module__": __name__,
                 "__doc__": f"{base_name} with per-layer heads/neurons/sublayers from `{CONFIG_KEY}`."})
        families[family] = classes
    return families


PRUNED_CLASSES = _build_classes()
for _family_classes in PRUNED_CLASSES.values():
    for _key, _cls in _family_classes.items():
        globals()[_cls.__name__] = _cls


def pruned_model_class(model: PreTrainedModel) -> type:
    """The Pruned* subclass matching a model's class (e.g. LlamaForCausalLM -> PrunedLlamaForCausalLM)."""
    family = base_model_type(model.config.model_type)
    for cls in PRUNED_CLASSES.get(family, {}).values():
        if issubclass(cls, PrunedModelMixin) and type(model) in cls.__mro__[1:]:
            return cls
    if isinstance(model, PrunedModelMixin):
        return type(model)
    raise PruningConfigError(
        f"{type(model).__name__} has no pruned counterpart; supported heads for {family!r}: "
        f"{sorted(k for k in PRUNED_CLASSES.get(family, {}) if k.startswith('Auto'))}"
    )


def register() -> None:
    """Register the Pruned* classes with transformers' Auto classes (idempotent; replaces stand-ins)."""
    register_configs()
    for family, classes in PRUNED_CLASSES.items():
        config_cls = pruned_config_class(family)
        for auto_name, cls in classes.items():
            if not auto_name.startswith("Auto"):
                continue
            auto_cls = getattr(transformers, auto_name)
            if auto_cls._model_mapping.get(config_cls, None) is not cls:
                auto_cls.register(config_cls, cls, exist_ok=True)
