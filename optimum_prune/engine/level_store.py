"""Per-Linear compression levels on disk: SparseGPT masks or GPTQ codes of every block Linear at every level.

EvoPress's sparsity and bit-width searches score thousands of mixes of per-layer levels; each level of
each Linear is compressed once, here, from the dense model's Hessians (one read-only sequential pass),
and a candidate is assembled by loading levels. Storage is compact: a sparsity level keeps its packed
mask and the surviving (OBS-updated) weights in 16 bits; a bit-width level keeps its packed codes and
scales (the compressed-tensors packing the saved model uses). One safetensors file per block, written
to a staging folder and moved into place, so an interrupted build resumes at the first missing block.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from ..saving import atomic_write
from .compress import QuantRecord
from .hessian import ResidualNorms
from .layers import LinearGroup, get_weight, set_weight
from .obs import PruneSpec, compress_weight
from .quant import QuantSpec
from ..fingerprints import content_hash as fingerprint
from .sequential import SequentialOptions, run_sequential

logger = logging.get_logger(__name__)

KINDS = ("sparsity", "bits")
MANIFEST = "level_store.json"


@dataclass(frozen=True)
class LinearUnit:
    """One compressible Linear of one block."""

    layer: int
    """Original layer index."""
    path: str
    """Path inside the block (e.g. ``self_attn.q_proj``)."""
    name: str
    """Full module name in the model."""
    shape: tuple[int, int]
    """[out_features, in_features]."""

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


class LevelStore:
    """Read access to a built store: the weight (or quantization record) of any unit at any level."""

    def __init__(self, directory: str | os.PathLike, manifest: dict[str, Any] | None = None) -> None:
        """Open the store in ``directory``; ``manifest`` instead of its file reads blocks still being built."""
        self.directory = Path(directory)
        manifest = manifest or json.loads((self.directory / MANIFEST).read_text())
        self.kind: str = manifest["kind"]
        self.levels: list[float] = manifest["levels"]
        self.units = [LinearUnit(u["layer"], u["path"], u["name"], tuple(u["shape"])) for u in manifest["units"]]
        self.quant = QuantSpec(**manifest["quant"]) if manifest.get("quant") else None
        self.info: dict[str, Any] = manifest.get("info", {})
        self._files: dict[int, Any] = {}

    # -------------------------------------------------------------- reading
    def _file(self, layer: int):
        from safetensors import safe_open

        if layer not in self._files:
            self._files[layer] = safe_open(str(self.directory / f"block-{layer}.safetensors"), framework="pt")
        return self._files[layer]

    def weight(self, unit: int | LinearUnit, level: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [out, in] weight of ``unit`` compressed to level index ``level``."""
        u = self.units[unit] if isinstance(unit, int) else unit
        f = self._file(u.layer)
        key = f"{u.path}/{level}"
        if self.kind == "sparsity":
            values = f.get_tensor(f"{key}/values")
            if self.levels[level] == 0:
                return values.to(dtype).reshape(u.shape)
            keep = _unpack_bits(f.get_tensor(f"{key}/mask"), u.numel)
            out = torch.zeros(u.numel, dtype=dtype)
            out[keep] = values.to(dtype)
            return out.reshape(u.shape)
        record = self.record(u, level)
        return _dequantize(record, dtype)

    def record(self, unit: int | LinearUnit, level: int) -> QuantRecord:
        """The GPTQ codes, scales and grid of ``unit`` at bit-width level ``level`` (bits stores only)."""
        if self.kind != "bits":
            raise ValueError("quantization records exist in bit-width stores only")
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        u = self.units[unit] if isinstance(unit, int) else unit
        f = self._file(u.layer)
        key = f"{u.path}/{level}"
        bits = int(self.levels[level])
        scale = f.get_tensor(f"{key}/scale")
        spec = QuantSpec(bits, int(u.shape[1] // scale.shape[1]) if scale.shape[1] > 1 else None,
                         self.quant.symmetric, self.quant.act_order)
        codes = unpack_from_int32(f.get_tensor(f"{key}/codes"), bits, torch.Size(u.shape)).to(torch.int8)
        return QuantRecord(codes, scale, None, spec)

    # -------------------------------------------------------------- sizes
    def nbytes(self) -> int:
        """Bytes on disk (all block files)."""
        return sum(p.stat().st_size for p in self.directory.glob("block-*.safetensors"))

    def compressed_numel(self, unit: int, level: int) -> float:
        """What level ``level`` leaves of ``unit``: kept weights (sparsity) or bits of storage (bits)."""
        u = self.units[unit]
        value = self.levels[level]
        return u.numel * (1 - value) if self.kind == "sparsity" else u.numel * value


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy().astype(np.uint8)))


def _unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=count).astype(bool))


def _dequantize(record: QuantRecord, dtype: torch.dtype) -> torch.Tensor:
    """Exactly what compressed-tensors computes at load: codes × scale of each column's group."""
    cols = record.codes.shape[1]
    group_of = torch.arange(cols) // (record.spec.group or cols)
    scale = record.scale.to(dtype)
    return (record.codes.to(dtype) * scale[:, group_of]).to(dtype)


def _storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """16-bit storage: bf16 models keep bf16, everything else is kept in fp16."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


# --------------------------------------------------------------------------- building
def sparsity_levels(target: float, step: float = 0.05, below: float = 0.3, above: float = 0.2,
                    maximum: float = 0.95) -> list[float]:
    """Evenly spaced sparsities around ``target`` (target included), so one level switch moves a fixed count."""
    if not 0 < target < 1:
        raise ValueError(f"sparsity must be in (0, 1), got {target}")
    low = max(0.0, target - below)
    k_low = -int(math.floor((target - low) / step + 1e-9))
    k_high = int(math.floor((min(target + above, maximum) - target) / step + 1e-9))
    return [max(0.0, round(target + k * step, 6)) for k in range(k_low, k_high + 1)]


def build_level_store(model: nn.Module, input_ids: torch.Tensor, directory: str | os.PathLike, *, kind: str,
                      levels: list[float], quant: QuantSpec | None = None, dampening: float = 0.01,
                      blocksize: int = 128, propagate: float | None = None,
                      options: SequentialOptions | None = None) -> LevelStore:
    """Compress every block Linear of ``model`` (left unchanged) to every level; return the store.

    ``kind="sparsity"``: SparseGPT at each sparsity in ``levels``; ``kind="bits"``: GPTQ at each bit-width
    in ``levels`` on the grid ``quant`` (group size, symmetric, act-order). ``propagate`` (one of the
    levels, normally the search's target): each block is calibrated on the outputs of the blocks before
    it compressed at that level, as sequential SparseGPT / GPTQ would see them, so a state near the
    target is close to a sequentially compressed model; None calibrates every block on dense inputs.
    An existing store with the same settings is reused; a partial one (interrupted) resumes at its
    first missing block.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown level store kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "bits":
        quant = quant or QuantSpec(4, 128, True, True)
        if not quant.symmetric:
            raise ValueError("bit-width stores use symmetric grids (what the packed checkpoint can save)")
        levels = sorted(int(b) for b in levels)
    else:
        levels = sorted(float(s) for s in levels)
        if any(not 0 <= s < 1 for s in levels):
            raise ValueError(f"sparsity levels must be in [0, 1), got {levels}")
    if propagate is not None and not any(abs(propagate - v) < 1e-9 for v in levels):
        raise ValueError(f"propagate={propagate} is not one of the levels {levels}")
    carry = None if propagate is None else min(range(len(levels)), key=lambda j: abs(levels[j] - propagate))
    directory = Path(directory)
    key = fingerprint("level-store", kind, levels, asdict(quant) if quant else None, dampening, blocksize, input_ids,
                      type(model).__name__, propagate)
    if (directory / MANIFEST).is_file():
        store = LevelStore(directory)
        if store.info.get("key") == key:
            logger.info("reusing the level store in %s", directory)
            return store
        raise FileExistsError(f"{directory} holds a level store built with other settings; remove it or pick "
                              "another directory")
    staging = directory.with_name(directory.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    stamp = staging / "key"
    if stamp.is_file() and stamp.read_text() != key:
        shutil.rmtree(staging)
        staging.mkdir(parents=True)
    stamp.write_text(key)
    names = {id(m): n for n, m in model.named_modules()}
    units: list[LinearUnit] = []
    dtype = _storage_dtype(next(model.parameters()).dtype)

    dense: list[tuple[nn.Module, torch.Tensor]] = []  # the previous block's dense weights, restored one step late

    def restore() -> None:
        with torch.no_grad():
            for module, weight in dense:
                module.weight.data.copy_(weight)
        dense.clear()

    def carry_forward(block_file: Path, groups: list[LinearGroup], layer: int) -> None:
        """Leave the block at the propagated level so the next block is calibrated on its outputs."""
        restore()
        if carry is None:
            return
        partial = LevelStore(block_file.parent, {"kind": kind, "levels": levels, "units": [],
                                                 "quant": asdict(quant) if quant else None})
        with torch.no_grad():
            for group in groups:
                for path, module in zip(group.names, group.modules):
                    dense.append((module, module.weight.data.clone()))
                    unit = LinearUnit(layer, path, names[id(module)], tuple(get_weight(module).shape))
                    set_weight(module, partial.weight(unit, carry, get_weight(module).dtype))

    def step(layer: int, block: nn.Module, groups: list[LinearGroup], hessians: dict[str, torch.Tensor]) -> dict:
        for group in groups:
            for path, module in zip(group.names, group.modules):
                units.append(LinearUnit(layer, path, names[id(module)], tuple(get_weight(module).shape)))
        target = staging / f"block-{layer}.safetensors"
        if target.is_file():
            from safetensors import safe_open

            with safe_open(str(target), framework="pt") as f:
                block_losses = json.loads(f.metadata()["losses"])
            losses.update({f"{layer}/{p}": v for p, v in block_losses.items()})
            carry_forward(target, groups, layer)
            return {"reused": True}
        tensors: dict[str, torch.Tensor] = {}
        block_losses = {}
        for group in groups:
            H = hessians[group.kind]
            for path, module in zip(group.names, group.modules):
                W = get_weight(module)
                block_losses[path] = []
                for index, value in enumerate(levels):
                    level_tensors, loss = _compress_level(W, H, kind, value, quant, dampening, blocksize, dtype,
                                                          f"{path}/{index}")
                    tensors.update(level_tensors)
                    block_losses[path].append(loss)
        _save_atomic(tensors, target, {"losses": json.dumps(block_losses)})
        losses.update({f"{layer}/{p}": v for p, v in block_losses.items()})
        carry_forward(target, groups, layer)
        return {"loss": sum(v[0] for v in block_losses.values())}

    step.modifies_weights = carry is not None  # type: ignore[attr-defined]
    options = options or SequentialOptions()
    description = "EvoPress sparsity levels" if kind == "sparsity" else "EvoPress bit-width levels"
    options = SequentialOptions(**{**options.__dict__, "description": description, "checkpoint_dir": None})
    losses: dict[str, list[float]] = {}
    residual = ResidualNorms(model)
    try:
        run_sequential(model, input_ids, step, hessians="full", options=options, run_id=key)
    finally:
        residual.remove()
        restore()
    manifest = {"kind": kind, "levels": levels, "quant": asdict(quant) if quant else None,
                "units": [asdict(u) | {"shape": list(u.shape)} for u in units],
                "info": {"key": key, "dampening": dampening, "calibration_tokens": int(input_ids.numel()),
                         "storage_dtype": str(dtype).replace("torch.", ""), "propagate": propagate,
                         "losses": [losses[f"{u.layer}/{u.path}"] for u in units],
                         "residual": {str(k): v for k, v in residual.medians().items()}}}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
    stamp.unlink()
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(staging, directory)
    return LevelStore(directory)


def _compress_level(W: torch.Tensor, H: torch.Tensor, kind: str, value: float, quant: QuantSpec | None,
                    dampening: float, blocksize: int, dtype: torch.dtype, key: str
                    ) -> tuple[dict[str, torch.Tensor], float]:
    """The tensors stored for one level of one Linear, and its OBS loss."""
    if kind == "sparsity":
        if value == 0:
            return {f"{key}/values": W.detach().to(dtype).reshape(-1).contiguous()}, 0.0
        result = compress_weight(W, H, prune=PruneSpec(value), blocksize=blocksize, percdamp=dampening)
        flat = result.weight.reshape(-1)
        keep = flat != 0
        return {f"{key}/values": flat[keep].to(dtype).contiguous(), f"{key}/mask": _pack_bits(keep.cpu())}, result.loss
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    spec = QuantSpec(int(value), quant.group_size, quant.symmetric, quant.act_order)
    result = compress_weight(W, H, quant=spec, blocksize=blocksize, percdamp=dampening)
    return ({f"{key}/codes": pack_to_int32(result.codes.cpu(), int(value)).contiguous(),
             f"{key}/scale": result.scale.cpu().contiguous()}, result.loss)


def _save_atomic(tensors: dict[str, torch.Tensor], target: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    atomic_write(target, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


__all__ = ["LinearUnit", "LevelStore", "build_level_store", "sparsity_levels"]
