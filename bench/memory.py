#!/usr/bin/env python
"""Peak memory of compressing a ~1B-parameter Llama-style model, in memory and streamed from disk (max_memory).

A random model with real shapes (hidden 2048, intermediate 5632, 32 heads, vocab 32000; 16 layers by default:
0.95B parameters, 3.8 GB in fp32) is written to a temporary directory in safetensors shards, one layer at a
time (the writer never holds the model). Each run is a child process going through the public API
(``Pruner.from_pretrained(dir[, max_memory=...]).prune(...)``, ``save_pretrained``); its peak RSS comes from
``os.wait4`` (the child's own ``ru_maxrss``), and the child also reports its peak after the imports, after the
load and after the compression. ``--layers`` changes the depth (peak of a streamed run should not move).

    OMP_NUM_THREADS=1 python bench/memory.py --threads 1 --parallel            # SparseGPT 50%: in memory, streamed
    OMP_NUM_THREADS=1 python bench/memory.py --threads 1 --runs streamed-sparsegpt --layers 8   # depth
    OMP_NUM_THREADS=1 python bench/memory.py --threads 1 --runs streamed-gptq

Results (merged per run name and depth): ``bench/results/memory/results.json``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "memory"
RUNS = {
    "in-memory-sparsegpt": dict(max_memory=None, method="sparsegpt"),
    "streamed-sparsegpt": dict(max_memory="1.5GB", method="sparsegpt"),
    "in-memory-wanda": dict(max_memory=None, method="wanda"),
    "streamed-wanda": dict(max_memory="1.5GB", method="wanda"),
    "in-memory-gptq": dict(max_memory=None, method="gptq"),
    "streamed-gptq": dict(max_memory="1.5GB", method="gptq"),
}


def config(layers: int):
    """A Llama-2/TinyLlama-shaped config (multi-head attention) with ``layers`` blocks."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=32,
                       num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=2048,
                       tie_word_embeddings=False, dtype="float32")


def write_model(directory: Path, layers: int, seed: int = 0) -> dict:
    """Random fp32 weights (normal, std 0.02; norms 1) shard by shard: one per layer, one for the rest."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    cfg = config(layers)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(cfg)
    names = [(n, tuple(p.shape)) for n, p in skeleton.state_dict().items()]
    groups = [[(n, s) for n, s in names if n.startswith(f"model.layers.{i}.")] for i in range(layers)]
    groups.append([(n, s) for n, s in names if not n.startswith("model.layers.")])
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        state = {n: (torch.ones(s) if "norm" in n else torch.randn(s, generator=g) * 0.02) for n, s in group}
        save_file(state, str(directory / file), metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in state.values())
        weight_map.update({n: file for n in state})
        del state
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(directory)
    return {"parameters": sum(int(torch.Size(s).numel()) for _, s in names), "fp32_bytes": total}


def child(args: argparse.Namespace) -> None:
    """One compression run; prints its phases' peaks (ru_maxrss so far, bytes) and seconds as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    from optimum_prune import Pruner, Quantizer

    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731 (KiB on Linux)
    report = {"peak_after_imports": peak()}
    spec = RUNS[args.child]
    start = time.perf_counter()
    session_class = Quantizer if spec["method"] == "gptq" else Pruner
    budget = args.max_memory if (args.max_memory and spec["max_memory"]) else spec["max_memory"]
    session = session_class.from_pretrained(args.model_dir, max_memory=budget)
    report["streamed"] = getattr(session.model, "_block_stream", None) is not None
    report["peak_after_load"], report["load_seconds"] = peak(), round(time.perf_counter() - start, 1)
    ids = torch.randint(0, 32000, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    run = dict(calibration=ids, num_samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
               seed=0, progress=False)
    start = time.perf_counter()
    if spec["method"] == "gptq":
        session.quantize(bits=4, group_size=128, **run)
    else:
        session.prune(method=spec["method"], sparsity=0.5, **run)
    report["peak_after_compress"], report["compress_seconds"] = peak(), round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    session.save_pretrained(args.output)
    report["save_seconds"] = round(time.perf_counter() - start, 1)
    report["sparsity"] = session.metrics.sparsity
    print("RESULT " + json.dumps(report), flush=True)


def start_child(name: str, model_dir: Path, output: Path, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, __file__, "--child", name, "--model-dir", str(model_dir), "--output", str(output),
               "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads)]
    if args.max_memory and RUNS[name]["max_memory"]:
        command += ["--max-memory", args.max_memory]
    log = open(output.parent / f"{name}.log", "w+")  # a file, not a pipe: runs side by side never block on output
    env = dict(os.environ, **dict(item.split("=", 1) for item in args.env))
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    proc.started, proc.log = time.perf_counter(), log  # type: ignore[attr-defined]
    return proc


def finish_child(name: str, proc: subprocess.Popen) -> dict:
    """Wait for one run; its peak RSS is the child's own ru_maxrss (os.wait4), never another child's."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.log.seek(0)  # type: ignore[attr-defined]
    lines = proc.log.readlines()  # type: ignore[attr-defined]
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = next((json.loads(line[len("RESULT "):]) for line in lines if line.startswith("RESULT ")), None)
    if proc.returncode or result is None:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{''.join(lines[-30:])}")
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024
    result["wall_seconds"] = round(time.perf_counter() - proc.started, 1)  # type: ignore[attr-defined]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["in-memory-sparsegpt", "streamed-sparsegpt"], choices=RUNS)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8, help="calibration windows (random token ids)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-memory", default=None, help="budget of the streamed runs (default: 1.5GB)")
    parser.add_argument("--keep-model", default=None, help="write the model here once and reuse it (default: a "
                                                            "temporary directory, removed at the end)")
    parser.add_argument("--workdir", default=None, help="where the model is written (default: a temporary dir)")
    parser.add_argument("--parallel", action="store_true",
                        help="start the runs together (each child's peak is still its own; on a busy shared machine "
                             "this gets the runs more of the CPU)")
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE",
                        help="environment of the compression runs, e.g. MALLOC_MMAP_THRESHOLD_=65536 (recorded)")
    parser.add_argument("--tag", default="", help="suffix of the result rows' names (e.g. the --env variant)")
    parser.add_argument("--child", choices=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--write", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    if args.write:  # in its own process, so that no compression run inherits the writer's memory
        print("MODEL " + json.dumps(write_model(Path(args.write), args.layers)), flush=True)
        return
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="optimum-prune-memory-") as tmp:
        model_dir = Path(args.keep_model or Path(tmp) / "model")
        start = time.perf_counter()
        if not (model_dir / "model.json").exists():  # --keep-model: written once, reused by later invocations
            model_dir.mkdir(parents=True, exist_ok=True)
            out = subprocess.run([sys.executable, __file__, "--write", str(model_dir), "--layers", str(args.layers)],
                                 check=True, capture_output=True, text=True).stdout
            (model_dir / "model.json").write_text(next(line for line in out.splitlines()
                                                       if line.startswith("MODEL "))[len("MODEL "):])
        model = json.loads((model_dir / "model.json").read_text())
        if json.loads((model_dir / "config.json").read_text())["num_hidden_layers"] != args.layers:
            raise SystemExit(f"{model_dir} holds a model of another depth than --layers {args.layers}")
        print(f"model of {model['parameters'] / 1e9:.3f}B parameters, {model['fp32_bytes'] / 1e9:.2f} GB fp32, ready in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        OUT.mkdir(parents=True, exist_ok=True)
        path = OUT / "results.json"
        groups = [args.runs] if args.parallel else [[name] for name in args.runs]
        for group in groups:
            procs = {name: start_child(name, model_dir, Path(tmp) / f"out-{name}", args) for name in group}
            for name, proc in procs.items():
                row = finish_child(name, proc)
                row.update(model, layers=args.layers, samples=args.samples, seq_len=args.seq_len,
                           max_memory=RUNS[name]["max_memory"] and (args.max_memory or RUNS[name]["max_memory"]),
                           method=RUNS[name]["method"],
                           peak_fraction_of_fp32=round(row["peak_rss_bytes"] / model["fp32_bytes"], 3),
                           load_average=os.getloadavg(), threads=args.threads, machine=platform.machine(),
                           concurrent_runs=len(group), env=args.env)
                print(f"{name} ({args.layers} layers): peak RSS {row['peak_rss_bytes'] / 1e9:.2f} GB = "
                      f"{100 * row['peak_fraction_of_fp32']:.1f}% of fp32 size; compress {row['compress_seconds']} s",
                      flush=True)
                with open(OUT / ".lock", "w") as lock:  # several invocations may finish at once
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    results = json.loads(path.read_text()) if path.exists() else {"rows": {}}
                    results["rows"][f"{name}{args.tag}/{args.layers}-layers"] = row
                    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
                shutil.rmtree(Path(tmp) / f"out-{name}", ignore_errors=True)

if __name__ == "__main__":
    main()
