"""Fine-tuning a compressed model through the transformers Trainer, with token-level distillation.

The student learns the dense teacher's next-token distribution (KL at every position, temperature T),
optionally mixed with the plain language-modeling loss. Multi-GPU, FSDP and DeepSpeed come from the
Trainer / ``accelerate launch``. ``masks`` keep removed structures at zero during training (a
callback re-applies them after every optimizer step), so a masked model can be trained before its
structures are physically removed.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

logger = logging.get_logger(__name__)

Masks = list[tuple[nn.Parameter, torch.Tensor]]
"""(parameter, boolean keep-mask of the same shape)."""


class TokenWindows(torch.utils.data.Dataset):
    """Fixed-length token windows [n, seq_len] as causal-LM training examples."""

    def __init__(self, input_ids: torch.Tensor) -> None:
        self.input_ids = input_ids

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class _ApplyMasks(TrainerCallback):
    """Zero the removed structures again after every optimizer step."""

    def __init__(self, masks: Masks) -> None:
        self.masks = masks

    def on_step_end(self, args, state, control, **kwargs):
        apply_masks(self.masks)


@torch.no_grad()
def apply_masks(masks: Masks) -> None:
    for param, keep in masks:
        param.data.mul_(keep.to(device=param.device, dtype=param.dtype))


class DistillationTrainer(Trainer):
    """Trainer whose loss is α·T²·KL(teacher ‖ student) + (1 − α)·LM loss, per token."""

    loss_is_scaled_for_ga = False  # compute_loss returns per-batch means: the Trainer divides by accumulation steps

    def __init__(self, *args: Any, teacher: nn.Module | None = None, alpha: float = 1.0, temperature: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha (weight of the distillation loss) must be in [0, 1], got {alpha}")
        if alpha > 0 and teacher is None:
            raise ValueError("distillation (alpha > 0) needs the dense teacher model")
        self.teacher = teacher.eval().requires_grad_(False).to(self.args.device) if teacher is not None else None
        self.alpha = alpha
        self.temperature = temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs.loss if self.alpha < 1.0 else None
        if self.alpha > 0:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=inputs["input_ids"],
                                              attention_mask=inputs.get("attention_mask")).logits
            T = self.temperature
            student = torch.log_softmax(outputs.logits.float() / T, dim=-1)
            teacher = torch.log_softmax(teacher_logits.float() / T, dim=-1)
            kl = (teacher.exp() * (teacher - student)).sum(-1).mean() * T * T
            loss = kl if loss is None else self.alpha * kl + (1 - self.alpha) * loss
        return (loss, outputs) if return_outputs else loss


def finetune(model: nn.Module, train_ids: torch.Tensor, *, teacher: nn.Module | None = None, alpha: float = 1.0,
             temperature: float = 1.0, masks: Masks | None = None, max_steps: int = 100,
             learning_rate: float = 5e-5, per_device_train_batch_size: int = 4, output_dir: str | None = None,
             resume_from_checkpoint: str | bool | None = None, **training_args: Any) -> dict[str, Any]:
    """Train ``model`` in place on token windows; returns the Trainer's final metrics plus ``global_step``.

    Extra keyword arguments go to ``TrainingArguments`` (gradient_checkpointing, bf16, warmup_steps,
    gradient_accumulation_steps, ...). Nothing is saved unless ``save_strategy`` asks for it;
    ``resume_from_checkpoint`` (True: the last checkpoint in ``output_dir``, or a path) goes to ``Trainer.train``.
    """
    if masks:
        apply_masks(masks)
    defaults = dict(report_to=[], save_strategy="no", logging_steps=max(1, max_steps // 10), disable_tqdm=False,
                    lr_scheduler_type="linear", warmup_steps=0, seed=0, use_cpu=not torch.cuda.is_available())
    defaults.update(training_args)
    with tempfile.TemporaryDirectory(prefix="optimum-prune-finetune-") as tmp:
        args = TrainingArguments(output_dir=output_dir or os.path.join(tmp, "run"), max_steps=max_steps,
                                 learning_rate=learning_rate, per_device_train_batch_size=per_device_train_batch_size,
                                 **defaults)
        was_training = model.training
        trainer = DistillationTrainer(model=model, args=args, train_dataset=TokenWindows(train_ids), teacher=teacher,
                                      alpha=alpha, temperature=temperature,
                                      callbacks=[_ApplyMasks(masks)] if masks else None)
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        model.train(was_training)
    if masks:
        apply_masks(masks)
    return {**result.metrics, "global_step": result.global_step}
