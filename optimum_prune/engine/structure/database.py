"""ZipLM's level database: structured OBS over attention heads and FFN neurons, every level in one pass.

Per layer, the output projection of each sublayer (o_proj / down_proj and their equivalents) sees its
input Hessian H. Removing a head or a neuron removes a group of that projection's input columns S;
structured OBS gives its loss ½·tr(W_S (H⁻¹_SS)⁻¹ W_Sᵀ) and the correction of the remaining weights.
Units are removed greedily one at a time (least loss first, H⁻¹ and W updated after each), so one pass
yields every level. The database keeps only WHICH units each level removes and its loss, plus H: the
corrected weights of any level are recomputed exactly from the dense W and H when a level is used
(``refit``), instead of storing a weight copy per level.

Post-norms (Gemma 2/3, OLMo 2: a norm between the output projection and the residual add): the projection's
output is rescaled token by token, so its raw error says nothing about the residual stream (on Gemma 3 270M the
raw output of a late MLP is ~1000x smaller than what its post-norm writes). The projection's rows are weighted by
the norm's measured per-channel gain (``engine.hessian.PostNormGains``) before the levels are computed: losses in
residual-stream units, the weights refit from the unweighted W.

The Hessians dominate its size (fp32, in_features² per sublayer: about 17 GB for a 7B Llama). Past
``spill_above`` bytes they are written to safetensors files and memory-mapped (``HessianSpill``): pages are
read on use and the kernel may drop them again, so a database larger than host memory still serves.

GQA: a level is (KV groups kept, query heads kept per group). Query heads are first removed one per
group at a time (the least-loss head of every group, jointly), giving levels (G, q); from each of
those, whole groups are removed greedily, giving (g, q) for every g. Without GQA, groups are heads.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from transformers.utils import logging

from ..hessian import PostNormGains, ResidualNorms
from ..layers import LinearGroup, get_weight
from ..obs import dampened_inverse
from ..sequential import SequentialOptions, run_sequential
from ...modeling.adapters import ModelDims, get_adapter

logger = logging.get_logger(__name__)

AttentionLevel = tuple[int, int]
"""(KV groups kept, query heads kept per group); (0, 0) removes the attention sublayer."""


@dataclass
class Level:
    """One compression level of a sublayer: the units it removes (original indices) and its OBS loss."""

    removed: tuple[int, ...]
    loss: float


@dataclass
class SublayerDatabase:
    """Every level of one sublayer, plus the damped Hessian its corrected weights are refit from."""

    kind: str
    """"attention" (units: query heads) or "mlp" (units: FFN neurons)."""
    levels: dict[Any, Level]
    hessian: torch.Tensor
    """Damped input Hessian of the output projection (fp32, CPU)."""
    unit_width: int
    """Input columns of the output projection per unit (head_dim for heads, 1 for neurons)."""

    def columns(self, removed: tuple[int, ...]) -> torch.Tensor:
        """Input columns of the output projection that survive when ``removed`` units are gone."""
        n = self.hessian.shape[0]
        keep = torch.ones(n, dtype=torch.bool)
        for unit in removed:
            keep[unit * self.unit_width:(unit + 1) * self.unit_width] = False
        return keep.nonzero().flatten()


@dataclass
class LayerDatabase:
    layer: int
    attention: SublayerDatabase
    mlp: SublayerDatabase
    scale: float = 1.0
    """Median squared norm of the residual stream entering the block: losses are read relative to it."""


@dataclass
class LevelDatabase:
    """The whole model's levels (by original layer index) and the settings that built them."""

    layers: dict[int, LayerDatabase]
    dims: ModelDims
    info: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Size: the Hessians dominate (memory-mapped ones included); the levels are index lists."""
        total = 0
        for entry in self.layers.values():
            for sub in (entry.attention, entry.mlp):
                total += sub.hessian.numel() * sub.hessian.element_size()
                total += sum(8 * len(level.removed) + 16 for level in sub.levels.values())
        return total

    def spilled_bytes(self) -> int:
        """Bytes of the Hessians that live in memory-mapped files rather than in memory."""
        return sum(sub.hessian.numel() * sub.hessian.element_size() for entry in self.layers.values()
                   for sub in (entry.attention, entry.mlp) if getattr(sub.hessian, "spilled", False))


# --------------------------------------------------------------------------- spilling to disk
class HessianSpill:
    """Keeps Hessians in memory up to ``above`` bytes, then writes each to a safetensors file and memory-maps it.

    The files are unlinked once mapped (the mapping keeps them alive until the tensor is freed), so nothing is
    left behind; ``directory`` (default: the system's temporary directory) should be on a disk with room.
    """

    def __init__(self, above: int | None, directory: str | os.PathLike | None = None) -> None:
        self.above = above
        self.directory = Path(directory) if directory is not None else None
        self.resident = 0

    def __call__(self, H: torch.Tensor, name: str) -> torch.Tensor:
        size = H.numel() * H.element_size()
        if self.above is None or self.resident + size <= self.above:
            self.resident += size
            return H
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=f"ziplm-{name}-", suffix=".safetensors",
                                    dir=self.directory)
        os.close(fd)
        try:
            save_file({"hessian": H.contiguous()}, path)
            return mapped_tensor(path, "hessian")
        finally:
            os.unlink(path)


def mapped_tensor(path: str | os.PathLike, key: str) -> torch.Tensor:
    """A tensor of a safetensors file, memory-mapped copy-on-write (read on use; the file is never written)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    meta = header[key]
    dtypes = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
    begin, _ = meta["data_offsets"]
    array = np.memmap(path, dtype=dtypes[meta["dtype"]], mode="c", offset=8 + length + begin,
                      shape=tuple(meta["shape"]))
    tensor = torch.from_numpy(array)
    tensor.spilled = True  # type: ignore[attr-defined]
    return tensor


# --------------------------------------------------------------------------- structured OBS
class _StructuredOBS:
    """Greedy structured OBS on one matrix: W [out, in] and H⁻¹, with units = groups of input columns."""

    def __init__(self, W: torch.Tensor, Hinv: torch.Tensor) -> None:
        self.W = W.clone()
        self.Hinv = Hinv.clone()
        self.loss = 0.0

    def copy(self) -> "_StructuredOBS":
        other = _StructuredOBS.__new__(_StructuredOBS)
        other.W, other.Hinv, other.loss = self.W.clone(), self.Hinv.clone(), self.loss
        return other

    def unit_losses(self, units: list[torch.Tensor]) -> torch.Tensor:
        """OBS loss of removing each unit alone (units of equal width, batched)."""
        cols = torch.stack(units)  # [U, w]
        blocks = self.Hinv[cols[:, :, None], cols[:, None, :]]  # [U, w, w]
        Ws = self.W[:, cols].permute(1, 0, 2)  # [U, out, w]
        if cols.shape[1] == 1:
            return 0.5 * Ws.pow(2).sum((1, 2)) / blocks[:, 0, 0]
        solved = _spd_solve(blocks, Ws.transpose(1, 2))  # [U, w, out]
        return 0.5 * (Ws.transpose(1, 2) * solved).sum((1, 2))

    def remove(self, cols: torch.Tensor) -> float:
        """Remove the columns ``cols`` jointly: OBS update of W and H⁻¹; returns the step's loss."""
        block = self.Hinv[cols][:, cols]
        rows = self.Hinv[cols]  # [s, in]
        Ws = self.W[:, cols]
        if cols.numel() == 1:
            inv = 1.0 / block
            step = float(0.5 * Ws.pow(2).sum() * inv)
            self.W -= (Ws * inv) @ rows
            self.Hinv -= rows.t() @ (rows * inv)
        else:
            solved = _spd_solve(block, rows)  # (H⁻¹_SS)⁻¹ H⁻¹_S:
            step = float(0.5 * (Ws @ _spd_solve(block, Ws.t())).trace())
            self.W -= Ws @ solved
            self.Hinv -= rows.t() @ solved
        self.W[:, cols] = 0
        self.Hinv[cols, :] = 0
        self.Hinv[:, cols] = 0
        self.Hinv[cols, cols] = 1.0  # keeps the removed block invertible; never selected again
        self.loss += max(step, 0.0)
        return step


def _spd_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A⁻¹B for symmetric positive definite A (batched), through its Cholesky factor."""
    return torch.cholesky_solve(B.contiguous(), torch.linalg.cholesky(A))


def _head_columns(head: int, head_dim: int, device: torch.device) -> torch.Tensor:
    return torch.arange(head * head_dim, (head + 1) * head_dim, device=device)


def attention_levels(W: torch.Tensor, Hinv: torch.Tensor, dims: ModelDims) -> dict[AttentionLevel, Level]:
    """Every (groups, q per group) level of one attention's output projection, by greedy structured OBS."""
    G, Q, hd = dims.num_kv_heads, dims.heads_per_group, dims.head_dim
    device = W.device
    levels: dict[AttentionLevel, Level] = {}
    heads_of = {g: list(range(g * Q, (g + 1) * Q)) for g in range(G)}
    state = _StructuredOBS(W, Hinv)
    removed: list[int] = []
    for q in range(Q, 0, -1):
        _remove_groups(state.copy(), heads_of, removed, q, hd, levels)
        if q == 1:
            break
        # one more query head out of every group: each group's least-loss head, removed jointly
        choice = []
        for g in range(G):
            alive = heads_of[g]
            losses = state.unit_losses([_head_columns(h, hd, device) for h in alive])
            choice.append(alive[int(torch.argmin(losses))])
        state.remove(torch.cat([_head_columns(h, hd, device) for h in choice]))
        removed += choice
        heads_of = {g: [h for h in heads_of[g] if h not in choice] for g in heads_of}
    levels[(0, 0)] = Level(tuple(range(dims.num_heads)), math.nan)  # loss filled by the caller (exact)
    return levels


def _remove_groups(state: _StructuredOBS, heads_of: dict[int, list[int]], removed: list[int], q: int, hd: int,
                   levels: dict[AttentionLevel, Level]) -> None:
    """From a state where every group keeps ``q`` heads: levels (g, q) for g = G..1, greedily by group."""
    device = state.W.device
    alive = dict(heads_of)
    gone = list(removed)
    levels[(len(alive), q)] = Level(tuple(sorted(gone)), state.loss)
    while len(alive) > 1:
        groups = list(alive)
        cols = [torch.cat([_head_columns(h, hd, device) for h in alive[g]]) for g in groups]
        best = groups[int(torch.argmin(state.unit_losses(cols)))]
        state.remove(torch.cat([_head_columns(h, hd, device) for h in alive[best]]))
        gone += alive.pop(best)
        levels[(len(alive), q)] = Level(tuple(sorted(gone)), state.loss)


def mlp_levels(W: torch.Tensor, Hinv: torch.Tensor, kept_levels: list[int], max_steps: int = 2048
               ) -> dict[int, Level]:
    """Levels (neurons kept) of one MLP's output projection: neurons removed greedily by structured OBS.

    Up to ``max_steps`` greedy steps; wider layers remove several least-loss neurons per step.
    """
    n = W.shape[1]
    per_step = max(1, math.ceil(n / max_steps))
    targets = sorted({min(max(int(k), 0), n) for k in kept_levels} | {n, 0}, reverse=True)
    state = _StructuredOBS(W, Hinv)
    alive = torch.ones(n, dtype=torch.bool, device=W.device)
    order: list[int] = []
    levels: dict[int, Level] = {}
    for target in targets:
        while n - len(order) > max(target, 0) and target > 0:
            count = min(per_step, n - len(order) - target)
            idx = alive.nonzero().flatten()
            losses = 0.5 * state.W[:, idx].pow(2).sum(0) / torch.diagonal(state.Hinv)[idx]
            pick = idx[torch.topk(losses, count, largest=False).indices]
            state.remove(pick)
            alive[pick] = False
            order += pick.tolist()
        levels[target] = Level(tuple(sorted(order)), state.loss if target > 0 else math.nan)
    levels[0] = Level(tuple(range(n)), math.nan)
    return levels


def full_removal_loss(W: torch.Tensor, H: torch.Tensor) -> float:
    """Loss of removing the whole sublayer (its output becomes zero): ½·tr(W H Wᵀ)."""
    return float(0.5 * ((W @ H) * W).sum())


def refit(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """OBS-corrected weights of the kept input columns: W H[:, K] H[K, K]⁻¹ (= the greedy updates, exactly)."""
    W = weight.detach().float()
    H = hessian.to(W.device)
    if keep.numel() == W.shape[1]:
        return W.clone()
    if keep.numel() == 0:
        return W.new_zeros(W.shape[0], 0)
    rhs = (W @ H[:, keep]).t()  # [K, out]
    return _spd_solve(H[keep][:, keep], rhs).t().contiguous()


# --------------------------------------------------------------------------- building the database
def build_database(model: nn.Module, input_ids: torch.Tensor, *, mlp_kept: list[int], dampening: float = 0.01,
                   options: SequentialOptions | None = None, obs_steps: int = 2048,
                   spill_above: int | None = None, spill_dir: str | os.PathLike | None = None) -> LevelDatabase:
    """One read-only sequential pass over the dense model: the levels of every attention and MLP.

    ``obs_steps``: greedy OBS steps per FFN (a wider FFN removes several least-loss neurons per step).
    ``spill_above``: bytes of Hessians kept in memory; the rest are memory-mapped from files in ``spill_dir``
    (None: all in memory; 0: all mapped). The levels and the losses do not depend on it.
    """
    spill = HessianSpill(spill_above, spill_dir)
    adapter = get_adapter(model)
    dims = adapter.dims(model.config)
    layers: dict[int, LayerDatabase] = {}

    def step(layer: int, block: nn.Module, groups: list[LinearGroup], hessians: dict[str, torch.Tensor]) -> dict:
        by_kind = {g.kind: g for g in groups}
        missing = {"attention_out", "mlp_out"} - set(by_kind)
        if missing:
            raise ValueError(f"layer {layer} has no {' / '.join(sorted(missing))} to prune: ZipLM starts from a "
                             "model whose sublayers are all present")
        subs = {}
        for kind, out_kind in (("attention", "attention_out"), ("mlp", "mlp_out")):
            W = get_weight(by_kind[out_kind].modules[0]).float()
            gain = gains.gain(layer, kind)
            if gain is not None:  # a post-norm: losses in residual-stream units (the weights are refit unweighted)
                W = W * gain.to(W.device)[:, None]
            H = hessians[out_kind].float()
            H[torch.diag(H) == 0, torch.diag(H) == 0] = 1.0  # dead inputs
            Hd, Hinv, _ = dampened_inverse(H, dampening)
            if kind == "attention":
                levels = attention_levels(W, Hinv, dims)
                width = dims.head_dim
            else:
                levels = mlp_levels(W, Hinv, mlp_kept, max_steps=obs_steps)
                width = 1
            full = full_removal_loss(W, Hd)
            for level in levels.values():
                if math.isnan(level.loss):
                    level.loss = full
            subs[kind] = SublayerDatabase(kind, levels, spill(Hd.cpu(), f"{layer}-{kind}"), width)
        layers[layer] = LayerDatabase(layer, subs["attention"], subs["mlp"])
        return {"loss": subs["attention"].levels[(0, 0)].loss + subs["mlp"].levels[0].loss}

    step.modifies_weights = False  # type: ignore[attr-defined]
    options = options or SequentialOptions()
    options = SequentialOptions(**{**options.__dict__, "description": "ZipLM level database", "checkpoint_dir": None})
    residual = ResidualNorms(model)
    gains = PostNormGains(model)
    try:
        run_sequential(model, input_ids, step, hessians="full", options=options,
                       run_id=f"ziplm database {mlp_kept} {dampening}" + (f" {obs_steps}" if obs_steps != 2048 else ""))
    finally:
        residual.remove()
        gains.remove()
    for layer, value in residual.medians().items():
        if layer in layers:
            layers[layer].scale = max(value, 1e-12)
    database = LevelDatabase(layers, dims, {"dampening": dampening, "mlp_levels": sorted(set(mlp_kept)),
                                            "calibration_tokens": int(input_ids.numel()), "obs_steps": obs_steps})
    if gains.sums:
        database.info["post_norm_gains"] = True
    if spill_above is not None:
        database.info["spilled_mib"] = round(database.spilled_bytes() / 2**20, 2)
    return database



def reusable_database(owner: Any, input_ids: torch.Tensor, *, mlp_kept: list[int], dampening: float,
                      obs_steps: int = 2048) -> LevelDatabase | None:
    """``owner.ziplm_database`` if it was built from these very windows with this grid, dampening and OBS steps,
    else None (ZipLM and EvoPress's structure search share one database per session)."""
    cached = getattr(owner, "_ziplm_key", None)
    if cached is not None and cached[0] is input_ids and cached[1] == (tuple(sorted(mlp_kept)), dampening, obs_steps):
        return owner.ziplm_database
    return None


def keep_database(owner: Any, input_ids: torch.Tensor, database: LevelDatabase, *, mlp_kept: list[int],
                  dampening: float, obs_steps: int = 2048) -> None:
    """Remember ``database`` on ``owner`` for the next run with the same windows, grid, dampening and steps."""
    owner.ziplm_database, owner._ziplm_key = database, (input_ids, (tuple(sorted(mlp_kept)), dampening, obs_steps))
