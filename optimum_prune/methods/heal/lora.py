"""LoRA healing through peft: adapters on the pruned model's block Linears, trained, then merged back.

The targets are found through the architecture adapter (every compressible Linear of every remaining
block, or those whose block-relative path ends with a requested name), so each family and each pruned
per-layer shape gets adapters of its own size. After training the adapters are merged into the weights
(``merge_and_unload``): the result is a plain pruned checkpoint with no peft in it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the settings are checked when a config is built, which imports neither torch nor transformers
    from torch import nn

DEFAULTS: dict[str, Any] = {"r": 16, "alpha": None, "dropout": 0.05, "target_modules": None}
"""The settings a ``lora=dict(...)`` leaves out (alpha None: 2r, the usual ratio)."""


class LoRAError(ValueError):
    """A LoRA healing request that cannot run (bad settings, a sparse model, unknown target names)."""


def lora_settings(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """``lora=`` checked and completed with the defaults (None: full fine-tuning). Imports no peft."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise LoRAError(f"lora= takes a dict like {{'r': 16, 'alpha': 32, 'target_modules': ['q_proj', 'v_proj']}}, "
                        f"got {value!r}")
    settings = {**DEFAULTS, **value}
    r = settings["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LoRAError(f"lora r (the adapter rank) must be a positive integer, got {r!r}")
    if settings["alpha"] is None:
        settings["alpha"] = 2 * r
    alpha, dropout = settings["alpha"], settings["dropout"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise LoRAError(f"lora alpha (the adapter scale numerator, scale = alpha / r) must be positive, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise LoRAError(f"lora dropout must be in [0, 1), got {dropout!r}")
    targets = settings["target_modules"]
    if isinstance(targets, str):
        settings["target_modules"] = targets = [targets]
    if targets is not None and (not targets or not all(isinstance(t, str) and t for t in targets)):
        raise LoRAError(f"lora target_modules must be Linear names (e.g. ['q_proj', 'v_proj']) or None for every "
                        f"block Linear, got {targets!r}")
    return settings


def target_modules(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Full module names of the block Linears that get adapters: all of them, or those whose block-relative path
    is or ends with one of ``names``. Removed sublayers (no weights) are never targets."""
    from ...engine.layers import linear_groups
    from ...modeling.adapters import get_adapter

    adapter = get_adapter(model)
    full = {id(m): n for n, m in model.named_modules()}
    found: list[tuple[str, str]] = []
    for block in adapter.layers(model):
        for group in linear_groups(adapter, block):
            found += [(path, full[id(module)]) for path, module in zip(group.names, group.modules)]
    if names is None:
        return [name for _, name in found]

    def matches(path: str, name: str) -> bool:
        return path == name or path.endswith("." + name)

    missing = [n for n in names if not any(matches(path, n) for path, _ in found)]
    if missing:
        known = sorted({path for path, _ in found})
        raise LoRAError(f"lora target_modules {missing} name no Linear of this model's blocks; its block Linears are "
                        f"{known} (a suffix such as the last name is enough), or leave target_modules out for all")
    return [name for path, name in found if any(matches(path, n) for n in names)]


def wrap(model: nn.Module, settings: dict[str, Any]) -> tuple[nn.Module, list[str]]:
    """``model`` with LoRA adapters (peft ``get_peft_model``; only the adapters are trainable), and the full
    names of the adapted Linears."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    names = target_modules(model, settings["target_modules"])
    extra = {k: v for k, v in settings.items() if k not in DEFAULTS}
    conv1d = any(isinstance(model.get_submodule(n), Conv1D) for n in names)  # GPT-2 stores weights [in, out]
    try:
        config = LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                            target_modules=names, fan_in_fan_out=conv1d, bias="none", task_type="CAUSAL_LM", **extra)
    except TypeError as err:
        raise LoRAError(f"lora settings {sorted(extra)} are not peft LoraConfig fields ({err}); the named ones are "
                        f"{sorted(DEFAULTS)}") from None
    return get_peft_model(model, config), names


def merge(peft_model: nn.Module, requires_grad: dict[str, bool]) -> nn.Module:
    """Merge the trained adapters into the weights and drop peft; trainability is restored as it was before."""
    model = peft_model.merge_and_unload()
    for name, param in model.named_parameters():
        param.requires_grad_(requires_grad.get(name, True))
    for attribute in ("peft_config", "_hf_peft_config_loaded"):
        if attribute in vars(model):
            delattr(model, attribute)
    return model


def trainable_parameters(model: nn.Module) -> int:
    """Parameters the optimizer will update (the adapters only, once wrapped)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def record(settings: dict[str, Any], names: list[str], trainable: int) -> dict[str, Any]:
    """The JSON-ready LoRA entry of the heal record."""
    paths = sorted({n.rsplit(".", 1)[-1] for n in names})
    return {"r": settings["r"], "alpha": settings["alpha"], "dropout": settings["dropout"],
            "target_modules": settings["target_modules"] or paths, "adapted_linears": len(names),
            "trainable_params": trainable, "merged": True,
            **{k: v for k, v in settings.items() if k not in DEFAULTS}}
