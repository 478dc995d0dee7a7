"""Block streaming: compress a model whose weights stay in their safetensors shards, one block resident at a time.

``load_streamed`` builds the model on the meta device (accelerate's ``init_empty_weights``; non-persistent
buffers such as rotary frequencies are computed as usual) and attaches a ``BlockStream``. The sequential
loop asks the stream for each block before its turn (``load``: read from the shards, or from the work
directory once compressed) and hands it back after (``store``: a changed block is written to the work
directory, then every tensor returns to meta). The embeddings are resident only while block 0's inputs are
captured. ``save_streamed`` writes a sharded checkpoint block by block. Peak memory is one block, its
Hessians and the calibration activations, whatever the depth: after each block is handed back, the C heap's
free pages are returned to the system (``release_free_heap``), otherwise glibc keeps the solver's freed
buffers resident and the peak grows with depth (2.30 GB at 16 layers against 1.36 GB at 2 for SparseGPT).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import shutil
import struct
import weakref
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors.torch import save_file
from torch import nn

from ..saving import atomic_write

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class StreamingError(ValueError):
    """A model that cannot be streamed (no safetensors shards, a budget below one block); says what to do."""


def parse_memory(value: int | str) -> int:
    """Bytes of a memory budget: an int, or a string such as "1GB", "800MiB", "2.5 GB"."""
    from ..sizes import parse_memory as parse

    try:
        return parse(value)
    except ValueError as err:
        raise StreamingError(f"max_memory={err}") from None


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """(tensor entries, byte offset of the data) of a safetensors file, reading only its header."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def read_tensors(path: str | os.PathLike, keys: list[str]) -> dict[str, torch.Tensor]:
    """``keys`` of a safetensors file, read into fresh memory (no mapping of the file: safetensors' own loader
    maps the whole file, and its pages would count as resident until the tensors are freed)."""
    header, start = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for key in keys:
            entry = header[key]
            begin, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
            f.seek(start + begin)
            view = tensor.view(-1).view(torch.uint8) if tensor.numel() else tensor
            if end > begin and f.readinto(memoryview(view.numpy())) != end - begin:
                raise StreamingError(f"{path} is truncated (tensor {key!r}); restore the checkpoint")
            out[key] = tensor
    return out


def shard_files(directory: str | os.PathLike) -> dict[str, str] | None:
    """{tensor key: shard file name} of a safetensors checkpoint directory, or None when it has none."""
    directory = Path(directory)
    if (directory / INDEX).is_file():
        return dict(json.loads((directory / INDEX).read_text())["weight_map"])
    if (directory / SINGLE).is_file():
        return {key: SINGLE for key in read_header(directory / SINGLE)[0]}
    return None


def checkpoint_bytes(directory: str | os.PathLike) -> int | None:
    """Total bytes of a directory's safetensors weight files (None when it has none)."""
    files = shard_files(directory)
    if files is None:
        return None
    return sum(os.path.getsize(Path(directory) / name) for name in set(files.values()))


@dataclass
class BlockStream:
    """Where each tensor of a streamed model lives: the source shards, or the work directory once changed."""

    source: Path
    files: dict[str, str]
    work: Path
    written: dict[str, Path] = field(default_factory=dict)
    _owns_work: bool = False

    @classmethod
    def open(cls, directory: str | os.PathLike, work_dir: str | os.PathLike | None = None) -> "BlockStream":
        files = shard_files(directory)
        if files is None:
            raise StreamingError(f"{directory} has no safetensors weights ({SINGLE} or {INDEX}); streaming reads "
                                 "blocks from safetensors shards: re-save the model with save_pretrained")
        owns = work_dir is None
        work = Path(tempfile.mkdtemp(prefix="optimum-prune-stream-") if owns else work_dir)
        work.mkdir(parents=True, exist_ok=True)
        stream = cls(Path(directory), files, work, _owns_work=owns)
        if owns:  # the compressed blocks live as long as the model that reads them
            weakref.finalize(stream, shutil.rmtree, str(work), True)
        return stream

    def _location(self, key: str) -> Path:
        if key in self.written:
            return self.written[key]
        if key not in self.files:
            raise StreamingError(f"the checkpoint at {self.source} has no tensor {key!r}")
        return self.source / self.files[key]

    def load(self, module: nn.Module, prefix: str, device: str | torch.device = "cpu") -> None:
        """Make ``module``'s streamed tensors (full names ``prefix.name``) real on ``device``."""
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for name in self._names(module, prefix):
            by_file.setdefault(self._location(f"{prefix}{name}"), []).append((name, f"{prefix}{name}"))
        for path, names in by_file.items():
            tensors = read_tensors(path, [key for _, key in names])
            for name, key in names:
                tensor = tensors.pop(key)
                set_module_tensor_to_device(module, name, device, value=tensor, dtype=tensor.dtype)

    def store(self, module: nn.Module, prefix: str, *, changed: bool, tag: str) -> None:
        """Return ``module``'s streamed tensors to meta, first writing them to the work directory when ``changed``."""
        names = self._names(module, prefix, resident=True)
        if changed:
            state = {f"{prefix}{n}": _tensor(module, n).detach().to("cpu").contiguous() for n in names}
            target = self.work / f"{tag}.safetensors"
            atomic_write(target, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
            self.written.update({key: target for key in state})
            del state
        for name in names:
            set_module_tensor_to_device(module, name, "meta")
        release_free_heap()

    def _names(self, module: nn.Module, prefix: str, resident: bool = False) -> list[str]:
        """Names (relative to ``module``) of its parameters and buffers the checkpoint holds."""
        out = []
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            key = f"{prefix}{name}"
            if (key in self.files or key in self.written) and (not resident or tensor.device.type != "meta"):
                out.append(name)
        return out


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` (None on other C libraries: musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return the C heap's free pages to the system (glibc ``malloc_trim(0)``); False where there is no such call.

    glibc raises its mmap threshold after each large buffer is freed (up to 32 MB), so the solver's later
    Hessians and temporaries come from the heap, and the pages they leave free in its middle stay resident
    (only the heap's top is ever trimmed on free). A streamed compression calls this each time a block goes
    back to disk, so what the previous blocks left free is not counted again. No process setting changes.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


def block_stream(model: nn.Module) -> BlockStream | None:
    """The stream of a model loaded by ``load_streamed`` (None for an ordinary model)."""
    return getattr(model, "_block_stream", None)


def _prefix(model: nn.Module, module: nn.Module) -> str:
    if module is model:
        return ""
    for name, candidate in model.named_modules():
        if candidate is module:
            return f"{name}."
    raise ValueError("the module is not part of the model")


@contextmanager
def resident(model: nn.Module, module: nn.Module, *, changed: bool = False) -> Iterator[nn.Module]:
    """``module`` of a streamed ``model`` with its weights real for the duration (a no-op for an ordinary model)."""
    stream = block_stream(model)
    if stream is None:
        yield module
        return
    prefix = _prefix(model, module)
    stream.load(module, prefix)
    try:
        yield module
    finally:
        stream.store(module, prefix, changed=changed, tag=prefix.rstrip(".").replace(".", "_"))


@contextmanager
def resident_stem(model: nn.Module, blocks: nn.ModuleList) -> Iterator[None]:
    """Everything of a streamed model but its blocks and its output head, real for the duration (block 0's inputs)."""
    stream = block_stream(model)
    if stream is None:
        yield
        return
    skip = {id(m) for m in blocks.modules()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        skip |= {id(m) for m in head.modules()}
    leaves = [(name, m) for name, m in model.named_modules() if id(m) not in skip]
    for name, m in leaves:
        _load_own(stream, m, f"{name}." if name else "")
    try:
        yield
    finally:
        for name, m in leaves:
            _store_own(stream, m, f"{name}." if name else "")


def _load_own(stream: BlockStream, module: nn.Module, prefix: str) -> None:
    """Load only ``module``'s direct tensors (not its children's)."""
    for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        key = f"{prefix}{name}"
        if key in stream.files or key in stream.written:
            value = read_tensors(stream._location(key), [key])[key]
            set_module_tensor_to_device(module, name, "cpu", value=value, dtype=value.dtype)


def _store_own(stream: BlockStream, module: nn.Module, prefix: str) -> None:
    for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if (f"{prefix}{name}" in stream.files or f"{prefix}{name}" in stream.written) and tensor.device.type != "meta":
            set_module_tensor_to_device(module, name, "meta")


def _checkpoint_dtype(directory: Path, files: dict[str, str]) -> torch.dtype:
    """The dtype of the checkpoint's first floating tensor (what ``from_pretrained(dtype="auto")`` gives)."""
    for name in sorted(set(files.values())):
        for entry in read_header(directory / name)[0].values():
            dtype = _DTYPES[entry["dtype"]]
            if dtype.is_floating_point:
                return dtype
    return torch.float32


def load_streamed(directory: str | os.PathLike, model_class: Any = None, *,
                  work_dir: str | os.PathLike | None = None) -> nn.Module:
    """The model at ``directory`` with every weight left in its safetensors shards (meta until needed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    stream = BlockStream.open(directory, work_dir)
    config = AutoConfig.from_pretrained(directory)
    model_class = model_class or AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        model = model_class.from_config(config, dtype=_checkpoint_dtype(directory, stream.files))
    model.eval()
    unknown = sorted(k for k in stream.files if k not in dict(model.state_dict()))
    if unknown:
        raise StreamingError(f"the checkpoint's tensors {unknown[:3]} have no place in {type(model).__name__}; "
                             "streaming needs a checkpoint saved by transformers for this architecture")
    model._block_stream = stream
    return model
