"""Typed run records: what a method run measured and decided, written into ``pruning_config`` and read by the card.

Every metric a method can record is a documented field of ``Metrics`` (a misspelt name fails where it is
written, not as a missing row in a card); ``RunRecord`` is one run's provenance. Both are stored in
``config.json`` as plain JSON (``PruningConfig`` stays portable) and read back with ``from_config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any


def metric(doc: str) -> Any:
    return field(default=None, metadata={"doc": doc})


@dataclass(frozen=True)
class Metrics:
    """The figures a run records (None: not measured by this run)."""

    sparsity: float | None = metric("fraction of the block Linear weights that are zero")
    average_bits: float | None = metric("parameter-weighted average bit-width of the block Linears")
    layers_removed: int | None = metric("whole blocks removed")
    predicted_speedup: float | None = metric("speedup the latency table predicts for the chosen structure")
    estimated_loss: float | None = metric("summed structured-OBS loss of the chosen levels")
    dense_ms: float | None = metric("measured time of the dense model (paired rounds)")
    pruned_ms: float | None = metric("measured time of the pruned model (paired rounds)")
    table_dense_ms: float | None = metric("the latency table's dense-model time")
    level_database_mib: float | None = metric("size of ZipLM's level database")
    level_store_mib: float | None = metric("size of EvoPress's per-Linear level store on disk")
    model_mib: float | None = metric("size of the dense model's block Linears")
    compression_seconds: float | None = metric("wall time of the compression")
    search_seconds: float | None = metric("wall time of the search")
    heal_steps: int | None = metric("healing optimizer steps")
    heal_train_loss: float | None = metric("final healing training loss")
    heal_tokens: int | None = metric("tokens in the healing windows")
    heal_dataset: str | None = metric("healing data")
    heal_seconds: float | None = metric("healing wall time")
    heal_distillation_alpha: float | None = metric("weight of the distillation loss while healing")
    heal_lora: dict[str, Any] | None = metric("LoRA settings of the healing (merged into the weights before saving)")
    extra: dict[str, Any] = field(default_factory=dict, metadata={"doc": "figures this version does not name"})

    def merged(self, **updates: Any) -> "Metrics":
        """These metrics with ``updates`` (a later run adds to what earlier runs recorded)."""
        return replace(self, **updates)

    def to_dict(self) -> dict[str, Any]:
        """The measured figures, in declaration order (unmeasured ones left out)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra" and getattr(self, f.name)
               is not None}
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Metrics":
        known = {f.name for f in fields(cls)} - {"extra"}
        data = dict(data or {})
        return cls(**{k: data.pop(k) for k in list(data) if k in known}, extra=data)

    @classmethod
    def doc(cls, name: str) -> str:
        return cls.__dataclass_fields__[name].metadata.get("doc", "") if name in cls.__dataclass_fields__ else ""


@dataclass
class RunRecord:
    """One run's provenance: method, calibration, targets, per-layer values, metrics and its search summary."""

    method: str | None = None
    calibration: dict[str, Any] | None = None
    target_speedup: float | list[float] | None = None
    measured_speedup: float | None = None
    latency_environment: dict[str, Any] | None = None
    layer_sparsity: dict[str, float] | None = None
    layer_bits: dict[str, int] | None = None
    metrics: Metrics = field(default_factory=Metrics)
    search: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, config: Any) -> "RunRecord":
        """The record stored in a ``PruningConfig``."""
        values = {f.name: getattr(config, f.name, None) for f in fields(cls)}
        values["metrics"] = Metrics.from_dict(values["metrics"])
        return cls(**values)

    def fields_to_store(self, *, only: set[str] | None = None) -> dict[str, Any]:
        """The ``pruning_config`` fields this record sets (JSON-ready)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if only is None or f.name in only}
        if "metrics" in out:
            out["metrics"] = self.metrics.to_dict() or None
        return out
