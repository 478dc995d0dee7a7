"""LayerChop (Jha et al., arXiv 2305.14864): remove whole blocks, then heal by continued pretraining.

Which blocks go is decided by a strategy:

- ``"last"``: the n blocks before the final one (LayerChop's deterministic choice; no data needed);
- ``"angular"``: the contiguous window of n blocks whose input and output residual streams are closest
  in angle (Gromov et al., arXiv 2403.17887; last token of each calibration window);
- ``"block_influence"``: the n blocks of lowest ShortGPT block influence 1 − cos(h_in, h_out);
- ``"evopress"``: the set found by EvoPress' evolutionary depth search (``optimum_prune.evopress``).

Healing is ordinary causal-LM training of all remaining weights through the transformers Trainer
(``optimum_prune.distill.finetune`` with ``alpha=0``), optionally distilling from the dense model;
multi-GPU, FSDP and DeepSpeed come from ``accelerate launch``.
"""

from __future__ import annotations

import json
from numbers import Integral
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .distill import Masks, finetune
from .engine.importance import angular_distance, block_influence
from .engine.layers import linear_groups, original_layer_indices
from .loading import task_of_model
from .modeling.adapters import get_adapter
from .modeling.pruning_config import PruningConfig

logger = logging.get_logger(__name__)

STRATEGIES: tuple[str, ...] = ("last", "angular", "block_influence", "evopress")
"""Layer-choice strategies, in the order the error messages list them."""

NEEDS_CALIBRATION: frozenset[str] = frozenset({"angular", "block_influence", "evopress"})
"""Strategies that read calibration activations ("last" needs none)."""


def check_request(model: nn.Module, num_layers: Any, strategy: str, options: dict[str, Any] | None = None
                  ) -> list[int]:
    """Validate a LayerChop request before any data is read; returns the original indices of the blocks present."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown LayerChop strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    originals = original_layer_indices(model)
    depth = len(originals)
    if isinstance(num_layers, bool) or not isinstance(num_layers, Integral) or not 1 <= num_layers <= depth - 1:
        dropped = _dropped(model)
        gone = f" left, {len(dropped)} already removed" if dropped else ""
        raise ValueError(f"num_layers must be an integer from 1 to {depth - 1} (the model has {depth} blocks{gone} "
                         f"and keeps at least one), got {num_layers!r}")
    if options and strategy != "evopress":
        raise ValueError(f"strategy {strategy!r} takes no options (got {sorted(options)}); options are passed "
                         "to the EvoPress search only")
    adapter = get_adapter(model)
    if adapter.check_structure is not None:  # e.g. a GPT-2 that cannot renumber its blocks: fail before calibrating
        adapter.check_structure(model.config, PruningConfig(drop_layers=originals[-1:]))
    return originals


def _dropped(model: nn.Module) -> list[int]:
    """Original indices of the blocks removed before this call."""
    raw = getattr(model.config, "pruning_config", None)
    return list(PruningConfig.from_dict(raw).drop_layers) if raw else []


def choose_layers(model: nn.Module, input_ids: torch.Tensor | None, num_layers: int, strategy: str, *,
                  batch_size: int = 4, progress: bool = True, **kwargs: Any) -> tuple[list[int], dict[str, Any]]:
    """The ORIGINAL indices of the ``num_layers`` blocks to drop, and what the choice was based on (JSON-ready).

    ``input_ids`` (calibration windows [n, seq_len]) are needed by every strategy but "last". Extra keyword
    arguments go to EvoPress' ``search_depth``.
    """
    originals = check_request(model, num_layers, strategy, kwargs)
    num_layers, depth = int(num_layers), len(originals)
    if strategy != "last" and input_ids is None:
        raise ValueError(f"strategy {strategy!r} scores blocks on calibration data: pass input_ids "
                         "(token windows [num_samples, seq_len])")
    info: dict[str, Any] = {"strategy": strategy, "num_layers": num_layers}
    was_training = model.training
    model.eval()
    try:
        if strategy == "last":
            drop = originals[depth - 1 - num_layers:depth - 1]
        elif strategy == "angular":
            scores = angular_distance(model, input_ids, span=num_layers, batch_size=batch_size)
            start = min(scores, key=lambda k: (scores[k], k))
            first = originals.index(start)
            drop = originals[first:first + num_layers]
            info.update(score="angular distance arccos(cos)/pi of the window (last token)",
                        scores=_rounded(scores), window_distance=round(scores[start], 6))
        elif strategy == "block_influence":
            scores = block_influence(model, input_ids, span=1, batch_size=batch_size)
            drop = sorted(sorted(scores, key=lambda k: (scores[k], k))[:num_layers])
            info.update(score="block influence 1 - cos(h_in, h_out)", scores=_rounded(scores))
        else:
            drop, found = _evopress(model, input_ids, num_layers, originals, progress=progress, **kwargs)
            info = {**found, **info}  # the search's own fields, never shadowing strategy / num_layers
    finally:
        model.train(was_training)
    info["dropped"] = list(drop)
    logger.info("LayerChop (%s): dropping blocks %s of %s", strategy, drop, originals)
    return list(drop), info


def _evopress(model: nn.Module, input_ids: torch.Tensor, num_layers: int, originals: list[int], *, progress: bool,
              **kwargs: Any) -> tuple[list[int], dict[str, Any]]:
    """EvoPress' depth search, imported only when asked for; its answer is checked before use."""
    try:
        from .evopress import search_depth
    except ImportError as err:
        if err.name != "optimum_prune.evopress":  # the module exists but one of ITS imports failed
            raise
        raise ValueError("strategy='evopress' needs the EvoPress depth search (optimum_prune.evopress.search_depth), "
                         "which this installation lacks; use 'angular', 'block_influence' or 'last'") from err
    result = search_depth(model, input_ids, num_blocks=num_layers, progress=progress, **kwargs)
    drop = sorted(int(i) for i in result.drop_layers)
    if len(set(drop)) != num_layers or not set(drop) <= set(originals):
        raise RuntimeError(f"the EvoPress search returned blocks {list(result.drop_layers)}; expected {num_layers} "
                           f"distinct original indices among {originals}")
    return drop, _jsonable(dict(getattr(result, "info", None) or {}))


def _rounded(scores: dict[int, float]) -> dict[str, float]:
    return {str(k): round(float(v), 6) for k, v in scores.items()}


def _jsonable(value: Any) -> Any:
    """``value`` with tensors / numpy values made plain and dict keys made strings (it goes into config.json)."""

    def plain(obj: Any) -> Any:
        if hasattr(obj, "tolist"):
            return obj.tolist()
        if isinstance(obj, (set, frozenset, tuple)):
            return list(obj)
        return str(obj)

    return json.loads(json.dumps(value, default=plain))


# ---------------------------------------------------------------------------------------------- healing
def check_healable(model: nn.Module) -> None:
    """Healing is continued causal-LM pretraining: refuse encoders and heads that have no LM loss."""
    task = task_of_model(model)
    if task != "causal-lm":
        raise ValueError(f"healing is continued causal-LM pretraining, so it needs a causal language model "
                         f"(AutoModelForCausalLM: Llama, Mistral, Qwen2/3, SmolLM, OPT, GPT-2); this model is a "
                         f"{type(model).__name__} ({task}). Fine-tune encoders on their own task instead")


def sparsity_masks(model: nn.Module) -> Masks:
    """Keep-masks of the nonzero weights of every compressible Linear in the blocks (sparse models stay sparse)."""
    adapter = get_adapter(model)
    masks: Masks = []
    for block in adapter.layers(model):
        for group in linear_groups(adapter, block):
            for module in group.modules:
                masks.append((module.weight, module.weight.data != 0))
    return masks


def keeps_zeros(config: PruningConfig) -> bool:
    """True when the model was sparsified (SparseGPT / Wanda / magnitude, unstructured or N:M)."""
    method = (config.method or "").split(" ")[0]
    return config.layer_sparsity is not None or method in ("sparsegpt", "wanda", "magnitude")


def heal(model: nn.Module, train_ids: torch.Tensor, *, max_steps: int = 1000, learning_rate: float = 2e-5,
         per_device_train_batch_size: int = 4, teacher: nn.Module | None = None, alpha: float | None = None,
         temperature: float = 1.0, masks: Masks | None = None, resume_from_checkpoint: str | bool | None = None,
         output_dir: str | None = None, gradient_checkpointing: bool = False, **training_args: Any) -> dict[str, Any]:
    """Train all weights of ``model`` in place on token windows (plain LM loss, or distillation from ``teacher``).

    Returns the Trainer's metrics plus ``global_step``. ``output_dir`` keeps Trainer checkpoints
    (``save_strategy="steps"`` by default there, ``save_steps``); ``resume_from_checkpoint=True`` continues
    from the last one in ``output_dir``, or pass a checkpoint path.
    """
    alpha = check_heal(model, teacher, alpha, resume_from_checkpoint, output_dir)
    if output_dir is not None:
        training_args.setdefault("save_strategy", "steps")
    if gradient_checkpointing:
        training_args["gradient_checkpointing"] = True
    use_cache = getattr(model.config, "use_cache", None)
    metrics = finetune(model, train_ids, teacher=teacher, alpha=alpha, temperature=temperature, masks=masks,
                       max_steps=max_steps, learning_rate=learning_rate,
                       per_device_train_batch_size=per_device_train_batch_size, output_dir=output_dir,
                       resume_from_checkpoint=resume_from_checkpoint, **training_args)
    if gradient_checkpointing and getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    if use_cache is not None:
        model.config.use_cache = use_cache
    logger.info("healed for %s steps: train loss %.4f", metrics.get("global_step"),
                metrics.get("train_loss", float("nan")))
    return metrics


def check_heal(model: nn.Module, teacher: nn.Module | None, alpha: float | None,
               resume_from_checkpoint: str | bool | None, output_dir: Any) -> float:
    """Everything about a healing request that can fail before data is read; returns the distillation weight."""
    check_healable(model)
    check_teacher(model, teacher)
    if resume_from_checkpoint is True and output_dir is None:
        raise ValueError("resume_from_checkpoint=True continues from the last checkpoint in output_dir: pass "
                         "output_dir= (the directory of the interrupted run), or a checkpoint path")
    return resolve_alpha(teacher, alpha)


def resolve_alpha(teacher: nn.Module | None, alpha: float | None) -> float:
    """Weight of the distillation loss: 1 with a teacher, 0 (the paper's plain LM loss) without one."""
    if alpha is None:
        return 1.0 if teacher is not None else 0.0
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (weight of the distillation loss) must be in [0, 1], got {alpha}")
    if alpha > 0 and teacher is None:
        raise ValueError(f"alpha={alpha} distills from a dense model: pass distill_from= (the dense model or its "
                         "Pruner), or alpha=0 for plain continued pretraining")
    return float(alpha)


def check_teacher(model: nn.Module, teacher: nn.Module | None) -> None:
    """The teacher must speak the student's vocabulary (token-level distillation compares logits)."""
    if teacher is None:
        return
    check_healable(teacher)
    mine, theirs = model.config.vocab_size, teacher.config.vocab_size
    if mine != theirs:
        raise ValueError(f"distill_from has a vocabulary of {theirs} tokens, the model {mine}: distill from the "
                         "dense model this one was pruned from")


def heal_record(metrics: dict[str, Any], max_steps: int, num_windows: int, seq_len: int, dataset: str | None,
                alpha: float) -> dict[str, Any]:
    """The JSON-ready entries healing adds to ``pruning_config.metrics``."""
    record: dict[str, Any] = {
        "heal_steps": int(metrics.get("global_step", max_steps)),
        "heal_train_loss": round(float(metrics["train_loss"]), 5) if "train_loss" in metrics else None,
        "heal_tokens": int(num_windows * seq_len),
        "heal_dataset": dataset,
        "heal_seconds": round(float(metrics.get("train_runtime", 0.0)), 2),
    }
    if alpha > 0:
        record["heal_distillation_alpha"] = alpha
    return record
