"""What the Pruner and the Quantizer share: loading, running any registered method or a recipe, provenance,
calibration, atomic save (packed when quantized) and Hub upload."""

from __future__ import annotations

import os
import tempfile
from dataclasses import fields
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from transformers import PreTrainedModel
from transformers.utils import logging

from .calibration import load_calibration
from .loading import TASKS, load_model, task_of_model
from .methods.base import ConfigError, MethodConfig, RunConfig
from .methods.registry import REGISTRY, MethodSpec
from .modeling.adapters import base_model_type, get_adapter
from .modeling.modeling_pruned import PrunedModelMixin, pruned_config_class, pruned_model_class
from .modeling.pruning_config import PruningConfig
from .modeling.surgery import apply_structure, current_structure
from .records import Metrics, RunRecord
from .report import PruningSummary, summarize
from .saving import atomic_directory

logger = logging.get_logger(__name__)

RunOptions = RunConfig

STREAMABLE = frozenset({"sparsegpt", "wanda", "magnitude", "gptq"})
"""The methods that run on a model loaded with ``max_memory`` (its blocks streamed from disk one at a time)."""
"""The former name of ``RunConfig``."""


class CompressionSession:
    """A model (and tokenizer) being compressed in place, with save / push of the result.

    Every method runs through ``run_method`` (the keyword forms ``Pruner.prune`` / ``Quantizer.quantize`` /
    ``Pruner.heal`` build its config from their keywords) and every stage is recorded in
    ``pruning_config.recipe``, so ``run(recipe)`` can run several in order and re-run them from a checkpoint.
    """

    ziplm_database = None
    """The level database of the last ZipLM / EvoPress structure run; a later run with the same calibration
    and grid reuses it."""
    _ziplm_key: tuple | None = None

    def __init__(self, model: PreTrainedModel, tokenizer: Any = None, *, base_model: str | None = None) -> None:
        get_adapter(model)  # fail early, naming the supported architectures
        self.model = model
        self.tokenizer = tokenizer
        self.base_model = base_model or _hub_id(getattr(model.config, "_name_or_path", None))
        self.records: dict[str, Any] = {}
        """Packed low-bit codes per quantized Linear (empty until a quantization method runs)."""
        self._calibration_cache: tuple[Any, tuple, torch.Tensor, dict[str, Any]] | None = None

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, gguf_file: str | None = None, task: str | None = None,
                        max_memory: int | str | None = None, **kwargs: Any):
        """Load from a Hub id, a directory, a ``.gguf`` file (``gguf_file=``) or an embedded name ("smollm2").

        ``max_memory`` ("1GB"): a local safetensors checkpoint larger than this stays on disk and SparseGPT /
        Wanda / magnitude / GPTQ stream it one block at a time (docs/scale.md); a smaller one loads as usual.

        ``task`` picks the head ("causal-lm", "masked-lm", "sequence-classification",
        "feature-extraction", ...); by default it follows ``config.architectures``. Other keyword
        arguments go to transformers' ``from_pretrained`` (``revision``, ``dtype``, ``token`` ...).
        """
        if max_memory is not None:  # weights beyond the budget stay on disk, one block resident at a time
            from .streamed_io import load_within

            loaded = load_within(name_or_path, max_memory, task=task, **kwargs)
            if loaded is not None:
                return cls(*loaded[:2], base_model=loaded[2])
        model, tokenizer, base_model = load_model(name_or_path, gguf_file=gguf_file, task=task, **kwargs)
        from .export.vocab import remember_gguf_source  # a GGUF export copies that file's tokenizer

        remember_gguf_source(model, name_or_path, gguf_file)
        return cls(model, tokenizer, base_model=base_model)

    def spawn(self, model: PreTrainedModel) -> "CompressionSession":
        """A session of the same kind for another model derived from this one (same tokenizer and calibration)."""
        member = type(self)(model, self.tokenizer, base_model=self.base_model)
        member._calibration_cache = self._calibration_cache
        member._adopt_pruned_class()
        return member

    # ------------------------------------------------------------------ running methods
    def run_method(self, config: MethodConfig, run: RunConfig | None = None) -> Any:
        """Run one method config on this session's model and record it as a recipe stage."""
        spec = REGISTRY.get(config.name)
        if getattr(self.model, "_block_stream", None) is not None and config.name not in STREAMABLE:
            raise ConfigError(f"{config.name} needs the whole model in memory; this one was loaded with max_memory "
                              f"and streams its blocks, which {', '.join(sorted(STREAMABLE))} support: load it "
                              "without max_memory")
        if self.records:
            raise RuntimeError("this model is already quantized; start from the dense model (quantization is the "
                               "last step)")
        run = config.run_settings(run or RunConfig())
        result = spec.run(self, config, run)
        self._record_stage(config, run if spec.calibrated else None, result)
        return result

    def run(self, recipe: Any) -> "CompressionSession":
        """Run a recipe (a ``Recipe``, its dict, or a YAML / JSON file) stage by stage; returns this session."""
        from .recipe import Recipe

        recipe = Recipe.of(recipe)
        for stage in recipe.stages:
            if getattr(stage.config, "target_speedup", None).__class__ is list:
                raise ConfigError("a recipe stage prunes to ONE target speedup; run the stages once per target")
            logger.info("recipe stage %s", stage.config.name)
            self.run_method(stage.config, recipe.stage_run(stage))
        return self

    def _keyword_call(self, kind: str, method: Any, kwargs: dict[str, Any], default: str) -> Any:
        """``prune(method=..., **fields)`` and friends: the config is built from the method's own fields."""
        run = kwargs.pop("run", None)
        if isinstance(method, MethodConfig):
            config, method = method, None
            if config.kind != kind:
                raise ConfigError(f"{config.name!r} is a {config.kind} method; call it through "
                                  f"{'Quantizer.quantize' if config.kind == 'quantize' else 'Pruner.' + config.kind}")
            spec = REGISTRY.get(config.name)
            config_kwargs, run_kwargs = {}, _split(kwargs, spec, RunConfig)
        else:
            spec = REGISTRY.for_keyword(kind, method or default)
            config_kwargs, run_kwargs = _split(kwargs, spec, spec.config_class, RunConfig)
            config = spec.config_class(**config_kwargs)
        if run is not None and run_kwargs:
            raise ConfigError(f"pass the run settings either as run= or as keywords, not both ({sorted(run_kwargs)})")
        run = run if run is not None else RunConfig(**run_kwargs)
        return self.run_method(config, run)

    def _record_stage(self, config: MethodConfig, run: RunConfig | None, result: Any) -> None:
        """Append the stage (every default resolved) to ``pruning_config.recipe`` of each model it produced
        (an entry returns the model, or {key: session} when it made several, e.g. one per ZipLM target)."""
        several = isinstance(result, dict) and bool(result) and all(
            isinstance(member, CompressionSession) for member in result.values())
        sessions = list(result.values()) if several else [self]
        for session in sessions:
            stage = config.to_dict()
            if several:  # each member records the one target that made it
                stage["target_speedup"] = float(session.pruning_config.target_speedup)
            if run is not None:
                stage["run"] = run.to_dict()
            recipe = list(session.pruning_config.recipe or []) if session is self else list(
                self.pruning_config.recipe or [])
            session._record(recipe=recipe + [stage])

    # ------------------------------------------------------------------ provenance
    @property
    def pruning_config(self) -> PruningConfig:
        """Everything removed so far, by original index, with its provenance (empty for a dense model)."""
        return current_structure(self.model)

    @property
    def metrics(self) -> Metrics:
        """What the runs so far measured (typed; see ``optimum_prune.records.Metrics``)."""
        return Metrics.from_dict(self.pruning_config.metrics)

    @property
    def run_record(self) -> RunRecord:
        """The provenance of the last run (method, calibration, targets, metrics, search summary)."""
        return RunRecord.from_config(self.pruning_config)

    def record(self, *, metrics: Metrics | None = None, **fields: Any) -> None:
        """Store a run's provenance (the fields of ``RunRecord``) in ``pruning_config``."""
        known = {f.name for f in dataclass_fields(RunRecord)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise TypeError(f"not run-record fields: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if metrics is not None:
            fields["metrics"] = metrics.to_dict() or None
        self._record(**fields)

    def _record(self, **fields: Any) -> None:
        """Store provenance fields in the model's ``pruning_config`` (config.json)."""
        config = self.pruning_config
        for name, value in fields.items():
            setattr(config, name, value)
        if config.base_model is None and self.base_model:
            config.base_model = self.base_model
        self.model.config.pruning_config = config.to_dict()

    # ------------------------------------------------------------------ structure
    def apply(self, config: PruningConfig | dict[str, Any]) -> PreTrainedModel:
        """Physically remove the structures in ``config`` (original indices) and return the model.

        Applying several configs accumulates them. The config is validated first: on an error the
        model is left unchanged.
        """
        if not isinstance(config, PruningConfig):
            config = PruningConfig.from_dict(config)
        if config.base_model is None and self.pruning_config.base_model is None and self.base_model:
            config.base_model = self.base_model
        apply_structure(self.model, config)
        self._adopt_pruned_class()
        if logger.isEnabledFor(logging.INFO):
            logger.info("pruned: %s", self.summary().to_markdown().splitlines()[2])
        return self.model

    def _adopt_pruned_class(self) -> None:
        """Give a structurally pruned model the classes that rebuild its structure at load time."""
        if current_structure(self.model).is_structured and not isinstance(self.model, PrunedModelMixin):
            self.model.__class__ = pruned_model_class(self.model)
            self.model.config.__class__ = pruned_config_class(base_model_type(self.model.config.model_type))

    def summary(self) -> PruningSummary:
        """Before/after parameters, size and the per-layer structure (print it, or ``.to_markdown()``)."""
        return summarize(self.model)

    # ------------------------------------------------------------------ calibration
    def calibration_data(self, options: RunConfig) -> tuple[torch.Tensor, dict[str, Any]]:
        """Token windows [num_samples, seq_len] for ``options`` (cached per source and sizes) and their description."""
        from .evaluation.models import max_positions

        limit = max_positions(self.model)
        given = options.calibration  # token ids bring their own window length
        width = given.shape[-1] if isinstance(given, torch.Tensor) else options.seq_len
        if limit is not None and width > limit:
            raise ConfigError(f"seq_len={width} is longer than this model's {limit} positions "
                              f"(max_position_embeddings): use seq_len={limit} or less")
        key = (options.num_samples, options.seq_len, options.seed)
        cache = self._calibration_cache
        if cache is not None and cache[0] is options.calibration and cache[1] == key:
            return cache[2], cache[3]
        ids, info = load_calibration(options.calibration, self.tokenizer, num_samples=options.num_samples,
                                     seq_len=options.seq_len, seed=options.seed, model=self.model,
                                     progress=options.progress)
        self._calibration_cache = (options.calibration, key, ids, info)
        return ids, info

    # ------------------------------------------------------------------ quantized weights
    @property
    def quantization(self) -> dict[str, Any]:
        """Summary of the grids used (for the card and the CLI)."""
        from .packing import FORMAT

        specs = {r.spec for r in self.records.values()}
        bits = sorted({s.bits for s in specs})
        spec = next(iter(specs)) if specs else None
        return {"format": f"compressed-tensors {FORMAT}", "bits": bits[0] if len(bits) == 1 else bits,
                "group_size": spec.group if spec else None, "symmetric": spec.symmetric if spec else None,
                "act_order": spec.act_order if spec else None, "quantized_linears": len(self.records)}

    # ------------------------------------------------------------------ saving
    def model_card(self, repo_id: str | None = None):
        """The model card (huggingface_hub ``ModelCard``) written beside the weights."""
        from .card import build_model_card

        task = task_of_model(self.model)
        load_class, _, pipeline_tag = TASKS[task]
        return build_model_card(self.summary(), self.pruning_config, pipeline_tag=pipeline_tag,
                                load_class=load_class, repo_id=repo_id,
                                quantization=self.quantization if self.records else None)

    def save_pretrained(self, save_directory: str | os.PathLike, *, repo_id: str | None = None, **kwargs: Any) -> Path:
        """Write weights (packed when quantized), config, tokenizer and model card (plus modeling code for
        structured pruning). Nothing is left behind if it fails."""
        self._check_savable()
        with atomic_directory(save_directory) as tmp:
            self._write(tmp, repo_id=repo_id, **kwargs)
        logger.info("saved compressed model to %s", save_directory)
        return Path(save_directory)

    def export(self, path: str | os.PathLike, format: str = "gguf", dtype: str = "f16", **kwargs: Any):
        """Write the model for an inference engine: ``format="gguf"`` is one file llama.cpp / ollama / LM Studio run
        (dtype f32, f16, bf16, or llama.cpp's Q8_0, Q4_K_M, ...; see docs/gguf.md). Returns a ``GGUFExport``."""
        from .export import GGUFExportError, export_gguf

        if format != "gguf":
            raise GGUFExportError(f"unknown export format {format!r}; the one format is 'gguf'")
        if self.records:
            raise GGUFExportError("this model is GPTQ-quantized (packed codes); export the model before quantizing "
                                  "and let llama.cpp quantize it: export(path, dtype='Q4_K_M')")
        return export_gguf(self.model, path, tokenizer=self.tokenizer, dtype=dtype, **kwargs)

    def _check_savable(self) -> None:
        if self.records:
            from .packing import check_packable

            check_packable(self.model, self.records)

    def _write(self, directory: Path, *, repo_id: str | None = None, **kwargs: Any) -> None:
        self._save_weights(directory, **kwargs)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        self.model_card(repo_id).save(os.path.join(directory, "README.md"))

    def _save_weights(self, directory: Path, **kwargs: Any) -> None:
        if getattr(self.model, "_block_stream", None) is not None:  # block by block: shards and work directory
            from .streamed_io import save_streamed

            save_streamed(self.model, directory, get_adapter(self.model).layers(self.model), self.records)
        elif self.records:
            from .packing import save_packed

            save_packed(self.model, directory, self.records, **kwargs)
        else:
            self.model.save_pretrained(directory, **kwargs)

    def _commit_message(self) -> str:
        if self.records:
            q = self.quantization
            return f"Upload {q['bits']}-bit GPTQ model ({q['format']})"
        summary = self.summary()
        return f"Upload pruned model ({summary.params_before:,} -> {summary.params_after:,} parameters)"

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str | None = None, revision: str | None = None, create_pr: bool = False):
        """Upload weights, config, tokenizer, remote code and model card to ``repo_id`` in one commit.

        A missing token or an unreachable Hub raises ``PushError`` naming the cause (check it before long
        work with ``check_push``)."""
        self._check_savable()
        check_push(repo_id, token)
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            with tempfile.TemporaryDirectory(prefix="optimum-prune-push-") as tmp:
                self._write(Path(tmp), repo_id=repo_id)
                return api.upload_folder(repo_id=repo_id, folder_path=tmp,
                                         commit_message=commit_message or self._commit_message(),
                                         revision=revision, create_pr=create_pr, repo_type="model")
        except (OSError, HfHubHTTPError) as err:
            raise PushError(f"pushing to {repo_id} failed: {_push_cause(err)}; nothing was uploaded (save with "
                            "save_pretrained and upload later)") from err


class PushError(RuntimeError):
    """An upload that cannot happen or failed: no token, no network, or the Hub refused (the cause in one line)."""


def check_push(repo_id: str, token: str | None = None) -> None:
    """Fail now, before any long work, when an upload to ``repo_id`` cannot happen (no token, Hub unreachable)."""
    from huggingface_hub import get_token

    from .text import hub_problem

    if not repo_id or repo_id.count("/") > 1 or " " in repo_id:
        raise PushError(f"{repo_id!r} is not a Hub repo id: use 'name' or 'user/name'")
    if not (token or get_token()):
        raise PushError("no Hugging Face token to push with: run `hf auth login` or set HF_TOKEN")
    problem = hub_problem()
    if problem:
        raise PushError(f"cannot push to the Hub: {problem}; save locally (--output) and upload later")


def _push_cause(err: BaseException) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403):
        return f"the Hub refused the token (HTTP {status}): check it with `hf auth whoami`"
    if status is not None:
        return f"the Hub answered HTTP {status}"
    return f"no connection to the Hub ({type(err).__name__})"


def _split(kwargs: dict[str, Any], spec: MethodSpec, *classes: type) -> Any:
    """Keyword arguments by config class; a keyword no class has fails naming the methods it belongs to."""
    names = [{f.name for f in fields(c) if f.init} for c in classes]
    parts: list[dict[str, Any]] = [{} for _ in classes]
    for key, value in kwargs.items():
        for part, known in zip(parts, names):
            if key in known:
                part[key] = value
                break
        else:
            owners = [s.keyword or s.name for s in REGISTRY.specs()
                      if s.name != spec.name and key in {f.name for f in fields(s.config_class)}]
            where = f" (it is a setting of {', '.join(dict.fromkeys(owners))})" if owners else ""
            valid = ", ".join(sorted(set().union(*names)))
            raise ConfigError(f"`{key}` is not a setting of {spec.keyword or spec.name}{where}; its settings are: "
                              f"{valid}")
    return parts if len(parts) > 1 else parts[0]


def _hub_id(name: str | None) -> str | None:
    """``name`` if it looks like a Hub repo id (and is not a local path)."""
    if not name or os.path.exists(name) or name.count("/") != 1 or " " in name:
        return None
    return name
