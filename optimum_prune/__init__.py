"""optimum-prune: make transformers models smaller and faster, and give them back as Hub checkpoints.

Importing the package registers the pruned architectures (``pruned_llama``, ``pruned_bert`` ...)
with transformers' Auto classes, so pruned checkpoints load with ``AutoModelForCausalLM``.
"""

__version__ = "0.1.0"

from .modeling.adapters import SUPPORTED_MODEL_TYPES, ArchitectureAdapter, UnsupportedArchitectureError, get_adapter
from .modeling.modeling_pruned import register as _register
from .modeling.pruning_config import PruningConfig, PruningConfigError
from .calibration import get_calibration_data
from .loading import ModelLoadError
from .methods import REGISTRY, ConfigError, MethodConfig, RunConfig
from .methods.evopress.config import EvoPressBitsConfig, EvoPressConfig, EvoPressSettings
from .methods.gptq.config import GPTQConfig
from .methods.heal.config import HealConfig
from .methods.layerchop.config import LayerChopConfig
from .methods.sparsity.config import MagnitudeConfig, SparseGPTConfig, WandaConfig
from .methods.ziplm.config import FinetuneConfig, ZipLMConfig
from .pruner import Pruner
from .quantizer import Quantizer
from .recipe import Recipe
from .report import PruningSummary

_register()

__all__ = [
    "REGISTRY",
    "ArchitectureAdapter",
    "ConfigError",
    "EvoPressBitsConfig",
    "EvoPressConfig",
    "EvoPressSettings",
    "FinetuneConfig",
    "GPTQConfig",
    "HealConfig",
    "LayerChopConfig",
    "MagnitudeConfig",
    "MethodConfig",
    "Recipe",
    "RunConfig",
    "SparseGPTConfig",
    "WandaConfig",
    "ZipLMConfig",
    "Pruner",
    "Quantizer",
    "get_calibration_data",
    "ModelLoadError",
    "PruningConfig",
    "PruningConfigError",
    "PruningSummary",
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedArchitectureError",
    "get_adapter",
]
