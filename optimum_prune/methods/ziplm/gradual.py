"""Gradual ZipLM: prune in steps of growing speedup, fine-tuning with distillation between steps.

The model keeps its dense shapes during the run: removed heads / neurons / sublayers are zeroed
(masks kept at zero through training), so each step's level database is built on the fine-tuned
model with the dense indexing, and a step may only remove MORE than the previous one (levels whose
removed set does not contain the previous removals are excluded from the DP). The structures are
physically removed when a target is reached.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ...distill import finetune
from ...engine.sequential import SequentialOptions
from ...modeling.surgery import apply_structure
from ...engine.structure.masking import structure_masks
from ...engine.structure.database import build_database
from ...evaluation.scorer import CalibrationScorer
from .method import ZipLMOutcome, ZipLMSettings, sensitivity
from ...engine.structure.search import (Item, Stitcher, budget_for, check_targets, chosen_levels, items_from, predicted_ms,
                                       refine)

logger = logging.get_logger(__name__)


@dataclass
class FinetuneSettings:
    """What runs between pruning steps (``prune(..., finetune=dict(...))``)."""

    train_ids: torch.Tensor
    max_steps: int = 100
    """Optimizer steps after EACH pruning step."""
    stages: int = 3
    """Pruning steps up to a single target (speedups spaced geometrically); a list of targets uses its own."""
    alpha: float = 1.0
    """Weight of the token-level distillation loss (1: distillation only; 0: plain LM loss)."""
    temperature: float = 1.0
    teacher_cache: Any = None
    """A ``TeacherCache`` of the dense model on ``train_ids``: every stage reads it instead of running the teacher."""
    training_args: dict[str, Any] = field(default_factory=dict)
    """Further ``TrainingArguments`` (learning_rate, per_device_train_batch_size, gradient_checkpointing, ...)."""


def stage_targets(targets: list[float], stages: int) -> list[float]:
    """One target: ``stages`` speedups spaced geometrically up to it; several: the sorted targets themselves."""
    if len(targets) > 1:
        return sorted(targets)
    target = targets[0]
    stages = max(1, stages)
    return [target ** ((i + 1) / stages) for i in range(stages)]


def _restrict(items: list[Item], database, previous: dict[tuple[int, str], set[int]]) -> list[Item]:
    """Items whose levels all contain the previous step's removals (a step only removes more)."""
    out = []
    for item in items:
        entry = database.layers[item.layer]
        sub = entry.attention if item.kind == "attention" else entry.mlp
        before = previous.get((item.layer, item.kind), set())
        keep = [j for j, key in enumerate(item.keys) if before <= set(sub.levels[key].removed)]
        out.append(replace(item, keys=tuple(item.keys[j] for j in keep), costs=tuple(item.costs[j] for j in keep),
                           losses=tuple(item.losses[j] for j in keep)))
    return out


def run_gradual(model: nn.Module, input_ids: torch.Tensor, targets: list[float], table, tuning: FinetuneSettings,
                *, settings: ZipLMSettings | None = None, options: SequentialOptions | None = None
                ) -> dict[float, ZipLMOutcome]:
    """Gradual ZipLM from the dense ``model`` (left unchanged, it is the teacher); one outcome per target."""
    settings = settings or ZipLMSettings()
    options = options or SequentialOptions()
    check_targets(targets, table)
    stages = stage_targets(targets, tuning.stages)
    student = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(settings.seed)
    score_ids = input_ids[torch.randperm(input_ids.shape[0], generator=generator)[: settings.search_samples]]
    scorer = (CalibrationScorer(model, score_ids, settings.top_k, options.batch_size)
              if settings.search_iterations else None)
    previous: dict[tuple[int, str], set[int]] = {}
    outcomes: dict[float, ZipLMOutcome] = {}
    history = []
    for step, stage in enumerate(stages):
        database = build_database(student, input_ids, mlp_kept=sorted(table.mlp), dampening=settings.dampening,
                                  options=options, obs_steps=settings.obs_steps,
                                  spill_above=settings.database_memory)
        items = _restrict(items_from(database, table), database, previous)
        budget = budget_for(stage, items, table)
        stitcher = Stitcher(student, database)

        def score(picked: list[int]) -> float:
            candidate = stitcher.build(items, picked, physical=False)
            return scorer(candidate)

        coefficients = sensitivity(student, items, stitcher, database, input_ids, settings, options)
        result = refine(items, budget, score, iterations=settings.search_iterations, seed=settings.seed + step,
                        resolution=settings.resolution, initial=coefficients)
        structure = stitcher.structure(items, result.picked)
        student = stitcher.build(items, result.picked, physical=False)
        masks = structure_masks(student, structure)
        before = scorer(student) if scorer is not None else None
        metrics = finetune(student, tuning.train_ids, teacher=model, alpha=tuning.alpha,
                           temperature=tuning.temperature, teacher_cache=tuning.teacher_cache, masks=masks,
                           max_steps=tuning.max_steps,
                           **tuning.training_args)
        after = scorer(student) if scorer is not None else None
        previous = {(item.layer, item.kind): set(stitcher._sub(item).levels[item.keys[j]].removed)
                    for item, j in zip(items, result.picked)}
        predicted = table.dense_ms / predicted_ms(items, result.picked, table)
        dims = database.dims
        removed = {"heads": sum(len(v) for v in structure.remove_heads.values())
                   + dims.num_heads * len(structure.drop_attention),
                   "neurons": sum(len(v) for v in structure.remove_neurons.values())
                   + dims.intermediate_size * len(structure.drop_mlp)}
        history.append({"stage_speedup": round(stage, 4), "predicted_speedup": round(predicted, 4), "removed": removed,
                        "score_before_finetune": before, "score_after_finetune": after,
                        "train_loss": metrics.get("train_loss")})
        logger.info("gradual ZipLM step %d/%d (%.3fx): score %s -> %s after fine-tuning", step + 1, len(stages),
                    stage, before, after)
        if any(abs(stage - t) < 1e-9 for t in targets):
            target = next(t for t in targets if abs(stage - t) < 1e-9)
            final = copy.deepcopy(student)
            apply_structure(final, copy.deepcopy(structure))
            search = {"method": "ziplm-gradual", "target_speedup": target, "predicted_speedup": round(predicted, 4),
                      "score": after, "score_metric": f"top-{settings.top_k} KL" if scorer is not None and
                      scorer.causal else "relative output error", "search_iterations": settings.search_iterations,
                      "finetune_steps_per_stage": tuning.max_steps, "alpha": tuning.alpha, "stages": list(history),
                      "seed": settings.seed}
            outcomes[target] = ZipLMOutcome(target, final, structure, chosen_levels(items, result.picked), predicted,
                                            sum(i.losses[j] for i, j in zip(items, result.picked)), after, search)
    return outcomes
