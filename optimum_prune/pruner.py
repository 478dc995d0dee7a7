"""The Pruner: load a model, remove structures or weights, save or push a smaller, reloadable checkpoint."""

from __future__ import annotations

import os
import time
from typing import Any

from transformers import PreTrainedModel
from transformers.utils import logging

from .card import build_model_card
from .calibration import load_calibration
from .engine.compress import CompressionPlan, compress_model, uniform
from .engine.obs import METHODS, PruneSpec
from .engine.schedule import SCHEDULES, build_schedule
from .engine.layers import original_layer_indices, zero_fraction
from . import layerchop
from .loading import TASKS, task_of_model
from .modeling.adapters import base_model_type
from .modeling.modeling_pruned import PrunedModelMixin, pruned_config_class, pruned_model_class
from .modeling.pruning_config import PruningConfig
from .modeling.surgery import apply_structure, current_structure
from .report import PruningSummary, summarize
from .session import CompressionSession, RunOptions
from .evopress import EvoPressSettings, search_depth, search_structure
from .evopress_levels import level_grid, run_level_search
from .ziplm.family import ZipLMFamily
from .ziplm.latency import (InferenceEnvironment, LatencyTable, SpeedupMeasurement, get_latency_table, measure_speedup,
                            model_signature)
from .ziplm.gradual import FinetuneSettings, run_gradual
from .ziplm.method import ZipLMSettings, run_ziplm
from .ziplm.database import build_database
from .ziplm.method import _levels
from .ziplm.search import Stitcher, check_targets

logger = logging.get_logger(__name__)


class Pruner(CompressionSession):
    """Holds a model (and its tokenizer) and prunes it in place.

    >>> pruner = Pruner.from_pretrained("HuggingFaceTB/SmolLM2-135M")
    >>> model = pruner.apply(PruningConfig(remove_heads={0: [0, 1, 2]}, drop_layers=[7]))   # structures
    >>> model = pruner.prune(method="sparsegpt", sparsity=0.7, schedule="hessian-kmeans")   # weights
    >>> pruner.save_pretrained("smollm2-pruned")
    """

    ziplm_database = None
    """The level database of the last ZipLM run; a later run with the same calibration and grid reuses it."""
    _ziplm_key: tuple | None = None

    def prune(
        self,
        method: str | None = None,
        *,
        target_speedup: float | list[float] | None = None,
        sparsity: float | dict[int, float] | None = None,
        n_m: str | tuple[int, int] | None = None,
        latency: InferenceEnvironment | dict[str, Any] | None = None,
        latency_table: LatencyTable | str | os.PathLike | None = None,
        search_iterations: int = 30,
        search_samples: int = 8,
        measure_speedup: bool = True,
        speedup_tolerance: float = 0.03,
        finetune: dict[str, Any] | None = None,
        schedule: str = "uniform",
        schedule_options: dict[str, Any] | None = None,
        calibration: Any = None,
        num_samples: int = 128,
        seq_len: int = 512,
        seed: int = 0,
        batch_size: int = 8,
        device: str | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        dampening: float = 0.01,
        blocksize: int = 128,
        progress: bool = True,
        num_layers: int | None = None,
        strategy: str = "angular",
        strategy_options: dict[str, Any] | None = None,
        target: str | None = None,
        drop_ratio: float | None = None,
        evopress: EvoPressSettings | dict[str, Any] | None = None,
    ) -> PreTrainedModel | ZipLMFamily:
        """Prune with ZipLM to measured speedups, or sparsify with SparseGPT, Wanda or magnitude.

        ``target_speedup`` (ZipLM, the default method when it is given): one target returns the pruned
        model (held by this Pruner); a list returns a ``ZipLMFamily`` {target: Pruner}, this Pruner's
        model staying dense. Speedups refer to a latency table measured in ``latency`` (an
        ``InferenceEnvironment`` or its fields as a dict; default: this device and dtype, batch 1 x 512
        tokens, prefill), cached and reused; or pass ``latency_table`` (a table or its JSON file). The
        achieved speedup is measured after pruning (``measure_speedup``) and recorded; a miss larger than
        ``speedup_tolerance`` re-aims the search at a corrected target (up to 3 times). ``finetune``
        switches to gradual ZipLM: pruning steps alternate with fine-tuning by token-level distillation
        from the dense model (transformers Trainer): ``dict(train_dataset=<text file, strings, Dataset
        or token ids>, max_steps=100, stages=3, alpha=1.0, learning_rate=..., num_samples=..., ...)``.

        ``sparsity`` is one fraction or {original layer index: fraction}; ``n_m="2:4"`` asks for N:M
        semi-structured masks instead. ``schedule`` ("uniform", "hessian-kmeans", "owl") spreads one
        target over the layers (budget met exactly). Calibration: a dataset name, a text file, a list
        of strings, a ``datasets.Dataset`` or token ids; by default WikiText-2, or text sampled from the
        model when offline. ``checkpoint_dir`` makes the run resumable.

        ``method="layerchop"`` removes ``num_layers`` whole blocks chosen by ``strategy``: "angular" (the
        contiguous window whose input and output streams are closest), "block_influence" (ShortGPT),
        "last" (the blocks before the final one; no calibration) or "evopress" (``strategy_options`` go to
        its search); heal afterwards with ``heal``.

        ``method="evopress", target="depth"`` searches which attention and which MLP sublayers to drop
        (independently: ``drop_ratio`` or ``num_layers`` blocks' worth of each) by EvoPress, minimizing
        KL to the dense model on the calibration windows; ``evopress`` holds the search settings
        (``EvoPressSettings`` or its fields; ``state_file`` makes the search resumable).
        ``target="sparsity"`` gives every block Linear its own SparseGPT sparsity (levels 5% apart, average
        exactly ``sparsity``), searched over a level store built once (``evopress=dict(level_store=dir)``).
        """
        method = method or ("ziplm" if target_speedup is not None else
                            "layerchop" if num_layers is not None else "sparsegpt")
        options = RunOptions(calibration, num_samples, seq_len, seed, batch_size, device, checkpoint_dir, progress)
        if method == "ziplm":
            if target_speedup is None:
                raise ValueError("ZipLM prunes to a target speedup: pass target_speedup=1.5 (or a list, e.g. "
                                 "[1.25, 1.5, 2.0], for one model per target)")
            if sparsity is not None or n_m is not None:
                raise ValueError("ZipLM removes whole heads and neurons to meet `target_speedup`; `sparsity` and "
                                 "`n_m` belong to method='sparsegpt' / 'wanda' / 'magnitude'")
            return self._ziplm(target_speedup, options, latency=latency, latency_table=latency_table,
                               settings=ZipLMSettings(search_iterations=search_iterations,
                                                      search_samples=search_samples, dampening=dampening, seed=seed,
                                                      speedup_tolerance=speedup_tolerance),
                               measure=measure_speedup, finetune=finetune)
        if method == "layerchop":
            stray = [name for name, value in (("target_speedup", target_speedup), ("sparsity", sparsity), ("n_m", n_m),
                                              ("finetune", finetune)) if value is not None]
            if stray:
                raise ValueError(f"{', '.join(stray)}: not LayerChop's, which removes `num_layers` whole blocks "
                                 "(heal afterwards with Pruner.heal)")
            if num_layers is None:
                raise ValueError("LayerChop removes whole blocks: pass num_layers= (how many, e.g. 8)")
            return self._layerchop(num_layers, strategy, options, dict(strategy_options or {}))
        if method == "evopress":
            if target == "structure":
                return self._evopress_structure(target_speedup, evopress, options, latency=latency,
                                                latency_table=latency_table, measure=measure_speedup,
                                                dampening=dampening)
            if target == "sparsity":
                return self._evopress_sparsity(sparsity, evopress, options, dampening=dampening, blocksize=blocksize)
            return self._evopress(target, num_layers, drop_ratio, evopress, options)
        if finetune is not None:
            raise ValueError("finetune= is gradual ZipLM's (pruning steps alternating with fine-tuning); "
                             "it needs target_speedup")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of ziplm, layerchop, evopress, "
                             f"{', '.join(METHODS)}")
        if target_speedup is not None:
            raise ValueError(f"target_speedup is ZipLM's (structured pruning to a measured speedup); method "
                             f"{method!r} sparsifies weights to a `sparsity`")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        n, m = _parse_n_m(n_m)
        if sparsity is None and not m:
            raise ValueError("give `sparsity` (e.g. 0.5, or a per-layer dict) or `n_m` (e.g. \"2:4\")")
        layers = original_layer_indices(self.model)
        per_layer = uniform(sparsity or 0.0, layers)
        for value in per_layer.values():  # bad values fail here, before any data is read or weight touched
            PruneSpec(value, n, m, method)
        if schedule != "uniform" and (isinstance(sparsity, dict) or m):
            raise ValueError(f"schedule={schedule!r} spreads ONE target sparsity over the layers: "
                             "give sparsity as a number and no n_m")
        seq = options.sequential(method)
        start = time.perf_counter()
        needs_data = method != "magnitude" or schedule != "uniform"
        ids, calib_info = self.calibration_data(options) if needs_data else (None, None)
        search = None
        if schedule != "uniform":
            plan_schedule = build_schedule(schedule, self.model, ids, float(sparsity), options=seq,
                                           dampening=dampening, **(schedule_options or {}))
            per_layer, search = plan_schedule.sparsity, plan_schedule.info
        plan = CompressionPlan(method, per_layer, n, m, blocksize=blocksize, dampening=dampening)
        compress_model(self.model, ids, plan, seq)
        achieved = zero_fraction(self.model)
        metrics = dict(self.pruning_config.metrics or {})
        metrics.update(sparsity=round(achieved, 5), compression_seconds=round(time.perf_counter() - start, 2))
        self._record(method=method if not m else f"{method} {n}:{m}",
                     layer_sparsity={str(k): round(float(v), 6) for k, v in per_layer.items()} if not m else None,
                     calibration=calib_info, metrics=metrics, search=search)
        logger.info("%s: %.1f%% of the Linear weights in the blocks are zero", method, 100 * achieved)
        return self.model

    def _layerchop(self, num_layers: int, strategy: str, options: RunOptions, strategy_options: dict[str, Any]
                   ) -> PreTrainedModel:
        """LayerChop's removal: choose the blocks (validated before any calibration), drop them, record why."""
        layerchop.check_request(self.model, num_layers, strategy, strategy_options)
        start = time.perf_counter()
        needs_data = strategy in layerchop.NEEDS_CALIBRATION
        ids, calib_info = self.calibration_data(options) if needs_data else (None, None)
        drop, info = layerchop.choose_layers(self.model, ids, num_layers, strategy, batch_size=options.batch_size,
                                             progress=options.progress, **strategy_options)
        self.apply(PruningConfig(drop_layers=drop))
        metrics = dict(self.pruning_config.metrics or {})
        metrics.update(layers_removed=len(drop), compression_seconds=round(time.perf_counter() - start, 2))
        self._record(method="layerchop", search=info, calibration=calib_info, metrics=metrics)
        return self.model

    def heal(self, train_dataset: Any, *, max_steps: int = 1000, learning_rate: float = 2e-5,
             per_device_train_batch_size: int = 4, seq_len: int = 512, num_samples: int | None = None, seed: int = 0,
             distill_from: Any = None, alpha: float | None = None, resume_from_checkpoint: str | bool | None = None,
             output_dir: str | os.PathLike | None = None, gradient_checkpointing: bool = False,
             **training_args: Any) -> dict[str, Any]:
        """Heal a pruned causal LM by continued pretraining of all its weights (LayerChop); returns the Trainer metrics.

        ``train_dataset``: generic text as a text file, strings, a ``datasets.Dataset``, a dataset name or token
        ids [n, seq_len]; cut into ``num_samples`` windows of ``seq_len`` tokens (default: enough for
        ``max_steps``). The loss is the plain causal-LM loss, or with ``distill_from`` (the dense model or its
        Pruner) token-level distillation weighted by ``alpha`` (default 1). ``output_dir`` keeps Trainer
        checkpoints (``save_steps=``), ``resume_from_checkpoint=True`` continues from the last one. Other
        keyword arguments go to ``TrainingArguments``; several GPUs come from ``accelerate launch``. A sparsified
        model keeps its zeros.
        """
        if train_dataset is None:
            raise ValueError("heal trains on generic text: pass train_dataset= a text file, strings, a "
                             "datasets.Dataset, a dataset name (e.g. 'fineweb-edu') or token ids")
        teacher = getattr(distill_from, "model", distill_from)
        alpha = layerchop.check_heal(self.model, teacher, alpha, resume_from_checkpoint, output_dir)
        accumulation = training_args.get("gradient_accumulation_steps", 1)
        train_ids, data_info = load_calibration(train_dataset, self.tokenizer, seq_len=seq_len, seed=seed,
                                                num_samples=num_samples or max_steps * per_device_train_batch_size
                                                * accumulation)
        masks = layerchop.sparsity_masks(self.model) if layerchop.keeps_zeros(self.pruning_config) else None
        training_args.setdefault("seed", seed)
        metrics = layerchop.heal(self.model, train_ids, max_steps=max_steps, learning_rate=learning_rate,
                                 per_device_train_batch_size=per_device_train_batch_size, teacher=teacher, alpha=alpha,
                                 masks=masks, resume_from_checkpoint=resume_from_checkpoint,
                                 output_dir=None if output_dir is None else str(output_dir),
                                 gradient_checkpointing=gradient_checkpointing, **training_args)
        record = dict(self.pruning_config.metrics or {})
        record.update(layerchop.heal_record(metrics, max_steps, train_ids.shape[0], train_ids.shape[1],
                                            data_info.get("dataset"), alpha))
        self._record(metrics=record)
        return metrics

    def _ziplm(self, target_speedup: float | list[float], options: RunOptions, *, latency, latency_table,
               settings: ZipLMSettings, measure: bool, finetune: dict[str, Any] | None = None
               ) -> PreTrainedModel | ZipLMFamily:
        """ZipLM on this Pruner's (dense) model: one database, one search per target, measured speedups."""
        single = isinstance(target_speedup, (int, float))
        targets = [float(target_speedup)] if single else [float(t) for t in target_speedup]
        if not targets or any(not t > 0 for t in targets):
            raise ValueError(f"target speedups must be positive numbers (1.5 = 1.5x faster), got {target_speedup!r}")
        start = time.perf_counter()
        table = self._latency_table(latency, latency_table, options)
        check_targets(targets, table)
        tuning = self._finetune_settings(finetune, options) if finetune is not None else None
        ids, calib_info = self.calibration_data(options)
        env = table.environment
        timings: dict[int, SpeedupMeasurement] = {}

        def speedup_of(model) -> float:
            timings[id(model)] = measure_speedup(self.model, model, env)
            return timings[id(model)].speedup

        if tuning is not None:
            outcomes = run_gradual(self.model, ids, targets, table, tuning, settings=settings,
                                   options=options.sequential("ZipLM"))
            database = None
        else:
            key = (tuple(sorted(table.mlp)), settings.dampening)
            reuse = None
            if self._ziplm_key is not None and self._ziplm_key[0] is ids and self._ziplm_key[1] == key:
                reuse = self.ziplm_database
            outcomes, database = run_ziplm(self.model, ids, targets, table, settings=settings,
                                           options=options.sequential("ZipLM"), database=reuse,
                                           measure=speedup_of if measure else None)
            self.ziplm_database = database
            self._ziplm_key = (ids, key)
        family = ZipLMFamily()
        for target, outcome in outcomes.items():
            member = Pruner(outcome.model, self.tokenizer, base_model=self.base_model)
            member._calibration_cache = self._calibration_cache
            member._adopt_pruned_class()
            speed = outcome.measured_speedup if outcome.measured_speedup is not None else \
                (speedup_of(outcome.model) if measure else None)
            timing = timings.get(id(outcome.model))
            dense_ms, pruned_ms = (timing.dense_ms, timing.pruned_ms) if timing else (None, None)
            measured = round(speed, 4) if speed else None
            metrics = {"predicted_speedup": round(outcome.predicted_speedup, 4), "estimated_loss": outcome.estimated_loss,
                       "dense_ms": dense_ms, "pruned_ms": pruned_ms, "table_dense_ms": table.dense_ms,
                       "level_database_mib": round(database.nbytes() / 2**20, 2) if database else None,
                       "compression_seconds": round(time.perf_counter() - start, 2)}
            member._record(method=outcome.search.get("method", "ziplm"), target_speedup=target, measured_speedup=measured,
                           latency_environment=env.to_dict(), calibration=calib_info, metrics=metrics,
                           search={**outcome.search, "levels": {str(k): v for k, v in outcome.levels.items()}})
            if measured is not None:
                logger.info("ZipLM %gx: measured %.3fx (predicted %.3fx)", target, measured, outcome.predicted_speedup)
            family[target] = member
        if single:
            self.model = family[targets[0]].model
            return self.model
        return family

    def _evopress(self, target: str | None, num_layers: int | None, drop_ratio: float | None,
                  settings: EvoPressSettings | dict[str, Any] | None, options: RunOptions) -> PreTrainedModel:
        """EvoPress depth search (attention and MLP sublayers independently), then the drops applied."""
        if target != "depth":
            raise ValueError(f"EvoPress target {target!r} is not available; choose target='depth' (attention and "
                             "MLP sublayers dropped independently, with drop_ratio= or num_layers=), "
                             "target='sparsity' (per-Linear SparseGPT levels, with sparsity=) or "
                             "target='structure' (ZipLM levels under a measured latency budget, with target_speedup=); "
                             "per-Linear bit-widths are Quantizer.quantize(method='evopress', average_bits=...)")
        if (num_layers is None) == (drop_ratio is None):
            raise ValueError("EvoPress depth needs exactly one of drop_ratio= (e.g. 0.25) and num_layers= (blocks' "
                             "worth of sublayers, e.g. 8)")
        depth = len(original_layer_indices(self.model))
        count = num_layers if num_layers is not None else round(drop_ratio * depth)
        if not 1 <= count < depth:
            raise ValueError(f"EvoPress depth can remove 1 to {depth - 1} blocks' worth of sublayers of this "
                             f"{depth}-block model; drop_ratio={drop_ratio} / num_layers={num_layers} gives {count}")
        settings = EvoPressSettings.of(settings)
        start = time.perf_counter()
        ids, calib_info = self.calibration_data(options)
        result = search_depth(self.model, ids, num_blocks=count, sublayers=True, settings=settings,
                              batch_size=min(options.batch_size, 4), progress=options.progress)
        self.apply(PruningConfig(drop_attention=result.drop_attention, drop_mlp=result.drop_mlp))
        metrics = dict(self.pruning_config.metrics or {})
        metrics.update(search_seconds=round(time.perf_counter() - start, 2))
        self._record(method="evopress", search=result.info, calibration=calib_info, metrics=metrics)
        return self.model

    def _evopress_sparsity(self, sparsity: Any, settings: EvoPressSettings | dict[str, Any] | None,
                           options: RunOptions, *, dampening: float, blocksize: int) -> PreTrainedModel:
        """EvoPress over per-Linear SparseGPT levels at an exact average sparsity (level store built once)."""
        if not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
            raise ValueError(f"EvoPress target='sparsity' needs one average sparsity in (0, 1), e.g. sparsity=0.7; "
                             f"got {sparsity!r}")
        settings = EvoPressSettings.of(settings)
        level_grid("sparsity", float(sparsity), settings)  # an unreachable target fails before calibration
        start = time.perf_counter()
        ids, calib_info = self.calibration_data(options)
        outcome = run_level_search(self.model, ids, "sparsity", float(sparsity), settings,
                                   options.sequential("EvoPress sparsity"), dampening=dampening, blocksize=blocksize)
        state, info, store = outcome.state, outcome.info, outcome.store
        kept: dict[str, float] = {}
        total: dict[str, int] = {}
        for unit, level in zip(store.units, state):  # parameter-weighted mean sparsity of each block
            kept[str(unit.layer)] = kept.get(str(unit.layer), 0.0) + unit.numel * store.levels[level]
            total[str(unit.layer)] = total.get(str(unit.layer), 0) + unit.numel
        layer_sparsity = {k: round(kept[k] / total[k], 6) for k in kept}
        metrics = dict(self.pruning_config.metrics or {})
        metrics.update(sparsity=round(zero_fraction(self.model), 5), level_store_mib=info["level_store_mib"],
                       model_mib=info["model_mib"], compression_seconds=round(time.perf_counter() - start, 2))
        self._record(method="evopress", layer_sparsity=layer_sparsity, search=info, calibration=calib_info,
                     metrics=metrics)
        return self.model

    def _evopress_structure(self, target_speedup, settings, options: RunOptions, *, latency, latency_table,
                            measure: bool, dampening: float) -> PreTrainedModel:
        """EvoPress over ZipLM's levels under the measured latency budget (starts from ZipLM's DP choice)."""
        if not isinstance(target_speedup, (int, float)) or not target_speedup > 0:
            raise ValueError("EvoPress target='structure' needs one target_speedup (e.g. 2.0)")
        settings = EvoPressSettings.of(settings)
        start = time.perf_counter()
        table = self._latency_table(latency, latency_table, options)
        check_targets([float(target_speedup)], table)
        ids, calib_info = self.calibration_data(options)
        key = (tuple(sorted(table.mlp)), dampening)
        if self._ziplm_key is not None and self._ziplm_key[0] is ids and self._ziplm_key[1] == key:
            database = self.ziplm_database
        else:
            database = build_database(self.model, ids, mlp_kept=sorted(table.mlp), dampening=dampening,
                                      options=options.sequential("ZipLM level database"))
            self.ziplm_database, self._ziplm_key = database, (ids, key)
        chosen, items, info = search_structure(self.model, ids, table, float(target_speedup), database,
                                               settings=settings, batch_size=min(options.batch_size, 4),
                                               progress=options.progress)
        stitcher = Stitcher(self.model, database)
        dense = self.model
        self.model = stitcher.build(items, chosen)
        self._adopt_pruned_class()
        timing = measure_speedup(dense, self.model, table.environment) if measure else None
        dense_ms, pruned_ms = (timing.dense_ms, timing.pruned_ms) if timing else (None, None)
        levels = {str(k): v for k, v in _levels(items, chosen).items()}
        metrics = {"predicted_speedup": info["predicted_speedup"], "dense_ms": dense_ms, "pruned_ms": pruned_ms,
                   "search_seconds": round(time.perf_counter() - start, 2)}
        self._record(method="evopress", target_speedup=float(target_speedup),
                     measured_speedup=round(timing.speedup, 4) if timing else None,
                     latency_environment=table.environment.to_dict(), calibration=calib_info, metrics=metrics,
                     search={**info, "levels": levels})
        return self.model

    def _finetune_settings(self, finetune: dict[str, Any], options: RunOptions) -> FinetuneSettings:
        """Gradual mode's settings; the training windows are read like calibration data (same tokenizer)."""
        args = dict(finetune)
        if "train_dataset" not in args:
            raise ValueError("gradual ZipLM fine-tunes between pruning steps: pass finetune=dict(train_dataset=..., "
                             "max_steps=...) with a text file, strings, a datasets.Dataset or token ids")
        source = args.pop("train_dataset")
        names = {"max_steps", "stages", "alpha", "temperature"}
        known = {k: args.pop(k) for k in list(args) if k in names}
        batch = args.get("per_device_train_batch_size", 4)
        num_samples = args.pop("num_samples", None) or known.get("max_steps", 100) * batch
        seq_len = args.pop("seq_len", options.seq_len)
        train_ids, _ = load_calibration(source, self.tokenizer, num_samples=num_samples, seq_len=seq_len,
                                        seed=options.seed + 1, model=self.model)
        return FinetuneSettings(train_ids=train_ids, training_args=args, **known)

    def _latency_table(self, latency, latency_table, options: RunOptions) -> LatencyTable:
        if latency_table is not None:
            table = latency_table if isinstance(latency_table, LatencyTable) else LatencyTable.load(latency_table)
            if table.model != model_signature(self.model):
                raise ValueError(f"the latency table was measured for {table.model}, not for this model "
                                 f"({model_signature(self.model)}); measure one with `optimum-prune latency`")
            return table
        if isinstance(latency, InferenceEnvironment):
            env = latency
        else:
            fields = dict(latency or {})
            param = next(self.model.parameters())
            fields.setdefault("device", str(options.device or param.device))
            fields.setdefault("dtype", str(param.dtype).replace("torch.", ""))
            env = InferenceEnvironment(**fields)
        return get_latency_table(self.model, env, progress=options.progress)

    def _adopt_pruned_class(self) -> None:
        """Give a structurally pruned model the classes that rebuild its structure at load time."""
        if current_structure(self.model).is_structured and not isinstance(self.model, PrunedModelMixin):
            self.model.__class__ = pruned_model_class(self.model)
            self.model.config.__class__ = pruned_config_class(base_model_type(self.model.config.model_type))

    def apply(self, config: PruningConfig | dict[str, Any]) -> PreTrainedModel:
        """Physically remove the structures in ``config`` (original indices) and return the model.

        Applying several configs accumulates them. The config is validated first: on an error the
        model is left unchanged.
        """
        if not isinstance(config, PruningConfig):
            config = PruningConfig.from_dict(config)
        if config.base_model is None and self.pruning_config.base_model is None and self.base_model:
            config.base_model = self.base_model
        apply_structure(self.model, config)
        self._adopt_pruned_class()
        if logger.isEnabledFor(logging.INFO):
            logger.info("pruned: %s", self.summary().to_markdown().splitlines()[2])
        return self.model

    def summary(self) -> PruningSummary:
        """Before/after parameters, size and the per-layer structure (print it, or ``.to_markdown()``)."""
        return summarize(self.model)

    # ------------------------------------------------------------------ saving
    def model_card(self, repo_id: str | None = None):
        """The model card (huggingface_hub ``ModelCard``) written beside the weights."""
        task = task_of_model(self.model)
        _, _, pipeline_tag = TASKS[task]
        return build_model_card(self.summary(), self.pruning_config, pipeline_tag=pipeline_tag,
                                load_class=TASKS[task][0], repo_id=repo_id)

    def _commit_message(self) -> str:
        summary = self.summary()
        return f"Upload pruned model ({summary.params_before:,} -> {summary.params_after:,} parameters)"


def _parse_n_m(n_m: str | tuple[int, int] | None) -> tuple[int, int]:
    """"2:4" -> (2, 4)."""
    if n_m is None:
        return 0, 0
    if isinstance(n_m, str):
        try:
            n, m = (int(x) for x in n_m.split(":"))
        except ValueError:
            raise ValueError(f"n_m must look like \"2:4\" (N zeros in every M weights), got {n_m!r}") from None
    else:
        n, m = n_m
    if not 0 < n < m:
        raise ValueError(f"N:M sparsity needs 0 < N < M, got {n}:{m}")
    return n, m

