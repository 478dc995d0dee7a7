"""What the Pruner and the Quantizer share: loading, calibration, provenance, atomic save and Hub upload."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi
from transformers import PreTrainedModel
from transformers.utils import logging

from .calibration import CalibrationSource, load_calibration
from .engine.sequential import SequentialOptions
from .loading import load_model
from .modeling.adapters import get_adapter
from .modeling.pruning_config import PruningConfig
from .modeling.surgery import current_structure
from .saving import atomic_directory

logger = logging.get_logger(__name__)


@dataclass
class RunOptions:
    """Calibration and execution settings shared by every calibrated method."""

    calibration: CalibrationSource = None
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 8
    device: str | torch.device | None = None
    checkpoint_dir: str | os.PathLike | None = None
    progress: bool = True

    def sequential(self, description: str) -> SequentialOptions:
        """The block loop's options for these settings."""
        return SequentialOptions(batch_size=self.batch_size, device=self.device, checkpoint_dir=self.checkpoint_dir,
                                 progress=self.progress, description=description)


class CompressionSession:
    """A model (and tokenizer) being compressed in place, with save / push of the result."""

    def __init__(self, model: PreTrainedModel, tokenizer: Any = None, *, base_model: str | None = None) -> None:
        get_adapter(model)  # fail early, naming the supported architectures
        self.model = model
        self.tokenizer = tokenizer
        self.base_model = base_model or _hub_id(getattr(model.config, "_name_or_path", None))
        self._calibration_cache: tuple[Any, tuple, torch.Tensor, dict[str, Any]] | None = None

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, gguf_file: str | None = None, task: str | None = None,
                        **kwargs: Any):
        """Load from a Hub id, a directory, a ``.gguf`` file (``gguf_file=``) or an embedded name ("smollm2").

        ``task`` picks the head ("causal-lm", "masked-lm", "sequence-classification",
        "feature-extraction", ...); by default it follows ``config.architectures``. Other keyword
        arguments go to transformers' ``from_pretrained`` (``revision``, ``dtype``, ``token`` ...).
        """
        model, tokenizer, base_model = load_model(name_or_path, gguf_file=gguf_file, task=task, **kwargs)
        return cls(model, tokenizer, base_model=base_model)

    # ------------------------------------------------------------------ provenance
    @property
    def pruning_config(self) -> PruningConfig:
        """Everything removed so far, by original index, with its provenance (empty for a dense model)."""
        return current_structure(self.model)

    def _record(self, **fields: Any) -> None:
        """Store provenance fields in the model's ``pruning_config`` (config.json)."""
        config = self.pruning_config
        for name, value in fields.items():
            setattr(config, name, value)
        if config.base_model is None and self.base_model:
            config.base_model = self.base_model
        self.model.config.pruning_config = config.to_dict()

    # ------------------------------------------------------------------ calibration
    def calibration_data(self, options: RunOptions) -> tuple[torch.Tensor, dict[str, Any]]:
        """Token windows [num_samples, seq_len] for ``options`` (cached per source and sizes) and their description."""
        key = (options.num_samples, options.seq_len, options.seed)
        cache = self._calibration_cache
        if cache is not None and cache[0] is options.calibration and cache[1] == key:
            return cache[2], cache[3]
        ids, info = load_calibration(options.calibration, self.tokenizer, num_samples=options.num_samples,
                                     seq_len=options.seq_len, seed=options.seed, model=self.model)
        self._calibration_cache = (options.calibration, key, ids, info)
        return ids, info

    # ------------------------------------------------------------------ saving
    def model_card(self, repo_id: str | None = None):
        raise NotImplementedError

    def save_pretrained(self, save_directory: str | os.PathLike, *, repo_id: str | None = None, **kwargs: Any) -> Path:
        """Write weights, config, tokenizer and model card (plus modeling code for structured pruning).
        Nothing is left behind if it fails."""
        with atomic_directory(save_directory) as tmp:
            self._write(tmp, repo_id=repo_id, **kwargs)
        logger.info("saved compressed model to %s", save_directory)
        return Path(save_directory)

    def _write(self, directory: Path, *, repo_id: str | None = None, **kwargs: Any) -> None:
        self._save_weights(directory, **kwargs)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        self.model_card(repo_id).save(os.path.join(directory, "README.md"))

    def _save_weights(self, directory: Path, **kwargs: Any) -> None:
        self.model.save_pretrained(directory, **kwargs)

    def _commit_message(self) -> str:
        return "Upload compressed model"

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str | None = None, revision: str | None = None, create_pr: bool = False):
        """Upload weights, config, tokenizer, remote code and model card to ``repo_id`` in one commit."""
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory(prefix="optimum-prune-push-") as tmp:
            self._write(Path(tmp), repo_id=repo_id)
            return api.upload_folder(repo_id=repo_id, folder_path=tmp,
                                     commit_message=commit_message or self._commit_message(),
                                     revision=revision, create_pr=create_pr, repo_type="model")


def _hub_id(name: str | None) -> str | None:
    """``name`` if it looks like a Hub repo id (and is not a local path)."""
    if not name or os.path.exists(name) or name.count("/") != 1 or " " in name:
        return None
    return name
