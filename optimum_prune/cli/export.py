"""``optimum-prune export``: write a (pruned) model as one GGUF file that llama.cpp / ollama / LM Studio run."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..model_names import add_model_arguments


def add_export_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``export`` subcommand; returns its parser."""
    p = subparsers.add_parser("export", help="write a GGUF file that llama.cpp / ollama / LM Studio run (dense or "
                                             "pruned; see docs/gguf.md)")
    add_model_arguments(p)
    p.add_argument("--output", required=True, help="the .gguf file to write")
    p.add_argument("--format", default="gguf", choices=["gguf"], help="export format (default: gguf)")
    p.add_argument("--dtype", default="f16", help="f32, f16, bf16, or a llama.cpp type: Q8_0, Q6_K, Q5_K_M, "
                                                  "Q4_K_M, ... (quantized by llama.cpp itself; default: f16)")
    p.add_argument("--pre-tokenizer", default=None,
                   help="llama.cpp pre-tokenizer name for a Hugging Face BPE tokenizer (e.g. llama-bpe, smollm); "
                        "not needed when the model came from a GGUF file")
    p.set_defaults(command="export")
    return p


def run_export_cli(args: argparse.Namespace) -> int:
    """Check the options, load, export, print what was written; errors reach the CLI's one-line handler."""
    from ..export import GGUFExportError, normalize_dtype
    from ..export.quantize import QUANT_TYPES, check_quantize_available

    dtype = normalize_dtype(args.dtype)  # bad options fail before the model is loaded
    if Path(args.output).suffix != ".gguf":
        raise GGUFExportError(f"--output should be a .gguf file, got {args.output!r}")
    if dtype in QUANT_TYPES:
        check_quantize_available(dtype)
    from .. import Pruner

    start = time.perf_counter()
    pruner = Pruner.from_pretrained(args.model, gguf_file=args.gguf_file, task=args.task)
    result = pruner.export(args.output, format=args.format, dtype=dtype, pre_tokenizer=args.pre_tokenizer)
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {result.path} ({result.arch}, {result.dtype}, {result.num_layers} layers, tokenizer: "
          f"{result.tokenizer}, {result.file_bytes / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s)")
    return 0
