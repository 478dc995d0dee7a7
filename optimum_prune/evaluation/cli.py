"""The ``eval`` and ``latency`` subcommands of ``optimum-prune``: their argparse parsers and what they run."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..model_names import add_model_arguments
from ..text import DATASETS, DatasetUnavailableError, read_text

# -------------------------------------------------------------------------------------------- eval


def add_eval_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``eval`` subcommand on an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser("eval", help="perplexity, KL to the dense model, latency and size of a model",
                              description="Evaluate a model with the project protocol (perplexity over the first "
                                          "--max-windows windows of --seq-len tokens) and print a Markdown table.")
    add_model_arguments(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", help="a text file to compute perplexity on (e.g. ../shared/data/wikitext-2/test.txt)")
    source.add_argument("--dataset", choices=list(DATASETS), help="a dataset from the Hub (needs internet)")
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--reference", help="the dense model to compute KL(reference || model) against")
    p.add_argument("--top-k", type=int, default=None, help="Top-K KL: reference's top-k tokens + a rest bucket")
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True,
                   help="measure prefill latency (default: on)")
    p.add_argument("--latency-seq-len", type=int, default=None, help="tokens of the latency input (default: --seq-len)")
    p.add_argument("--repeats", type=int, default=20, help="timed latency runs")
    p.add_argument("--threads", type=int, default=None, help="torch threads during the latency measurement")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (default: where the model loads)")
    p.add_argument("--json", dest="json_path", metavar="OUT.json", help="also write the results as JSON")
    p.add_argument("--lm-eval-tasks", nargs="+", default=None, metavar="TASK", help="lm-eval-harness tasks")
    p.add_argument("--lm-eval-limit", type=float, default=None, help="examples per lm-eval task")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--gguf", metavar="FILE.gguf", help="instead: perplexity of this GGUF file from llama.cpp's own "
                                                      "logits and tokenizer (with --text; --seq-len, --max-windows, "
                                                      "--threads apply)")
    p.set_defaults(command="eval")
    return p


def run_eval_cli(args: argparse.Namespace) -> int:
    """Run ``optimum-prune eval``: load, evaluate, print the table, write JSON; 0 on success, 2 on bad input."""
    from ..loading import load_model
    from .harness import lm_eval
    from .report import evaluate

    if getattr(args, "gguf", None):
        return _run_gguf_eval(args)
    try:
        text = None
        if args.text or args.dataset:
            text = read_text(args.text or args.dataset, split=args.split)
        model, tokenizer, _ = load_model(args.model, gguf_file=args.gguf_file, task=getattr(args, "task", None))
        if text is not None and tokenizer is None:
            raise ValueError(f"no tokenizer found for {args.model}; cannot tokenize the text")
        reference = load_model(args.reference, tokenizer=False)[0] if args.reference else None
        latency: bool | dict[str, Any] = False
        if args.latency:
            latency = {"repeats": args.repeats, "threads": args.threads}
            if args.latency_seq_len:
                latency["seq_len"] = args.latency_seq_len
        weights = args.model if os.path.isdir(args.model) else None
        report = evaluate(model, tokenizer, text, reference=reference, top_k=args.top_k, latency=latency,
                          weights_path=weights, seq_len=args.seq_len, max_windows=args.max_windows,
                          batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
                          name=args.model)
        if args.lm_eval_tasks:
            limit = args.lm_eval_limit
            limit = int(limit) if limit is not None and limit >= 1 else limit
            results = lm_eval(model, tokenizer, args.lm_eval_tasks, batch_size=args.batch_size, limit=limit)
            report.lm_eval = results.get("results", {})
    except (ValueError, FileNotFoundError, ImportError, DatasetUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.to_markdown())
    if args.json_path:
        directory = os.path.dirname(os.path.abspath(args.json_path))
        os.makedirs(directory, exist_ok=True)
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2, default=str)
        print(f"\nwrote {args.json_path}")
    return 0


def _run_gguf_eval(args: argparse.Namespace) -> int:
    """``eval --gguf FILE --text T``: the project's perplexity protocol on llama.cpp's logits of the file."""
    from .gguf import gguf_perplexity

    if not (args.text or args.dataset):
        print("error: --gguf needs --text (or --dataset) to compute perplexity on", file=sys.stderr)
        return 2
    result = gguf_perplexity(args.gguf, read_text(args.text or args.dataset, split=args.split), seq_len=args.seq_len,
                             max_windows=args.max_windows, threads=args.threads)
    print(f"perplexity (llama.cpp) of {args.gguf}: {result.perplexity:.4f} "
          f"({result.num_windows} windows x {result.seq_len} tokens)")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump({"gguf": str(args.gguf), **result.__dict__}, f, indent=2)
    return 0


# ----------------------------------------------------------------------------------------- latency


def add_latency_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``latency`` subcommand on an ``argparse`` subparsers object; returns its parser."""
    from .defaults import CACHE_ENV_VAR, DEFAULT_MLP_LEVELS

    p = subparsers.add_parser("latency", help="measure (or reuse) the ZipLM latency table of a model",
                              description="Time every attention level and FFN width of one block, and the dense "
                                          "model, in an inference environment; cached per environment and model.")
    add_model_arguments(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--engine", default="torch", help="torch (default) or llama.cpp (time the GGUF export in "
                                                      "llama.cpp; needs llama-cpp-python)")
    p.add_argument("--dtype", default=None, help="torch: float32 (default), float16 or bfloat16; llama.cpp: the GGUF "
                                                 "type, f16 (default), f32, bf16, Q8_0, Q4_K_M, ...")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512, help="prefill tokens, or KV-cache length in decode mode")
    p.add_argument("--mode", default="prefill", help="prefill (default) or decode (one token with a KV cache)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads while timing (default: torch's count; "
                                                              "llama.cpp: half the CPUs)")
    p.add_argument("--logits-to-keep", type=int, default=None,
                   help="prefill: the LM head on the last N positions only (1: time to first token); 0: every "
                        "position (torch's default); llama.cpp: 1 only")
    p.add_argument("--mlp-levels", type=int, default=None, help=f"FFN widths to time (default: {DEFAULT_MLP_LEVELS})")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per level (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per level")
    p.add_argument("--cache-dir",
                   help=f"table cache (default: ${CACHE_ENV_VAR}/latency or ~/.cache/optimum_prune/latency)")
    p.add_argument("--remeasure", action="store_true", help="measure even when a cached table matches")
    p.add_argument("--output", metavar="TABLE.json", help="also write the table here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(command="latency")
    return p


def run_latency_cli(args: argparse.Namespace) -> int:
    """Run ``optimum-prune latency``: load, measure or reuse, print, save; 0 on success, 2 on bad input."""
    from ..loading import load_model
    from .environment import InferenceEnvironment
    from .table_cache import get_latency_table, latency_table_path

    try:
        env = InferenceEnvironment(device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                                   seq_len=args.seq_len, mode=args.mode, threads=args.threads, engine=args.engine,
                                   logits_to_keep=args.logits_to_keep)
        env.check_available()
        if env.llamacpp:  # the dense model is exported to GGUF and timed in llama.cpp
            model, _, _ = load_model(args.model, gguf_file=args.gguf_file, task=args.task, tokenizer=False)
        else:
            model, _, _ = load_model(args.model, gguf_file=args.gguf_file, task=args.task, tokenizer=False,
                                     dtype=env.torch_dtype)
            model.to(env.torch_device)
        path = latency_table_path(model, env, cache_dir=args.cache_dir, mlp_levels=args.mlp_levels)
        before = _mtime(path)
        table = get_latency_table(model, env, cache_dir=args.cache_dir, remeasure=args.remeasure,
                                  mlp_levels=args.mlp_levels, repeats=args.repeats, warmup=args.warmup,
                                  progress=not args.no_progress)
        if args.output:
            table.save(args.output)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table.to_text())
    reused = before is not None and _mtime(path) == before
    print(f"\n{'reused the table cached' if reused else 'measured; cached'} at {path}")
    if args.output:
        print(f"wrote {args.output}")
    return 0


def _mtime(path: Path) -> int | None:
    """Modification time of ``path`` in ns, None when absent (tells the CLI whether a table was reused)."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None
