"""The ``optimum-prune`` command line: each method's flags are built from its config's fields."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Sequence

from ..model_names import add_model_arguments
from ..methods.base import RunConfig
from ..methods.registry import REGISTRY
from .commands import COMMANDS, parse_index_spec
from .compare import add_compare_arguments
from .flags import FlagSet

__all__ = ["build_parser", "main", "parse_index_spec"]


def model_args(p: argparse.ArgumentParser, *, output: bool = True, eval_text: bool = True) -> None:
    """--model / --gguf-file / --task (defined once, in loading) and --output / --push-to-hub / --eval-text."""
    add_model_arguments(p)
    if output:
        p.add_argument("--output", required=True, help="directory for the compressed checkpoint")
        p.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload to this Hub repo")
    if eval_text:
        p.add_argument("--eval-text", help="text file: print the perplexity before and after compression "
                                           "(e.g. ../shared/data/wikitext-2/test.txt)")
        add_compare_arguments(p)


def _method_command(sub, kind: str, help_text: str, default_help: str) -> argparse.ArgumentParser:
    """A subcommand whose flags are the fields of every method of ``kind`` (and of RunConfig if calibrated)."""
    parser = sub.add_parser(kind, help=help_text)
    model_args(parser)
    if kind in ("prune", "quantize"):
        parser.add_argument("--max-memory", default=None, metavar="SIZE",
                            help="e.g. 1GB: a local safetensors checkpoint larger than this stays on disk and "
                                 "SparseGPT / Wanda / magnitude / GPTQ stream it one block at a time (docs/scale.md)")
    specs = REGISTRY.specs(kind)
    names = [s.keyword or s.name for s in specs]
    if len(specs) > 1:
        parser.add_argument("--method", choices=names, help=default_help)
    reserved = {"--model", "--gguf-file", "--task", "--output", "--push-to-hub", "--eval-text", "--method",
                "--eval-windows", "--prompt", "--max-new-tokens", "--max-memory"}
    if any(s.calibrated for s in specs):  # the shared run flags keep their plain names (--seed is RunConfig's)
        reserved |= {f"--{f.name.replace('_', '-')}" for f in fields(RunConfig)}
    flags = FlagSet(parser, reserved)
    for spec in specs:
        flags.add(spec.config_class, title=f"{spec.keyword or spec.name} ({spec.config_class.__doc__.splitlines()[0]})")
    if any(s.calibrated for s in specs):
        flags.add(RunConfig, title="calibration and run settings")
    parser.set_defaults(flagset=flags)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optimum-prune", description="Make transformers models smaller and faster.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    parser.add_argument("--debug", action="store_true", help="on an error, also print the full traceback")
    sub = parser.add_subparsers(dest="command", required=True)

    apply = sub.add_parser("apply", help="remove explicit heads / neurons / sublayers / layers as they are (no weight "
                                         "correction), save, verify the reload")
    model_args(apply)
    apply.add_argument("--config", help="a PruningConfig JSON file (original indices)")
    apply.add_argument("--remove-heads", default="", help="query heads per layer, e.g. '0:1,2;3:0-2'")
    apply.add_argument("--remove-neurons", default="", help="FFN neurons per layer, e.g. '4:0-767'")
    apply.add_argument("--drop-attention", type=int, nargs="*", default=[], metavar="LAYER")
    apply.add_argument("--drop-mlp", type=int, nargs="*", default=[], metavar="LAYER")
    apply.add_argument("--drop-layers", type=int, nargs="*", default=[], metavar="LAYER")
    apply.add_argument("--no-verify", action="store_true", help="skip reloading the output and comparing logits")

    _method_command(sub, "prune", "ZipLM to measured target speedups, LayerChop, EvoPress, or sparsify with "
                                  "SparseGPT / Wanda / magnitude (optionally scheduled per layer)",
                    "default: ziplm with --target-speedup, layerchop with --num-layers, else sparsegpt")
    _method_command(sub, "heal", "continued pretraining of a pruned causal LM (LayerChop healing, transformers "
                                 "Trainer)", "")
    _method_command(sub, "quantize", "GPTQ-quantize (packed compressed-tensors checkpoint), or EvoPress bit-widths",
                    "gptq (default) or evopress (a bit-width per Linear at --average-bits)")

    run = sub.add_parser("run", help="run a recipe (YAML or JSON: stages such as ziplm -> heal -> gptq) on a model")
    run.add_argument("recipe", nargs="?", help="recipe file (.yaml / .yml / .json)")
    run.add_argument("--recipe-from", metavar="CHECKPOINT",
                     help="re-run the recipe recorded in a checkpoint's config.json (with --model: its base model)")
    model_args(run)

    from ..evaluation.cli import add_eval_cli as add_eval, add_latency_cli as add_latency

    add_eval(sub)
    add_latency(sub)
    from .export import add_export_cli

    add_export_cli(sub)

    show = sub.add_parser("summary", help="print what was removed from a saved pruned model")
    show.add_argument("model", help="directory or Hub id of a pruned model")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging

    logging.set_verbosity_info() if args.verbose else logging.set_verbosity_warning()
    from .errors import run_command  # one-line errors, Ctrl-C (exit 130), OS causes; --debug: the traceback

    return run_command(COMMANDS[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
