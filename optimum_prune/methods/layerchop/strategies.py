"""LayerChop (Jha et al., arXiv 2305.14864): remove whole blocks, then heal by continued pretraining.

Which blocks go is decided by a strategy:

- ``"last"``: the n blocks before the final one (LayerChop's deterministic choice; no data needed);
- ``"angular"``: the contiguous window of n blocks whose input and output residual streams are closest
  in angle (Gromov et al., arXiv 2403.17887; last token of each calibration window);
- ``"block_influence"``: the n blocks of lowest ShortGPT block influence 1 − cos(h_in, h_out);
- ``"evopress"``: the set found by EvoPress' evolutionary depth search (``optimum_prune.methods.evopress``).

Healing afterwards is a method of its own (``optimum_prune.methods.heal``).
"""

from __future__ import annotations

import json
from numbers import Integral
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ...engine.importance import angular_distance, block_influence
from ...engine.layers import original_layer_indices
from ...modeling.adapters import get_adapter
from ...modeling.pruning_config import PruningConfig
from .config import STRATEGIES

logger = logging.get_logger(__name__)

NEEDS_CALIBRATION: frozenset[str] = frozenset({"angular", "block_influence", "evopress"})
"""Strategies that read calibration activations ("last" needs none)."""


def check_request(model: nn.Module, num_layers: Any, strategy: str, options: dict[str, Any] | None = None
                  ) -> list[int]:
    """Validate a LayerChop request before any data is read; returns the original indices of the blocks present."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown LayerChop strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    originals = original_layer_indices(model)
    depth = len(originals)
    if isinstance(num_layers, bool) or not isinstance(num_layers, Integral) or not 1 <= num_layers <= depth - 1:
        dropped = _dropped(model)
        gone = f" left, {len(dropped)} already removed" if dropped else ""
        raise ValueError(f"num_layers must be an integer from 1 to {depth - 1} (the model has {depth} blocks{gone} "
                         f"and keeps at least one), got {num_layers!r}")
    if options and strategy != "evopress":
        raise ValueError(f"strategy {strategy!r} takes no options (got {sorted(options)}); options are passed "
                         "to the EvoPress search only")
    adapter = get_adapter(model)
    if adapter.check_structure is not None:  # e.g. a GPT-2 that cannot renumber its blocks: fail before calibrating
        adapter.check_structure(model.config, PruningConfig(drop_layers=originals[-1:]))
    return originals


def _dropped(model: nn.Module) -> list[int]:
    """Original indices of the blocks removed before this call."""
    raw = getattr(model.config, "pruning_config", None)
    return list(PruningConfig.from_dict(raw).drop_layers) if raw else []


def choose_layers(model: nn.Module, input_ids: torch.Tensor | None, num_layers: int, strategy: str, *,
                  batch_size: int = 4, progress: bool = True, **kwargs: Any) -> tuple[list[int], dict[str, Any]]:
    """The ORIGINAL indices of the ``num_layers`` blocks to drop, and what the choice was based on (JSON-ready).

    ``input_ids`` (calibration windows [n, seq_len]) are needed by every strategy but "last". Extra keyword
    arguments go to EvoPress' ``search_depth``.
    """
    originals = check_request(model, num_layers, strategy, kwargs)
    num_layers, depth = int(num_layers), len(originals)
    if strategy != "last" and input_ids is None:
        raise ValueError(f"strategy {strategy!r} scores blocks on calibration data: pass input_ids "
                         "(token windows [num_samples, seq_len])")
    info: dict[str, Any] = {"strategy": strategy, "num_layers": num_layers}
    was_training = model.training
    model.eval()
    try:
        if strategy == "last":
            drop = originals[depth - 1 - num_layers:depth - 1]
        elif strategy == "angular":
            scores = angular_distance(model, input_ids, span=num_layers, batch_size=batch_size)
            start = min(scores, key=lambda k: (scores[k], k))
            first = originals.index(start)
            drop = originals[first:first + num_layers]
            info.update(score="angular distance arccos(cos)/pi of the window (last token)",
                        scores=_rounded(scores), window_distance=round(scores[start], 6))
        elif strategy == "block_influence":
            scores = block_influence(model, input_ids, span=1, batch_size=batch_size)
            drop = sorted(sorted(scores, key=lambda k: (scores[k], k))[:num_layers])
            info.update(score="block influence 1 - cos(h_in, h_out)", scores=_rounded(scores))
        else:
            drop, found = _evopress(model, input_ids, num_layers, originals, progress=progress, **kwargs)
            info = {**found, **info}  # the search's own fields, never shadowing strategy / num_layers
    finally:
        model.train(was_training)
    info["dropped"] = list(drop)
    logger.info("LayerChop (%s): dropping blocks %s of %s", strategy, drop, originals)
    return list(drop), info


def _evopress(model: nn.Module, input_ids: torch.Tensor, num_layers: int, originals: list[int], *, progress: bool,
              **kwargs: Any) -> tuple[list[int], dict[str, Any]]:
    """EvoPress' depth search (the EvoPress method's public API); its answer is checked before use."""
    from .. import evopress

    result = evopress.search_depth(model, input_ids, num_blocks=num_layers, progress=progress, **kwargs)
    drop = sorted(int(i) for i in result.drop_layers)
    if len(set(drop)) != num_layers or not set(drop) <= set(originals):
        raise RuntimeError(f"the EvoPress search returned blocks {list(result.drop_layers)}; expected {num_layers} "
                           f"distinct original indices among {originals}")
    return drop, _jsonable(dict(getattr(result, "info", None) or {}))


def _rounded(scores: dict[int, float]) -> dict[str, float]:
    return {str(k): round(float(v), 6) for k, v in scores.items()}


def _jsonable(value: Any) -> Any:
    """``value`` with tensors / numpy values made plain and dict keys made strings (it goes into config.json)."""

    def plain(obj: Any) -> Any:
        if hasattr(obj, "tolist"):
            return obj.tolist()
        if isinstance(obj, (set, frozenset, tuple)):
            return list(obj)
        return str(obj)

    return json.loads(json.dumps(value, default=plain))
