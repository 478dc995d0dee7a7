"""The fast preset's quality knobs at one fixed latency table: ZipLM on SmolLM2 with one setting changed at a time.

    OMP_NUM_THREADS=1 python bench/ziplm_knobs.py '{"damp0.1": {"dampening": 0.1}, "cal48": {"num_samples": 48}}'

Each entry prunes the embedded SmolLM2 to ``--target`` predicted speedup with ``preset="fast"`` plus its keyword
overrides, against the same latency table (bench/results/quickstart/table128.json, 128-token prefill, 2 threads),
with no speedup measurement, so the only difference between rows is the knob; then perplexity on the first
``--eval-windows`` windows of WikiText-2 test (the quick start's figure). Rows are appended to
bench/results/quickstart/knobs.jsonl with the load average (the seconds depend on it; the perplexity does not).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "quickstart"
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("knobs", help='JSON: {"row name": {keyword: value, ...}, ...} (prune() keywords)')
    parser.add_argument("--target", type=float, default=1.25)
    parser.add_argument("--table", default=str(OUT / "table128.json"))
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--out", default=str(OUT / "knobs.jsonl"))
    args = parser.parse_args()
    knobs = json.loads(args.knobs)  # bad JSON fails here, before the model loads

    from optimum_prune import Pruner
    from optimum_prune.evaluation import perplexity

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    for name, kw in knobs.items():
        pruner = Pruner.from_pretrained("smollm2")
        start = time.time()
        pruner.prune(target_speedup=args.target, preset="fast", calibration=str(DATA / "valid.txt"),
                     latency_table=args.table, measure_speedup=False, progress=False, **kw)
        seconds = time.time() - start
        ppl = perplexity(pruner.model, pruner.tokenizer, str(DATA / "test.txt"), max_windows=args.eval_windows,
                         progress=False).perplexity
        row = {"name": name, "commit": commit, "kw": kw, "target": args.target, "seconds": round(seconds, 1), "ppl": round(ppl, 3),
               "load": round(os.getloadavg()[0], 2), "params": sum(p.numel() for p in pruner.model.parameters())}
        print(row, flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
