"""The resume state of a sequential run: block files plus a manifest that proves they belong to this run.

``state.json`` is the manifest: which run wrote the directory (fingerprints of the model, the method
settings, the calibration ids and the batch size), how far it got, and the size and sha256 of every file
it relies on. It is written last and atomically, so it only ever names files that were completely
written. A directory that is not ours, belongs to another run, or whose files no longer match the
manifest raises ``CheckpointError`` saying to remove it or pick another ``checkpoint_dir``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..fingerprints import content_hash as _hash
from ..fingerprints import model_fingerprint
from ..saving import atomic_write

FORMAT = "optimum-prune sequential checkpoint"
VERSION = 2
_ASPECTS = {"model": "the model (architecture or weights)", "method": "the method settings",
            "calibration": "the calibration data", "batch_size": "the batch size"}
_OURS = re.compile(r"^\.?(block_\d{4}(\.extra)?\.safetensors|activations_\d{4}\.pt|state\.json)(\..+\.tmp)?$")


class CheckpointError(RuntimeError):
    """A checkpoint_dir that cannot be resumed (foreign, of another run, or corrupt); says to remove it."""


def run_fingerprint(model: nn.Module, run_id: str, input_ids: torch.Tensor, batch_size: int) -> dict[str, str]:
    """What defines a run: a checkpoint only resumes a run equal in all four."""
    return {"model": model_fingerprint(model), "method": _hash(run_id), "calibration": _hash(input_ids),
            "batch_size": str(batch_size)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save through a Python file, so a failed write raises OSError (ENOSPC, EACCES), not RuntimeError."""
    with open(path, "wb") as f:
        torch.save(obj, f)


class Checkpoint:
    """Resume state of a sequential run: one safetensors file per finished block plus the next inputs."""

    def __init__(self, directory: str | os.PathLike, run: dict[str, str]) -> None:
        self.dir = Path(directory)
        self.run = run
        self.files: dict[str, dict[str, Any]] = {}

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def _fail(self, problem: str) -> CheckpointError:
        return CheckpointError(f"checkpoint_dir {self.dir} {problem}; remove it (to start over) or pick another "
                               "checkpoint_dir")

    def _state(self) -> dict[str, Any] | None:
        """The manifest, checked to be ours and of this run; None for a missing or empty directory."""
        if not self.dir.exists():
            return None
        if not self.dir.is_dir():
            raise self._fail("is not a directory")
        if not self.state_file.is_file():
            names = [p.name for p in self.dir.iterdir()]
            if not all(_OURS.match(n) for n in names):
                raise self._fail("holds files but no checkpoint manifest (state.json): it is not a checkpoint of "
                                 "this tool, or it was tampered with")
            for name in names:  # a run killed before its first manifest: nothing to resume
                (self.dir / name).unlink(missing_ok=True)
            return None
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise self._fail(f"has an unreadable manifest state.json ({err})") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise self._fail("has a state.json that is not a checkpoint manifest of this tool (or of an older "
                             "version)")
        if state.get("version") != VERSION:
            raise self._fail(f"was written by manifest version {state.get('version')}, this is {VERSION}")
        saved = state.get("fingerprint") or {}
        differ = [_ASPECTS[k] for k in _ASPECTS if saved.get(k) != self.run[k]]
        if differ:
            raise self._fail("holds a checkpoint of a different run (" + ", ".join(differ) + " changed)")
        return state

    def exists(self) -> bool:
        """True when a resumable checkpoint of this run is there (raises for a foreign or corrupt one)."""
        state = self._state()
        if state is None:
            return False
        self._verify(state)
        return int(state.get("next_block", 0)) > 0

    def _verify(self, state: dict[str, Any]) -> None:
        """Every file the manifest names is there with its recorded size and sha256."""
        files = state.get("files")
        first = state.get("next_block")
        if not isinstance(files, dict) or not isinstance(first, int) or first < 0 or "activations" not in state:
            raise self._fail("has an incomplete manifest")
        for name, entry in files.items():
            path = self.dir / name
            if not isinstance(entry, dict) or not _OURS.match(name) or not path.is_file():
                raise self._fail(f"is missing {name}")
            if path.stat().st_size != entry.get("size") or _sha256(path) != entry.get("sha256"):
                raise self._fail(f"has a corrupt {name} (its size or sha256 differs from the manifest)")
        needed = {f"block_{i:04d}.safetensors" for i in range(first)} | ({state["activations"]} if first else set())
        if needed - set(files):
            raise self._fail(f"is missing {sorted(needed - set(files))[0]}")
        self.files = files

    def load_blocks(self, layers: nn.ModuleList, originals: list[int], compress: Any
                    ) -> tuple[int, list[dict[str, Any]]]:
        state = json.loads(self.state_file.read_text())
        first = state["next_block"]
        if first > len(layers):
            raise self._fail(f"records {first} finished blocks, but the model has {len(layers)}")
        restore = getattr(compress, "import_state", None)
        for index in range(first):
            weights = load_file(str(self.dir / f"block_{index:04d}.safetensors"))
            missing, unexpected = layers[index].load_state_dict(weights, strict=False)
            if unexpected or [m for m in missing if not m.endswith("inv_freq")]:
                raise self._fail(f"holds block {index} weights that do not match the model")
            extra = self.dir / f"block_{index:04d}.extra.safetensors"
            if restore is not None and extra.name in self.files:
                restore(originals[index], load_file(str(extra)))
        return first, state["stats"]

    def load_activations(self, store: torch.device) -> list[torch.Tensor]:
        state = json.loads(self.state_file.read_text())
        return [t.to(store) for t in torch.load(self.dir / state["activations"], weights_only=True)]

    def save(self, index: int, block: nn.Module, hidden: list[torch.Tensor], stats: list[dict[str, Any]],
             extra: dict[str, torch.Tensor]) -> None:
        """Write block ``index``'s weights, extra state and outputs, then the manifest that names them."""
        if index == 0:
            self._state()  # a foreign directory is refused before anything is written into it
            self.files = {}
        self.dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
        written = [f"block_{index:04d}.safetensors"]
        atomic_write(self.dir / written[0], lambda p: save_file(tensors, str(p)))
        if extra:
            extra = {k: v.detach().cpu().contiguous() for k, v in extra.items()}
            written.append(f"block_{index:04d}.extra.safetensors")
            atomic_write(self.dir / written[-1], lambda p: save_file(extra, str(p)))
        activations = f"activations_{index + 1:04d}.pt"  # named by block: the manifest never names a newer file
        written.append(activations)
        atomic_write(self.dir / activations, lambda p: _torch_save([h.cpu() for h in hidden], p))
        old = [n for n in self.files if n.startswith("activations_")]
        self.files = {n: e for n, e in self.files.items() if n not in old}
        for name in written:
            path = self.dir / name
            self.files[name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        state = {"format": FORMAT, "version": VERSION, "fingerprint": self.run, "next_block": index + 1,
                 "activations": activations, "files": self.files, "stats": stats}
        atomic_write(self.state_file, lambda p: p.write_text(json.dumps(state, indent=1)))
        for name in old:
            (self.dir / name).unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
