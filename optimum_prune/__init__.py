"""optimum-prune: make transformers models smaller and faster, and give them back as Hub checkpoints.

Importing the package registers the pruned architectures (``pruned_llama``, ``pruned_bert`` ...)
with transformers' Auto classes, so pruned checkpoints load with ``AutoModelForCausalLM``. The
import itself is light: the public names below load on first use, and registration happens as
transformers' Auto classes load (see ``registration.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports
from .registration import install as _install_registration

__version__ = "0.1.0"

_EXPORTS = {
    "SUPPORTED_MODEL_TYPES": "modeling.adapters",
    "ArchitectureAdapter": "modeling.adapters",
    "UnsupportedArchitectureError": "modeling.adapters",
    "get_adapter": "modeling.adapters",
    "PruningConfig": "modeling.pruning_config",
    "PruningConfigError": "modeling.pruning_config",
    "CheckpointIntegrityError": "modeling.integrity",
    "CheckpointError": "engine.checkpoint",
    "NonFiniteError": "engine.finite",
    "get_calibration_data": "calibration",
    "ModelLoadError": "loading",
    "REGISTRY": "methods",
    "ConfigError": "methods",
    "MethodConfig": "methods",
    "RunConfig": "methods",
    "EvoPressBitsConfig": "methods.evopress.config",
    "EvoPressConfig": "methods.evopress.config",
    "EvoPressSettings": "methods.evopress.config",
    "GPTQConfig": "methods.gptq.config",
    "HealConfig": "methods.heal.config",
    "LayerChopConfig": "methods.layerchop.config",
    "MagnitudeConfig": "methods.sparsity.config",
    "SparseGPTConfig": "methods.sparsity.config",
    "WandaConfig": "methods.sparsity.config",
    "FinetuneConfig": "methods.ziplm.config",
    "ZipLMConfig": "methods.ziplm.config",
    "Pruner": "pruner",
    "Quantizer": "quantizer",
    "Recipe": "recipe",
    "PruningSummary": "report",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load on first use
    from .calibration import get_calibration_data
    from .loading import ModelLoadError
    from .methods import REGISTRY, ConfigError, MethodConfig, RunConfig
    from .methods.evopress.config import EvoPressBitsConfig, EvoPressConfig, EvoPressSettings
    from .methods.gptq.config import GPTQConfig
    from .methods.heal.config import HealConfig
    from .methods.layerchop.config import LayerChopConfig
    from .methods.sparsity.config import MagnitudeConfig, SparseGPTConfig, WandaConfig
    from .methods.ziplm.config import FinetuneConfig, ZipLMConfig
    from .modeling.adapters import SUPPORTED_MODEL_TYPES, ArchitectureAdapter, UnsupportedArchitectureError, get_adapter
    from .engine.checkpoint import CheckpointError
    from .engine.finite import NonFiniteError
    from .modeling.integrity import CheckpointIntegrityError
    from .modeling.pruning_config import PruningConfig, PruningConfigError
    from .pruner import Pruner
    from .quantizer import Quantizer
    from .recipe import Recipe
    from .report import PruningSummary

_install_registration()
