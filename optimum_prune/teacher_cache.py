"""Teacher logits for distillation, computed once and kept on disk (memory-mapped), so a step runs the student only.

A cache belongs to one teacher, one tokenizer and one set of training windows. It holds, per token position,
either the teacher's full fp32 log-probs, or its top-k logits (int32 token ids + fp32 raw logits) and the
log-sum-exp over the whole vocabulary (fp64), from which the teacher's probability outside the top-k is exact
(``docs/healing.md`` defines the loss). Files: ``input_ids.npy``, ``logprobs.npy`` or ``values.npy`` /
``indices.npy`` / ``lse.npy`` (``numpy.load(..., mmap_mode="r")``) and ``manifest.json`` (format, the fingerprints
of the teacher, the tokenizer and the windows, top_k, temperature). A cache is built block by block in
``<directory>.partial`` (resumable: ``state.json`` counts the windows written) and renamed into place only when
complete, so a half-written cache is never read as a finished one. A cache of another teacher, tokenizer or
windows is refused (``rebuild=True`` replaces it).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from .evaluation.models import LogitsSource, chunk_rows, eval_no_grad, place, require_causal_lm
from .evaluation.windows import as_windows, batches
from .fingerprints import content_hash as _hash
from .fingerprints import model_fingerprint, tokenizer_fingerprint
from .saving import atomic_write_text

logger = logging.get_logger(__name__)

FORMAT = "optimum-prune teacher cache"
VERSION = 1
MANIFEST = "manifest.json"
_ASPECTS = {"teacher": "the teacher model (architecture or weights)", "tokenizer": "the tokenizer",
            "windows": "the training windows (data, seq_len, seed or number of windows)", "top_k": "top_k",
            "temperature": "the temperature"}


class TeacherCacheError(ValueError):
    """A teacher cache that cannot be used for this run (another teacher, tokenizer or windows); names the fix."""


def windows_fingerprint(input_ids: torch.Tensor) -> str:
    """A short hash of the token windows (their shape and every id)."""
    ids = as_windows(input_ids)
    return _hash(list(ids.shape), ids.cpu().contiguous().numpy().astype(np.int64).tobytes().hex())


def cache_identity(teacher: nn.Module, input_ids: torch.Tensor, tokenizer: Any, top_k: int | None,
                   temperature: float) -> dict[str, Any]:
    """What a cache must match to be reused: teacher, tokenizer, windows, top_k and (top-k only) temperature."""
    return {"teacher": model_fingerprint(teacher), "tokenizer": tokenizer_fingerprint(tokenizer),
            "windows": windows_fingerprint(input_ids), "top_k": top_k,
            "temperature": None if top_k is None else float(temperature)}


@dataclass
class TeacherRows:
    """The teacher's side of the loss for a batch of windows, on the student's device (see ``distill``)."""

    logprobs: torch.Tensor | None = None
    """[B, L, V] fp32 log-probs at temperature 1 (full caches)."""
    values: torch.Tensor | None = None
    """[B, L, k] fp32 raw top-k logits (top-k caches)."""
    indices: torch.Tensor | None = None
    """[B, L, k] int64 token ids of ``values``."""
    lse: torch.Tensor | None = None
    """[B, L] fp64 log-sum-exp over the whole vocabulary of logits / temperature."""


@dataclass
class TeacherCache:
    """A complete cache, opened read-only with memory-mapped arrays (``TeacherCache.open``)."""

    directory: Path
    manifest: dict[str, Any]
    input_ids: np.ndarray
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> TeacherCache:
        """Open a finished cache (its manifest exists only once every window is written)."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            partial = " (an interrupted build is in " + str(_staging(directory)) + ")" if _staging(
                directory).is_dir() else ""
            raise TeacherCacheError(f"{directory} holds no finished teacher cache{partial}: build it with "
                                    "build_teacher_cache(teacher, input_ids, directory)")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise TeacherCacheError(f"{directory} is not a teacher cache of this version ({FORMAT} v{VERSION}); "
                                    "remove it or pick another directory")
        names = ["logprobs"] if manifest["top_k"] is None else ["values", "indices", "lse"]
        arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in names}
        return cls(directory, manifest, np.load(directory / "input_ids.npy", mmap_mode="r"), arrays)

    @property
    def top_k(self) -> int | None:
        return self.manifest["top_k"]

    @property
    def temperature(self) -> float | None:
        """The temperature the log-sum-exp was taken at (top-k); None: full log-probs serve every temperature."""
        return self.manifest["identity"]["temperature"]

    @property
    def num_windows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def check(self, expected: dict[str, Any]) -> None:
        """Raise TeacherCacheError naming every aspect in which this cache differs from ``expected``."""
        saved = self.manifest["identity"]
        differ = [_ASPECTS[k] for k in _ASPECTS if k in expected and saved.get(k) != expected[k]]
        if differ:
            raise TeacherCacheError(f"the teacher cache in {self.directory} was built for another run: "
                                    f"{', '.join(differ)} differ. Remove it, pick another directory, or pass "
                                    "rebuild=True")

    def check_temperature(self, temperature: float) -> None:
        """A top-k cache serves only the temperature its log-sum-exp was taken at."""
        if self.temperature is not None and abs(self.temperature - temperature) > 1e-12:
            raise TeacherCacheError(f"the top-k teacher cache in {self.directory} holds the log-sum-exp at "
                                    f"temperature {self.temperature}, not {temperature}: rebuild it with "
                                    f"temperature={temperature} (or use a full cache, top_k=None)")

    def rows(self, window_index: torch.Tensor, device: torch.device | str = "cpu",
             input_ids: torch.Tensor | None = None) -> TeacherRows:
        """The cached teacher rows of windows ``window_index`` [B]; with ``input_ids`` they must be those windows."""
        index = np.asarray(torch.as_tensor(window_index).reshape(-1).cpu(), dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.num_windows):
            raise TeacherCacheError(f"window index {int(index.max())} is outside the teacher cache's "
                                    f"{self.num_windows} windows")
        if input_ids is not None:
            cached = torch.from_numpy(self.input_ids[index].astype(np.int64))
            if not torch.equal(cached, input_ids.detach().cpu().long()):
                raise TeacherCacheError(f"the batch's tokens differ from those cached in {self.directory} for "
                                        "the same windows: the cache was built on other training windows")
        take = lambda name: torch.from_numpy(np.ascontiguousarray(self.arrays[name][index])).to(device)  # noqa: E731
        if self.top_k is None:
            return TeacherRows(logprobs=take("logprobs"))
        return TeacherRows(values=take("values"), indices=take("indices").long(), lse=take("lse"))


def _staging(directory: Path) -> Path:
    return directory.with_name(directory.name + ".partial")


def build_teacher_cache(teacher: nn.Module, input_ids: torch.Tensor, directory: str | os.PathLike, *,
                        tokenizer: Any = None, top_k: int | None = 100, temperature: float = 1.0,
                        batch_size: int = 4, device: str | torch.device | None = None, progress: bool = True,
                        rebuild: bool = False) -> TeacherCache:
    """The teacher's cache for ``input_ids`` [n, seq_len] in ``directory``: reused if it matches, else built.

    ``top_k=None`` keeps the full log-probs (n * seq_len * vocab * 4 bytes); otherwise the top-k raw logits and
    the fp64 log-sum-exp of logits / ``temperature``. A finished cache of another teacher / tokenizer / windows /
    top_k raises TeacherCacheError (``rebuild=True`` replaces it); an interrupted build of the same run resumes.
    """
    require_causal_lm(teacher, "caching teacher logits")
    windows = as_windows(input_ids)
    if top_k is not None and top_k < 1:
        raise TeacherCacheError(f"top_k must be a positive number of tokens (or None for the full log-probs), "
                                f"got {top_k}")
    if temperature <= 0:
        raise TeacherCacheError(f"temperature must be positive, got {temperature}")
    directory = Path(directory)
    identity = cache_identity(teacher, windows, tokenizer, top_k, temperature)
    from accelerate import PartialState

    with PartialState().main_process_first():  # under `accelerate launch` one process builds, the others reuse
        return _build(teacher, windows, directory, identity, tokenizer, top_k, temperature, batch_size, device,
                      progress, rebuild)


def _build(teacher: nn.Module, windows: torch.Tensor, directory: Path, identity: dict[str, Any], tokenizer: Any,
           top_k: int | None, temperature: float, batch_size: int, device: Any, progress: bool,
           rebuild: bool) -> TeacherCache:
    """``build_teacher_cache`` once its arguments are checked: reuse, refuse, resume or build."""
    if (directory / MANIFEST).is_file():
        cache = TeacherCache.open(directory)
        try:
            cache.check(identity)
            logger.info("reusing the teacher cache in %s", directory)
            return cache
        except TeacherCacheError:
            if not rebuild:
                raise
        logger.warning("rebuilding the teacher cache in %s (it was built for another run)", directory)
    elif directory.exists() and any(directory.iterdir()):
        raise TeacherCacheError(f"{directory} exists and is not a teacher cache: pick an empty or new directory")
    staging = _staging(directory)
    state_path = staging / "state.json"
    key = _hash(identity)
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    if state is None or state.get("key") != key:
        if staging.exists():
            logger.info("discarding an interrupted teacher cache build of another run in %s", staging)
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        state = {"key": key, "done": 0}
    elif state["done"]:
        logger.info("resuming the teacher cache build in %s at window %d of %d", staging, state["done"],
                    windows.shape[0])
    _fill(teacher, windows, staging, state, top_k, temperature, batch_size, device, progress)
    manifest = {"format": FORMAT, "version": VERSION, "identity": identity, "top_k": top_k,
                "temperature_independent": top_k is None, "num_windows": windows.shape[0],
                "seq_len": windows.shape[1], "vocab_size": state["vocab"],
                "tokenizer_name": getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None}
    atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=1))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(staging, directory)
    return TeacherCache.open(directory)


def _fill(teacher: nn.Module, windows: torch.Tensor, staging: Path, state: dict[str, Any], top_k: int | None,
          temperature: float, batch_size: int, device: Any, progress: bool) -> None:
    """Write the teacher's rows for every window not yet done, batch by batch (the count saved after each)."""
    n, length = windows.shape
    run_device = place(teacher, device)
    with eval_no_grad(teacher):
        source = LogitsSource.probing(teacher, windows, run_device)
        vocab = state.get("vocab") or _vocab(source, windows, run_device)
        state["vocab"] = vocab
        arrays = _open_arrays(staging, n, length, vocab, top_k, fresh=state["done"] == 0)
        if state["done"] == 0:
            arrays["input_ids"][:] = windows.numpy().astype(np.int32)
        step = chunk_rows(vocab)
        start_row = state["done"]
        desc = f"teacher logits ({'full' if top_k is None else f'top-{top_k}'})"
        for rows in batches(n - start_row, batch_size, desc, progress):
            rows = slice(rows.start + start_row, rows.stop + start_row)
            states = source.states(windows[rows].to(run_device))
            out = {name: [] for name in arrays if name != "input_ids"}
            for begin in range(0, states.shape[0], step):
                chunk = states[begin:begin + step]
                logits = (source.head(chunk) if source.head is not None else chunk).float()
                if top_k is None:
                    out["logprobs"].append(torch.log_softmax(logits, dim=-1).cpu())
                else:
                    values, indices = logits.topk(min(top_k, vocab), dim=-1)
                    out["values"].append(values.cpu())
                    out["indices"].append(indices.int().cpu())
                    out["lse"].append(torch.logsumexp(logits.double() / temperature, dim=-1).cpu())
            count = rows.stop - rows.start
            for name, parts in out.items():
                block = torch.cat(parts).numpy()
                arrays[name][rows] = block.reshape((count, length) + block.shape[1:])
            for array in arrays.values():
                array.flush()
            state["done"] = rows.stop
            atomic_write_text(staging / "state.json", json.dumps(state))
        del arrays


def _vocab(source: LogitsSource, windows: torch.Tensor, device: torch.device) -> int:
    states = source.states(windows[:1, :2].to(device))
    return source.vocab_size(states)


def _open_arrays(staging: Path, n: int, length: int, vocab: int, top_k: int | None,
                 fresh: bool) -> dict[str, np.ndarray]:
    """The cache's .npy files as writable memory maps (created when ``fresh``)."""
    k = None if top_k is None else min(top_k, vocab)
    shapes = {"input_ids": ((n, length), np.int32)}
    if k is None:
        shapes["logprobs"] = ((n, length, vocab), np.float32)
    else:
        shapes.update(values=((n, length, k), np.float32), indices=((n, length, k), np.int32),
                      lse=((n, length), np.float64))
    if fresh:
        gib = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in shapes.values()) / 2**30
        free = shutil.disk_usage(staging).free / 2**30
        if gib > free:
            raise TeacherCacheError(f"the teacher cache needs {gib:.1f} GiB but {staging.parent} has {free:.1f} GiB "
                                    "free: use a smaller top_k, fewer windows, or another directory")
        if gib > 2:
            logger.warning("the teacher cache will take %.1f GiB on disk in %s", gib, staging.parent)
    return {name: np.lib.format.open_memmap(staging / f"{name}.npy", mode="w+" if fresh else "r+", dtype=dtype,
                                            shape=shape)
            for name, (shape, dtype) in shapes.items()}
