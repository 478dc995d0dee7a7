"""Load-time integrity of a pruned checkpoint: its ``pruning_config`` and its weights must agree.

Two checks run on every load path (the plugin, ``trust_remote_code``, ``Pruner.from_pretrained``):

1. ``check_config`` — before anything is built: the ``pruning_config`` in config.json is parsed (types),
   its depth must equal the saved ``num_hidden_layers`` plus the dropped blocks (so no number in
   config.json can make a loader allocate without bound), and every layer, head and neuron index must
   exist in the dense model that config.json describes.
2. ``check_loaded_weights`` — after transformers read the tensors: the tensors in the files must be
   exactly those the structure implies. An unexpected tensor (weights of a sublayer the config says is
   removed), a missing one, or a shape the structure does not explain raises, naming the tensor and the
   config field.

Copied beside the weights for ``trust_remote_code`` loading, so it imports only the standard library and
its sibling modules.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from .adapters import ArchitectureAdapter, get_adapter
from .headers import check_before_building, read_headers, weight_files
from .pruning_config import CONFIG_KEY, ModelDims, PruningConfig, PruningConfigError

FIX = ("config.json and the weights must come from one save: restore both from the original checkpoint, or re-save "
       "the model with optimum-prune")
MAX_SHOWN = 5


class CheckpointIntegrityError(PruningConfigError, RuntimeError):
    """A checkpoint whose ``pruning_config`` and weights do not describe one consistent pruned model.

    A ``ValueError`` (through ``PruningConfigError``) and a ``RuntimeError`` (what transformers raises for
    weights that do not fit), so code catching either keeps working.
    """


# ---------------------------------------------------------------------- 1. the config, before allocation
def check_config(config: Any, *, required: bool = True) -> PruningConfig | None:
    """The checkpoint's ``pruning_config``, validated against the dense dimensions in ``config``.

    Runs before any module is built. ``required``: a missing ``pruning_config`` is an error (the
    ``pruned_*`` classes need one); otherwise None is returned for a dense config.
    """
    where = f"config.json's `{CONFIG_KEY}`"
    raw = getattr(config, CONFIG_KEY, None)
    if raw is None:
        if required:
            raise CheckpointIntegrityError(f"{where} is missing; a `pruned_*` model needs it. {FIX}")
        return None
    try:
        saved = PruningConfig.from_dict(raw)
    except PruningConfigError as err:
        raise CheckpointIntegrityError(f"{where} is corrupt: {err}. {FIX}") from err
    depth = _config_int(config, "num_hidden_layers")
    n = saved.num_original_layers
    if n is None:
        if saved.is_empty and not required:
            return saved
        raise CheckpointIntegrityError(f"{where} lacks `num_original_layers` (the dense model's depth). {FIX}")
    expected = depth + len(saved.drop_layers)
    if n != expected:
        raise CheckpointIntegrityError(
            f"{where}: `num_original_layers` is {n}, but the checkpoint has {depth} blocks (`num_hidden_layers`) "
            f"and `drop_layers` removes {len(saved.drop_layers)}, so it must be {expected}. {FIX}"
        )
    adapter = get_adapter(config)
    dims = dense_dims(adapter, config, n)
    try:
        saved.validate(dims)
        if adapter.check_structure is not None:
            adapter.check_structure(config, saved)
    except PruningConfigError as err:
        raise CheckpointIntegrityError(
            f"{where} does not fit the dense model config.json describes ({n} layers, {dims.num_heads} query heads, "
            f"{dims.intermediate_size} FFN neurons per layer"
            + (f", {dims.num_experts} experts per layer" if dims.num_experts else "") + f"): {err}. {FIX}"
        ) from err
    return saved


def _config_int(config: Any, name: str, value: Any = None) -> int:
    value = getattr(config, name, None) if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointIntegrityError(f"config.json's `{name}` is {value!r}; it must be a positive integer. {FIX}")
    return value


def dense_dims(adapter: ArchitectureAdapter, config: Any, num_layers: int) -> ModelDims:
    """The dense model's dimensions, each checked to be a positive integer (and heads to divide evenly)."""
    try:
        dims = adapter.dims(config, num_layers=num_layers)
    except (TypeError, ZeroDivisionError, AttributeError) as err:
        raise CheckpointIntegrityError(f"config.json's dimensions are not usable: {err}. {FIX}") from err
    for name in ("num_heads", "num_kv_heads", "head_dim", "hidden_size"):
        _config_int(config, name, getattr(dims, name))
    if adapter.experts is None or dims.intermediate_size:
        _config_int(config, "intermediate_size", dims.intermediate_size)
    if adapter.experts is not None:
        _config_int(config, "num_experts", dims.num_experts)
        _config_int(config, "num_experts_per_tok", dims.experts_per_token)
    if dims.num_heads % dims.num_kv_heads:
        raise CheckpointIntegrityError(
            f"config.json has {dims.num_heads} query heads, not a multiple of its {dims.num_kv_heads} key/value "
            f"heads. {FIX}"
        )
    return dims


# ---------------------------------------------------------------------- 2. the weights, after reading
def checked_from_pretrained(load: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """Run transformers' ``from_pretrained`` (``load``) and refuse weights the structure does not explain.

    Shape mismatches are collected (``ignore_mismatched_sizes``) so that the error can name the tensor
    and the config field; unless the caller asked to ignore them, every one is an error.
    """
    kwargs = dict(kwargs)
    wants_info = kwargs.pop("output_loading_info", False)
    caller_ignores = bool(kwargs.pop("ignore_mismatched_sizes", False))
    model_class = getattr(load, "__self__", None)
    if isinstance(model_class, type):  # before transformers builds anything: config.json vs the files' headers
        check_weights_before_loading(model_class, args[0] if args else kwargs.get("pretrained_model_name_or_path"),
                                     kwargs, required=True, ignore_mismatched_outside_blocks=caller_ignores)
    model, info = load(*args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    check_loaded_weights(model, info, ignore_mismatched_outside_blocks=caller_ignores)
    check_finite_parameters(model)
    return (model, info) if wants_info else model


def check_finite_parameters(model: Any) -> None:
    """Refuse loaded weights that hold NaN or inf (a saved pruned model never does), naming each tensor."""
    import torch

    bad = []
    for name, p in model.named_parameters():
        if p.is_meta or not p.is_floating_point() or bool(torch.isfinite(p).all()):
            continue
        bad.append(f"`{name}` ({int((~torch.isfinite(p)).sum())} of {p.numel()} values)")
    if bad:
        raise CheckpointIntegrityError(
            f"{type(model).__name__}: the weights hold NaN/inf values in {len(bad)} tensor(s): "
            + ", ".join(bad[:MAX_SHOWN]) + (" ..." if len(bad) > MAX_SHOWN else "")
            + ". A saved model never holds them: restore the weights from the original checkpoint"
        )


def check_weights_before_loading(model_class: type, name_or_path: Any, kwargs: dict[str, Any], *,
                                 required: bool, ignore_mismatched_outside_blocks: bool = False) -> None:
    """Refuse, before anything is built, a config.json whose depth, dimensions or ``pruning_config`` the
    safetensors files do not back (their headers are read, not their tensors). ``required``: as in
    ``check_config``. Without local or cached safetensors files only the config checks run."""
    config = kwargs.get("config")
    if not hasattr(config, "to_dict"):
        from transformers import AutoConfig

        hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only", "subfolder",
                                      "trust_remote_code") if k in kwargs}
        try:
            config = (getattr(model_class, "config_class", None) or AutoConfig).from_pretrained(name_or_path, **hub)
        except Exception:  # transformers' own loading reports an unreadable config.json
            return
    headers = read_headers(weight_files(name_or_path, kwargs))

    def report(skeleton: Any, info: dict[str, Any]) -> None:
        check_loaded_weights(skeleton, info, ignore_mismatched_outside_blocks=ignore_mismatched_outside_blocks)

    check_before_building(model_class, config, headers, lambda text: CheckpointIntegrityError(f"{text}. {FIX}"),
                          report, lambda c: check_config(c, required=required))


def check_loaded_weights(model: Any, info: dict[str, Any], *, ignore_mismatched_outside_blocks: bool = False) -> None:
    """Raise ``CheckpointIntegrityError`` unless the loaded tensors are exactly those the structure implies.

    ``info`` is transformers' loading info (missing, unexpected and mismatched keys). Tensors outside the
    blocks that belong to another task's head (a checkpoint saved with another Auto class) are transformers'
    business, as for any model.
    """
    adapter = get_adapter(model)
    saved = PruningConfig.from_model_config(model.config) or PruningConfig(
        num_original_layers=getattr(model.config, "num_hidden_layers", None))
    kept = saved.kept_layers() if saved.num_original_layers is not None else []
    locate = _locator(adapter, model.config, kept)
    cross_task = _saved_for_another_class(model)
    problems: list[str] = []

    missing = sorted(info.get("missing_keys", []))
    if missing:
        problems.append(f"the checkpoint lacks {len(missing)} weight(s) the pruned structure needs: "
                        + _listed(missing, lambda key: _explain_missing(locate(key))))
    unexpected = sorted(k for k in info.get("unexpected_keys", []) if not (cross_task and locate(k) is None))
    if unexpected:
        problems.append(f"the checkpoint holds {len(unexpected)} tensor(s) the pruned structure does not have: "
                        + _listed(unexpected, lambda key: _explain_unexpected(locate(key), saved, len(kept))))
    shapes = {m[0]: (tuple(m[1]), tuple(m[2])) for m in info.get("mismatched_keys", [])}
    if ignore_mismatched_outside_blocks:
        shapes = {k: v for k, v in shapes.items() if locate(k) is not None}
    if shapes:
        problems.append(f"size mismatch in {len(shapes)} tensor(s): "
                        + _listed(sorted(shapes), lambda key: _explain_shape(shapes[key], locate(key), saved)))
    errors = [str(e) for e in info.get("error_msgs", []) if e]
    if errors:
        problems.append("transformers reported: " + "; ".join(errors[:MAX_SHOWN]))
    if problems:
        raise CheckpointIntegrityError(
            f"{type(model).__name__}: the weights do not match config.json"
            + (f"'s `{CONFIG_KEY}`" if getattr(model.config, CONFIG_KEY, None) is not None else "") + ": "
            + " | ".join(problems) + f". {FIX}"
        )


def _saved_for_another_class(model: Any) -> bool:
    """True when the checkpoint was saved from another head (its extra head tensors are then expected)."""
    saved = list(getattr(model.config, "architectures", None) or [])
    names = {cls.__name__ for cls in type(model).__mro__}
    return bool(saved) and not any(name in names or name.removeprefix("Pruned") in names for name in saved)


def _listed(keys: list[str], explain: Callable[[str], str]) -> str:
    """Keys grouped by their explanation: "reason (`a`, `b`); other reason (`c`)"."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(explain(key), []).append(key)
    parts = []
    for reason, members in list(groups.items())[:MAX_SHOWN]:
        shown = ", ".join(f"`{k}`" for k in members[:MAX_SHOWN]) + (" ..." if len(members) > MAX_SHOWN else "")
        parts.append(f"{reason} ({shown})" if reason else shown)
    more = len(groups) - MAX_SHOWN
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


# Where a tensor sits: (block position, original layer or None, sublayer "attention" / "mlp" / None).
Place = tuple[int, "int | None", "str | None"]


def _locator(adapter: ArchitectureAdapter, config: Any, kept: list[int]) -> Callable[[str], Place | None]:
    pattern = re.compile(r"(?:^|\.)" + re.escape(adapter.layers_path) + r"\.(\d+)\.(.+)$")
    attention = [adapter.attention, adapter.attention_out, *adapter.sublayer_norms(config, "attention"),
                 *(p.path for p in adapter.attention_in)]
    mlp = [*adapter.mlp_in, adapter.mlp_out, *adapter.sublayer_norms(config, "mlp")]
    experts = [adapter.experts.router, adapter.experts.experts] if adapter.experts else []
    moe = [adapter.experts.block] if adapter.experts else []

    def under(rel: str, paths: list[str | None]) -> bool:
        return any(p and (rel == p or rel.startswith(p + ".")) for p in paths)

    def locate(key: str) -> Place | None:
        match = pattern.search(key)
        if match is None:
            return None
        block, rel = int(match.group(1)), match.group(2)
        sublayer = ("attention" if under(rel, attention) else "mlp" if under(rel, mlp) else
                    "experts" if under(rel, experts) else "mlp" if under(rel, moe) else None)
        return block, kept[block] if block < len(kept) else None, sublayer

    return locate


_FIELDS = {"attention": ("drop_attention", "remove_heads", "query heads"),
           "mlp": ("drop_mlp", "remove_neurons", "FFN neurons"),
           "experts": ("drop_mlp", "remove_experts", "experts")}


def _explain_missing(place: Place | None) -> str:
    if place is None or place[1] is None or place[2] is None:
        return "" if place is None or place[1] is None else f"block {place[0]}, original layer {place[1]}"
    _, layer, sublayer = place
    return f"`{CONFIG_KEY}.{_FIELDS[sublayer][0]}` does not list layer {layer}, so its {sublayer} must be in the weights"


def _explain_unexpected(place: Place | None, saved: PruningConfig, depth: int) -> str:
    if place is None:
        return "the model has no such tensor"
    block, layer, sublayer = place
    if layer is None:
        return (f"block {block} does not exist: `num_hidden_layers` and `{CONFIG_KEY}.drop_layers` leave {depth} "
                "blocks")
    if sublayer is not None:
        drop = _FIELDS[sublayer][0]
        if layer in getattr(saved, drop):
            return f"`{CONFIG_KEY}.{drop}` lists layer {layer}, yet the weights hold its {sublayer}"
    return f"block {block} (original layer {layer}) has no such tensor in the structure"


def _explain_shape(shapes: tuple, place: Place | None, saved: PruningConfig) -> str:
    in_file, expected = shapes
    text = f"the weights have shape {list(in_file)}, the structure implies {list(expected)}"
    if place is None or place[1] is None or place[2] is None:
        return f"{text} (from config.json's dimensions)"
    _, layer, sublayer = place
    _, remove, unit = _FIELDS[sublayer]
    removed = getattr(saved, remove).get(layer, [])
    if not removed:
        return f"{text} (from config.json's dimensions: `{CONFIG_KEY}.{remove}` removes nothing from layer {layer})"
    return (f"{text}: `{CONFIG_KEY}.{remove}[{layer}]` removes {len(removed)} {unit} "
            f"{removed[:8]}{' ...' if len(removed) > 8 else ''}")
