"""Pruned config classes (``Pruned<Family>Config``, model_type ``pruned_<family>``) and their registration.

Separate from the model classes so that ``AutoConfig`` can learn the pruned model types without
importing transformers' modeling code; the model classes (modeling_pruned.py) reuse these classes.
"""

from __future__ import annotations

from transformers.models.auto import configuration_auto

from .adapters import ADAPTERS
from .pruning_config import PruningConfigError

PREFIX = "pruned_"

# Auto classes a pruned checkpoint can be loaded with, and the transformers mapping behind each.
AUTO_CLASSES: dict[str, str] = {
    "AutoModel": "MODEL_MAPPING_NAMES",
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForTokenClassification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForQuestionAnswering": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
}


def _camel(model_type: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in model_type.split("_"))


def config_class_name(family: str) -> str:
    return f"Pruned{_camel(family)}Config"


def base_classes(family: str) -> dict[str, str]:
    """Auto class name -> transformers class name, for the heads this family has."""
    from transformers.models.auto import modeling_auto  # names only; imported when first needed

    out = {}
    for auto_name, mapping_name in AUTO_CLASSES.items():
        class_name = getattr(modeling_auto, mapping_name).get(family)
        if isinstance(class_name, (list, tuple)):
            class_name = class_name[0]
        if class_name:
            out[auto_name] = class_name
    return out


def _build_config_classes() -> dict[str, type]:
    """One config subclass per supported family that this transformers version knows."""
    out: dict[str, type] = {}
    for adapter in ADAPTERS:
        for family in adapter.model_types:
            if family not in configuration_auto.CONFIG_MAPPING_NAMES:
                continue
            base_config = configuration_auto.CONFIG_MAPPING[family]
            out[family] = type(config_class_name(family), (base_config,),
                               {"model_type": PREFIX + family, "__module__": __name__,
                                "from_dict": _checked_from_dict(base_config)})
    return out


def _checked_from_dict(base: type) -> classmethod:
    """``base.from_dict``, with a value the config class refuses (a string dimension, a float depth ...) raised as
    ``CheckpointIntegrityError`` naming config.json, like every other inconsistency of a pruned checkpoint."""
    def from_dict(cls, config_dict, **kwargs):
        try:
            return base.from_dict.__func__(cls, config_dict, **kwargs)
        except (OSError, PruningConfigError):
            raise
        except Exception as err:
            from .integrity import FIX, CheckpointIntegrityError

            text = " ".join(str(err).split())
            message = f"config.json holds a value {base.__name__} refuses ({text}). {FIX}"
            raise CheckpointIntegrityError(message) from err
    return classmethod(from_dict)


PRUNED_CONFIGS = _build_config_classes()
for _cls in PRUNED_CONFIGS.values():
    globals()[_cls.__name__] = _cls


def pruned_config_class(family: str) -> type:
    return PRUNED_CONFIGS[family]


def register_configs() -> None:
    """Register every pruned config class with ``AutoConfig`` (idempotent)."""
    for family, config_cls in PRUNED_CONFIGS.items():
        if PREFIX + family not in configuration_auto.CONFIG_MAPPING:
            configuration_auto.AutoConfig.register(PREFIX + family, config_cls)
