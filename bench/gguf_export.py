#!/usr/bin/env python
"""GGUF export of SmolLM2-135M, dense and pruned: llama.cpp loads, generates, and matches transformers' perplexity.

    python bench/gguf_export.py                 # f16, 4 windows of 512 tokens of test.txt (~5 min on 2 cores)
    python bench/gguf_export.py --windows 40 --quantized Q8_0 Q4_K_M

For each model: export (f16 by default), check the file's embedded tokenizer gives the same ids as the
transformers tokenizer, greedy-generate 32 tokens in llama.cpp and in transformers, and compute the
project's perplexity (first --windows windows of 512 tokens of WikiText-2 test.txt) from llama.cpp's logits
and from transformers. Quantized types are exported by llama.cpp's quantizer and run in a child process
(a SIGILL build is reported, not fatal). Results: bench/results/gguf_export/results.json (+ NOTES.md by hand).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"
OUT = ROOT / "bench" / "results" / "gguf_export"
STRUCTURE = ROOT / "examples" / "smollm2_structures.json"
PROMPT = "The capital of France is"

CHILD = """
import json, sys
from optimum_prune.evaluation.gguf import gguf_perplexity
r = gguf_perplexity(sys.argv[1], sys.argv[2], seq_len=512, max_windows=int(sys.argv[3]))
print(json.dumps({"perplexity": r.perplexity}))
"""


def llama_generate(path: Path, ids: list[int], n: int = 32) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        out = []
        for _ in range(n):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(token)
            llm.eval([token])
        return out
    finally:
        llm.close()


def hf_generate(model, ids: list[int], n: int = 32) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def tokenizer_agrees(path: Path, tokenizer, text: str) -> bool:
    import llama_cpp

    from optimum_prune.evaluation.gguf import gguf_token_ids

    llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False, vocab_only=True)
    try:
        return gguf_token_ids(llm, text) == tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        llm.close()


def measure(name: str, pruner, args, text: str) -> dict:
    from optimum_prune.evaluation import perplexity
    from optimum_prune.evaluation.gguf import gguf_perplexity

    row: dict = {"model": name}
    t = time.perf_counter()
    hf = perplexity(pruner.model, pruner.tokenizer, text, seq_len=512, max_windows=args.windows, progress=False)
    row["ppl_transformers"] = hf.perplexity
    row["transformers_s"] = round(time.perf_counter() - t, 1)
    ids = pruner.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    hf_tokens = hf_generate(pruner.model, ids)
    for dtype in [args.dtype, *args.quantized]:
        path = OUT / f"{name}-{dtype}.gguf"
        t = time.perf_counter()
        result = pruner.export(path, dtype=dtype)
        entry = {"arch": result.arch, "layers": result.num_layers, "tokenizer": result.tokenizer,
                 "notes": result.notes, "file_MiB": round(result.file_bytes / 2**20, 1),
                 "export_s": round(time.perf_counter() - t, 1)}
        if dtype == args.dtype:  # in-process: loads, tokenizes, generates
            entry["tokenizer_ids_match"] = tokenizer_agrees(path, pruner.tokenizer, text[:20000])
            tokens = llama_generate(path, ids)
            entry["greedy_32_identical"] = tokens == hf_tokens
            entry["generation"] = pruner.tokenizer.decode(tokens)
            t = time.perf_counter()
            entry["ppl_llama_cpp"] = gguf_perplexity(path, text, seq_len=512, max_windows=args.windows).perplexity
            entry["llama_cpp_s"] = round(time.perf_counter() - t, 1)
        else:  # a child process: a llama.cpp build that dies with SIGILL is reported
            proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(DATA), str(args.windows)],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                entry["ppl_llama_cpp"] = json.loads(proc.stdout.strip().splitlines()[-1])["perplexity"]
            else:
                from optimum_prune.export.quantize import describe_exit

                entry["error"] = describe_exit(proc.returncode) or proc.stderr.strip().splitlines()[-1:]
        if "ppl_llama_cpp" in entry:
            entry["ppl_rel_diff"] = entry["ppl_llama_cpp"] / hf.perplexity - 1
        if not args.keep:
            path.unlink(missing_ok=True)
        row[dtype] = entry
        print(json.dumps({name: {dtype: entry}}, default=str), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=4, help="512-token windows of test.txt (protocol: 40)")
    parser.add_argument("--dtype", default="f16")
    parser.add_argument("--quantized", nargs="*", default=[], help="llama.cpp types, e.g. Q8_0 Q4_K_M")
    parser.add_argument("--keep", action="store_true", help="keep the .gguf files in the results folder")
    args = parser.parse_args()
    from optimum_prune import Pruner, PruningConfig
    from optimum_prune.text import read_text

    OUT.mkdir(parents=True, exist_ok=True)
    text = read_text(str(DATA))
    rows = []
    pruner = Pruner.from_pretrained("smollm2")
    rows.append(measure("smollm2-dense", pruner, args, text))
    pruner.apply(PruningConfig.from_json_file(str(STRUCTURE)))
    rows.append(measure("smollm2-pruned", pruner, args, text))
    (OUT / "results.json").write_text(json.dumps({"windows": args.windows, "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
