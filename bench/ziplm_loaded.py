"""ZipLM on a deliberately loaded machine: targets are met within ±7%, or the run refuses and says why.

A background process keeps one of the cores busy (a bounded busy loop, ``--load-seconds``) while ZipLM
measures a fresh latency table for SmolLM2-135M, prunes to each target and measures the speedups in
paired rounds. Each row records what happened: the measured speedup and its miss, whether the run warned
that a target was missed, or the ``BusyMachineError`` that refused a disturbed table. Never a silent miss.

    python bench/ziplm_loaded.py                      # 1.25x, 1.5x, 2x with one core loaded
    python bench/ziplm_loaded.py --load-processes 0   # the same without load, for comparison

Results: ``bench/results/ziplm_loaded/results.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "ziplm_loaded"
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


def busy(seconds: float) -> None:
    """Spin one core for ``seconds`` (then stop by itself)."""
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x = (x * 1103515245 + 12345) % 2**31


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=float, nargs="+", default=[1.25, 1.5, 2.0])
    parser.add_argument("--load-processes", type=int, default=1)
    parser.add_argument("--load-seconds", type=float, default=3600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--tolerance", type=float, default=0.07)
    parser.add_argument("--preset", default=None, help="a ZipLM preset, e.g. fast (its own calibration size)")
    parser.add_argument("--name", default=None, help="results file name (default: results / results-unloaded)")
    args = parser.parse_args()

    import torch

    from optimum_prune import Pruner
    from optimum_prune.evaluation.latency_table import BusyMachineError

    torch.set_num_threads(args.threads)
    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    logging.getLogger("optimum_prune").addHandler(Collect(level=logging.WARNING))
    load = [mp.Process(target=busy, args=(args.load_seconds,), daemon=True) for _ in range(args.load_processes)]
    for p in load:
        p.start()
    start = time.perf_counter()
    load_before = os.getloadavg()
    rows, refused, refused_after = [], None, None
    try:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["OPTIMUM_PRUNE_CACHE"] = cache  # a fresh table, measured under the load
            pruner = Pruner.from_pretrained("smollm2")
            try:
                sizes = {} if args.preset else dict(num_samples=args.num_samples, seq_len=args.seq_len,
                                                    search_iterations=0)
                family = pruner.prune(target_speedup=list(args.targets), latency=dict(threads=args.threads),
                                      calibration=str(DATA / "valid.txt"), preset=args.preset, **sizes)
            except BusyMachineError as err:
                refused, refused_after = str(err), round(time.perf_counter() - start, 1)
            else:
                for target, member in family.items():
                    config = member.pruning_config
                    measured = config.measured_speedup
                    rows.append({"target": target, "measured": measured,
                                 "miss": round(measured / target - 1, 4) if measured else None,
                                 "within_7pct": bool(measured) and abs(measured / target - 1) <= args.tolerance,
                                 "warned_missed": bool(config.search.get("target_missed")),
                                 "aimed_at": config.search.get("aimed_at"),
                                 "measured_at": config.search.get("measured_at")})
    finally:
        for p in load:
            p.terminate()
    result = {"load_processes": args.load_processes, "threads": args.threads, "targets": args.targets,
              "preset": args.preset,
              "seconds": round(time.perf_counter() - start, 1),
              "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg(), "refused": refused,
              "refused_after_s": refused_after, "rows": rows,
              "warnings": warnings}
    OUT.mkdir(parents=True, exist_ok=True)
    name = args.name or ("results" if args.load_processes else "results-unloaded")
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# ZipLM with {args.load_processes} busy process(es) beside it ({args.threads} threads)", ""]
    if refused:
        lines += [f"Refused: {refused}", ""]
    else:
        lines += ["| target | measured | miss | within ±7% | warned as missed | aimed at | measured at |",
                  "|---:|---:|---:|:-:|:-:|---|---|"]
        lines += [f"| {r['target']:g}x | {r['measured']}x | {100 * r['miss']:+.1f}% | {r['within_7pct']} | "
                  f"{r['warned_missed']} | {r['aimed_at']} | {r['measured_at']} |" for r in rows]
    lines += ["", f"Wall time {result['seconds']} s; load average (1/5/15 min) {load_before} before, "
              f"{result['loadavg_1_5_15_after']} after. Warnings:", ""] + [f"- {w}" for w in warnings]
    (OUT / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
