#!/usr/bin/env python
"""Sweep the layer-wise sparsity schedules on SmolLM2-135M, scored on VALID perplexity (never test).

Used to choose the defaults of ``hessian-kmeans`` (number of groups, largest shift) and to check
OWL's; the dense statistics are gathered once and reused by every setting.

    python bench/schedule_sweep.py --num-samples 32 --sparsity 0.7
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from optimum_prune import get_calibration_data
from optimum_prune.engine.compress import CompressionPlan, compress_model
from optimum_prune.engine.schedule import collect_statistics, hessian_kmeans, owl
from optimum_prune.engine.sequential import SequentialOptions
from optimum_prune.evaluation import perplexity
from optimum_prune.loading import load_model

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext-2"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--shifts", type=float, nargs="*", default=[0.05, 0.1, 0.15])
    parser.add_argument("--groups", type=int, nargs="*", default=[3, 5])
    parser.add_argument("--normalize", nargs="*", default=["residual", "energy", "none"],
                        help="scale of the loss: residual | energy | none")
    parser.add_argument("--powers", type=float, nargs="*", default=[1.0], help="exponent of the loss scale")
    parser.add_argument("--only", nargs="*", default=None, help="run only these schedule names")
    parser.add_argument("--owl-lambdas", type=float, nargs="*", default=[0.08])
    parser.add_argument("--eval-windows", type=int, default=20)
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "schedule_sweep.json"))
    args = parser.parse_args()

    dense, tokenizer, _ = load_model("smollm2")
    ids = get_calibration_data(str(DATA / "valid.txt"), tokenizer, num_samples=args.num_samples, seq_len=args.seq_len)
    options = SequentialOptions(progress=False)
    stats = collect_statistics(dense, ids, sparsity=args.sparsity, loss=True, outliers=True, options=options)
    layers = sorted(stats)
    schedules = {"uniform": {k: args.sparsity for k in layers}}
    for lam in args.owl_lambdas:
        schedules[f"owl-l{lam}"] = owl(stats, args.sparsity, lam=lam).sparsity
    for k in args.groups:
        for shift in args.shifts:
            for normalize in args.normalize:
                for power in args.powers if normalize != "none" else [1.0]:
                    name = f"kmeans-k{k}-s{shift}-{normalize}" + (f"-p{power}" if power != 1.0 else "")
                    schedules[name] = hessian_kmeans(stats, args.sparsity, num_groups=k, max_shift=shift,
                                                     normalize=None if normalize == "none" else normalize,
                                                     power=power).sparsity
    results = {}
    for name, per_layer in schedules.items():
        if args.only is not None and name not in args.only:
            continue
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        compress_model(model, ids, CompressionPlan("sparsegpt", per_layer), options)
        ppl = perplexity(model, tokenizer, str(DATA / "valid.txt"), max_windows=args.eval_windows,
                         progress=False).perplexity
        results[name] = {"valid_perplexity": ppl, "seconds": round(time.perf_counter() - start, 1),
                         "sparsity": {str(k): round(v, 4) for k, v in per_layer.items()}}
        print(f"{name:24s} valid ppl {ppl:8.2f}", flush=True)
        del model
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"settings": vars(args), "estimated_loss": {str(k): stats[k].loss for k in layers},
                                           "energy": {str(k): stats[k].energy for k in layers},
                                           "residual": {str(k): stats[k].residual for k in layers},
                                           "schedules": {n: {str(k): round(v, 4) for k, v in s.items()}
                                                         for n, s in schedules.items()},
                                           "outlier_ratio": {str(k): stats[k].outlier_ratio for k in layers},
                                           "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    raise SystemExit(main())
