"""Fine-tuning a compressed model through the transformers Trainer, with token-level distillation.

The student learns the dense teacher's next-token distribution (KL at every position, temperature T),
optionally mixed with the plain language-modeling loss. Multi-GPU, FSDP and DeepSpeed come from the
Trainer / ``accelerate launch``. ``masks`` keep removed structures at zero during training (a
callback re-applies them after every optimizer step), so a masked model can be trained before its
structures are physically removed.

With a ``teacher_cache`` (``optimum_prune.teacher_cache``: the teacher's logits computed once, on disk) a step
runs the student only: each batch carries its windows' indices and the loss reads the teacher's side from the
cache. A full cache gives exactly the live loss; a top-k cache gives ``topk_kd_loss`` (docs/healing.md).
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

if TYPE_CHECKING:
    from .teacher_cache import TeacherCache

logger = logging.get_logger(__name__)

Masks = list[tuple[nn.Parameter, torch.Tensor]]
"""(parameter, boolean keep-mask of the same shape)."""


WINDOW_INDEX = "window_index"
"""The batch key holding each example's window number (the row of the teacher cache)."""


class TokenWindows(torch.utils.data.Dataset):
    """Fixed-length token windows [n, seq_len] as causal-LM training examples (``with_index``: + window number)."""

    def __init__(self, input_ids: torch.Tensor, with_index: bool = False) -> None:
        self.input_ids = input_ids
        self.with_index = with_index

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[i]
        item = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        if self.with_index:
            item[WINDOW_INDEX] = torch.tensor(i)
        return item


def kd_loss(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T²·mean over positions of KL(p_T ‖ q_T), p_T = softmax(teacher / T), q_T = softmax(student / T).

    ``teacher_logprobs`` may be the teacher's logits or its log-probs (softmax is shift-invariant).
    """
    T = temperature
    student = torch.log_softmax(student_logits.float() / T, dim=-1)
    teacher = torch.log_softmax(teacher_logprobs.float() / T, dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean() * T * T


def topk_kd_loss(student_logits: torch.Tensor, top_logits: torch.Tensor, top_indices: torch.Tensor,
                 lse: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T²·mean over positions of the KL between teacher and student reduced to the teacher's top-k tokens + a rest.

    With S the teacher's top-k tokens, z its logits, ``lse`` = log Σ_v exp(z_v / T) over the whole vocabulary:
    p_i = exp(z_i / T − lse) for i in S and p_rest = 1 − Σ_S p_i (exact: ``lse`` covers every token);
    q = softmax(student / T), q_rest = Σ_{v∉S} q_v (a log-sum-exp over the complement, not 1 − Σ_S q_i).
    Loss = Σ_S p_i (log p_i − log q_i) + p_rest (log p_rest − log q_rest): the KL of the two distributions
    coarsened to S ∪ {rest}, a lower bound of the full KL that equals it when S is the whole vocabulary.
    """
    T = temperature
    logq = torch.log_softmax(student_logits.float() / T, dim=-1)
    idx = top_indices.long()
    logp = top_logits.double() / T - lse.double().unsqueeze(-1)
    kl = (logp.exp() * (logp - logq.gather(-1, idx).double())).sum(-1)
    if idx.shape[-1] < logq.shape[-1]:  # a complement exists: add the rest bucket
        p_rest = (1.0 - logp.exp().sum(-1)).clamp(min=0.0)
        log_p_rest = torch.where(p_rest > 0, p_rest.clamp(min=1e-300).log(), torch.zeros_like(p_rest))
        outside = torch.ones_like(logq, dtype=torch.bool).scatter(-1, idx, False)
        log_q_rest = logq.masked_fill(~outside, float("-inf")).logsumexp(-1).double()
        kl = kl + p_rest * (log_p_rest - log_q_rest)
    return kl.mean().float() * T * T


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
                 teacher_cache: TeacherCache | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha (weight of the distillation loss) must be in [0, 1], got {alpha}")
        if alpha > 0 and teacher is None and teacher_cache is None:
            raise ValueError("distillation (alpha > 0) needs the dense teacher model or its teacher_cache")
        if teacher_cache is not None:
            teacher_cache.check_temperature(temperature)
            teacher = None  # the cache replaces the live teacher: one student forward and backward per step
        self.teacher = teacher.eval().requires_grad_(False).to(self.args.device) if teacher is not None else None
        self.teacher_cache = teacher_cache
        self.alpha = alpha
        self.temperature = temperature

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the window index in the batches (the model's forward does not take it; the loss does)."""
        super()._set_signature_columns_if_needed()
        if WINDOW_INDEX not in self._signature_columns:
            self._signature_columns.append(WINDOW_INDEX)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        window_index = inputs.pop(WINDOW_INDEX, None)
        outputs = model(**inputs)
        loss = outputs.loss if self.alpha < 1.0 else None
        if self.alpha > 0:
            kl = self.distillation_loss(outputs.logits, inputs, window_index)
            loss = kl if loss is None else self.alpha * kl + (1 - self.alpha) * loss
        return (loss, outputs) if return_outputs else loss

    def distillation_loss(self, student_logits: torch.Tensor, inputs: dict[str, torch.Tensor],
                          window_index: torch.Tensor | None) -> torch.Tensor:
        """The KD term: from the live teacher, or from the cache rows of the batch's windows."""
        if self.teacher_cache is None:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=inputs["input_ids"],
                                              attention_mask=inputs.get("attention_mask")).logits
            return kd_loss(student_logits, teacher_logits, self.temperature)
        if window_index is None:
            raise ValueError(f"a teacher cache needs the batch's window indices: build the dataset as "
                             f"TokenWindows(ids, with_index=True) (key {WINDOW_INDEX!r})")
        rows = self.teacher_cache.rows(window_index, student_logits.device, inputs["input_ids"])
        if rows.logprobs is not None:
            return kd_loss(student_logits, rows.logprobs, self.temperature)
        return topk_kd_loss(student_logits, rows.values, rows.indices, rows.lse, self.temperature)


def finetune(model: nn.Module, train_ids: torch.Tensor, *, teacher: nn.Module | None = None, alpha: float = 1.0,
             temperature: float = 1.0, teacher_cache: TeacherCache | None = None, masks: Masks | None = None,
             max_steps: int = 100,
             learning_rate: float = 5e-5, per_device_train_batch_size: int = 4, output_dir: str | None = None,
             resume_from_checkpoint: str | bool | None = None, **training_args: Any) -> dict[str, Any]:
    """Train ``model`` in place on token windows; returns the Trainer's final metrics plus ``global_step``.

    Extra keyword arguments go to ``TrainingArguments`` (gradient_checkpointing, bf16, warmup_steps,
    gradient_accumulation_steps, ...). Nothing is saved unless ``save_strategy`` asks for it;
    ``resume_from_checkpoint`` (True: the last checkpoint in ``output_dir``, or a path) goes to ``Trainer.train``.
    ``teacher_cache`` (built on ``train_ids``) replaces the live ``teacher``.
    """
    if teacher_cache is not None and teacher_cache.num_windows != train_ids.shape[0]:
        raise ValueError(f"the teacher cache holds {teacher_cache.num_windows} windows, the training data "
                         f"{train_ids.shape[0]}: build the cache on these train_ids")
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
        trainer = DistillationTrainer(model=model, args=args,
                                      train_dataset=TokenWindows(train_ids, with_index=teacher_cache is not None),
                                      teacher=teacher, alpha=alpha, temperature=temperature,
                                      teacher_cache=teacher_cache,
                                      callbacks=[_ApplyMasks(masks)] if masks else None)
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        model.train(was_training)
    if masks:
        apply_masks(masks)
    return {**result.metrics, "global_step": result.global_step}
