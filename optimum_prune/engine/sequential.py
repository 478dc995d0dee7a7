"""Sequential (block-by-block) calibration: the memory-bounded loop every second-order method runs on.

The inputs of block 0 are captured once; then for each block: its Linears' Hessians are accumulated
(fp32, forward hooks) over the calibration batch, the block is compressed, and its outputs are
recomputed FROM THE COMPRESSED BLOCK to feed the next one. Only the current block visits the compute
device (accelerate's ``cpu_offload_with_hook``); activations live on ``offload_device``. After each
block a checkpoint (block weights + next inputs) is written, so an interrupted run resumes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from accelerate import cpu_offload_with_hook
from accelerate.hooks import remove_hook_from_module
from accelerate.utils import send_to_device
from torch import nn
from transformers.utils import logging
from transformers.utils.logging import tqdm

from ..modeling.adapters import get_adapter
from .checkpoint import Checkpoint, run_fingerprint
from .finite import check_finite_weights, finite_hessians
from .hessian import capture_hessians
from .layers import LinearGroup, linear_groups, original_layer_indices
from .streaming import BlockStream, block_stream, resident_stem

logger = logging.get_logger(__name__)

BlockFn = Callable[[int, nn.Module, list[LinearGroup], dict[str, torch.Tensor]], dict[str, Any]]
"""compress(original_layer_index, block, groups, {group kind: Hessian}) -> per-block stats (JSON-able).

A read-only step sets ``modifies_weights = False`` (the statistics pass): its block runs once, not twice.
It may also define ``export_state(layer) -> dict[str, Tensor]`` and ``import_state(layer, tensors)``:
tensors beyond the block's weights (e.g. quantization codes) that a resumed run must get back."""


@dataclass
class SequentialOptions:
    """Where and how the block loop runs."""

    batch_size: int = 8
    device: str | torch.device | None = None
    """Compute device for the current block (default: CUDA when available, else CPU)."""
    offload_device: str | torch.device = "cpu"
    """Where activations and idle blocks wait."""
    checkpoint_dir: str | os.PathLike | None = None
    """Resume state (block weights + next inputs); removed after success unless ``keep_checkpoint``."""
    keep_checkpoint: bool = False
    progress: bool = True
    description: str = "compressing"


@dataclass
class SequentialResult:
    stats: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0


class _StopForward(Exception):
    pass


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def mixed_layer_types(model: nn.Module) -> list[str] | None:
    """The per-layer ``layer_types`` (the adapter's ``layer_types_key``) when they differ between blocks, else None.

    Blocks of different types take different inputs besides the hidden states (Gemma 3: a sliding-window or
    a full causal mask, local or global rotary embeddings), so block 0's may not be replayed to every block.
    """
    adapter = get_adapter(model)
    key = adapter.layer_types_key
    types = list(getattr(model.config, key, None) or []) if key else []
    return types if len(set(types)) > 1 and len(types) == len(adapter.layers(model)) else None


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int, store: torch.device | str
                         ) -> tuple[list[tuple[torch.Tensor, tuple, dict[str, Any]]], list[dict[str, tuple]]]:
    """(hidden_states, other positional args, kwargs) entering block 0, one entry per calibration batch; and,
    for a model whose blocks have different ``layer_types``, per batch the (args, kwargs) entering the first
    block of each type (the forward then runs up to the last of those blocks), else an empty list."""
    layers = get_adapter(model).layers(model)
    types = mixed_layer_types(model)
    firsts = {} if types is None else {t: types.index(t) for t in dict.fromkeys(types)}
    last = max(firsts.values(), default=0)
    records: list[tuple[torch.Tensor, tuple, dict[str, Any]]] = []
    by_type: list[dict[str, tuple]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        records.append((hidden.to(store), send_to_device(tuple(args[1:]), store), send_to_device(kwargs, store)))
        if last == 0:
            raise _StopForward

    def type_hook(layer_type: str, index: int):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            kwargs = dict(kwargs)
            kwargs.pop("hidden_states", None)
            by_type[-1][layer_type] = (send_to_device(tuple(args[1:]), store), send_to_device(kwargs, store))
            if index == last:
                raise _StopForward
        return record

    handles = [layers[0].register_forward_pre_hook(hook, with_kwargs=True)]
    handles += [layers[i].register_forward_pre_hook(type_hook(t, i), with_kwargs=True) for t, i in firsts.items()]
    # the blocks before the last recorded one pass their input through: the masks and position embeddings are
    # made before the first block, so no block needs to run (nor, for a streamed model, to be read)
    for block in list(layers)[:last]:
        block.forward = _pass_through
    model_device = next(model.parameters()).device
    extra = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
    try:
        for batch in input_ids.split(batch_size):
            if types is not None:
                by_type.append({})
            try:
                model(input_ids=batch.to(model_device), attention_mask=torch.ones_like(batch, device=model_device),
                      **extra)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
        for block in list(layers)[:last]:
            del block.forward  # the class's forward again
    return records, by_type


def _pass_through(hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
    return hidden_states if hidden_states is not None else args[0]


def _block_forward(block: nn.Module, hidden: torch.Tensor, extra: tuple[tuple, dict[str, Any]],
                   device: torch.device) -> torch.Tensor:
    args, kwargs = extra
    out = block(send_to_device(hidden, device), *send_to_device(args, device), **send_to_device(kwargs, device))
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    input_ids: torch.Tensor,
    compress: BlockFn,
    *,
    hessians: str | None = "full",
    options: SequentialOptions | None = None,
    run_id: str = "",
) -> SequentialResult:
    """Compress ``model`` block by block on the calibration ``input_ids`` [num_samples, seq_len].

    ``hessians``: "full" (SparseGPT, GPTQ), "diag" (Wanda: input norms only) or None (no statistics,
    e.g. capture of activations only). ``run_id`` identifies the settings for resuming.
    """
    check_finite_weights(model)  # NaN/inf weights are named before any work (or checkpoint file)
    options = options or SequentialOptions()
    if block_stream(model) is not None and options.checkpoint_dir:
        raise ValueError("a streamed model (loaded with max_memory) keeps its compressed blocks in its own work "
                         "directory; run it without checkpoint_dir")
    device = torch.device(options.device) if options.device is not None else default_device()
    store = torch.device(options.offload_device)
    start = time.perf_counter()
    ckpt = None
    if options.checkpoint_dir:
        ckpt = Checkpoint(options.checkpoint_dir, run_fingerprint(model, run_id, input_ids, options.batch_size))
    try:
        return _run_blocks(model, input_ids, compress, hessians, options, ckpt, device, store, start)
    except KeyboardInterrupt as err:  # the CLI says where to resume from
        if ckpt is not None:
            err.checkpoint_dir = str(ckpt.dir)  # type: ignore[attr-defined]
        raise


def _run_blocks(model: nn.Module, input_ids: torch.Tensor, compress: BlockFn, hessians: str | None,
                options: SequentialOptions, ckpt: Checkpoint | None, device: torch.device, store: torch.device,
                start: float) -> SequentialResult:
    """The loop of ``run_sequential`` (resume, capture, then block by block)."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    originals = original_layer_indices(model)
    result = SequentialResult()
    first = 0
    if ckpt is not None and ckpt.exists():
        first, result.stats = ckpt.load_blocks(layers, originals, compress)
        result.resumed_from = first
        logger.warning("resuming from %s: blocks 0-%d already compressed", options.checkpoint_dir, first - 1)

    stream = block_stream(model)
    with resident_stem(model, layers):  # a streamed model's embeddings are real only for the capture
        records, by_type = capture_block_inputs(model, input_ids, options.batch_size, store)
    hidden = [h for h, _, _ in records]
    kwargs = [(a, k) for _, a, k in records]
    types = mixed_layer_types(model) if by_type else None
    if first:
        hidden = ckpt.load_activations(store)

    bar = tqdm(total=len(layers), initial=first, desc=options.description, disable=not options.progress,
               unit="block")
    for index in range(first, len(layers)):
        block = layers[index]
        block_start = time.perf_counter()
        read_only = not getattr(compress, "modifies_weights", True)
        prefix = _stream_in(model, stream, block)
        onload = _onload(block, device)
        groups = linear_groups(adapter, block)
        if types is not None:  # this block's own mask and position embeddings (its layer type's)
            kwargs = [b[types[index]] for b in by_type]
        H: dict[str, torch.Tensor] = {}
        outputs: list[torch.Tensor] | None = None
        if hessians and groups:
            kept: list[torch.Tensor] = []
            with capture_hessians(groups, device, diagonal_only=hessians == "diag") as accs:
                for h, kw in zip(hidden, kwargs):
                    out = _block_forward(block, h, kw, device)
                    if read_only:  # already the final outputs; a compressing step recomputes them instead
                        kept.append(out.to(store))
                    del out
            outputs = kept if read_only else None
            H = finite_hessians(originals[index], groups, accs)  # NaN/inf inputs named before the solver
            del accs  # their running sums would double the block's Hessians while it is compressed
        stats = compress(originals[index], block, groups, H) or {}
        del H
        if outputs is None:
            # the block changed: its outputs are recomputed from the compressed weights
            outputs = [_block_forward(block, h, kw, device).to(store) for h, kw in zip(hidden, kwargs)]
        hidden = outputs
        del outputs
        _offload(block, onload)
        if stream is not None:  # the compressed block waits on disk; only the next one will be resident
            stream.store(block, prefix, changed=not read_only, tag=f"block_{originals[index]:05d}")
        stats = {"layer": originals[index], "seconds": round(time.perf_counter() - block_start, 3), **stats}
        result.stats.append(stats)
        if ckpt is not None:
            ckpt.save(index, block, hidden, result.stats, _export(compress, originals[index]))
        bar.update(1)
        if "loss" in stats:
            bar.set_postfix(loss=f"{stats['loss']:.3g}")
    bar.close()
    if ckpt is not None and not options.keep_checkpoint:
        ckpt.remove()
    result.seconds = time.perf_counter() - start
    return result


def _stream_in(model: nn.Module, stream: BlockStream | None, block: nn.Module) -> str:
    """Read a streamed block's weights from disk (and check them); returns its name prefix."""
    if stream is None:
        return ""
    prefix = next(f"{name}." for name, m in model.named_modules() if m is block)
    stream.load(block, prefix)
    check_finite_weights(block)  # a streamed model's weights are only seen now
    return prefix


def _export(compress: BlockFn, layer: int) -> dict[str, torch.Tensor]:
    export = getattr(compress, "export_state", None)
    return export(layer) if export is not None else {}


def _onload(block: nn.Module, device: torch.device):
    """Move ``block`` to the compute device for its turn (accelerate hook); None when already there."""
    current = next(block.parameters(), torch.empty(0)).device
    if current == device:
        return None
    _, hook = cpu_offload_with_hook(block, execution_device=device)
    block.to(device)
    return hook


def _offload(block: nn.Module, hook) -> None:
    if hook is not None:
        hook.offload()
        remove_hook_from_module(block)
