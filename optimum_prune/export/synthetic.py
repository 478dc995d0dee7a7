"""Random-weight GGUF files of chosen per-layer shapes, for timing in llama.cpp (latency tables).

llama.cpp's speed does not depend on weight values, so a latency table times files whose layers all sit at
one pruning level, written here with seeded random weights in the ``deci`` architecture (per-layer head
counts and FFN widths, as pruned exports use) and a placeholder vocabulary. Hyperparameters and tensor
encoding are the exporter's own (``gguf._add_hparams``, ``gguf._convert``), so a synthetic layer is the
layer a pruned export would contain.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..saving import atomic_file
from .gguf import FLOAT_TYPES, _add_hparams, _convert, normalize_dtype
from .plan import GGUFPlan, LayerPlan
from .quantize import check_quantize_available, run_quantize
from .vocab import _placeholder


@dataclass(frozen=True)
class SyntheticShape:
    """What every synthetic file of one model shares: widths, head size, context and RoPE / norm settings."""

    hidden_size: int
    head_dim: int
    context_length: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    vocab_size: int = 256
    """A small vocabulary: embeddings and head cost the same in every file, so they cancel in differences."""

    @classmethod
    def of(cls, plan: GGUFPlan, vocab_size: int = 256) -> SyntheticShape:
        """The shared settings of a model's export plan (its widths, head size, context, RoPE, norm epsilon)."""
        return cls(plan.hidden_size, plan.head_dim, plan.context_length, plan.rms_norm_eps, plan.rope_theta,
                   vocab_size)


class RandomWeights:
    """Seeded random tensors by shape, made once and reused across layers and files (values do not matter)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, *shape: int) -> torch.Tensor:
        if shape not in self._cache:
            generator = np.random.default_rng([self.seed, *shape])
            self._cache[shape] = torch.from_numpy(generator.standard_normal(shape, dtype=np.float32) * 0.02)
        return self._cache[shape]


def write_synthetic_gguf(path: str | os.PathLike, layers: list[LayerPlan], shape: SyntheticShape, *,
                         dtype: str = "f16", weights: RandomWeights | None = None) -> Path:
    """A ``deci`` GGUF file with ``layers`` (n_head, n_head_kv, n_ff each; n_head 0: no attention) of random
    weights in ``dtype`` (quantized types through llama.cpp's quantizer, as the export does)."""
    dtype = normalize_dtype(dtype)
    if not layers or layers[0].n_head < 1 or layers[0].n_head_kv < 1:
        raise ValueError("the first layer of a llama.cpp model needs attention heads (llama.cpp reads the head size "
                         "there)")
    if layers[-1].n_ff < 1:
        raise ValueError("the last layer of a deci model needs an FFN (llama.cpp's deci graph discards the output "
                         "of an FFN-free last layer)")
    weights = weights or RandomWeights()
    target = Path(path)
    with atomic_file(target, suffix=".gguf") as tmp:
        if dtype in FLOAT_TYPES:
            _write(tmp, layers, shape, dtype, weights)
        else:
            check_quantize_available(dtype)
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as work:
                f32 = Path(work) / "f32.gguf"
                _write(f32, layers, shape, "f32", weights)
                run_quantize(f32, tmp, dtype)
    return target


def _write(path: Path, layers: list[LayerPlan], shape: SyntheticShape, dtype: str, weights: RandomWeights) -> None:
    import gguf

    plan = GGUFPlan("deci", shape.hidden_size, shape.head_dim, shape.vocab_size, shape.context_length,
                    shape.rms_norm_eps, shape.rope_theta, None, False, layers)
    writer = gguf.GGUFWriter(str(path), "deci")
    _add_hparams(writer, plan, dtype, "optimum-prune latency probe")
    _placeholder(writer, shape.vocab_size)
    hidden, head_dim = shape.hidden_size, shape.head_dim
    converted: dict[tuple[int, ...], tuple[np.ndarray, object]] = {}

    def add(name: str, tensor: torch.Tensor) -> None:
        key = tuple(tensor.shape)
        if key not in converted:
            converted[key] = _convert(tensor, dtype)
        data, raw = converted[key]
        writer.add_tensor(name, data, raw_dtype=raw)

    ones = torch.ones(hidden)
    add("token_embd.weight", weights(shape.vocab_size, hidden))
    writer.add_tensor("output_norm.weight", ones.numpy())
    add("output.weight", weights(shape.vocab_size, hidden))
    for i, layer in enumerate(layers):
        prefix = f"blk.{i}."
        if layer.n_head:
            writer.add_tensor(prefix + "attn_norm.weight", ones.numpy())
            add(prefix + "attn_q.weight", weights(layer.n_head * head_dim, hidden))
            add(prefix + "attn_k.weight", weights(layer.n_head_kv * head_dim, hidden))
            add(prefix + "attn_v.weight", weights(layer.n_head_kv * head_dim, hidden))
            add(prefix + "attn_output.weight", weights(hidden, layer.n_head * head_dim))
        if layer.n_ff:
            writer.add_tensor(prefix + "ffn_norm.weight", ones.numpy())
            add(prefix + "ffn_gate.weight", weights(layer.n_ff, hidden))
            add(prefix + "ffn_up.weight", weights(layer.n_ff, hidden))
            add(prefix + "ffn_down.weight", weights(hidden, layer.n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
