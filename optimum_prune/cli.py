"""The ``optimum-prune`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from .loading import DEFAULT_MODEL, EMBEDDED_MODELS, TASKS


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


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optimum-prune", description="Make transformers models smaller and faster.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    apply = sub.add_parser("apply", help="remove explicit heads / neurons / sublayers / layers, save, verify the reload")
    apply.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"Hub id, directory, .gguf file, or an embedded model ({', '.join(EMBEDDED_MODELS)}); "
                            f"default: {DEFAULT_MODEL}")
    apply.add_argument("--gguf-file", help="GGUF file inside --model's directory or repo")
    apply.add_argument("--task", choices=list(TASKS), help="model head to load (default: from config.json)")
    apply.add_argument("--config", help="a PruningConfig JSON file (original indices)")
    apply.add_argument("--remove-heads", default="", help="query heads per layer, e.g. '0:1,2;3:0-2'")
    apply.add_argument("--remove-neurons", default="", help="FFN neurons per layer, e.g. '4:0-767'")
    apply.add_argument("--drop-attention", type=int, nargs="*", default=[], metavar="LAYER")
    apply.add_argument("--drop-mlp", type=int, nargs="*", default=[], metavar="LAYER")
    apply.add_argument("--drop-layers", type=int, nargs="*", default=[], metavar="LAYER")
    apply.add_argument("--output", required=True, help="directory for the pruned checkpoint")
    apply.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload to this Hub repo")
    apply.add_argument("--no-verify", action="store_true", help="skip reloading the output and comparing logits")

    show = sub.add_parser("summary", help="print what was removed from a saved pruned model")
    show.add_argument("model", help="directory or Hub id of a pruned model")
    return parser


def _apply(args: argparse.Namespace) -> int:
    import torch

    from . import Pruner, PruningConfig

    config = PruningConfig.from_json_file(args.config) if args.config else PruningConfig()
    config = config.merge(PruningConfig(
        remove_heads=parse_index_spec(args.remove_heads, "--remove-heads"),
        remove_neurons=parse_index_spec(args.remove_neurons, "--remove-neurons"),
        drop_attention=args.drop_attention, drop_mlp=args.drop_mlp, drop_layers=args.drop_layers,
    ))
    if config.is_empty:
        print("error: nothing to remove; give --config or --remove-heads/--remove-neurons/--drop-*", file=sys.stderr)
        return 2
    start = time.perf_counter()
    pruner = Pruner.from_pretrained(args.model, gguf_file=args.gguf_file, task=args.task)
    probe = _probe_inputs(pruner)
    pruner.apply(config)
    with torch.no_grad():
        expected = _logits(pruner.model, probe)
    out = pruner.save_pretrained(args.output)
    print(pruner.summary().to_markdown(changed_only=True))
    print(f"\nsaved to {out} ({time.perf_counter() - start:.1f} s)")
    if not args.no_verify:
        from .loading import auto_class, task_of_model

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
    from . import Pruner

    pruner = Pruner.from_pretrained(args.model)
    print(pruner.summary().to_markdown(changed_only=True))
    print("\npruning_config:")
    print(json.dumps(pruner.pruning_config.to_dict(), indent=2, sort_keys=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    from transformers.utils import logging

    logging.set_verbosity_info() if args.verbose else logging.set_verbosity_warning()
    from . import PruningConfigError, UnsupportedArchitectureError

    try:
        return {"apply": _apply, "summary": _summary}[args.command](args)
    except (PruningConfigError, UnsupportedArchitectureError, argparse.ArgumentTypeError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
