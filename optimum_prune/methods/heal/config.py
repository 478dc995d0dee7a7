"""Settings of healing: continued causal-LM training of a pruned model (plain LM loss or distillation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..base import ConfigError, MethodConfig, check_positive, option
from ..common import json_object
from .lora import LoRAError, lora_settings


@dataclass
class HealConfig(MethodConfig):
    """Train all remaining weights on generic text through the transformers Trainer (LayerChop's healing)."""

    name: ClassVar[str] = "heal"
    kind: ClassVar[str] = "heal"

    train_dataset: Any = option(None, "generic text: a text file, strings, a datasets.Dataset, a dataset name "
                                      "(e.g. fineweb-edu), 'generated' / 'generated:N' (N windows of text sampled "
                                      "from the dense model, docs/healing.md) or token ids [n, seq_len]",
                                aliases=("--train-data",))
    max_steps: int = option(1000, "optimizer steps")
    learning_rate: float = option(2e-5, "learning rate")
    per_device_train_batch_size: int = option(4, "windows per device and step", aliases=("--batch-size",))
    gradient_accumulation_steps: int = option(1, "steps whose gradients are summed before an update")
    seq_len: int = option(512, "tokens per training window")
    num_samples: int = option(None, "training windows (default: enough for max_steps)")
    seed: int = option(0, "seed of the window sampling and of the Trainer")
    distill_from: Any = option(None, "the dense model (or its Pruner, or a path / Hub id) to distill from instead "
                                     "of the plain LM loss")
    alpha: float = option(None, "weight of the distillation loss (default 1 with distill_from, else 0)")
    teacher_cache: Any = option(None, "with distill_from: a directory for the teacher's logits on the training "
                                      "windows, computed once and reused (then a step runs the student only); "
                                      "a cache of another teacher or other windows is refused")
    teacher_top_k: int = option(100, "with teacher_cache: keep the teacher's top-k logits and log-sum-exp per "
                                     "token (docs/healing.md); 0 keeps the full log-probs (vocab floats per token)")
    output_dir: Any = option(None, "keep Trainer checkpoints here (every save_steps)", aliases=("--checkpoint-dir",))
    save_steps: int = option(None, "with output_dir: steps between checkpoints (default 500)")
    resume_from_checkpoint: Any = option(None, "True: continue from the last checkpoint in output_dir; or a "
                                               "checkpoint path", flag="--resume", const=True)
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory)")
    bf16: bool = option(False, "bf16 mixed precision")
    training_args: dict = option(None, "further TrainingArguments (JSON), e.g. {\"warmup_steps\": 10}",
                                 factory=dict, parse=json_object)
    lora: dict = option(None, "train peft LoRA adapters (merged back before saving) instead of all weights (JSON), "
                              "e.g. {\"r\": 16, \"alpha\": 32, \"dropout\": 0.05, \"target_modules\": [\"q_proj\", "
                              "\"v_proj\"]}; target_modules default: every block Linear", parse=json_object)

    def validate(self) -> None:
        if self.train_dataset is None:
            raise ConfigError("heal trains on generic text: pass train_dataset= a text file, strings, a "
                              "datasets.Dataset, a dataset name (e.g. 'fineweb-edu') or token ids")
        check_positive(self, "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "seq_len")
        check_positive(self, "learning_rate", integer=False)
        self.training_args = dict(self.training_args or {})
        if self.teacher_cache is not None and self.distill_from is None:
            raise ConfigError("teacher_cache keeps the logits of the model you distill from: pass distill_from= "
                              "(the dense model), or drop teacher_cache")
        if self.teacher_top_k is not None and self.teacher_top_k < 0:
            raise ConfigError(f"teacher_top_k must be >= 0 (0: full log-probs), got {self.teacher_top_k}")
        try:
            self.lora = lora_settings(self.lora)
        except LoRAError as err:
            raise ConfigError(str(err)) from None

    def trainer_arguments(self) -> dict[str, Any]:
        """The TrainingArguments beyond the named ones: only what differs from the Trainer's defaults."""
        args = dict(self.training_args)
        if self.gradient_accumulation_steps != 1:
            args["gradient_accumulation_steps"] = self.gradient_accumulation_steps
        if self.bf16:
            args["bf16"] = True
        if self.output_dir is not None and self.save_steps is not None:
            args.update(save_strategy="steps", save_steps=self.save_steps)
        args.setdefault("seed", self.seed)
        return args
