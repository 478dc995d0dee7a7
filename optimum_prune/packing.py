"""Saving GPTQ-quantized weights as real packed low-bit tensors in the compressed-tensors format.

compressed-tensors' ``pack-quantized`` format is what transformers (``AutoModelForCausalLM``) and
vLLM both read: per quantized Linear, ``weight_packed`` (int32 words holding 32/bits codes each),
``weight_scale`` [out, groups], ``weight_shape`` and, for asymmetric grids, ``weight_zero_point``.
We pack the GPTQ codes directly (no re-rounding), so reloading reproduces the fake-quantized
weights bit for bit. The ``quantization_config`` sits in config.json beside ``pruning_config``.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from .engine.compress import QuantRecord
from .engine.quant import QuantSpec

FORMAT = "pack-quantized"


def _args(spec: QuantSpec):
    from compressed_tensors.quantization import QuantizationArgs

    grouped = spec.group is not None
    return QuantizationArgs(
        num_bits=spec.bits, type="int", symmetric=spec.symmetric,
        strategy="group" if grouped else "channel", group_size=spec.group if grouped else None,
        actorder="static" if (spec.act_order and grouped) else None, dynamic=False,
    )


def quantization_config(model: nn.Module, records: dict[str, QuantRecord]) -> Any:
    """compressed-tensors ``QuantizationConfig``: one config group per distinct grid, every other Linear ignored."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    by_spec: dict[QuantSpec, list[str]] = defaultdict(list)
    for name, record in records.items():
        by_spec[record.spec].append(name)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ignore = sorted(n for n in linears if n not in records)
    uniform = len(by_spec) == 1 and set(records) <= linears
    groups = {}
    for i, (spec, names) in enumerate(sorted(by_spec.items(), key=lambda kv: (kv[0].bits, str(kv[0])))):
        targets = ["Linear"] if uniform else sorted(names)
        groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=_args(spec))
    return QuantizationConfig(config_groups=groups, ignore=ignore, format=FORMAT, quantization_status="compressed")


def packed_state_dict(model: nn.Module, records: dict[str, QuantRecord],
                      state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict (or the part ``state`` of it) with each quantized weight replaced by its packed
    codes, scales and zero points."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    state = model.state_dict() if state is None else state
    modules = dict(model.named_modules())
    for name, record in records.items():
        if f"{name}.weight" not in state:
            continue
        module = modules[name]
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name} is a {type(module).__name__}; compressed-tensors packs nn.Linear weights only")
        state.pop(f"{name}.weight")
        state[f"{name}.weight_packed"] = pack_to_int32(record.codes.to(torch.int8), record.spec.bits)
        state[f"{name}.weight_scale"] = record.scale.to(module.weight.dtype).contiguous()
        state[f"{name}.weight_shape"] = torch.tensor(list(record.codes.shape), dtype=torch.int64)
        if not record.spec.symmetric:
            state[f"{name}.weight_zero_point"] = pack_to_int32(record.zero.to(torch.int8), record.spec.bits,
                                                               packed_dim=0).contiguous()
    return state


def save_packed(model: nn.Module, directory: str | os.PathLike, records: dict[str, QuantRecord],
                **kwargs: Any) -> None:
    """``model.save_pretrained`` with packed low-bit weights and the compressed-tensors quantization_config."""
    check_packable(model, records)
    model.save_pretrained(directory, state_dict=packed_state_dict(model, records), **kwargs)
    write_quantization_config(model, directory, records)


def write_quantization_config(model: nn.Module, directory: str | os.PathLike, records: dict[str, QuantRecord]) -> None:
    """Add the compressed-tensors ``quantization_config`` to the config.json in ``directory``."""
    import compressed_tensors

    qconfig = quantization_config(model, records).model_dump(exclude={"quant_method"})
    path = os.path.join(directory, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "compressed-tensors", "version": compressed_tensors.__version__,
                                     "sparsity_config": {}, "transform_config": {}, **qconfig}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def packing_problem(model: nn.Module, *, symmetric: bool = True) -> str | None:
    """Why quantizing this model's block Linears would give weights that cannot be saved packed (None: they can)."""
    from .engine.layers import linear_groups
    from .modeling.adapters import get_adapter

    if not symmetric:
        return ("asymmetric grids cannot be saved packed yet (compressed-tensors reloads their zero points "
                "wrongly): quantize with symmetric=True to save")
    adapter = get_adapter(model)
    for block in adapter.layers(model):
        for group in linear_groups(adapter, block):
            for module in group.modules:
                if group.expert is not None:
                    return ("cannot save packed weights for Mixture-of-Experts experts: they are fused 3-D tensors, "
                            "and compressed-tensors stores nn.Linear only. Use the Python API and evaluate the "
                            "fake-quantized model in memory")
                if not isinstance(module, nn.Linear):
                    return (f"cannot save packed weights for {type(module).__name__} layers (GPT-2 uses Conv1D): "
                            "compressed-tensors stores nn.Linear only. Quantize a Llama-style, OPT or BERT model, "
                            "or use the Python API and evaluate the fake-quantized model in memory")
    return None


def check_packable(model: nn.Module, records: dict[str, QuantRecord]) -> None:
    """Fail before anything is written when a quantized layer cannot be stored packed."""
    modules = dict(model.named_modules())
    if any(not r.spec.symmetric for r in records.values()):
        raise ValueError(
            "asymmetric grids cannot be saved yet: compressed-tensors (<= 0.20) packs their zero points on "
            "save but expects them unpacked when transformers loads the model, so the checkpoint would not "
            "reload. Quantize with symmetric=True (the default, as in llm-compressor's W4A16) to save"
        )
    bad = sorted(n for n in records if not isinstance(modules.get(n), nn.Linear))
    if bad:
        raise TypeError(
            f"cannot save packed weights for {bad[:3]}{'...' if len(bad) > 3 else ''}: compressed-tensors "
            "stores nn.Linear layers only (GPT-2 uses Conv1D; Mixture-of-Experts experts are fused 3-D tensors). "
            "Evaluate the fake-quantized model in memory, "
            "or quantize a Llama-style, OPT or BERT model"
        )
