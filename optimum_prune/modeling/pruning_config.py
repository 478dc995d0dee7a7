"""PruningConfig: what was removed from a model (by original layer index) and how it was chosen.

It lives in the model's ``config.json`` under the key ``pruning_config``. This module depends on the
standard library only, because it is copied beside the weights for ``trust_remote_code`` loading.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

CONFIG_KEY = "pruning_config"
FORMAT_VERSION = 1
EXPERT_WIDTH_MULTIPLE = 8
"""Each expert's FFN width after neuron removal is a multiple of this (grouped-matmul alignment)."""
_UNIT_FIELDS = ("remove_heads", "remove_neurons", "remove_experts")
"""Per-layer index maps (layer -> original indices of heads / FFN neurons / experts)."""


class PruningConfigError(ValueError):
    """A PruningConfig that cannot describe the model it is applied to, or a corrupt serialized one."""


def _int_key_map(name: str, value: Any) -> dict[int, list[int]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PruningConfigError(f"`{name}` must map a layer index to a list of indices, got {type(value).__name__}")
    out: dict[int, list[int]] = {}
    for key, indices in value.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise PruningConfigError(f"`{name}` has a layer key {key!r} that is not an integer") from None
        if isinstance(indices, int) or not isinstance(indices, (list, tuple, set, frozenset)):
            raise PruningConfigError(f"`{name}[{layer}]` must be a list of integers, got {indices!r}")
        out[layer] = sorted({_as_int(f"{name}[{layer}]", i) for i in indices})
    return dict(sorted(out.items()))


def _nested_key_map(name: str, value: Any) -> dict[int, dict[int, list[int]]]:
    """layer -> {expert -> sorted indices}, from JSON's string keys; empty entries dropped."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PruningConfigError(f"`{name}` must map a layer index to {{expert index: [neuron indices]}}, got "
                                 f"{type(value).__name__}")
    out = {}
    for key, inner in value.items():
        layer = next(iter(_int_key_map(name, {key: []})))  # the key, checked to be an integer
        mapping = {k: v for k, v in _int_key_map(f"{name}[{layer}]", inner).items() if v}
        if mapping:
            out[layer] = mapping
    return dict(sorted(out.items()))


def _int_list(name: str, value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int) or not isinstance(value, (list, tuple, set, frozenset)):
        raise PruningConfigError(f"`{name}` must be a list of layer indices, got {value!r}")
    return sorted({_as_int(name, v) for v in value})


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise PruningConfigError(f"`{name}` holds {value!r}, which is not an integer index")
    return value


@dataclass
class PruningConfig:
    """Structures removed from a transformers model, plus the provenance of that choice.

    Every index refers to the ORIGINAL (dense) model: layer indices, query-head indices and FFN
    intermediate-neuron indices, so configs compose and stay readable after layers are dropped.
    """

    remove_heads: dict[int, list[int]] = field(default_factory=dict)
    """Per layer, query-head indices to remove (GQA: see ``validate`` for the grouping rule)."""
    remove_neurons: dict[int, list[int]] = field(default_factory=dict)
    """Per layer, FFN intermediate indices to remove."""
    drop_attention: list[int] = field(default_factory=list)
    """Layers whose attention sublayer is removed (the residual stream passes through)."""
    drop_mlp: list[int] = field(default_factory=list)
    """Layers whose MLP/FFN sublayer is removed (the residual stream passes through)."""
    drop_layers: list[int] = field(default_factory=list)
    """Whole blocks removed; the remaining blocks are renumbered 0..n-1 in the model."""
    remove_experts: dict[int, list[int]] = field(default_factory=dict)
    """Per Mixture-of-Experts layer, ORIGINAL expert indices removed (their router rows go with them); the
    layer keeps the others, at least as many as the router picks per token."""
    remove_expert_neurons: dict[int, dict[int, list[int]]] = field(default_factory=dict)
    """Per MoE layer, per ORIGINAL expert index, FFN neurons removed inside that expert. The experts of a layer
    share one fused tensor, so every kept expert of a layer must keep the same number of neurons."""
    num_original_layers: int | None = None
    """Depth of the dense model; filled in when the config is applied."""

    # Provenance, filled by the methods (ZipLM, LayerChop, EvoPress, the scheduler) and shown in cards.
    method: str | None = None
    base_model: str | None = None
    target_speedup: float | list[float] | None = None
    measured_speedup: float | None = None
    latency_environment: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    layer_sparsity: dict[str, float] | None = None
    layer_bits: dict[str, int] | None = None
    metrics: dict[str, Any] | None = None
    search: dict[str, Any] | None = None
    recipe: list[dict[str, Any]] | None = None
    """The stages that made this model, every default resolved (``optimum-prune run --recipe-from``)."""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.remove_heads = _int_key_map("remove_heads", self.remove_heads)
        self.remove_neurons = _int_key_map("remove_neurons", self.remove_neurons)
        self.remove_experts = _int_key_map("remove_experts", self.remove_experts)
        self.remove_expert_neurons = _nested_key_map("remove_expert_neurons", self.remove_expert_neurons)
        self.drop_attention = _int_list("drop_attention", self.drop_attention)
        self.drop_mlp = _int_list("drop_mlp", self.drop_mlp)
        self.drop_layers = _int_list("drop_layers", self.drop_layers)
        if self.num_original_layers is not None:
            self.num_original_layers = _as_int("num_original_layers", self.num_original_layers)
        for name in _UNIT_FIELDS:
            mapping = getattr(self, name)
            setattr(self, name, {k: v for k, v in mapping.items() if v})
        if not isinstance(self.format_version, int) or self.format_version > FORMAT_VERSION:
            raise PruningConfigError(
                f"`format_version` {self.format_version!r} is newer than this optimum-prune understands "
                f"({FORMAT_VERSION}); upgrade optimum-prune"
            )

    # ----------------------------------------------------------------- serialization
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (layer keys become strings, as JSON requires)."""
        data = asdict(self)
        data["remove_heads"] = {str(k): list(v) for k, v in self.remove_heads.items()}
        data["remove_neurons"] = {str(k): list(v) for k, v in self.remove_neurons.items()}
        data["remove_experts"] = {str(k): list(v) for k, v in self.remove_experts.items()}
        data["remove_expert_neurons"] = {str(k): {str(e): list(n) for e, n in v.items()}
                                         for k, v in self.remove_expert_neurons.items()}
        return copy.deepcopy(data)

    def to_json_string(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True) + "\n"

    def to_json_file(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningConfig:
        """Inverse of ``to_dict``; a corrupt field raises PruningConfigError naming the field."""
        if isinstance(data, PruningConfig):
            return data
        if not isinstance(data, dict):
            raise PruningConfigError(f"`{CONFIG_KEY}` must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PruningConfigError(
                f"`{CONFIG_KEY}` has unknown field(s) {unknown}; known fields are {sorted(known)}"
            )
        try:
            return cls(**copy.deepcopy(data))
        except PruningConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise PruningConfigError(f"`{CONFIG_KEY}` is not valid: {err}") from err

    @classmethod
    def from_json_string(cls, text: str) -> PruningConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PruningConfigError(f"`{CONFIG_KEY}` is not valid JSON: {err}") from err
        return cls.from_dict(data)

    @classmethod
    def from_json_file(cls, path: str) -> PruningConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_json_string(f.read())

    @classmethod
    def from_model_config(cls, config: Any) -> PruningConfig | None:
        """The PruningConfig stored on a transformers config, or None for a dense model."""
        raw = getattr(config, CONFIG_KEY, None)
        if raw is None:
            return None
        return cls.from_dict(raw)

    # ----------------------------------------------------------------- structure queries
    @property
    def is_structured(self) -> bool:
        """True when anything other than whole blocks was removed (needs the pruned model classes)."""
        return bool(self.remove_heads or self.remove_neurons or self.remove_experts or self.remove_expert_neurons
                    or self.drop_attention or self.drop_mlp)

    @property
    def is_empty(self) -> bool:
        return not (self.is_structured or self.drop_layers)

    def kept_layers(self) -> list[int]:
        """Original indices of the blocks still present, in model order."""
        if self.num_original_layers is None:
            raise PruningConfigError("`num_original_layers` is unset; apply the config to a model first")
        dropped = set(self.drop_layers)
        return [i for i in range(self.num_original_layers) if i not in dropped]

    def structure_only(self) -> PruningConfig:
        """A copy with just the structural fields (what surgery needs)."""
        return PruningConfig(
            remove_heads=self.remove_heads,
            remove_neurons=self.remove_neurons,
            drop_attention=self.drop_attention,
            drop_mlp=self.drop_mlp,
            drop_layers=self.drop_layers,
            remove_experts=self.remove_experts,
            remove_expert_neurons=self.remove_expert_neurons,
            num_original_layers=self.num_original_layers,
        )

    def merge(self, other: PruningConfig) -> PruningConfig:
        """Union of two configs' removals (both in original indices); provenance from ``other`` wins when set."""
        merged = copy.deepcopy(self)
        for name in _UNIT_FIELDS:
            mine = dict(getattr(merged, name))
            for layer, idx in getattr(other, name).items():
                mine[layer] = sorted(set(mine.get(layer, [])) | set(idx))
            setattr(merged, name, dict(sorted(mine.items())))
        nested = copy.deepcopy(merged.remove_expert_neurons)
        for layer, experts in other.remove_expert_neurons.items():
            for expert, idx in experts.items():
                have = nested.setdefault(layer, {}).get(expert, [])
                nested[layer][expert] = sorted(set(have) | set(idx))
        merged.remove_expert_neurons = {k: dict(sorted(v.items())) for k, v in sorted(nested.items())}
        for name in ("drop_attention", "drop_mlp", "drop_layers"):
            setattr(merged, name, sorted(set(getattr(merged, name)) | set(getattr(other, name))))
        if other.num_original_layers is not None:
            if merged.num_original_layers not in (None, other.num_original_layers):
                raise PruningConfigError(
                    f"cannot merge configs for models of {merged.num_original_layers} and "
                    f"{other.num_original_layers} layers"
                )
            merged.num_original_layers = other.num_original_layers
        structural = {*_UNIT_FIELDS, "remove_expert_neurons", "drop_attention", "drop_mlp", "drop_layers",
                      "num_original_layers", "format_version"}
        for f in fields(self):
            if f.name not in structural and getattr(other, f.name) is not None:
                setattr(merged, f.name, copy.deepcopy(getattr(other, f.name)))
        return merged

    def validate(self, dims: ModelDims) -> None:
        """Check every index against the dense model's dimensions; errors say what to change.

        GQA rule: after removal, every KV group that keeps any query head keeps the SAME number of
        query heads (a group left with none is removed with its key/value heads). This admits both
        removing whole KV groups and removing an equal number of query heads from every group.
        """
        n = dims.num_layers
        if self.num_original_layers is not None and self.num_original_layers != n:
            raise PruningConfigError(
                f"`num_original_layers` is {self.num_original_layers} but the model has {n} layers"
            )
        layer_fields = {name: list(getattr(self, name)) for name in ("drop_attention", "drop_mlp", "drop_layers")}
        layer_fields.update({name: list(getattr(self, name)) for name in (*_UNIT_FIELDS, "remove_expert_neurons")})
        for name, layers in layer_fields.items():
            for layer in layers:
                if not 0 <= layer < n:
                    raise PruningConfigError(f"`{name}` has layer {layer}, out of range: valid layers are 0..{n - 1}")
        if len(self.drop_layers) >= n:
            raise PruningConfigError(f"`drop_layers` removes all {n} layers; keep at least one")
        for layer, heads in self.remove_heads.items():
            if self._check_units("remove_heads", layer, heads, dims.num_heads, "query heads", "drop_attention"):
                kept_per_group = dims.kept_heads_per_kv_group(heads)
                if len({c for c in kept_per_group if c > 0}) > 1:
                    raise PruningConfigError(
                        f"`remove_heads[{layer}]` leaves KV groups with unequal query heads {kept_per_group} "
                        f"({dims.num_heads} query heads share {dims.num_kv_heads} key/value heads, "
                        f"{dims.heads_per_group} per group). Rule: every KV group that keeps query heads must "
                        "keep the same number of them — remove whole KV groups, or the same number of query "
                        "heads from each group"
                    )
        if self.remove_neurons and not dims.intermediate_size:
            raise PruningConfigError(
                "`remove_neurons` is set, but this model has no dense FFN (its FFN is a Mixture of Experts whose "
                "neurons sit inside the experts): remove whole experts with `remove_experts` instead"
            )
        for layer, neurons in self.remove_neurons.items():
            self._check_units("remove_neurons", layer, neurons, dims.intermediate_size, "FFN neurons", "drop_mlp")
        if self.remove_experts and not dims.num_experts:
            raise PruningConfigError("`remove_experts` is set, but this model has no Mixture-of-Experts layers; "
                                     "remove FFN neurons with `remove_neurons` instead")
        for layer, experts in self.remove_experts.items():
            if self._check_units("remove_experts", layer, experts, dims.num_experts, "experts", "drop_mlp"):
                kept = dims.num_experts - len(experts)
                if kept < dims.experts_per_token:
                    raise PruningConfigError(
                        f"`remove_experts[{layer}]` leaves {kept} expert(s), but the router picks "
                        f"{dims.experts_per_token} per token (`num_experts_per_tok`): keep at least "
                        f"{dims.experts_per_token}, or put {layer} in `drop_mlp` to remove the whole sublayer"
                    )
        if self.remove_expert_neurons and not dims.num_experts:
            raise PruningConfigError("`remove_expert_neurons` is set, but this model has no Mixture-of-Experts layers; "
                                     "remove FFN neurons with `remove_neurons` instead")
        for layer, experts in self.remove_expert_neurons.items():
            self._check_expert_neurons(layer, experts, dims)

    def _check_expert_neurons(self, layer: int, experts: dict[int, list[int]], dims: ModelDims) -> None:
        """Range checks, and one width for every kept expert of the layer (they share a fused tensor)."""
        bad = [e for e in experts if not 0 <= e < dims.num_experts]
        if bad:
            raise PruningConfigError(f"`remove_expert_neurons[{layer}]` names expert(s) {bad[:5]}, out of range: each "
                                     f"layer has {dims.num_experts} experts (0..{dims.num_experts - 1})")
        if layer in self.drop_mlp or layer in self.drop_layers:
            return
        gone = set(self.remove_experts.get(layer, []))
        for expert, neurons in experts.items():
            where = f"`remove_expert_neurons[{layer}][{expert}]`"
            bad = [i for i in neurons if not 0 <= i < dims.expert_size]
            if bad:
                raise PruningConfigError(f"{where} has index(es) {bad[:5]}, out of range: each expert has "
                                         f"{dims.expert_size} FFN neurons (0..{dims.expert_size - 1})")
            if expert not in gone and len(neurons) == dims.expert_size:
                raise PruningConfigError(f"{where} removes all neurons of expert {expert}; to remove the expert, put "
                                         f"it in `remove_experts[{layer}]` instead")
        removed = {e: len(experts.get(e, [])) for e in range(dims.num_experts) if e not in gone}
        if len(set(removed.values())) > 1:
            raise PruningConfigError(
                f"`remove_expert_neurons[{layer}]` removes different numbers of neurons from the kept experts "
                f"{removed}: the experts of a layer share one fused tensor, so each kept expert must lose the same "
                "number of neurons (the indices may differ)"
            )
        kept = dims.expert_size - max(removed.values())
        if kept % EXPERT_WIDTH_MULTIPLE:
            raise PruningConfigError(
                f"`remove_expert_neurons[{layer}]` leaves each expert {kept} FFN neurons: keep a multiple of "
                f"{EXPERT_WIDTH_MULTIPLE} (transformers' grouped matmul over fused experts needs 16-byte aligned rows "
                "in 16- and 32-bit floats)"
            )

    def _check_units(self, name: str, layer: int, indices: list[int], total: int, unit: str, drop_field: str) -> bool:
        """Range-check one layer's unit indices; True when the layer's sublayer survives (more checks apply)."""
        bad = [i for i in indices if not 0 <= i < total]
        if bad:
            shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
            raise PruningConfigError(
                f"`{name}[{layer}]` has index(es) [{shown}], out of range: each layer has {total} {unit} "
                f"(0..{total - 1})"
            )
        if layer in getattr(self, drop_field) or layer in self.drop_layers:
            return False
        if len(indices) == total:
            raise PruningConfigError(
                f"`{name}[{layer}]` removes all {unit} of layer {layer}; to remove the sublayer, put {layer} "
                f"in `{drop_field}` instead"
            )
        return True


@dataclass(frozen=True)
class ModelDims:
    """The dense model's dimensions that pruning indices refer to."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    """Dense FFN width (0: the family's FFN is a Mixture of Experts alone)."""
    num_experts: int = 0
    """Routed experts per Mixture-of-Experts layer (0: a dense model)."""
    experts_per_token: int = 0
    """Experts the router picks per token (top-k)."""
    expert_size: int = 0
    """FFN width of each expert."""

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kept_heads_per_kv_group(self, removed: list[int]) -> list[int]:
        """Number of query heads each KV group keeps after removing ``removed``."""
        removed_set = set(removed)
        r = self.heads_per_group
        return [sum(1 for h in range(g * r, (g + 1) * r) if h not in removed_set) for g in range(self.num_kv_heads)]
