"""Timing in an inference environment: a stack of blocks at one pruning level, or a whole model's forward.

One block timed alone keeps its weights in cache and runs faster than it does inside the model; a stack of
``STACK_DEPTH`` random-weight blocks streams them as the full model does, so sublayer times add up the way
they do in context. Every time goes through the one timer (``timing.median_ms``).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging

from ..modeling.adapters import ArchitectureAdapter, get_adapter
from ..modeling.pruning_config import CONFIG_KEY, PruningConfig
from ..modeling.surgery import apply_structure
from .environment import InferenceEnvironment
from .models import accepts, eval_no_grad, is_causal_lm, max_positions, stock_class
from .timing import measure_latency, median_ms

logger = logging.get_logger(__name__)

STACK_DEPTH = 16
"""Blocks timed together (fewer if the model has fewer): in context, weights stream as in the full model."""
TABLE_METHOD = "stack-v2"
"""How tables are measured; part of the cache key, so tables measured another way are not reused."""


class StackTimer:
    """Times a stack of blocks (a random copy ``depth`` blocks deep, the same structure in every block), per block."""

    def __init__(self, model: PreTrainedModel, adapter: ArchitectureAdapter, env: InferenceEnvironment,
                 ids: torch.Tensor, timing: dict[str, Any], depth: int) -> None:
        self.model = _random_copy(model, env, num_layers=depth)
        self.adapter = adapter
        self.depth = depth
        self.pristine = [copy.deepcopy(b) for b in adapter.layers(self.model)]
        self.env, self.ids, self.timing = env, ids, timing

    def time(self, structure: PruningConfig) -> float:
        """Median ms per block after removing ``structure`` (given for block 0) from every fresh dense block."""
        layers = self.adapter.layers(self.model)
        for i, block in enumerate(self.pristine):
            layers[i] = copy.deepcopy(block)
        self.model.config.num_hidden_layers = self.depth
        apply_structure(self.model, _everywhere(structure, self.depth),
                        current=PruningConfig(num_original_layers=self.depth))
        base = self.model.base_model
        if self.env.mode == "prefill":
            inputs = _forward_inputs(base, self.ids, use_cache=False)
            return median_ms(lambda: base(**inputs), **self.timing) / self.depth
        cache = _prefill_cache(base, self.ids[:, :self.env.seq_len])
        step = _forward_inputs(base, self.ids[:, self.env.seq_len:], cache=cache, past=self.env.seq_len)
        return median_ms(lambda: base(**step), reset=functools.partial(_rewind, cache, self.env.seq_len),
                         **self.timing) / self.depth


def _everywhere(template: PruningConfig, depth: int) -> PruningConfig:
    """The structure ``template`` gives block 0, applied to every one of ``depth`` blocks."""
    heads, neurons = template.remove_heads.get(0), template.remove_neurons.get(0)
    return PruningConfig(remove_heads={i: list(heads) for i in range(depth)} if heads else {},
                         remove_neurons={i: list(neurons) for i in range(depth)} if neurons else {},
                         drop_attention=list(range(depth)) if 0 in template.drop_attention else [],
                         drop_mlp=list(range(depth)) if 0 in template.drop_mlp else [])


def time_model(model: PreTrainedModel, env: InferenceEnvironment, ids: torch.Tensor, timing: dict[str, Any]) -> float:
    """Median ms of the full model: ``measure_latency`` for prefill, a cached one-token step for decode.

    A model not on the environment's device in its dtype is timed as a random-weight copy of the same shapes.
    """
    dense = model if placed(model, env) else None
    if dense is None:
        logger.info("%s is not on %s in %s: timing a random-weight copy of the same shapes",
                    type(model).__name__, env.device, env.dtype)
        dense = _random_copy(model, env)
    if env.mode == "prefill":
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if env.logits_to_keep:  # the head on the last positions only (check_inputs: the forward takes it)
            inputs["logits_to_keep"] = env.logits_to_keep
        return measure_latency(dense, inputs, repeats=timing["repeats"], warmup=timing["warmup"],
                               threads=env.threads).median_ms
    with eval_no_grad(dense):
        cache = _prefill_cache(dense, ids[:, :env.seq_len])
        step = _forward_inputs(dense, ids[:, env.seq_len:], cache=cache, past=env.seq_len)
        return median_ms(lambda: dense(**step), reset=functools.partial(_rewind, cache, env.seq_len), **timing)


def placed(model: nn.Module, env: InferenceEnvironment) -> bool:
    """Whether every parameter is on the environment's device in its dtype."""
    device, dtype = env.torch_device, env.torch_dtype
    return all(p.device == device and p.dtype == dtype for p in model.parameters())


def check_inputs(model: PreTrainedModel, env: InferenceEnvironment) -> None:
    """Positions within the model's range, and a decoder for decode mode; errors name the fix."""
    needed = env.seq_len + (1 if env.mode == "decode" else 0)
    limit = max_positions(model)
    if limit is not None and needed > limit:
        extra = " plus the decoded token" if env.mode == "decode" else ""
        raise ValueError(f"seq_len {env.seq_len}{extra} exceeds the model's {limit} positions; use seq_len <= "
                         f"{limit - (needed - env.seq_len)}")
    if getattr(env, "logits_to_keep", 0) and not env.llamacpp and not accepts(model, "logits_to_keep"):
        raise ValueError(f"{type(model).__name__}.forward has no logits_to_keep argument, so its prefill cannot be "
                         f"timed with the head on the last {env.logits_to_keep} position(s); use logits_to_keep=0 "
                         "(every position) for this model")
    if env.mode == "decode" and not (is_causal_lm(model) or getattr(model.config, "is_decoder", False)):
        raise ValueError(f"{type(model).__name__} is not a causal decoder, so it has no KV cache to decode with; "
                         "encoders such as BERT support mode='prefill' only (load decoders with AutoModelForCausalLM "
                         "to measure decode)")


def random_ids(model: PreTrainedModel, env: InferenceEnvironment) -> torch.Tensor:
    """Seeded random tokens, [batch, seq_len (+1 decoded token)], on the environment's device."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    length = env.seq_len + (1 if env.mode == "decode" else 0)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, config.vocab_size, (env.batch_size, length), generator=generator).to(env.torch_device)


def _forward_inputs(module: nn.Module, ids: torch.Tensor, *, cache: Any = None, past: int = 0,
                    use_cache: bool = True) -> dict[str, Any]:
    """Keyword inputs for a forward over ``ids`` after ``past`` cached tokens (all attended)."""
    inputs: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": torch.ones(ids.shape[0], past + ids.shape[1], dtype=torch.long, device=ids.device),
    }
    if cache is not None:
        inputs["cache" if accepts(module, "cache") else "past_key_values"] = cache
    if accepts(module, "use_cache"):
        inputs["use_cache"] = use_cache
    return inputs


def _prefill_cache(module: nn.Module, ids: torch.Tensor) -> Any:
    """The KV cache after a prefill of ``ids``; a model that returns none cannot be timed in decode mode."""
    out = module(**_forward_inputs(module, ids, use_cache=True))
    for name in ("cache", "past_key_values"):
        cache = getattr(out, name, None)
        if cache is not None:
            return cache
    raise ValueError(f"{type(module).__name__} returned no KV cache, so decode mode cannot be measured; use "
                     "mode='prefill' (encoders such as BERT support prefill only)")


def _rewind(cache: Any, length: int) -> None:
    """Crop the cache back to ``length`` tokens, so repeated decode steps all see the same cache length."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _random_copy(model: PreTrainedModel, env: InferenceEnvironment, num_layers: int | None = None) -> PreTrainedModel:
    """Random weights, same class and shapes (``num_layers`` deep if given), on the environment's device and dtype."""
    config = copy.deepcopy(model.config)
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
        key = get_adapter(model).layer_types_key
        layer_types = getattr(config, key, None) if key else None
        if isinstance(layer_types, (list, tuple)) and layer_types:
            setattr(config, key, list(layer_types[:num_layers]))
    cls = stock_class(model)
    device = env.torch_device
    rng_devices = []
    if device.type == "cuda":
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    attn = getattr(config, "_attn_implementation", None)
    kwargs = {"attn_implementation": attn} if attn else {}
    with torch.random.fork_rng(devices=rng_devices):  # a seeded init that leaves the caller's RNG as it was
        torch.manual_seed(0)
        with torch.device(device):
            model = cls._from_config(config, dtype=env.torch_dtype, **kwargs)
    return model.to(device).eval()
