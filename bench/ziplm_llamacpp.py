#!/usr/bin/env python
"""ZipLM timed in llama.cpp: SmolLM2-135M pruned to decode-speedup targets measured on its GGUF exports.

    nice -n 10 python bench/ziplm_llamacpp.py                          # 1.5x and 2x, f16, 2 threads, --preset fast
    python bench/ziplm_llamacpp.py --targets 2.0 --dtype Q8_0 --rounds 10

``Pruner.from_pretrained("smollm2").prune(target_speedup=[...], latency=dict(engine="llama.cpp", mode="decode",
dtype=..., threads=...), preset="fast", calibration=valid.txt)``: the latency table is timed in llama.cpp on
synthetic GGUF files, and ZipLM's speedup checks (and re-aiming) time the dense and pruned GGUF exports in
paired rounds. Then each pruned model is exported and its decode speed measured again, independently, against
the dense export in ``--rounds`` paired rounds (tokens/s = 1000 / ms per decode step x batch), and optionally
its llama.cpp perplexity on the first ``--ppl-windows`` windows of 512 tokens of WikiText-2 test.txt.
Writes bench/results/ziplm_llamacpp/results.json and NOTES.md (figures; commentary added by hand).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
OUT = ROOT / "bench" / "results" / "ziplm_llamacpp"
TOLERANCE = 0.07
"""The issue's bar: llama.cpp-timed targets met within ±7% (goal ±5%) in llama.cpp decode."""

PPL_CHILD = """
import json, sys
from optimum_prune.evaluation.gguf import gguf_perplexity
r = gguf_perplexity(sys.argv[1], sys.argv[2], seq_len=512, max_windows=int(sys.argv[3]), threads=int(sys.argv[4]))
print(json.dumps({"perplexity": r.perplexity}))
"""


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def perplexity(path: Path, windows: int, threads: int) -> float | None:
    """llama.cpp's perplexity of a GGUF file, in a child process (a crashing build is reported, not fatal)."""
    proc = subprocess.run([sys.executable, "-c", PPL_CHILD, str(path), str(DATA / "test.txt"), str(windows),
                           str(threads)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"perplexity of {path.name} failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["perplexity"]


def quality(pruner, model, path: Path, windows: int) -> dict:
    """transformers' perplexity of ``model`` on the same windows llama.cpp scores, and whether llama.cpp's greedy
    32 tokens after a prompt equal transformers' (the file loads and generates exactly)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from gguf_export import PROMPT, hf_generate, llama_generate

    from optimum_prune.evaluation import perplexity as hf_perplexity
    from optimum_prune.text import read_text

    text = read_text(str(DATA / "test.txt"))
    ppl = hf_perplexity(model, pruner.tokenizer, text, seq_len=512, max_windows=windows, progress=False).perplexity
    ids = pruner.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    tokens = llama_generate(path, ids)
    return {"ppl_transformers": ppl, "greedy_32_identical": tokens == hf_generate(model, ids),
            "generation": pruner.tokenizer.decode(tokens)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0])
    parser.add_argument("--dtype", default="f16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preset", default="fast", help="ZipLM preset ('none' for the full defaults)")
    parser.add_argument("--num-samples", type=int, default=None, help="calibration windows (default: the preset's)")
    parser.add_argument("--rounds", type=int, default=10, help="paired rounds of the final speed measurement")
    parser.add_argument("--repeats", type=int, default=8, help="timed decode steps per model and round")
    parser.add_argument("--ppl-windows", type=int, default=4, help="llama.cpp perplexity windows (0: skip)")
    parser.add_argument("--speedup-rounds", type=int, default=None,
                        help="paired rounds of ZipLM's own speedup checks (default: the preset's)")
    parser.add_argument("--timing-prefix", default=None,
                        help="a command every llama.cpp timing child runs under, e.g. /tmp/s4/quiet.sh (a script "
                             "that pauses other jobs on a shared machine while llama.cpp is timed)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from optimum_prune import Pruner
    from optimum_prune.evaluation import llamacpp_timing
    from optimum_prune.evaluation.latency_table import InferenceEnvironment, gguf_speedup

    if args.timing_prefix:
        llamacpp_timing.CHILD_PREFIX[:] = shlex.split(args.timing_prefix)
    hf_logging.set_verbosity_warning()
    args.out.mkdir(parents=True, exist_ok=True)
    latency = dict(engine="llama.cpp", mode="decode", dtype=args.dtype, threads=args.threads)
    preset = None if args.preset == "none" else args.preset
    run = {"load_average_start": load(), "cpus": os.cpu_count(), "latency": latency, "preset": preset,
           "targets": args.targets, "calibration": str(DATA / "valid.txt"), "timing_prefix": args.timing_prefix}
    print(f"load average {run['load_average_start']} on {os.cpu_count()} CPUs", flush=True)

    start = time.perf_counter()
    pruner = Pruner.from_pretrained("smollm2")
    kwargs = {"num_samples": args.num_samples} if args.num_samples else {}
    if args.speedup_rounds:
        kwargs["speedup_rounds"] = args.speedup_rounds
    try:  # the bench measures its own table (remeasure): a cached one may come from another machine state
        family = pruner.prune(target_speedup=list(args.targets), latency=latency, preset=preset,
                              calibration=str(DATA / "valid.txt"), remeasure_latency=True, **kwargs)
    except Exception as err:  # a BusyMachineError is a result here: record it honestly
        run.update(error=f"{type(err).__name__}: {err}", load_average_end=load(),
                   seconds=round(time.perf_counter() - start, 1))
        (args.out / "results.json").write_text(json.dumps(run, indent=2) + "\n")
        print(run["error"], flush=True)
        return 1
    run["prune_seconds"] = round(time.perf_counter() - start, 1)
    run["load_average_after_prune"] = load()
    first = family[args.targets[0]].pruning_config
    recipe = first.recipe[-1] if first.recipe else {}
    run["settings"] = {k: recipe.get(k) for k in (
        "latency", "latency_mlp_levels", "latency_repeats", "search_iterations", "search_samples", "probe_samples",
        "speedup_rounds", "speedup_tolerance", "database_steps")}
    run["settings"]["run"] = {k: recipe.get("run", {}).get(k) for k in ("num_samples", "seq_len", "seed")}
    env = InferenceEnvironment(**first.latency_environment)
    print(family.to_markdown(), flush=True)

    files = args.out / "gguf"
    files.mkdir(exist_ok=True)
    dense_path = files / f"smollm2-dense-{args.dtype}.gguf"
    pruner.export(dense_path, dtype=args.dtype)
    rows = []
    dense_ppl = perplexity(dense_path, args.ppl_windows, args.threads) if args.ppl_windows else None
    dense_quality = quality(pruner, pruner.model, dense_path, args.ppl_windows) if args.ppl_windows else {}
    run["dense_quality"] = dict(dense_quality, ppl_llama_cpp=dense_ppl)
    for target in args.targets:
        member = family[target]
        config = member.pruning_config
        path = files / f"smollm2-{target:g}x-{args.dtype}.gguf"
        member.export(path, dtype=args.dtype)
        t0 = time.perf_counter()
        timing = gguf_speedup(dense_path, path, env, rounds=args.rounds, repeats=args.repeats, warmup=2)
        row = {
            "target": target,
            "predicted_speedup": config.search.get("predicted_speedup"),
            "ziplm_measured_speedup": config.measured_speedup,
            "aimed_at": config.search.get("aimed_at"),
            "target_missed_in_run": config.search.get("target_missed"),
            "bench_speedup": round(timing.speedup, 4),
            "bench_round_speedups": [round(r, 4) for r in timing.round_speedups],
            "bench_miss": round(timing.speedup / target - 1, 4),
            "within_7pct": abs(timing.speedup / target - 1) <= TOLERANCE,
            "within_5pct": abs(timing.speedup / target - 1) <= 0.05,
            "dense_ms_per_token": round(timing.dense_ms, 3),
            "pruned_ms_per_token": round(timing.pruned_ms, 3),
            "dense_tokens_per_s": round(1000 * env.batch_size / timing.dense_ms, 2),
            "pruned_tokens_per_s": round(1000 * env.batch_size / timing.pruned_ms, 2),
            "file_mib": round(path.stat().st_size / 2**20, 1),
            "dense_file_mib": round(dense_path.stat().st_size / 2**20, 1),
            "parameters": sum(p.numel() for p in member.model.parameters()),
            "measure_seconds": round(time.perf_counter() - t0, 1),
            "load_average": load(),
        }
        if args.ppl_windows:
            row["perplexity"] = perplexity(path, args.ppl_windows, args.threads)
            row["dense_perplexity"] = dense_ppl
            row.update(quality(pruner, member.model, path, args.ppl_windows))
            if row["perplexity"]:
                row["ppl_llama_cpp_vs_transformers"] = round(row["perplexity"] / row["ppl_transformers"] - 1, 5)
        rows.append(row)
        print(json.dumps(row), flush=True)
    run.update(results=rows, load_average_end=load(), seconds=round(time.perf_counter() - start, 1),
               table_environment_key=env.key())
    (args.out / "results.json").write_text(json.dumps(run, indent=2) + "\n")
    write_notes(args.out / "NOTES.md", run, args)
    for path in files.glob("*.gguf"):  # large files stay out of the repository
        path.unlink()
    files.rmdir()
    return 0


def write_notes(path: Path, run: dict, args: argparse.Namespace) -> None:
    """The figures of this run in Markdown (a 'Commentary' section is added by hand)."""
    lines = ["# ZipLM timed in llama.cpp: SmolLM2-135M decode speedups", "",
             f"Command: `nice -n 10 .venv/bin/python bench/ziplm_llamacpp.py --targets "
             f"{' '.join(f'{t:g}' for t in args.targets)} --dtype {args.dtype} --threads {args.threads} --preset "
             f"{args.preset} --rounds {args.rounds} --repeats {args.repeats} --ppl-windows {args.ppl_windows}"
             + (f" --speedup-rounds {args.speedup_rounds}" if args.speedup_rounds else "")
             + (f" --timing-prefix {args.timing_prefix}" if args.timing_prefix else "") + "`", "",
             f"Machine: {run['cpus']} CPUs, load average {run['load_average_start']} at the start, "
             f"{run.get('load_average_after_prune')} after pruning, {run['load_average_end']} at the end (1/5/15 min). "
             f"Pruning took {run['prune_seconds']} s; the whole run {run['seconds']} s.", "",
             f"Latency environment: `{run['latency']}`; table key `{run['table_environment_key']}`.", "",
             f"ZipLM settings: `{run['settings']}`.", "",
             "| target | predicted | ZipLM's check | bench (paired rounds) | miss | dense tok/s | pruned tok/s | "
             "file MiB | perplexity llama.cpp (dense) | transformers | greedy 32 same |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in run["results"]:
        ppl = f"{r['perplexity']:.2f} ({r['dense_perplexity']:.2f})" if r.get("perplexity") else "–"
        lines.append(f"| {r['target']:g}x | {r['predicted_speedup']}x | {r['ziplm_measured_speedup']}x | "
                     f"{r['bench_speedup']}x | {100 * r['bench_miss']:+.1f}% | {r['dense_tokens_per_s']} | "
                     f"{r['pruned_tokens_per_s']} | {r['file_mib']} / {r['dense_file_mib']} | {ppl} | "
                     f"{r.get('ppl_transformers', 0):.2f} ({r.get('ppl_llama_cpp_vs_transformers', 0):+.2%}) | "
                     f"{r.get('greedy_32_identical', '–')} |")
    dq = run.get("dense_quality") or {}
    if dq.get("ppl_llama_cpp"):
        lines += ["", f"Dense f16 file: perplexity llama.cpp {dq['ppl_llama_cpp']:.4f}, transformers "
                      f"{dq['ppl_transformers']:.4f} ({dq['ppl_llama_cpp'] / dq['ppl_transformers'] - 1:+.3%}); greedy 32 "
                      f"tokens identical: {dq['greedy_32_identical']}."]
    lines += ["", "Round speedups: " + "; ".join(f"{r['target']:g}x: {r['bench_round_speedups']}"
                                               for r in run["results"]), ""]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
