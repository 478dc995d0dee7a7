"""Healing on a session's model: read the training windows, train through the Trainer, record what it did."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...calibration import load_calibration
from ...generated_text import parse_source
from ...teacher_cache import build_teacher_cache
from ..base import RunConfig
from . import training
from .config import HealConfig


def run(session: Any, config: HealConfig, options: RunConfig | None = None) -> dict[str, Any]:
    """Heal ``session.model`` in place; returns the Trainer metrics. A sparsified model keeps its zeros."""
    teacher = config.distill_from
    if isinstance(teacher, str):
        teacher = type(session).from_pretrained(teacher).model
    if not isinstance(teacher, nn.Module):  # a Pruner / session: its model (a model's own .model is its trunk)
        teacher = getattr(teacher, "model", teacher)
    sparse = training.keeps_zeros(session.pruning_config)
    alpha = training.check_heal(session.model, teacher, config.alpha, config.resume_from_checkpoint,
                                config.output_dir, lora=config.lora, sparse=sparse)
    args = config.trainer_arguments()
    num_samples = config.num_samples or config.max_steps * config.per_device_train_batch_size * \
        args.get("gradient_accumulation_steps", 1)
    train_ids, data_info = load_calibration(config.train_dataset, session.tokenizer, seq_len=config.seq_len,
                                            seed=config.seed, num_samples=num_samples,
                                            model=text_model(session, teacher, config.train_dataset))
    if config.teacher_cache is not None and alpha > 0:
        args["teacher_cache"] = build_teacher_cache(teacher, train_ids, config.teacher_cache,
                                                    tokenizer=session.tokenizer, top_k=config.teacher_top_k or None,
                                                    batch_size=config.per_device_train_batch_size)
    masks = training.sparsity_masks(session.model) if sparse else None
    metrics = training.heal(session.model, train_ids, max_steps=config.max_steps, learning_rate=config.learning_rate,
                            per_device_train_batch_size=config.per_device_train_batch_size, teacher=teacher,
                            alpha=alpha, masks=masks, resume_from_checkpoint=config.resume_from_checkpoint,
                            output_dir=None if config.output_dir is None else str(config.output_dir),
                            gradient_checkpointing=config.gradient_checkpointing, lora=config.lora, **args)
    healed = training.heal_record(metrics, config.max_steps, train_ids.shape[0], train_ids.shape[1],
                                  data_info.get("dataset"), alpha)
    session.record(metrics=session.metrics.merged(**healed))
    return metrics


def text_model(session: Any, teacher: Any, train_dataset: Any) -> Any:
    """The model that writes ``train_dataset="generated"`` text: the dense one (distill_from, or an uncompressed model)."""
    if parse_source(train_dataset) is None or teacher is not None:
        return teacher
    config = session.pruning_config
    if not config.is_empty or config.method:
        raise ValueError(f"train_dataset={train_dataset!r} is text sampled from the dense model, and this model is "
                         f"already compressed ({config.method}): pass distill_from= the dense model (alpha=0 keeps "
                         "the plain LM loss)")
    return session.model
