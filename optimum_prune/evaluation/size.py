"""Model size: parameters and weight bytes of a model object, a checkpoint directory or a GGUF file.

``count_parameters`` is the one parameter counter of the package (the pruning summary uses it too).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.gguf")


@dataclass
class SizeResult:
    """Parameter count and bytes of weights (on disk for a checkpoint, in memory for a model object)."""

    parameters: int
    file_bytes: int
    source: str
    """"memory" (a model object), "safetensors", "pytorch" (``.bin``) or "gguf"."""


def count_parameters(source: nn.Module | Iterable[torch.Tensor]) -> tuple[int, int]:
    """(number of elements, bytes) of a module's parameters, or of loose tensors (a state dict's values);
    a tensor that appears twice (tied weights) is counted once. Bytes are in each tensor's own dtype."""
    tensors = source.parameters() if isinstance(source, nn.Module) else source
    seen: dict[int, torch.Tensor] = {}  # holding the tensors keeps their ids from being reused
    n = b = 0
    for t in tensors:
        if id(t) in seen:
            continue
        seen[id(t)] = t
        n += t.numel()
        b += t.numel() * t.element_size()
    return n, b


def model_size(model_or_dir: nn.Module | str | os.PathLike) -> SizeResult:
    """Parameters and weight bytes of a model object, a checkpoint directory or a GGUF file.

    On disk only tensor headers are read (no weights loaded) and bytes are the weight files' sizes. In
    memory, parameters are unique ``nn.Parameter`` elements and bytes those of parameters and persistent
    buffers in their own dtypes (so packed int32 quantized weights count their real bytes).
    """
    if isinstance(model_or_dir, nn.Module):
        return _memory_size(model_or_dir)
    path = os.fspath(model_or_dir)
    if not os.path.exists(path):
        from ..loading import resolve_embedded

        embedded = resolve_embedded(path)
        if embedded is None:
            raise FileNotFoundError(f"no checkpoint directory or file at {path!r}")
        directory, gguf_file, _ = embedded
        path = os.path.join(directory, gguf_file) if gguf_file else directory
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return _gguf_size(path)
        if path.endswith(".safetensors"):
            return _safetensors_size([path])
        raise ValueError(f"{path!r} is not a .safetensors or .gguf file")
    found = {pattern: sorted(glob.glob(os.path.join(path, pattern))) for pattern in _WEIGHT_PATTERNS}
    if found["*.safetensors"]:
        return _safetensors_size(found["*.safetensors"])
    if found["pytorch_model*.bin"]:
        return _torch_bin_size(found["pytorch_model*.bin"])
    if len(found["*.gguf"]) == 1:
        return _gguf_size(found["*.gguf"][0])
    raise FileNotFoundError(f"no weight files (*.safetensors, pytorch_model*.bin, one *.gguf) in {path!r}")


def _memory_size(model: nn.Module) -> SizeResult:
    params, nbytes = count_parameters(model)
    counted = {id(p) for p in model.parameters()}
    _, buffer_bytes = count_parameters(b for b in _persistent_buffers(model) if id(b) not in counted)
    return SizeResult(parameters=params, file_bytes=nbytes + buffer_bytes, source="memory")


def _persistent_buffers(model: nn.Module) -> Iterator[torch.Tensor]:
    """The buffers a checkpoint saves (non-persistent ones, such as rotary caches, left out)."""
    for module in model.modules():
        skip = getattr(module, "_non_persistent_buffers_set", set())
        for name, b in module.named_buffers(recurse=False):
            if b is not None and name not in skip:
                yield b


def _safetensors_size(files: Sequence[str]) -> SizeResult:
    from safetensors import safe_open

    def headers() -> Iterator[torch.Tensor]:
        for file in files:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    yield torch.empty(f.get_slice(key).get_shape(), device="meta")  # the shape, no data

    params, _ = count_parameters(headers())
    return SizeResult(parameters=params, file_bytes=sum(os.path.getsize(f) for f in files), source="safetensors")


def _torch_bin_size(files: Sequence[str]) -> SizeResult:
    params = 0
    for file in files:
        state = torch.load(file, map_location="meta", weights_only=True)
        params += count_parameters(t for t in state.values() if isinstance(t, torch.Tensor))[0]
    return SizeResult(parameters=params, file_bytes=sum(os.path.getsize(f) for f in files), source="pytorch")


def _gguf_size(file: str) -> SizeResult:
    try:
        from gguf import GGUFReader
    except ImportError as err:
        raise ImportError('reading GGUF files needs the gguf package: pip install "optimum-prune[gguf]"') from err
    reader = GGUFReader(file)
    params = sum(int(t.n_elements) for t in reader.tensors)
    return SizeResult(parameters=params, file_bytes=os.path.getsize(file), source="gguf")
