#!/usr/bin/env python
"""Engine benchmark: SparseGPT / Wanda / magnitude / the scheduler / OWL / GPTQ on SmolLM2-135M, WikiText-2.

One command reproduces the table (rows already measured are kept; ``--force`` redoes them):

    python bench/engine.py                                   # every row, CPU, ~3 h on 2 cores
    python bench/engine.py --rows dense sparsegpt-50 gptq-w4g128
    python bench/engine.py --llmc-python /work/llmc-venv/bin/python   # + llm-compressor reference rows

Protocol (``../shared/data/README.md``): calibration = 128 random windows x 512 tokens of
``valid.txt`` (seed 0, saved to ``bench/results/engine/windows.pt`` and fed unchanged to every row,
llm-compressor's included); perplexity = first 40 non-overlapping 512-token windows of ``test.txt``.
Every row runs in its own process, so its peak RSS is its own; wall time is the compression call only.
Results: ``bench/results/engine/results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
OUT = ROOT / "bench" / "results" / "engine"

# name -> (kind, settings). kind: dense | prune | quantize | llmc
ROWS: dict[str, tuple[str, dict]] = {
    "dense": ("dense", {}),
    "magnitude-50": ("prune", dict(method="magnitude", sparsity=0.5)),
    "wanda-50": ("prune", dict(method="wanda", sparsity=0.5)),
    "sparsegpt-50": ("prune", dict(method="sparsegpt", sparsity=0.5)),
    "magnitude-70": ("prune", dict(method="magnitude", sparsity=0.7)),
    "wanda-70": ("prune", dict(method="wanda", sparsity=0.7)),
    "sparsegpt-70": ("prune", dict(method="sparsegpt", sparsity=0.7)),
    "scheduler-70": ("prune", dict(method="sparsegpt", sparsity=0.7, schedule="hessian-kmeans")),
    "owl-70": ("prune", dict(method="sparsegpt", sparsity=0.7, schedule="owl")),
    "sparsegpt-2:4": ("prune", dict(method="sparsegpt", n_m="2:4")),
    "gptq-w4g128": ("quantize", dict(bits=4, group_size=128, act_order=True)),  # llm-compressor default: static act-order
    "gptq-w3g128": ("quantize", dict(bits=3, group_size=128, act_order=True)),
    "sparsegpt-50+w4g128": ("quantize", dict(bits=4, group_size=128, sparsity=0.5, act_order=True)),
    "llmc-sparsegpt-50": ("llmc", dict(recipe="sparsegpt50")),
    "llmc-gptq-w4g128": ("llmc", dict(recipe="gptq4g128")),
    "llmc-gptq-w3g128": ("llmc", dict(recipe="gptq3g128")),
    "llmc-sparsegpt-50+w4g128": ("llmc", dict(recipe="sparsegpt50_gptq4")),
}
DEFAULT_ROWS = [r for r in ROWS if not r.startswith("llmc-")]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """Highest resident set size seen while active (sampled from /proc every 50 ms), in MiB."""

    def __init__(self) -> None:
        import threading

        self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> "RssSampler":
        self.start = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def windows_file(num_samples: int, seq_len: int) -> Path:
    """The calibration windows every row uses (made once with the library's own sampler)."""
    path = OUT / f"windows-{num_samples}x{seq_len}.pt"
    if not path.exists():
        import torch

        from optimum_prune import get_calibration_data
        from optimum_prune.loading import load_model

        _, tokenizer, _ = load_model("smollm2")
        ids = get_calibration_data(str(DATA / "valid.txt"), tokenizer, num_samples=num_samples, seq_len=seq_len)
        OUT.mkdir(parents=True, exist_ok=True)
        torch.save(ids, path)
    return path


def run_row(name: str, windows: Path, threads: int | None) -> dict:
    """Compress and evaluate one row in THIS process (called in a child process by ``main``)."""
    import torch

    from optimum_prune import Pruner, Quantizer
    from optimum_prune.evaluation import model_size, perplexity

    if threads:
        torch.set_num_threads(threads)
    kind, settings = ROWS[name]
    ids = torch.load(windows, weights_only=True)
    session_cls = Quantizer if kind == "quantize" else Pruner
    session = session_cls.from_pretrained("smollm2")
    start = time.perf_counter()
    with RssSampler() as rss:
        if kind == "prune":
            session.prune(calibration=ids, progress=False, **settings)
        elif kind == "quantize":
            session.quantize(calibration=ids, progress=False, **settings)
    wall = time.perf_counter() - start
    ppl = perplexity(session.model, session.tokenizer, str(DATA / "test.txt"), progress=False)
    row = {"row": name, "kind": kind, "settings": settings, "perplexity": ppl.perplexity,
           "wall_s": round(wall, 1), "peak_rss_mib": round(peak_rss_mib(), 1),
           "rss_before_compression_mib": round(rss.start, 1), "peak_rss_during_compression_mib": round(rss.peak, 1),
           "num_samples": int(ids.shape[0]), "seq_len": int(ids.shape[1])}
    config = session.pruning_config
    if config.metrics:
        row["metrics"] = config.metrics
    if config.layer_sparsity and len(set(config.layer_sparsity.values())) > 1:
        row["layer_sparsity"] = config.layer_sparsity
    if kind == "quantize":
        out = OUT / "models" / name
        session.save_pretrained(out)
        row["file_mib"] = round(model_size(str(out)).file_bytes / 2**20, 1)
    return row


def run_llmc(name: str, windows: Path, python: str) -> dict:
    """An llm-compressor reference row through bench/llmcompressor_reference.py in its own venv."""
    recipe = ROWS[name][1]["recipe"]
    dense_dir = OUT / "models" / "dense"
    if not (dense_dir / "config.json").exists():
        from optimum_prune import Pruner

        Pruner.from_pretrained("smollm2").model.save_pretrained(dense_dir)
        Pruner.from_pretrained("smollm2").tokenizer.save_pretrained(dense_dir)
    result = OUT / f"{name}.llmc.json"
    cmd = [python, str(ROOT / "bench" / "llmcompressor_reference.py"), "--model", str(dense_dir),
           "--windows", str(windows), "--recipe", recipe, "--json", str(result),
           "--eval-text", str(DATA / "test.txt")]
    subprocess.run(cmd, check=True)
    data = json.loads(result.read_text())
    return {"row": name, "kind": "llmc", "settings": data.get("settings", {}), "perplexity": data["perplexity"],
            "wall_s": round(data["wall_s"], 1), "peak_rss_mib": data["peak_rss_mib"],
            "num_samples": data["num_samples"], "seq_len": data["seq_len"],
            "llmcompressor": data.get("llmcompressor_version")}


LLMC_RESULTS = ROOT / "bench" / "results" / "llmcompressor"


def import_llmc(name: str) -> dict | None:
    """An llm-compressor row measured earlier by bench/llmcompressor_reference.py on the same windows, if kept."""
    path = LLMC_RESULTS / f"{ROWS[name][1]['recipe']}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return {"row": name, "kind": "llmc", "settings": data.get("settings", {}), "perplexity": data["perplexity"],
            "wall_s": round(data["wall_s"], 1), "peak_rss_mib": data["peak_rss_mib"],
            "num_samples": data["num_samples"], "seq_len": data["seq_len"],
            "llmcompressor": data.get("llmcompressor_version"), "source": str(path.relative_to(ROOT))}


def markdown(rows: dict[str, dict]) -> str:
    dense = rows.get("dense", {}).get("perplexity")
    lines = ["| row | perplexity | vs dense | wall time (s) | peak RSS (MiB) | RSS before → peak during compression (MiB) "
             "| file (MiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ROWS:
        if name not in rows:
            continue
        r = rows[name]
        ratio = f"{r['perplexity'] / dense:.2f}x" if dense else ""
        during = (f"{r['rss_before_compression_mib']:.0f} → {r['peak_rss_during_compression_mib']:.0f}"
                  if "peak_rss_during_compression_mib" in r else "")
        lines.append(f"| {name} | {r['perplexity']:.2f} | {ratio} | {r['wall_s']:.0f} | {r['peak_rss_mib']:.0f} "
                     f"| {during} | {r.get('file_mib', '')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=None, choices=list(ROWS), help="default: all our rows")
    parser.add_argument("--force", action="store_true", help="re-run rows already in results.json")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--llmc-python", help="python of a venv with llmcompressor (runs the llmc-* rows; without "
                        "it, --rows llmc-... imports the rows kept in bench/results/llmcompressor/)")
    parser.add_argument("--out", default=str(OUT), help="results directory (default: bench/results/engine)")
    parser.add_argument("--row-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    OUT = Path(args.out)

    windows = windows_file(args.num_samples, args.seq_len)
    if args.row_worker:  # child process: one row, JSON on stdout's last line
        print(json.dumps(run_row(args.row_worker, windows, args.threads)))
        return 0

    results_file = OUT / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {"rows": {}}
    names = args.rows or DEFAULT_ROWS + ([r for r in ROWS if r.startswith("llmc-")] if args.llmc_python else [])
    for name in names:
        if name in results["rows"] and not args.force:
            print(f"{name}: kept from {results_file.name}")
            continue
        print(f"{name}: running ...", flush=True)
        if ROWS[name][0] == "llmc":
            if not args.llmc_python:
                row = import_llmc(name)
                if row is None:
                    print(f"{name}: skipped (needs --llmc-python)")
                    continue
                print(f"{name}: imported from {row['source']}")
            else:
                row = run_llmc(name, windows, args.llmc_python)
        else:
            cmd = [sys.executable, __file__, "--row-worker", name, "--num-samples", str(args.num_samples),
                   "--seq-len", str(args.seq_len), "--out", str(OUT)] + (["--threads", str(args.threads)] if args.threads else [])
            proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name}: perplexity {row['perplexity']:.2f}, {row['wall_s']:.0f} s, {row['peak_rss_mib']:.0f} MiB",
              flush=True)
        results["rows"][name] = row
        results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
        OUT.mkdir(parents=True, exist_ok=True)
        tmp = results_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, results_file)
        (OUT / "results.md").write_text(markdown(results["rows"]))
    print(markdown(results["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
