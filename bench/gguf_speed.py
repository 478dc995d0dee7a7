#!/usr/bin/env python
"""Depth-pruned SmolLM2-135M in llama.cpp: EvoPress and LayerChop models as f16 and Q4_K_M GGUF files.

    nice -n 10 python bench/gguf_speed.py --timing-prefix /tmp/s4/quiet.sh      # f16 and Q4_K_M, 1 thread

The models are the rows of bench/results/depth (one-shot, no healing; depth pruning removes sublayers without
changing the kept weights, so the recorded structure is the model): EvoPress (attention of 6 blocks and MLP of 6
others dropped) and LayerChop (its default strategy, angular: 6 whole blocks). For each GGUF type, the dense and
the pruned models are exported, loaded together in one llama.cpp child and timed in ``--rounds`` paired rounds
(order reversed every other round): decode (one token after ``--seq-len`` cached) and prefill (``--seq-len``
tokens), tokens/s and the median over rounds of dense ms / model ms. Perplexity: llama.cpp's (from the file's
logits) and transformers' (f32) on the same first ``--ppl-windows`` windows of 512 tokens of WikiText-2
test.txt; for f16 also whether llama.cpp's 32 greedy tokens equal transformers'.
Writes bench/results/gguf_speed/results.json and NOTES.md (commentary added by hand).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "gguf_speed"
DEPTH = ROOT / "bench" / "results" / "depth" / "results.json"
MODELS = {"evopress": "evopress", "layerchop": "angular"}
"""Row name here -> row of bench/results/depth/results.json (LayerChop's default strategy is angular)."""

sys.path.insert(0, str(ROOT / "bench"))
from ziplm_llamacpp import load, perplexity  # noqa: E402  (llama.cpp perplexity in a child process)


def structures() -> dict:
    from optimum_prune import PruningConfig

    rows = json.loads(DEPTH.read_text())
    return {name: PruningConfig(**{k: rows[row][k] for k in ("drop_layers", "drop_attention", "drop_mlp")})
            for name, row in MODELS.items()}


def speeds(paths: list[Path], dtype: str, args) -> dict:
    """Per mode: tokens/s of each file and its speedup over the first (dense), median of paired rounds."""
    from optimum_prune.evaluation.environment import InferenceEnvironment
    from optimum_prune.evaluation.llamacpp_timing import time_gguf_files

    out = {}
    for mode in ("decode", "prefill"):
        env = InferenceEnvironment(engine="llama.cpp", mode=mode, seq_len=args.seq_len, threads=args.threads,
                                   dtype=dtype)
        ms = time_gguf_files(paths, env, rounds=args.rounds, repeats=args.repeats, warmup=2)
        tokens = 1 if mode == "decode" else args.seq_len
        out[mode] = [{"ms": round(statistics.median(r[i] for r in ms), 3),
                      "tokens_per_s": round(1000 * tokens / statistics.median(r[i] for r in ms), 2),
                      "speedup": round(statistics.median(r[0] / r[i] for r in ms), 4),
                      "round_speedups": [round(r[0] / r[i], 4) for r in ms]} for i in range(len(paths))]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["f16", "Q4_K_M"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=64, help="decode: cached tokens; prefill: tokens")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=8, help="timed calls per file and round")
    parser.add_argument("--ppl-windows", type=int, default=4)
    parser.add_argument("--timing-prefix", default=None, help="a command the llama.cpp timing children run under "
                                                              "(e.g. /tmp/s4/quiet.sh)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from optimum_prune import Pruner
    from optimum_prune.evaluation import llamacpp_timing
    from ziplm_llamacpp import quality

    if args.timing_prefix:
        llamacpp_timing.CHILD_PREFIX[:] = shlex.split(args.timing_prefix)
    hf_logging.set_verbosity_warning()
    args.out.mkdir(parents=True, exist_ok=True)
    files = args.out / "gguf"
    files.mkdir(exist_ok=True)
    start = time.perf_counter()
    run = {"load_average_start": load(), "cpus": os.cpu_count(), "args": {k: str(v) for k, v in vars(args).items()}}
    pruners = {"dense": Pruner.from_pretrained("smollm2")}
    for name, structure in structures().items():
        pruners[name] = Pruner.from_pretrained("smollm2")
        pruners[name].apply(structure)
    rows = {name: {"structure": pruner.model.config.to_dict().get("pruning_config") if name != "dense" else None,
                   "parameters": sum(p.numel() for p in pruner.model.parameters())}
            for name, pruner in pruners.items()}
    for dtype in args.dtypes:
        paths = []
        for name, pruner in pruners.items():
            path = files / f"smollm2-{name}-{dtype}.gguf"
            result = pruner.export(path, dtype=dtype)
            rows[name][dtype] = {"arch": result.arch, "gguf_blocks": result.num_layers,
                                 "file_mib": round(path.stat().st_size / 2**20, 1), "notes": result.notes}
            paths.append(path)
        measured = speeds(paths, dtype, args)
        for i, name in enumerate(pruners):
            entry = rows[name][dtype]
            for mode in measured:
                entry[mode] = measured[mode][i]
            entry["ppl_llama_cpp"] = perplexity(paths[i], args.ppl_windows, args.threads)
            if "ppl_transformers" not in rows[name]:
                q = quality(pruners[name], pruners[name].model, paths[i], args.ppl_windows) if dtype == "f16" else {}
                rows[name].update({k: v for k, v in q.items() if k == "ppl_transformers"})
                if q:
                    entry.update(greedy_32_identical=q["greedy_32_identical"], generation=q["generation"])
            if entry["ppl_llama_cpp"] and rows[name].get("ppl_transformers"):
                entry["ppl_rel_diff"] = round(entry["ppl_llama_cpp"] / rows[name]["ppl_transformers"] - 1, 5)
            print(json.dumps({name: {dtype: entry}}), flush=True)
        run[f"load_average_after_{dtype}"] = load()
        for path in paths:
            path.unlink()
    files.rmdir()
    run.update(models=rows, load_average_end=load(), seconds=round(time.perf_counter() - start, 1))
    (args.out / "results.json").write_text(json.dumps(run, indent=2) + "\n")
    write_notes(args.out / "NOTES.md", run, args)
    return 0


def write_notes(path: Path, run: dict, args) -> None:
    lines = ["# Depth-pruned SmolLM2-135M in llama.cpp (EvoPress, LayerChop): speed, size, perplexity", "",
             f"Command: `nice -n 10 .venv/bin/python bench/gguf_speed.py --dtypes {' '.join(args.dtypes)} --threads "
             f"{args.threads} --seq-len {args.seq_len} --rounds {args.rounds} --repeats {args.repeats} --ppl-windows "
             f"{args.ppl_windows}" + (f" --timing-prefix {args.timing_prefix}" if args.timing_prefix else "") + "`",
             "", f"Machine: {run['cpus']} CPUs, load average {run['load_average_start']} at the start, "
             f"{run['load_average_end']} at the end; {run['seconds']} s.", "",
             f"Speed: llama.cpp, {args.threads} thread(s), decode = one token after {args.seq_len} cached, prefill = "
             f"{args.seq_len} tokens; median of {args.rounds} paired rounds against the dense file of the same type. "
             f"Perplexity: first {args.ppl_windows} windows of 512 tokens of WikiText-2 test.txt.", "",
             "| model | type | arch | MiB | decode tok/s | decode vs dense | prefill tok/s | prefill vs dense | "
             "ppl llama.cpp | ppl transformers (f32) | diff | greedy 32 same |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, row in run["models"].items():
        for dtype in args.dtypes:
            e = row[dtype]
            diff = f"{100 * e['ppl_rel_diff']:+.2f}%" if "ppl_rel_diff" in e else "–"
            ppl = f"{e['ppl_llama_cpp']:.2f}" if e.get("ppl_llama_cpp") else "–"
            lines.append(f"| {name} | {dtype} | {e['arch']} | {e['file_mib']} | {e['decode']['tokens_per_s']} | "
                         f"{e['decode']['speedup']}x | {e['prefill']['tokens_per_s']} | {e['prefill']['speedup']}x | "
                         f"{ppl} | {row.get('ppl_transformers', 0):.2f} | {diff} | {e.get('greedy_32_identical', '–')} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
