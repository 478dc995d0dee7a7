"""The Quantizer: GPTQ (optionally with SparseGPT in the same pass), saved as packed low-bit weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from optimum.quantization_base import OptimumQuantizer

from .methods.base import MethodConfig
from .session import CompressionSession


class Quantizer(CompressionSession, OptimumQuantizer):
    """Quantizes a model's block Linears with GPTQ and saves real packed weights (compressed-tensors).

    An ``optimum.quantization_base.OptimumQuantizer``: ``quantize(save_dir=...)`` quantizes and saves, as
    optimum's quantizers do.

    >>> q = Quantizer.from_pretrained("HuggingFaceTB/SmolLM2-135M")
    >>> q.quantize(bits=4, group_size=128)              # or bits={0: 8, 1: 4, ...} per layer, or GPTQConfig(...)
    >>> q.save_pretrained("smollm2-w4")                  # reloads with AutoModelForCausalLM
    """

    def quantize(self, bits: Any = None, *, method: str | MethodConfig | None = None,
                 save_dir: str | os.PathLike | None = None, **kwargs: Any) -> Any:
        """Run a quantization method: a config object (``GPTQConfig``, ``EvoPressBitsConfig``) or its fields.

        GPTQ (default): ``bits`` is 2..8 or {original layer index: bits}; ``group_size=None`` is one scale
        per output channel; ``act_order`` processes columns by decreasing Hessian diagonal (static groups);
        ``sparsity`` prunes with SparseGPT in the same pass. ``method="evopress", average_bits=3.0``: every
        block Linear gets its own bit-width, chosen by EvoPress at that exact average (``evopress``: its
        search settings). Calibration keywords are the shared ``RunConfig``'s. ``save_dir``: also save there.
        """
        if isinstance(bits, MethodConfig):
            method, bits = bits, None
        if bits is not None:
            kwargs["bits"] = bits
        model = self._keyword_call("quantize", method, kwargs, "gptq")
        if save_dir is not None:
            self.save_pretrained(save_dir)
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, *, repo_id: str | None = None, **kwargs: Any) -> Path:
        """Packed low-bit weights + compressed-tensors ``quantization_config`` (+ ``pruning_config``) in config.json."""
        if not self.records:
            raise RuntimeError("nothing is quantized yet: call quantize() first")
        return super().save_pretrained(save_directory, repo_id=repo_id, **kwargs)
