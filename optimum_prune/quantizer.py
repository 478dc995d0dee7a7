"""The Quantizer: GPTQ (optionally with SparseGPT in the same pass), saved as packed low-bit weights."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel
from transformers.utils import logging

from .card import build_model_card
from .engine.compress import CompressionPlan, QuantRecord, compress_model, uniform
from .engine.layers import original_layer_indices, zero_fraction
from .engine.quant import QuantSpec
from .evopress import EvoPressSettings
from .evopress_levels import level_grid, run_level_search
from .loading import TASKS, task_of_model
from .packing import FORMAT, check_packable, save_packed
from .report import summarize
from .session import CompressionSession, RunOptions

logger = logging.get_logger(__name__)


class Quantizer(CompressionSession):
    """Quantizes a model's block Linears with GPTQ and saves real packed weights (compressed-tensors).

    >>> q = Quantizer.from_pretrained("HuggingFaceTB/SmolLM2-135M")
    >>> q.quantize(bits=4, group_size=128)              # or bits={0: 8, 1: 4, ...} per layer
    >>> q.save_pretrained("smollm2-w4")                  # reloads with AutoModelForCausalLM
    """

    def __init__(self, model: PreTrainedModel, tokenizer: Any = None, *, base_model: str | None = None) -> None:
        super().__init__(model, tokenizer, base_model=base_model)
        self.records: dict[str, QuantRecord] = {}

    def quantize(
        self,
        bits: int | dict[int, int] = 4,
        *,
        method: str = "gptq",
        average_bits: float | None = None,
        evopress: EvoPressSettings | dict[str, Any] | None = None,
        group_size: int | None = 128,
        symmetric: bool = True,
        act_order: bool = False,
        sparsity: float | dict[int, float] | None = None,
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
    ) -> PreTrainedModel:
        """GPTQ-quantize every block Linear in place (weights land exactly on the grid) and return the model.

        ``bits`` is 2..8 or {original layer index: bits}; ``group_size=None`` is one scale per output
        channel; ``act_order`` processes columns by decreasing Hessian diagonal with static groups (the
        saved format is unchanged). ``sparsity`` prunes with SparseGPT in the same pass.

        ``method="evopress", average_bits=3.0``: every block Linear gets its own bit-width (GPTQ levels
        stored once, by default floor−1 .. ceil+2 bits), chosen by EvoPress at that exact average
        (``evopress``: ``EvoPressSettings`` or its fields, e.g. ``level_store``, ``generations``).
        """
        if self.records:
            raise RuntimeError("this model is already quantized; start from the dense model")
        if method == "evopress":
            if average_bits is None or sparsity is not None:
                raise ValueError("EvoPress bit-width search needs average_bits= (e.g. 3.0) and no sparsity=")
            return self._evopress_bits(float(average_bits), evopress, group_size, symmetric, act_order,
                                       RunOptions(calibration, num_samples, seq_len, seed, batch_size, device,
                                                  checkpoint_dir, progress), dampening, blocksize)
        if method != "gptq":
            raise ValueError(f"unknown quantization method {method!r}; choose 'gptq' or 'evopress'")
        if average_bits is not None:
            raise ValueError("average_bits= is the EvoPress bit-width search's: pass method='evopress' (or bits= for "
                             "plain GPTQ)")
        layers = original_layer_indices(self.model)
        per_layer_bits = uniform(bits, layers)
        specs = {k: QuantSpec(int(b), group_size, symmetric, act_order) for k, b in per_layer_bits.items()}
        options = RunOptions(calibration, num_samples, seq_len, seed, batch_size, device, checkpoint_dir, progress)
        ids, calib_info = self.calibration_data(options)
        plan = CompressionPlan("sparsegpt" if sparsity else None, uniform(sparsity or 0.0, layers),
                               quant=specs, blocksize=blocksize, dampening=dampening)
        seq = options.sequential("gptq" if not sparsity else "sparsegpt+gptq")
        start = time.perf_counter()
        result = compress_model(self.model, ids, plan, seq)
        self.records = result.quantized
        metrics = dict(self.pruning_config.metrics or {})
        metrics.update(compression_seconds=round(time.perf_counter() - start, 2))
        fields: dict[str, Any] = dict(layer_bits={str(k): int(v) for k, v in per_layer_bits.items()},
                                      calibration=calib_info, metrics=metrics)
        if sparsity:
            metrics["sparsity"] = round(zero_fraction(self.model), 5)
            fields.update(method="sparsegpt+gptq",
                          layer_sparsity={str(k): float(v) for k, v in plan.sparsity.items()})
        else:
            fields.update(method=self.pruning_config.method or "gptq")
        self._record(**fields)
        return self.model

    def _evopress_bits(self, average_bits: float, settings, group_size, symmetric: bool, act_order: bool,
                       options: RunOptions, dampening: float, blocksize: int) -> PreTrainedModel:
        """EvoPress over per-Linear GPTQ bit-widths; the chosen codes become this Quantizer's packed records."""
        settings = EvoPressSettings.of(settings)
        level_grid("bits", average_bits, settings)  # an unreachable target fails before calibration
        ids, calib_info = self.calibration_data(options)
        start = time.perf_counter()
        grid = QuantSpec(4, group_size, symmetric, act_order)
        outcome = run_level_search(self.model, ids, "bits", average_bits, settings, options.sequential("EvoPress bits"),
                                   quant=grid, dampening=dampening, blocksize=blocksize)
        self.records, info = outcome.records, outcome.info
        metrics = dict(self.pruning_config.metrics or {})
        metrics.update(average_bits=info["average"], level_store_mib=info["level_store_mib"], model_mib=info["model_mib"],
                       compression_seconds=round(time.perf_counter() - start, 2))
        self._record(method="evopress+gptq", search=info, calibration=calib_info, metrics=metrics)
        return self.model

    @property
    def quantization(self) -> dict[str, Any]:
        """Summary of the grids used (for the card and the CLI)."""
        specs = {r.spec for r in self.records.values()}
        bits = sorted({s.bits for s in specs})
        spec = next(iter(specs)) if specs else None
        return {"format": f"compressed-tensors {FORMAT}", "bits": bits[0] if len(bits) == 1 else bits,
                "group_size": spec.group if spec else None, "symmetric": spec.symmetric if spec else None,
                "act_order": spec.act_order if spec else None, "quantized_linears": len(self.records)}

    # ------------------------------------------------------------------ saving
    def model_card(self, repo_id: str | None = None):
        task = task_of_model(self.model)
        return build_model_card(summarize(self.model), self.pruning_config, pipeline_tag=TASKS[task][2],
                                load_class=TASKS[task][0], repo_id=repo_id, quantization=self.quantization)

    def save_pretrained(self, save_directory: str | os.PathLike, *, repo_id: str | None = None, **kwargs: Any) -> Path:
        """Packed low-bit weights + compressed-tensors ``quantization_config`` (+ ``pruning_config``) in config.json."""
        if not self.records:
            raise RuntimeError("nothing is quantized yet: call quantize() first")
        check_packable(self.model, self.records)
        return super().save_pretrained(save_directory, repo_id=repo_id, **kwargs)

    def _save_weights(self, directory: Path, **kwargs: Any) -> None:
        save_packed(self.model, directory, self.records, **kwargs)

    def _commit_message(self) -> str:
        q = self.quantization
        return f"Upload {q['bits']}-bit GPTQ model ({q['format']})"
