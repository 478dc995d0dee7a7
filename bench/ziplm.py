#!/usr/bin/env python
"""ZipLM benchmark: structured pruning of SmolLM2-135M to measured speedups on this CPU, vs two baselines.

    python bench/ziplm.py                          # targets 1.25 1.5 2.0, ~30 min on 2 cores
    python bench/ziplm.py --targets 1.5 --search-iterations 10

Environment: CPU, fp32, batch 1 x 512 tokens, prefill, ``--threads`` threads (default 2). Calibration:
the engine bench's 128 x 512 windows of ``valid.txt`` (seed 0). Perplexity: the project protocol on
``test.txt`` (first 40 windows of 512 tokens). Rows:
- ZipLM (``Pruner.prune(target_speedup=[...])``): one level database, one search per target;
- uniform structured: the same fraction of heads and FFN neurons removed in every layer, with the same
  OBS-corrected weights (from the same database), at levels whose predicted speedup brackets each target;
- ShortGPT: the n blocks of lowest block influence dropped, n = 1, 3, 5, ...
Every speedup is MEASURED against the dense model in alternating rounds (``measure_speedup``: median of
per-round ratios, so machine drift cancels). Baselines are compared
with ZipLM at the same measured speedup by interpolating their perplexity (log scale) between points.
Results: ``bench/results/ziplm/results.{json,md}`` and ``tradeoff.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
OUT = ROOT / "bench" / "results" / "ziplm"
WINDOWS = ROOT / "bench" / "results" / "engine" / "windows-128x512.pt"


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """log-perplexity interpolated linearly in speedup between the two points around x (None outside)."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            t = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return None


def uniform_candidates(database, table, targets: list[float],
                       fractions: list[float] | None = None) -> tuple[list, list[tuple[float, float, list[int]]]]:
    """Uniform structured pruning from a ZipLM level database: the same fraction of heads and FFN neurons removed in
    every layer (fractions 1/40 .. 35/40), at the levels whose predicted speedup is just below and just above each
    target (or exactly the given ``fractions``). Returns the database's items and (predicted speedup, fraction,
    picked level per item), by speedup;
    ``Stitcher(model, database).build(items, picked)`` makes the model, with the same OBS-corrected weights as ZipLM."""
    from optimum_prune.engine.structure.search import items_from, predicted_ms

    items = items_from(database, table)
    dims = database.dims
    candidates = []
    for fraction in fractions or [i / 40 for i in range(1, 36)]:
        picked = []
        for item in items:
            if item.kind == "attention":
                want = (1 - fraction) * dims.num_heads
                keys = [k for k in item.keys if k != (0, 0)]
                best = min(keys, key=lambda k: (abs(k[0] * k[1] - want), -k[0]))
            else:
                want = (1 - fraction) * dims.intermediate_size
                best = min((k for k in item.keys if k), key=lambda k: abs(k - want))
            picked.append(item.keys.index(best))
        candidates.append((table.dense_ms / predicted_ms(items, picked, table), fraction, picked))
    if fractions:
        return items, sorted(candidates)
    chosen: dict[float, tuple] = {}
    for target in targets:  # the candidates just below and just above each target
        below = max((c for c in candidates if c[0] <= target), default=None, key=lambda c: c[0])
        above = min((c for c in candidates if c[0] >= target), default=None, key=lambda c: c[0])
        for c in (below, above):
            if c is not None:
                chosen[c[1]] = c
    return items, sorted(chosen.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=float, nargs="+", default=[1.25, 1.5, 2.0])
    parser.add_argument("--search-iterations", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="latency repeats per measurement")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()

    from optimum_prune import Pruner
    from optimum_prune.calibration import get_calibration_data
    from optimum_prune.engine.importance import block_influence
    from optimum_prune.evaluation import perplexity
    from optimum_prune.loading import load_model
    from optimum_prune.modeling.pruning_config import PruningConfig
    from optimum_prune.modeling.surgery import apply_structure
    from optimum_prune.plotting import plot_tradeoff
    from optimum_prune.evaluation.latency_table import InferenceEnvironment, get_latency_table, measure_model_ms, measure_speedup
    from optimum_prune.engine.structure.search import Stitcher

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, _ = load_model("smollm2")
    model.eval()
    test = str(DATA / "test.txt")
    if WINDOWS.is_file():
        windows = torch.load(WINDOWS)
    else:
        windows = get_calibration_data(str(DATA / "valid.txt"), tokenizer, num_samples=128, seq_len=512, seed=0)

    def ppl(m) -> float:
        return perplexity(m, tokenizer, test, max_windows=args.eval_windows, progress=False).perplexity

    def params(m) -> int:
        return sum(p.numel() for p in m.parameters())

    env = InferenceEnvironment(device="cpu", dtype="float32", batch_size=1, seq_len=512, mode="prefill",
                               threads=args.threads)
    start = time.perf_counter()
    table = get_latency_table(model, env, cache_dir=out / "latency", repeats=args.repeats)
    table_seconds = time.perf_counter() - start
    dense_ms = measure_model_ms(model, env, repeats=args.repeats)
    rows: dict[str, list[dict]] = {"dense": [{"measured_speedup": 1.0, "perplexity": ppl(model), "params": params(model),
                                             "dense_ms": dense_ms}]}
    print(f"dense: {dense_ms:.1f} ms, ppl {rows['dense'][0]['perplexity']:.2f}", flush=True)

    # ---- ZipLM through the public API
    pruner = Pruner(model, tokenizer)
    start = time.perf_counter()
    family = pruner.prune(target_speedup=args.targets, calibration=windows, num_samples=windows.shape[0],
                          seq_len=windows.shape[1], latency_table=table, search_iterations=args.search_iterations)
    ziplm_seconds = time.perf_counter() - start
    rows["ziplm"] = []
    for target, member in family.items():
        config = member.pruning_config
        row = {"target": target, "measured_speedup": config.measured_speedup,
               "predicted_speedup": config.search["predicted_speedup"], "perplexity": ppl(member.model),
               "params": params(member.model), "score": config.search.get("score"), "levels": config.search["levels"]}
        rows["ziplm"].append(row)
        print(f"ziplm {target}x: measured {row['measured_speedup']:.3f}x, ppl {row['perplexity']:.2f}", flush=True)
        member.save_pretrained(out / "models" / f"ziplm-{target:g}x")

    # ---- uniform structured pruning: same fraction everywhere, same database and OBS weights
    database = pruner.ziplm_database
    stitcher = Stitcher(model, database)
    items, chosen = uniform_candidates(database, table, args.targets)
    rows["uniform"] = []
    for predicted, fraction, picked in chosen:
        pruned = stitcher.build(items, picked)
        row = {"fraction_removed": fraction, "predicted_speedup": predicted,
               "measured_speedup": measure_speedup(model, pruned, env).speedup,
               "perplexity": ppl(pruned), "params": params(pruned)}
        rows["uniform"].append(row)
        print(f"uniform {fraction:.3f}: measured {row['measured_speedup']:.3f}x, ppl {row['perplexity']:.2f}", flush=True)
        del pruned

    # ---- ShortGPT: drop the blocks of least block influence
    bi = block_influence(model, windows[:16])
    order = sorted(bi, key=bi.get)
    rows["shortgpt"] = []
    top = max(args.targets)
    for n in range(1, len(order), 2):
        import copy

        pruned = copy.deepcopy(model)
        apply_structure(pruned, PruningConfig(drop_layers=order[:n]))
        speedup = measure_speedup(model, pruned, env).speedup
        row = {"blocks_dropped": n, "dropped": sorted(order[:n]), "measured_speedup": speedup,
               "perplexity": ppl(pruned), "params": params(pruned)}
        rows["shortgpt"].append(row)
        print(f"shortgpt {n}: measured {speedup:.3f}x, ppl {row['perplexity']:.2f}", flush=True)
        del pruned
        if speedup > top * 1.05:
            break

    # ---- comparison at ZipLM's measured speedups
    comparison = []
    for row in rows["ziplm"]:
        x = row["measured_speedup"]
        comparison.append({"target": row["target"], "measured_speedup": x, "ziplm": row["perplexity"],
                           "uniform": interpolate([(r["measured_speedup"], r["perplexity"]) for r in rows["uniform"]], x),
                           "shortgpt": interpolate([(r["measured_speedup"], r["perplexity"]) for r in rows["shortgpt"]]
                                                   + [(1.0, rows["dense"][0]["perplexity"])], x),
                           "within_7pct": abs(x / row["target"] - 1) <= 0.07})
    result = {"settings": {**vars(args), "environment": env.to_dict(), "machine": platform.processor() or platform.machine(),
                           "torch": torch.__version__},
              "seconds": {"latency_table": round(table_seconds, 1), "ziplm_family": round(ziplm_seconds, 1)},
              "latency_table": table.to_dict(), "rows": rows, "comparison": comparison,
              "level_database_mib": round(database.nbytes() / 2**20, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    plot_tradeoff({"ZipLM": [(r["measured_speedup"], r["perplexity"]) for r in rows["ziplm"]],
                   "uniform structured (OBS)": [(r["measured_speedup"], r["perplexity"]) for r in rows["uniform"]],
                   "ShortGPT block drop": [(r["measured_speedup"], r["perplexity"]) for r in rows["shortgpt"]]},
                  out / "tradeoff.png", reference=rows["dense"][0]["perplexity"],
                  title="SmolLM2-135M, CPU prefill 1x512: WikiText-2 test perplexity")
    lines = ["| method | target | measured speedup | predicted | perplexity | parameters |", "|---|---:|---:|---:|---:|---:|"]
    d = rows["dense"][0]
    lines.append(f"| dense | – | 1.000x | – | {d['perplexity']:.2f} | {d['params']:,} |")
    for r in rows["ziplm"]:
        lines.append(f"| ZipLM | {r['target']:g}x | {r['measured_speedup']:.3f}x | {r['predicted_speedup']:.3f}x | "
                     f"{r['perplexity']:.2f} | {r['params']:,} |")
    for r in rows["uniform"]:
        lines.append(f"| uniform ({100 * r['fraction_removed']:.1f}% removed) | – | {r['measured_speedup']:.3f}x | "
                     f"{r['predicted_speedup']:.3f}x | {r['perplexity']:.2f} | {r['params']:,} |")
    for r in rows["shortgpt"]:
        lines.append(f"| ShortGPT ({r['blocks_dropped']} blocks) | – | {r['measured_speedup']:.3f}x | – | "
                     f"{r['perplexity']:.2f} | {r['params']:,} |")
    lines += ["", "At ZipLM's measured speedups (baselines interpolated between their measured points):", "",
              "| target | measured | within ±7% | ZipLM | uniform | ShortGPT |", "|---:|---:|:---:|---:|---:|---:|"]
    for c in comparison:
        fmt = lambda v: f"{v:.2f}" if v is not None else "n/a"  # noqa: E731
        lines.append(f"| {c['target']:g}x | {c['measured_speedup']:.3f}x | {'yes' if c['within_7pct'] else 'NO'} | "
                     f"{fmt(c['ziplm'])} | {fmt(c['uniform'])} | {fmt(c['shortgpt'])} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
