"""What each ``optimum-prune`` command does (the parser, with the flags built from configs, is in ``__init__``)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from typing import Any

def parse_index_spec(text: str, option: str) -> dict[int, list[int]]:
    """'0:1,2;3:0-63' -> {0: [1, 2], 3: [0..63]}."""
    out: dict[int, list[int]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        layer, sep, items = part.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"{option}: expected LAYER:I,J,... (e.g. '0:1,2;3:0-7'), got {part!r}")
        try:
            indices: list[int] = []
            for item in filter(None, (i.strip() for i in items.split(","))):
                lo, dash, hi = item.partition("-")
                indices += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
            out.setdefault(int(layer), []).extend(indices)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option}: {part!r} is not LAYER:I,J or LAYER:I-J with integers") from None
    return out


def _check_output(args: argparse.Namespace) -> None:
    """--output must be a directory or a new path: fail before any work, not at save time."""
    from pathlib import Path

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} exists and is not a directory; choose another output path")


def _check_push(args: argparse.Namespace) -> None:
    """With --push-to-hub, fail before any work when the upload cannot happen (no token, no network)."""
    if getattr(args, "push_to_hub", None):
        from ..session import check_push

        check_push(args.push_to_hub)


def _load(cls_name: str, args: argparse.Namespace):
    from .. import Pruner, Quantizer

    cls = Quantizer if cls_name == "quantize" else Pruner
    budget = getattr(args, "max_memory", None)
    extra = {"max_memory": budget} if budget else {}
    return cls.from_pretrained(args.model, gguf_file=args.gguf_file, task=args.task, **extra)


def _describe(spec, session, config) -> None:
    """The method's own one-line result, when its entry module has ``describe(session, config)``."""
    module = importlib.import_module(spec.entry.partition(":")[0])
    describe = getattr(module, "describe", None)
    if describe is not None:
        print(describe(session, config))


def _finish(session, args: argparse.Namespace, start: float, before=None) -> int:
    """Print the result (metrics, the before/after figures), save, say how to reload, push."""
    from .compare import measure, reload_hint, render

    config = session.pruning_config
    if config.layer_sparsity and len(set(config.layer_sparsity.values())) > 1:
        print("sparsity per layer: " + ", ".join(f"{k}: {v:.3f}" for k, v in config.layer_sparsity.items()))
    for key, value in (config.metrics or {}).items():
        print(f"{key}: {value}")
    if before is not None:
        figures = render(before, measure(session, args), args)
        if figures:
            print(figures)
    out = session.save_pretrained(args.output)
    print(f"saved to {out} ({time.perf_counter() - start:.1f} s)")
    print(reload_hint(out, _auto_class_name(session.model)))
    if args.push_to_hub:
        info = session.push_to_hub(args.push_to_hub)
        print(f"pushed to {getattr(info, 'commit_url', args.push_to_hub)}")
    return 0


def _infer_method(kind: str, args: argparse.Namespace) -> str:
    """--method, else the default the Python keyword form uses."""
    method = getattr(args, "method", None)
    if method:
        return method
    if kind == "prune":
        flags = args.flagset.given(args)
        if "--target-speedup" in flags:
            return "ziplm"
        if "--num-layers" in flags:
            return "layerchop"
        if "--sparsity" not in flags and "--n-m" not in flags:
            raise ValueError("give --sparsity (e.g. 0.5) or --n-m (e.g. 2:4) to sparsify, --target-speedup (e.g. 1.5 2) "
                             "for ZipLM, or --num-layers for LayerChop")
        return "sparsegpt"
    return {"quantize": "gptq", "heal": "heal"}[kind]


def _configs(kind: str, args: argparse.Namespace):
    """The method spec, its config and the run settings, all built from the flags (before the model loads)."""
    from ..methods.base import RunConfig
    from ..methods.registry import REGISTRY

    spec = REGISTRY.for_keyword(kind, _infer_method(kind, args))
    config_class = spec.config_class
    others = [RunConfig] if spec.calibrated else []
    stray = args.flagset.foreign(config_class, args, *others)
    if stray:
        raise ValueError(f"{', '.join(stray)}: not a setting of {spec.keyword or spec.name}; see "
                         f"`optimum-prune {kind} --help`")
    try:
        config = args.flagset.build(config_class, args)
        run = args.flagset.build(RunConfig, args) if spec.calibrated else None
    except ValueError as err:  # the config speaks Python (num_layers=); say it as flags (--num-layers)
        raise type(err)(_as_flags(str(err), args.flagset)) from None
    return spec, config, run


def _as_flags(message: str, flagset) -> str:
    """'pass num_layers= (how many)' -> 'pass --num-layers (how many)'."""
    import re

    by_field = {flag.path[-1]: name for name, flag in flagset.flags.items()}
    return re.sub(r"\b([a-z_]+)=(?![=\w\"'])", lambda m: by_field.get(m.group(1), m.group(1) + "=") + " "
                  if m.group(1) in by_field else m.group(0), message).replace("  ", " ").replace(" )", ")").replace(" ,", ",")


def _method(args: argparse.Namespace) -> int:
    """prune / quantize / heal: one method, configured from the flags."""
    kind = args.command
    spec, config, run = _configs(kind, args)
    _check_output(args)
    _check_push(args)
    start = time.perf_counter()
    session = _load(kind, args)
    if kind == "quantize":  # the CLI always saves: a model that cannot be stored packed fails before GPTQ
        from ..packing import packing_problem

        problem = packing_problem(session.model, symmetric=getattr(config, "symmetric", True))
        if problem:
            raise ValueError(problem)
    from .compare import measure

    before = measure(session, args)
    result = session.run_method(config, run)
    _describe(spec, session, config)
    if kind == "quantize":
        print(", ".join(f"{k}: {v}" for k, v in session.quantization.items()))
    from ..methods.ziplm.family import ZipLMFamily

    if isinstance(result, ZipLMFamily):
        return _family(result, args, start, before)
    return _finish(session, args, start, before)


def _auto_class_name(model) -> str:
    from ..loading import TASKS, task_of_model

    return TASKS[task_of_model(model)][0]


def _family(family, args: argparse.Namespace, start: float, before=None) -> int:
    """Several ZipLM targets: one checkpoint per target under OUTPUT/<target>x."""
    from .compare import measure, render

    print(family.to_markdown())
    for target, member in family.items():
        figures = render(before, measure(member, args), args) if before is not None else ""
        if figures:
            print(f"{target:g}x: " + figures)
    paths = family.save_pretrained(args.output)
    print("saved " + ", ".join(str(p) for p in paths.values()) + f" ({time.perf_counter() - start:.1f} s)")
    if args.push_to_hub:
        for target, member in family.items():
            info = member.push_to_hub(f"{args.push_to_hub}-{target:g}x")
            print(f"pushed to {getattr(info, 'commit_url', args.push_to_hub)}")
    return 0


def _run(args: argparse.Namespace) -> int:
    """A recipe file, or the recipe a checkpoint records, on --model."""
    from .. import Pruner
    from ..recipe import Recipe

    if (args.recipe is None) == (args.recipe_from is None):
        raise ValueError("give a recipe file (optimum-prune run recipe.yaml ...) or --recipe-from CHECKPOINT, "
                         "not both")
    recipe = Recipe.load(args.recipe) if args.recipe else Recipe.from_checkpoint(args.recipe_from)
    print("recipe: " + " -> ".join(s.config.name for s in recipe.stages))
    _check_output(args)
    _check_push(args)
    start = time.perf_counter()
    session = Pruner.from_pretrained(args.model, gguf_file=args.gguf_file, task=args.task)
    from .compare import measure

    before = measure(session, args)
    session.run(recipe)
    return _finish(session, args, start, before)


def _eval(args: argparse.Namespace) -> int:
    from ..evaluation.cli import run_eval_cli

    return run_eval_cli(args)


def _latency(args: argparse.Namespace) -> int:
    from ..evaluation.cli import run_latency_cli

    return run_latency_cli(args)


def _apply(args: argparse.Namespace) -> int:
    import torch

    from .. import Pruner, PruningConfig

    config = PruningConfig.from_json_file(args.config) if args.config else PruningConfig()
    config = config.merge(PruningConfig(
        remove_heads=parse_index_spec(args.remove_heads, "--remove-heads"),
        remove_neurons=parse_index_spec(args.remove_neurons, "--remove-neurons"),
        drop_attention=args.drop_attention, drop_mlp=args.drop_mlp, drop_layers=args.drop_layers,
    ))
    if config.is_empty:
        print("error: nothing to remove; give --config or --remove-heads/--remove-neurons/--drop-*", file=sys.stderr)
        return 2
    _check_push(args)
    start = time.perf_counter()
    pruner = Pruner.from_pretrained(args.model, gguf_file=args.gguf_file, task=args.task)
    probe = _probe_inputs(pruner)
    from .compare import measure, reload_hint, render

    before = measure(pruner, args)
    pruner.apply(config)
    with torch.no_grad():
        expected = _logits(pruner.model, probe)
    out = pruner.save_pretrained(args.output)
    print(pruner.summary().to_markdown(changed_only=True))
    print("\napply removes exactly these structures, without weight correction: it cuts a structure you chose (or "
          "reproduces one). `optimum-prune prune` chooses them and corrects the remaining weights (OBS).")
    figures = render(before, measure(pruner, args), args)
    if figures:
        print(figures)
    print(f"\nsaved to {out} ({time.perf_counter() - start:.1f} s)")
    print(reload_hint(out, _auto_class_name(pruner.model)))
    if not args.no_verify:
        from ..loading import auto_class, task_of_model

        reloaded = auto_class(task_of_model(pruner.model)).from_pretrained(out).eval()
        with torch.no_grad():
            diff = (_logits(reloaded, probe) - expected).abs().max().item()
        print(f"reloaded with transformers.{type(reloaded).__name__}: max |logit difference| = {diff:.3g}")
        if diff > 1e-4:
            print("error: the reloaded model differs from the pruned one", file=sys.stderr)
            return 1
    if args.push_to_hub:
        info = pruner.push_to_hub(args.push_to_hub)
        print(f"pushed to {getattr(info, 'commit_url', args.push_to_hub)}")
    return 0


def _probe_inputs(pruner) -> dict:
    import torch

    text = "The quick brown fox jumps over the lazy dog."
    if pruner.tokenizer is not None:
        return dict(pruner.tokenizer(text, return_tensors="pt"))
    return {"input_ids": torch.arange(1, 17)[None] % pruner.model.config.vocab_size}


def _logits(model, inputs: dict):
    out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _summary(args: argparse.Namespace) -> int:
    from .. import Pruner

    pruner = Pruner.from_pretrained(args.model)
    print(pruner.summary().to_markdown(changed_only=True))
    print("\npruning_config:")
    print(json.dumps(pruner.pruning_config.to_dict(), indent=2, sort_keys=True))
    return 0



COMMANDS: dict[str, Any] = {"apply": _apply, "prune": _method, "heal": _method, "quantize": _method, "run": _run,
                            "eval": _eval, "latency": _latency, "summary": _summary,
                            "export": lambda args: importlib.import_module(".export", __package__).run_export_cli(args)}
