"""The Pruner: load a model, remove structures, save or push a smaller, reloadable checkpoint."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from transformers import PreTrainedModel
from transformers.utils import logging

from .card import build_model_card
from .loading import TASKS, load_model, task_of_model
from .modeling.adapters import base_model_type, get_adapter
from .modeling.modeling_pruned import PrunedModelMixin, pruned_config_class, pruned_model_class
from .modeling.pruning_config import PruningConfig
from .modeling.surgery import apply_structure, current_structure
from .report import PruningSummary, summarize
from .saving import atomic_directory

logger = logging.get_logger(__name__)


class Pruner:
    """Holds a model (and its tokenizer) and applies pruning to it in place.

    >>> pruner = Pruner.from_pretrained("HuggingFaceTB/SmolLM2-135M")
    >>> model = pruner.apply(PruningConfig(remove_heads={0: [0, 1, 2]}, drop_layers=[7]))
    >>> pruner.save_pretrained("smollm2-pruned")
    """

    def __init__(self, model: PreTrainedModel, tokenizer: Any = None, *, base_model: str | None = None) -> None:
        get_adapter(model)  # fail early, naming the supported architectures
        self.model = model
        self.tokenizer = tokenizer
        self.base_model = base_model or _hub_id(getattr(model.config, "_name_or_path", None))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        gguf_file: str | None = None,
        task: str | None = None,
        **kwargs: Any,
    ) -> Pruner:
        """Load from a Hub id, a directory, a ``.gguf`` file (``gguf_file=``) or an embedded name ("smollm2").

        ``task`` picks the head ("causal-lm", "masked-lm", "sequence-classification",
        "feature-extraction", ...); by default it follows ``config.architectures``. Other keyword
        arguments go to transformers' ``from_pretrained`` (``revision``, ``dtype``, ``token`` ...).
        """
        model, tokenizer, base_model = load_model(name_or_path, gguf_file=gguf_file, task=task, **kwargs)
        return cls(model, tokenizer, base_model=base_model)

    # ------------------------------------------------------------------ pruning
    @property
    def pruning_config(self) -> PruningConfig:
        """Everything removed so far, by original index (empty for a dense model)."""
        return current_structure(self.model)

    def apply(self, config: PruningConfig | dict[str, Any]) -> PreTrainedModel:
        """Physically remove the structures in ``config`` (original indices) and return the model.

        Applying several configs accumulates them. The config is validated first: on an error the
        model is left unchanged.
        """
        if not isinstance(config, PruningConfig):
            config = PruningConfig.from_dict(config)
        if config.base_model is None and self.pruning_config.base_model is None and self.base_model:
            config.base_model = self.base_model
        structure = apply_structure(self.model, config)
        if structure.is_structured and not isinstance(self.model, PrunedModelMixin):
            self.model.__class__ = pruned_model_class(self.model)
            self.model.config.__class__ = pruned_config_class(base_model_type(self.model.config.model_type))
        if logger.isEnabledFor(logging.INFO):
            logger.info("pruned: %s", self.summary().to_markdown().splitlines()[2])
        return self.model

    def summary(self) -> PruningSummary:
        """Before/after parameters, size and the per-layer structure (print it, or ``.to_markdown()``)."""
        return summarize(self.model)

    # ------------------------------------------------------------------ saving
    def model_card(self, repo_id: str | None = None):
        """The model card (huggingface_hub ``ModelCard``) written beside the weights."""
        task = task_of_model(self.model)
        _, _, pipeline_tag = TASKS[task]
        return build_model_card(self.summary(), self.pruning_config, pipeline_tag=pipeline_tag,
                                load_class=TASKS[task][0], repo_id=repo_id)

    def save_pretrained(self, save_directory: str | os.PathLike, *, repo_id: str | None = None, **kwargs: Any) -> Path:
        """Write weights, config (with ``pruning_config``), tokenizer, model card and, for structured
        pruning, the modeling code for ``trust_remote_code``. Nothing is left behind if it fails."""
        with atomic_directory(save_directory) as tmp:
            self._write(tmp, repo_id=repo_id, **kwargs)
        logger.info("saved pruned model to %s", save_directory)
        return Path(save_directory)

    def _write(self, directory: Path, *, repo_id: str | None = None, **kwargs: Any) -> None:
        self.model.save_pretrained(directory, **kwargs)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        self.model_card(repo_id).save(os.path.join(directory, "README.md"))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ):
        """Upload weights, config, tokenizer, remote code and model card to ``repo_id`` in one commit."""
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory(prefix="optimum-prune-push-") as tmp:
            self._write(Path(tmp), repo_id=repo_id)
            summary = self.summary()
            message = commit_message or (
                f"Upload pruned model ({summary.params_before:,} -> {summary.params_after:,} parameters)"
            )
            return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=message,
                                     revision=revision, create_pr=create_pr, repo_type="model")


def _hub_id(name: str | None) -> str | None:
    """``name`` if it looks like a Hub repo id (and is not a local path)."""
    if not name or os.path.exists(name) or name.count("/") != 1 or " " in name:
        return None
    return name
