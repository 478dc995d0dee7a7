"""Healing (LayerChop's second step): continued causal-LM training of all remaining weights, or of LoRA
adapters merged back afterwards (``lora.py``).

Ordinary training through the transformers Trainer (``optimum_prune.distill.finetune``), with the plain
LM loss or token-level distillation from the dense model; multi-GPU, FSDP and DeepSpeed come from
``accelerate launch``. A sparsified model keeps its zeros (keep-masks re-applied after every step).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ...distill import Masks, finetune
from ...engine.layers import linear_groups
from ...loading import task_of_model
from ...modeling.adapters import get_adapter
from ...modeling.pruning_config import PruningConfig
from .lora import LoRAError, lora_settings, merge, target_modules, trainable_parameters, wrap
from .lora import record as lora_record

logger = logging.get_logger(__name__)


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
         output_dir: str | None = None, gradient_checkpointing: bool = False, lora: dict[str, Any] | None = None,
         **training_args: Any) -> dict[str, Any]:
    """Train all weights of ``model`` in place on token windows (plain LM loss, or distillation from ``teacher``).

    Returns the Trainer's metrics plus ``global_step``. ``output_dir`` keeps Trainer checkpoints
    (``save_strategy="steps"`` by default there, ``save_steps``); ``resume_from_checkpoint=True`` continues
    from the last one in ``output_dir``, or pass a checkpoint path. ``lora`` (settings, see ``lora.DEFAULTS``)
    trains peft LoRA adapters instead of all weights and merges them back (metrics gain ``lora``).
    """
    alpha = check_heal(model, teacher, alpha, resume_from_checkpoint, output_dir, lora=lora, sparse=bool(masks))
    if output_dir is not None:
        training_args.setdefault("save_strategy", "steps")
    if gradient_checkpointing:
        training_args["gradient_checkpointing"] = True
    use_cache = getattr(model.config, "use_cache", None)
    trained, settings = model, lora_settings(lora)
    if settings is not None:
        requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        with torch.random.fork_rng(devices=[]):  # the adapters' random init is seeded like the rest of the run
            torch.manual_seed(training_args.get("seed", 0))
            trained, adapted = wrap(model, settings)
        trainable = trainable_parameters(trained)
    metrics = finetune(trained, train_ids, teacher=teacher, alpha=alpha, temperature=temperature, masks=masks,
                       max_steps=max_steps, learning_rate=learning_rate,
                       per_device_train_batch_size=per_device_train_batch_size, output_dir=output_dir,
                       resume_from_checkpoint=resume_from_checkpoint, **training_args)
    if settings is not None:
        merge(trained, requires_grad)
        metrics["lora"] = lora_record(settings, adapted, trainable)
    if gradient_checkpointing:
        if getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_disable()
        model.disable_input_require_grads()  # the Trainer's hook on the embeddings leaves with the checkpointing
    if use_cache is not None:
        model.config.use_cache = use_cache
    logger.info("healed for %s steps: train loss %.4f", metrics.get("global_step"),
                metrics.get("train_loss", float("nan")))
    return metrics


def check_heal(model: nn.Module, teacher: nn.Module | None, alpha: float | None,
               resume_from_checkpoint: str | bool | None, output_dir: Any, *, lora: dict[str, Any] | None = None,
               sparse: bool = False) -> float:
    """Everything about a healing request that can fail before data is read; returns the distillation weight."""
    check_healable(model)
    check_teacher(model, teacher)
    settings = lora_settings(lora)
    if settings is not None:
        if sparse:
            raise LoRAError("LoRA healing would fill a sparsified model's zeros: merged adapters are a dense low-rank "
                            "update of every adapted weight. Heal sparse models without lora= (full fine-tuning "
                            "keeps the zeros with keep-masks)")
        target_modules(model, settings["target_modules"])
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
    if "lora" in metrics:
        record["heal_lora"] = metrics["lora"]
    return record
