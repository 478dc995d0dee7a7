"""What measuring needs from a model: is it a causal LM, where it runs, how to call it, its logits in chunks.

Shared by perplexity, KL, latency and the latency tables; nothing here changes a model's weights.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

CHUNK_ELEMENTS = 2**24
"""Largest logits block (positions x vocabulary) materialized in fp32 at once."""


# ------------------------------------------------------------------------------------ model kind


def _causal_lm_class_names() -> set[str]:
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for value in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return names


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a causal language model (its class or a parent is a ``...ForCausalLM``)."""
    names = _causal_lm_class_names()
    return any(c.__name__ in names for c in type(model).__mro__)


def require_causal_lm(model: nn.Module, what: str) -> None:
    """Raise a ValueError naming the fix when ``what`` (a next-token measure) is asked of a non-causal model."""
    if is_causal_lm(model):
        return
    from ..loading import task_of_model

    try:
        task = task_of_model(model)
    except Exception:
        task = "non-causal"
    raise ValueError(
        f"{what} is defined for causal language models (next-token prediction); {type(model).__name__} is a "
        f"{task} model. Load it with AutoModelForCausalLM, or evaluate encoders on a downstream task instead."
    )


def max_positions(model: nn.Module) -> int | None:
    """The longest input the model's config allows (``max_position_embeddings`` / ``n_positions``), if it says."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def stock_class(model: nn.Module) -> type:
    """The plain transformers class behind a model (the Pruned* subclasses rebuild structure from config)."""
    from transformers import PreTrainedModel

    from ..modeling.modeling_pruned import PrunedModelMixin

    for cls in type(model).__mro__:
        if issubclass(cls, PreTrainedModel) and not issubclass(cls, PrunedModelMixin):
            return cls
    return type(model)


# --------------------------------------------------------------------------------- placement, calls


def model_device(model: nn.Module) -> torch.device:
    """The device the model's weights are on (CPU for a model without parameters)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def place(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """The device to run on: ``device`` (moving the model there) or the model's own."""
    if device is None:
        return model_device(model)
    device = torch.device(device)
    if model_device(model) != device:
        logger.info("moving %s to %s", type(model).__name__, device)
        model.to(device)
    return device


@contextlib.contextmanager
def eval_no_grad(*models: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the block; the models' training flags are restored afterwards."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def accepts(module: nn.Module, name: str) -> bool:
    """Whether ``module.forward`` takes a keyword ``name`` (``use_cache``, ``cache`` ...)."""
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def call_without_cache(module: nn.Module, input_ids: torch.Tensor) -> Any:
    """``module(input_ids=...)``, with ``use_cache=False`` where the forward takes it."""
    kwargs = {"use_cache": False} if accepts(module, "use_cache") else {}
    return module(input_ids=input_ids, **kwargs)


# ------------------------------------------------------------------------------------------ logits


def chunk_rows(vocab: int) -> int:
    """Positions per fp32 logits chunk, so that a chunk holds at most ``CHUNK_ELEMENTS`` numbers."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


@dataclass
class LogitsSource:
    """How to get fp32 next-token logits of a causal LM in position chunks.

    With ``head`` set, the model's forward is ``head(backbone(ids).last_hidden_state)``: the backbone runs
    once per batch and the vocabulary projection runs per chunk, so the [batch, seq, vocab] logits are never
    materialized. Otherwise the full logits come from the model and only the fp32 work is chunked.
    """

    model: nn.Module
    backbone: nn.Module | None = None
    head: nn.Module | None = None

    @classmethod
    def of(cls, model: nn.Module, probe: torch.Tensor) -> LogitsSource:
        """Split ``model`` into backbone + head if that reproduces its logits on ``probe``."""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        prefix = getattr(model, "base_model_prefix", "")
        backbone = getattr(model, prefix, None) if prefix else None
        config = getattr(model, "config", None)
        scaled = any(getattr(config, k, None) not in (None, 1, 1.0)
                     for k in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"))
        if not isinstance(head, nn.Linear) or not isinstance(backbone, nn.Module) or backbone is model or scaled:
            return cls(model)
        try:
            want = call_without_cache(model, probe).logits.float()
            got = head(call_without_cache(backbone, probe).last_hidden_state).float()
        except Exception as err:  # an unusual backbone signature: use the plain forward
            logger.debug("cannot split %s into backbone + head: %s", type(model).__name__, err)
            return cls(model)
        tol = 1e-5 * max(1.0, want.abs().max().item())
        if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=tol):
            logger.debug("%s's logits are not head(backbone(x)); using full logits", type(model).__name__)
            return cls(model)
        return cls(model, backbone, head)

    @classmethod
    def probing(cls, model: nn.Module, windows: torch.Tensor, device: torch.device) -> LogitsSource:
        """``of`` with the usual probe: the first 16 tokens of the first window."""
        return cls.of(model, windows[:1, : min(16, windows.shape[1])].to(device))

    def states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch * seq, d] hidden states (or logits), to be turned into log-probs chunk by chunk."""
        if self.head is not None:
            out = call_without_cache(self.backbone, input_ids).last_hidden_state
        else:
            out = call_without_cache(self.model, input_ids).logits
        return out.reshape(-1, out.shape[-1])

    def vocab_size(self, states: torch.Tensor) -> int:
        """Vocabulary size of the log-probs ``states`` give."""
        return self.head.out_features if self.head is not None else states.shape[-1]

    def logprobs(self, states: torch.Tensor) -> torch.Tensor:
        """fp32 log-softmax over the vocabulary of a chunk of ``states`` rows."""
        logits = self.head(states) if self.head is not None else states
        return torch.log_softmax(logits.float(), dim=-1)
