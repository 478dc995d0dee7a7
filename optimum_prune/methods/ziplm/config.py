"""Settings of ZipLM (arXiv 2302.04089): structured pruning of heads, neurons and sublayers to measured speedups."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

from ..base import ConfigBase, ConfigError, MethodConfig, RunConfig, check_positive, option, with_training_args
from ..common import is_number, json_object

ENVIRONMENT = "optimum_prune.evaluation.environment:InferenceEnvironment"
"""The latency environment's fields become ``--latency-*`` flags."""

ENVIRONMENT_HELP = {
    "device": "where the speedup is measured: cpu, cuda or cuda:N (default: the compute device, else the model's)",
    "dtype": "float32, float16 or bfloat16 (default: the model's); with engine llama.cpp the GGUF type: f16 "
             "(default), f32, bf16, Q8_0, Q4_K_M, ...",
    "batch_size": "sequences per forward (default 1)",
    "seq_len": "prefill: tokens per sequence; decode: KV-cache length (default 512)",
    "mode": "prefill (one forward over seq_len tokens) or decode (one token after seq_len cached); default prefill",
    "threads": "CPU threads while timing (default: torch's current count; llama.cpp: half the CPUs)",
    "engine": "torch (default) or llama.cpp: time the GGUF exports in llama.cpp (tables, speedups)",
    "logits_to_keep": "prefill: the LM head on the last N positions only (1: time to first token, as generate() "
                      "and llama.cpp do); 0: every position (torch's default); llama.cpp: 1 only",
}
ENVIRONMENT_ALIASES = {"threads": ("--threads",)}


@dataclass
class FinetuneConfig(ConfigBase):
    """Gradual ZipLM: pruning steps alternate with token-level distillation from the dense model (Trainer)."""

    train_dataset: Any = option(None, "text to fine-tune on between pruning steps: a text file, a dataset name, "
                                      "strings, a datasets.Dataset or token ids", aliases=("--finetune-data",))
    max_steps: int = option(100, "optimizer steps after each pruning step", aliases=("--finetune-steps",))
    stages: int = option(3, "pruning steps up to a single target (speedups spaced geometrically)",
                         aliases=("--stages",))
    alpha: float = option(1.0, "weight of the distillation loss (1: distillation only; 0: plain LM loss)")
    temperature: float = option(1.0, "distillation temperature")
    teacher_cache: Any = option(None, "a directory for the dense model's logits on the fine-tuning windows, computed "
                                      "once and read by every stage (a step then runs the student only)")
    teacher_top_k: int = option(100, "with teacher_cache: the teacher's top-k logits + log-sum-exp per token "
                                     "(docs/healing.md); 0: full log-probs")
    learning_rate: float = option(5e-5, "fine-tuning learning rate", aliases=("--learning-rate",))
    per_device_train_batch_size: int = option(4, "windows per device and optimizer step")
    num_samples: int = option(None, "training windows (default: max_steps x batch size)")
    seq_len: int = option(None, "tokens per training window (default: the calibration seq_len)")
    training_args: dict = option(None, "further TrainingArguments (JSON), e.g. {\"warmup_steps\": 10}",
                                 factory=dict, parse=json_object)

    def validate(self) -> None:
        if self.train_dataset is None:
            raise ConfigError("gradual ZipLM fine-tunes between pruning steps: pass finetune=dict(train_dataset=..., "
                              "max_steps=...) with a text file, strings, a datasets.Dataset or token ids")
        check_positive(self, "max_steps", "stages", "per_device_train_batch_size", label="finetune ")
        self.training_args = dict(self.training_args or {})

    @classmethod
    def of(cls, value: Any) -> "FinetuneConfig | None":
        """From a ``FinetuneConfig``, a dict of its fields (unknown keys are TrainingArguments) or None."""
        if value is None or isinstance(value, cls):
            return value
        return cls(**with_training_args(cls, value))


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "fast": {
        "method": {"latency": {"seq_len": 128}, "latency_mlp_levels": 8, "latency_repeats": 5,
                   "search_iterations": 8, "search_samples": 2, "probe_samples": 1, "speedup_rounds": 3,
                   "speedup_tolerance": 0.05,
                   "database_steps": 128, "dampening": 0.1},
        "run": {"num_samples": 32, "seq_len": 256},
    },
}
"""Named defaults: ``method`` fields of ZipLMConfig and ``run`` fields of RunConfig."""
FAST_SUMMARY = ("32 calibration windows of 256 tokens, a latency table of 8 FFN widths timed 5 times at 128 "
                "tokens, 128 OBS steps per FFN, Hessian dampening 0.1 (fewer tokens, steadier inverses), "
                "sensitivity probes on 1 window, 8 refinement steps on 2 windows, 3 timing rounds per speedup "
                "check, re-aiming only when it misses by over 5 percent (3 rounds vary about that much on a "
                "shared CPU)")


@dataclass
class ZipLMConfig(MethodConfig):
    """Remove heads, FFN neurons and sublayers to meet target speedups measured in your inference environment."""

    name: ClassVar[str] = "ziplm"

    target_speedup: Any = option(None, "one speedup (1.5 = 1.5x faster), or a list for one model per target "
                                       "(CLI: 1.25 1.5 2; several targets write OUTPUT/<target>x)")
    latency: Any = option(None, "the inference environment the speedup is measured in: an InferenceEnvironment or "
                                "its fields (device, dtype, batch_size, seq_len, mode, threads, engine); default: "
                                "this device and dtype, batch 1 x 512 tokens, prefill, in PyTorch", nested=ENVIRONMENT,
                          prefix="latency-", nested_help=ENVIRONMENT_HELP, nested_aliases=ENVIRONMENT_ALIASES)
    latency_table: Any = option(None, "a latency table (or its JSON file from `optimum-prune latency`) instead "
                                      "of measuring one here")
    remeasure_latency: bool = option(False, "measure the latency table again even when a cached one matches")
    search_iterations: int = option(30, "randomized refinement steps per target (0: the DP's choice on OBS "
                                        "losses alone)")
    search_samples: int = option(8, "calibration windows that score the refinement's candidates")
    probe_samples: int = option(4, "calibration windows of the per-sublayer sensitivity probes (0: no probes, the "
                                   "OBS losses alone)")
    measure_speedup: bool = option(True, "time the pruned model against the dense one and record the speedup")
    speedup_tolerance: float = option(0.03, "re-aim the search while the measured speedup misses by more than this")
    speedup_rounds: int = option(5, "paired rounds (dense, then pruned) of each speedup measurement")
    strict: bool = option(False, "raise SpeedupMissError instead of warning when the measured speedup still misses "
                                 "a target by more than speedup_tolerance after re-aiming")
    dampening: float = option(0.01, "Hessian dampening, as a fraction of the mean diagonal")
    database_steps: int = option(2048, "greedy OBS steps per FFN in the level database (a wider FFN removes "
                                       "several least-loss neurons per step); fewer steps build it faster")
    database_memory: Any = option(None, "keep at most this much of the level database's Hessians in memory (bytes "
                                        "or '4GB'; they are fp32, in_features² per sublayer) and memory-map the "
                                        "rest from temporary files; 0: all on disk (default: all in memory)")
    finetune: Any = option(None, "gradual ZipLM: a FinetuneConfig or its fields (train_dataset, max_steps, stages, "
                                 "...); None: one-shot", nested="optimum_prune.methods.ziplm.config:FinetuneConfig",
                           prefix="finetune-")
    latency_mlp_levels: int = option(None, "FFN widths per block that the latency table times, and so the FFN levels "
                                           "ZipLM chooses from (default: 16)")
    latency_repeats: int = option(10, "timed runs per level of the latency table (their median is kept)")
    preset: str = option(None, "fast: defaults sized for a first try on a CPU (minutes for a 135M model): "
                               f"{FAST_SUMMARY}; it fills only the settings left at their defaults", choices=tuple(PRESETS))

    def run_settings(self, run: RunConfig) -> RunConfig:
        """The preset's calibration size where ``run`` keeps the defaults."""
        if self.preset is None:
            return run
        defaults = RunConfig()
        changes = {k: v for k, v in PRESETS[self.preset]["run"].items() if getattr(run, k) == getattr(defaults, k)}
        return replace(run, **changes) if changes else run

    def _apply_preset(self) -> None:
        """Fill the fields still at their defaults with the preset's values."""
        if self.preset is None:
            return
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; presets: {', '.join(PRESETS)}")
        defaults = {f.name: f.default for f in fields(self)}
        for name, value in PRESETS[self.preset]["method"].items():
            if name == "latency":
                if self.latency is None:
                    self.latency = dict(value)
                elif isinstance(self.latency, dict):
                    self.latency = {**value, **self.latency}
            elif getattr(self, name) == defaults[name]:
                setattr(self, name, value)

    def validate(self) -> None:
        self._apply_preset()
        target = self.target_speedup
        if target is None:
            raise ConfigError("ZipLM prunes to a target speedup: pass target_speedup=1.5 (or a list, e.g. "
                              "[1.25, 1.5, 2.0], for one model per target)")
        if isinstance(target, (list, tuple)) and len(target) == 1 and not isinstance(target, list):
            target = list(target)
        targets = target if isinstance(target, (list, tuple)) else [target]
        if not targets or any(not is_number(t) or not t > 0 for t in targets):
            raise ConfigError(f"target speedups must be positive numbers (1.5 = 1.5x faster), got {target!r}")
        self.target_speedup = [float(t) for t in target] if isinstance(target, (list, tuple)) else float(target)
        if self.latency is not None and not isinstance(self.latency, dict) and not hasattr(self.latency, "key"):
            raise ConfigError("latency must be an InferenceEnvironment or a dict of its fields (device, dtype, "
                              f"batch_size, seq_len, mode, threads, engine), got {self.latency!r}")
        if isinstance(self.latency, dict) and str(self.latency.get("engine", "torch")).lower() != "torch":
            from ...evaluation.environment import InferenceEnvironment

            try:  # a llama.cpp environment needs nothing from the model: check it before the model loads
                InferenceEnvironment(**self.latency)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"latency: {err}") from None
        if isinstance(self.latency_table, (str, os.PathLike)) and not os.path.isfile(self.latency_table):
            raise ConfigError(f"latency_table {os.fspath(self.latency_table)!r} is not a file: give the JSON that "
                              "`optimum-prune latency --output ...` wrote, or leave it out to measure one here")
        self.finetune = FinetuneConfig.of(self.finetune)
        check_positive(self, "dampening", integer=False)
        check_positive(self, "latency_repeats", "speedup_rounds", "database_steps")
        if self.database_memory is not None:
            self.database_memory_bytes  # a bad size fails here, before any work
        if isinstance(self.probe_samples, bool) or not isinstance(self.probe_samples, int) or self.probe_samples < 0:
            raise ConfigError(f"probe_samples must be an integer >= 0, got {self.probe_samples!r}")
        if self.latency_mlp_levels is not None:
            check_positive(self, "latency_mlp_levels")

    @property
    def database_memory_bytes(self) -> int | None:
        """``database_memory`` in bytes (None: the whole level database in memory)."""
        from ...sizes import parse_memory

        try:
            return None if self.database_memory is None else parse_memory(self.database_memory, zero=True)
        except ValueError as err:
            raise ConfigError(f"database_memory: {err}") from None

    @property
    def targets(self) -> list[float]:
        t = self.target_speedup
        return list(t) if isinstance(t, list) else [t]
