"""Latency tables cached on disk, keyed by environment (engine included), model shapes, FFN grid and how tables are
measured."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel
from transformers.utils import logging

from ..modeling.adapters import get_adapter
from .defaults import CACHE_ENV_VAR
from .env_timing import TABLE_METHOD
from .environment import InferenceEnvironment
from .llamacpp_table import LLAMACPP_TABLE_METHOD, measure_llamacpp_table
from .table import LatencyTable, mlp_grid, model_signature
from .table_measure import CHECK_REPEATS, dense_disagreement, measure_latency_table

logger = logging.get_logger(__name__)


def default_cache_dir() -> Path:
    """``$OPTIMUM_PRUNE_CACHE/latency``, else ``~/.cache/optimum_prune/latency``."""
    root = os.environ.get(CACHE_ENV_VAR)
    return Path(root).expanduser() / "latency" if root else Path.home() / ".cache" / "optimum_prune" / "latency"


def latency_table_path(model: PreTrainedModel, environment: InferenceEnvironment, *,
                       cache_dir: str | os.PathLike | None = None,
                       mlp_levels: int | Sequence[int] | None = None) -> Path:
    """Where ``get_latency_table`` keeps the table for this model, environment and FFN grid."""
    return _cache_path(cache_dir, *_cache_identity(model, environment, mlp_levels))


def _cache_identity(model: PreTrainedModel, environment: InferenceEnvironment,
                    mlp_levels: int | Sequence[int] | None) -> tuple[str, str, list[int]]:
    grid = mlp_grid(get_adapter(model).dims(model.config).intermediate_size, mlp_levels)
    return environment.key(), model_signature(model), grid


def _cache_path(cache_dir: str | os.PathLike | None, key: str, signature: str, grid: list[int]) -> Path:
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    method = LLAMACPP_TABLE_METHOD if key.startswith("engine=llama.cpp") else TABLE_METHOD  # torch: as before
    identity = json.dumps([key, signature, grid, method]).encode()
    return directory / f"{hashlib.sha256(identity).hexdigest()[:20]}.json"


def get_latency_table(
    model: PreTrainedModel,
    environment: InferenceEnvironment,
    *,
    cache_dir: str | os.PathLike | None = None,
    remeasure: bool = False,
    **kwargs: Any,
) -> LatencyTable:
    """The cached table for this model's shapes, environment and FFN grid, measured and cached when missing
    (timed in PyTorch, or in llama.cpp for an environment with engine="llama.cpp").

    ``kwargs`` go to ``measure_latency_table`` (``mlp_levels``, ``repeats``, ``warmup``, ``progress``).
    """
    environment.check_available()
    mlp_levels = kwargs.pop("mlp_levels", None)
    key, signature, grid = _cache_identity(model, environment, mlp_levels)
    path = _cache_path(cache_dir, key, signature, grid)
    if not remeasure and path.exists():
        table = _load_cached(path, key, signature, grid)
        if table is not None:
            logger.warning("reusing the latency table measured %s ago for %s (%s); remeasure=True "
                           "(--remeasure-latency) measures again", _age(path), _environment(table), path)
            checked = kwargs.get("check", True) and kwargs.get("repeats", 10) >= CHECK_REPEATS  # as the table's checks
            disagreement = dense_disagreement(model, table) if checked and not environment.llamacpp else None
            if disagreement is None:
                return table
            logger.warning("%s: the cached table does not match this machine now; measuring it again", disagreement)
    measure = measure_llamacpp_table if environment.llamacpp else measure_latency_table
    table = measure(model, environment, mlp_levels=grid, **kwargs)
    table.save(path)
    logger.info("saved the latency table to %s", path)
    return table


def _age(path: Path) -> str:
    """How long ago ``path`` was written, in words ("3 min", "2.5 h", "4 d")."""
    import time

    seconds = max(0.0, time.time() - path.stat().st_mtime)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}" if seconds < 10 * size else f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _environment(table: LatencyTable) -> str:
    env = table.environment
    engine = "llama.cpp " if env.llamacpp else ""
    return (f"{engine}{env.device} {env.dtype}, batch {env.batch_size} x {env.seq_len} tokens, {env.mode}, "
            f"{env.threads} thread(s)")


def _load_cached(path: Path, key: str, signature: str, grid: list[int]) -> LatencyTable | None:
    """The table at ``path`` if it is readable and was measured for exactly this key, model and grid."""
    try:
        table = LatencyTable.load(path)
    except (OSError, ValueError) as err:
        logger.warning("ignoring the unreadable cached latency table %s (%s); measuring again", path, err)
        return None
    if (table.environment_key, table.model, table.mlp_grid) != (key, signature, grid):
        logger.warning("the cached latency table %s was measured for another model or environment; measuring again",
                       path)
        return None
    return table
