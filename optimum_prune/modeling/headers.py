"""What a checkpoint's safetensors files hold, read from their JSON headers alone (no tensor data is read).

config.json's numbers decide what a loader builds and allocates; the headers say what the files really hold.
``check_before_building`` compares the two before anything is built: the depth and every dense dimension
(hidden size, heads, head size, FFN width, experts, vocabulary) must fit the tensors in the files, then a
skeleton built on the meta device (no memory) must have every tensor's shape. So no number in config.json
can make a loader build or allocate more than the files hold.

Copied beside the weights for ``trust_remote_code`` loading, so it imports only the standard library,
torch, transformers and its sibling modules.
"""

from __future__ import annotations

import copy
import json
import os
import re
import struct
from typing import Any, Callable

import torch

from .adapters import get_adapter
from .pruning_config import PruningConfigError

INDEX = "model.safetensors.index.json"
WEIGHTS = "model.safetensors"
MAX_HEADER_BYTES = 100 << 20
"""safetensors' own limit on a header's size."""
_HUB_KEYWORDS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")
_DIMS = {"num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
         "hidden_size": "hidden_size", "intermediate_size": "intermediate_size", "num_experts": "num_experts"}
_WIDTH_NAMES = ("intermediate_size", "ffn_dim", "n_inner", "shared_expert_intermediate_size", "moe_intermediate_size")


class Headers:
    """Every tensor's shape across a checkpoint's safetensors files, and the file that holds it."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], files: dict[str, str], dtypes: dict[str, str]) -> None:
        self.shapes = shapes
        self.files = files
        self.dtypes = dtypes

    def largest_axis(self) -> tuple[int, str]:
        """(the longest axis of any tensor, that tensor's name); a bound on every dense dimension."""
        return max(((max(s, default=0), k) for k, s in self.shapes.items()), default=(0, ""))

    def largest_numel(self) -> int:
        return max((_numel(s) for s in self.shapes.values()), default=0)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def read_header(path: str) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """{tensor: (shape, dtype)} from one safetensors file's header; None when the file is not a readable, complete one
    (transformers then reports it, and optimum-prune's loader names it as truncated or corrupt)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                return None
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                return None
            header = json.loads(f.read(length))
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    data_bytes = size - 8 - length
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            return None  # a file whose header lies about its data: transformers reports it
        shapes[key] = (tuple(shape), str(entry.get("dtype")))
    return shapes


def weight_files(name_or_path: Any, kwargs: dict[str, Any]) -> list[str] | None:
    """The safetensors files ``from_pretrained(name_or_path, **kwargs)`` will read; None when there are none
    (a GGUF or PyTorch checkpoint) or they cannot be found here (transformers then reports what is wrong)."""
    if name_or_path is None or kwargs.get("gguf_file") or kwargs.get("from_tf") or kwargs.get("from_flax"):
        return None
    variant = kwargs.get("variant")
    index, single = INDEX, WEIGHTS
    if variant:
        index, single = f"model.safetensors.index.{variant}.json", f"model.{variant}.safetensors"
    subfolder = kwargs.get("subfolder") or ""
    directory = os.path.join(os.fspath(name_or_path), subfolder)
    if os.path.isdir(directory):
        def find(name: str) -> str | None:
            path = os.path.join(directory, name)
            return path if os.path.isfile(path) else None
    else:
        def find(name: str) -> str | None:  # a Hub id: the files transformers would download next
            from transformers.utils import cached_file

            return cached_file(os.fspath(name_or_path), name, subfolder=subfolder,
                               _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False,
                               **{k: kwargs[k] for k in _HUB_KEYWORDS if k in kwargs})
    try:
        path = find(index)
        if path is not None:
            with open(path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            found = [find(s) for s in shards]
            return None if any(p is None for p in found) else found
        path = find(single)
        return [path] if path is not None else None
    except Exception:  # an unreachable Hub, a broken index: transformers' own loading says what is wrong
        return None


def read_headers(files: list[str] | None) -> Headers | None:
    """The headers of every file, or None when one cannot be read."""
    if not files:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    owners: dict[str, str] = {}
    for path in files:
        found = read_header(path)
        if found is None:
            return None
        shapes.update((k, shape) for k, (shape, _) in found.items())
        dtypes.update((k, dtype) for k, (_, dtype) in found.items())
        owners.update(dict.fromkeys(found, os.path.basename(path)))
    return Headers(shapes, owners, dtypes) if shapes else None


# ---------------------------------------------------------------------- config.json vs the headers
def _json_name(config: Any, attribute: str) -> str:
    """The name config.json uses for a config attribute (GPT-2 writes ``n_embd`` for ``hidden_size``)."""
    return getattr(config, "attribute_map", {}).get(attribute, attribute)


def _width_name(config: Any, value: int) -> str:
    for name in _WIDTH_NAMES:
        if getattr(config, name, None) == value:
            return name
    return "intermediate_size"


def _listed_indices(config: Any) -> int:
    """The longest per-layer index list in config.json's pruning_config (how far a pruned axis may shrink)."""
    raw = getattr(config, "pruning_config", None)
    longest = 0
    if isinstance(raw, dict):
        for name in ("remove_heads", "remove_neurons", "remove_experts"):
            value = raw.get(name)
            if isinstance(value, dict):
                longest = max([longest] + [len(v) for v in value.values() if isinstance(v, (list, tuple))])
    return longest


def dimension_problem(config: Any, headers: Headers) -> str | None:
    """Why config.json's depth or a dense dimension cannot describe the tensors in the files; None if it can.

    Runs before anything is built or validated further: the depth is bounded by the blocks in the files
    and every dimension by the longest axis of any tensor (plus the most indices a pruned layer removes).
    """
    adapter = get_adapter(config)
    depth = getattr(config, "num_hidden_layers", None)
    pattern = re.compile(r"(?:^|\.)" + re.escape(adapter.layers_path) + r"\.(\d+)\.")
    blocks = {int(m.group(1)) for m in map(pattern.search, headers.shapes) if m}
    if type(depth) is not int or depth <= 0:
        return f"config.json's `{_json_name(config, 'num_hidden_layers')}` is {depth!r}; it must be a positive integer"
    have = max(blocks) + 1 if blocks else 0
    if depth > (have if blocks else len(headers.shapes)):  # every block holds at least one tensor
        last = sorted(k for k in headers.shapes if (m := pattern.search(k)) and int(m.group(1)) == have - 1)
        example = f" (the last: `{last[0]}` ...)" if last else ""
        return (f"config.json's `{_json_name(config, 'num_hidden_layers')}` is {depth}, but the weights hold "
                f"{have} blocks{example}")
    longest, where = headers.largest_axis()
    slack = _listed_indices(config)
    limit = max(longest, len(headers.shapes)) + slack
    try:
        dims = adapter.dims(config, num_layers=1)
    except Exception as err:  # a missing, zero or non-numeric dimension
        return f"config.json's dimensions are not usable ({type(err).__name__}: {err})"
    values = [(_DIMS[a], getattr(dims, a, 0)) for a in _DIMS]
    values.append(("vocab_size", getattr(config, "vocab_size", 0)))
    for attribute, value in values:
        if attribute in ("num_experts", "intermediate_size") and value == 0 and \
                (attribute == "num_experts") == (getattr(adapter, "experts", None) is None):
            continue  # a dense family has no experts; a MoE family's FFN width may live in its experts only
        if type(value) is not int or value <= 0:
            name = _width_name(config, value) if attribute == "intermediate_size" else _json_name(config, attribute)
            return f"config.json's `{name}` is {value!r}; it must be a positive integer"
        if value <= limit:
            continue
        name = _width_name(config, value) if attribute == "intermediate_size" else _json_name(config, attribute)
        if attribute == "head_dim" and getattr(config, "head_dim", None) != value:
            name = f"{_json_name(config, 'hidden_size')}` / `{_json_name(config, 'num_attention_heads')}"
        removed = f", plus the {slack} indices `pruning_config` removes from one layer at most" if slack else ""
        return (f"config.json's `{name}` gives {value}, but no tensor in the weights has an axis that long "
                f"(the longest is {longest}, `{where}` in {headers.files[where]}{removed})")
    return None


def skeleton(model_class: type, config: Any) -> Any:
    """``model_class`` built from ``config`` on the meta device, as ``from_pretrained`` builds it (no memory)."""
    from transformers.utils import ContextManagers

    try:
        contexts = model_class.get_init_context(torch.float32, False, False, None)
    except Exception:
        contexts = [torch.device("meta")]
    with ContextManagers(contexts):
        return model_class(config)


def mismatches(model: Any, headers: Headers) -> tuple[list[tuple[str, tuple, tuple]], list[str], list[str]]:
    """(tensors whose shape in the files differs from the model's, [(name, in file, in model)];
    the model's tensors absent from the files that are larger than any tensor in them;
    floating-point tensors stored as integers or booleans, described).

    Names are matched as transformers matches them: with or without the base model's prefix.
    """
    state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    found: set[str] = set()
    wrong = []
    kinds: list[str] = []
    for key, shape in headers.shapes.items():
        name = key if key in expected else f"{prefix}.{key}" if f"{prefix}.{key}" in expected else \
            key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected \
            else None
        if name is None:
            continue
        found.add(name)
        if expected[name] != shape:
            wrong.append((name, shape, expected[name]))
        elif state[name].is_floating_point() and not headers.dtypes.get(key, "F").startswith(("F", "BF")):
            kinds.append(f"`{key}` is stored as {headers.dtypes[key]} in {headers.files[key]}, but the model holds "
                         f"it in floating point ({str(state[name].dtype).replace('torch.', '')})")
    largest = headers.largest_numel()
    oversized = [] if _renamed_on_load(model) else \
        [k for k, s in expected.items() if k not in found and _numel(s) > largest]
    return wrong, oversized, kinds


def _renamed_on_load(model: Any) -> bool:
    """True when transformers renames or merges this family's checkpoint tensors as it loads them (Mixtral's
    per-expert ``w1`` / ``w3`` become one fused ``gate_up_proj``): a model tensor absent by name from the files
    is then no evidence (the tensors are checked after loading instead)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return False
    return bool(get_checkpoint_conversion_mapping(getattr(model.config, "model_type", "")))


def check_before_building(model_class: type, config: Any, headers: Headers | None,
                          fail: Callable[[str], Exception], report: Callable[[Any, dict], None],
                          validate: Callable[[Any], Any]) -> None:
    """Refuse a config.json the weights do not back, before ``from_pretrained`` builds or allocates anything.

    ``fail(message)`` makes the error; ``validate(config)`` checks the pruning_config against the dimensions;
    ``report(skeleton, info)`` raises for shapes that differ (transformers' loading-info format).
    """
    if headers is not None:
        problem = dimension_problem(config, headers)
        if problem is not None:
            raise fail(problem)
    validate(config)
    if headers is None:
        return
    try:
        model = skeleton(model_class, config)
    except Exception as err:  # transformers refuses the dimensions (e.g. heads that do not divide the width)
        if isinstance(err, PruningConfigError):  # already ours, and precise
            raise
        raise fail(f"config.json describes no model transformers can build ({type(err).__name__}: {err})") from err
    wrong, oversized, kinds = mismatches(model, headers)
    if kinds and getattr(config, "quantization_config", None) is None:  # a quantized format stores integers
        raise fail(f"{len(kinds)} tensor(s) have a non-floating dtype: " + "; ".join(kinds[:5]))
    pattern = re.compile(r"(?:^|\.)" + re.escape(get_adapter(config).layers_path) + r"\.(\d+)\.")
    blocks = {m.group(1) if (m := pattern.search(name)) else None for name, _, _ in wrong}
    if len(blocks) > 1 or None in blocks:  # more than one block, or outside them: a dense dimension is likelier
        dense = explain_dimensions(model_class, config, headers, sorted(wrong))
        if dense is not None:
            raise fail(f"{dense}; {len(wrong)} tensor(s) differ")
    if wrong or oversized:
        report(model, {"mismatched_keys": wrong, "missing_keys": oversized})


def _dimension_fields(config: Any) -> dict[str, int]:
    """config.json's integer fields that size tensors (not ids, depths or position counts)."""
    skip = ("layer", "position", "n_ctx", "_id", "window", "num_labels", "max_")
    return {k: v for k, v in config.to_dict().items()
            if type(v) is int and v > 0 and not any(s in k for s in skip)}


def explain_dimensions(model_class: type, config: Any, headers: Headers, wrong: list, limit: int = 8) -> str | None:
    """Which config.json field makes the first misshapen tensor's shape, found by rebuilding the meta skeleton
    with that field changed until the tensor fits (at most ``limit`` rebuilds, on the error path only)."""
    name, in_file, expected = wrong[0]
    fields = _dimension_fields(config)
    tried: list[tuple[int, str, int]] = []
    for e, f in zip(expected, in_file) if len(expected) == len(in_file) else []:
        if e == f or 0 in (e, f):
            continue
        for field, v in fields.items():
            if (v * f) % e == 0:  # the field scales this axis
                tried.append((0 if v == e else 1, field, v * f // e))
            if v - (e - f) > 0:  # the field adds to it
                tried.append((2, field, v - (e - f)))
    for _, field, value in sorted(set(tried))[:limit]:
        if value == fields[field]:
            continue
        changed = copy.deepcopy(config)
        setattr(changed, field, value)
        try:
            still = mismatches(skeleton(model_class, changed), headers)[0]
        except Exception:  # that value is not a valid config either
            continue
        if not still:  # one field explains every misshapen tensor
            return (f"config.json's `{field}` is {fields[field]}, but the weights were saved with {value} "
                    f"(`{name}` has shape {list(in_file)}; {field}={fields[field]} implies {list(expected)})")
    return None
