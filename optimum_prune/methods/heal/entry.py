"""Healing on a session's model: read the training windows, train through the Trainer, record what it did."""

from __future__ import annotations

from typing import Any

from ...calibration import load_calibration
from ...teacher_cache import build_teacher_cache
from ..base import RunConfig
from . import training
from .config import HealConfig


def run(session: Any, config: HealConfig, options: RunConfig | None = None) -> dict[str, Any]:
    """Heal ``session.model`` in place; returns the Trainer metrics. A sparsified model keeps its zeros."""
    teacher = config.distill_from
    if isinstance(teacher, str):
        teacher = type(session).from_pretrained(teacher).model
    teacher = getattr(teacher, "model", teacher)
    alpha = training.check_heal(session.model, teacher, config.alpha, config.resume_from_checkpoint,
                                config.output_dir)
    args = config.trainer_arguments()
    num_samples = config.num_samples or config.max_steps * config.per_device_train_batch_size * \
        args.get("gradient_accumulation_steps", 1)
    train_ids, data_info = load_calibration(config.train_dataset, session.tokenizer, seq_len=config.seq_len,
                                            seed=config.seed, num_samples=num_samples)
    if config.teacher_cache is not None and alpha > 0:
        args["teacher_cache"] = build_teacher_cache(teacher, train_ids, config.teacher_cache,
                                                    tokenizer=session.tokenizer, top_k=config.teacher_top_k or None,
                                                    batch_size=config.per_device_train_batch_size)
    masks = training.sparsity_masks(session.model) if training.keeps_zeros(session.pruning_config) else None
    metrics = training.heal(session.model, train_ids, max_steps=config.max_steps, learning_rate=config.learning_rate,
                            per_device_train_batch_size=config.per_device_train_batch_size, teacher=teacher,
                            alpha=alpha, masks=masks, resume_from_checkpoint=config.resume_from_checkpoint,
                            output_dir=None if config.output_dir is None else str(config.output_dir),
                            gradient_checkpointing=config.gradient_checkpointing, **args)
    healed = training.heal_record(metrics, config.max_steps, train_ids.shape[0], train_ids.shape[1],
                                  data_info.get("dataset"), alpha)
    session.record(metrics=session.metrics.merged(**healed))
    return metrics
