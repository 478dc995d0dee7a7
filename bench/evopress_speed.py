#!/usr/bin/env python
"""Seconds per generation of EvoPress's depth search on SmolLM2-135M, without and with the exact savings
(parent activations reused, early stops, identical candidates once, KL scored window by window with scored
(state, window) pairs reused and windows after a stop skipped), in paired rounds: the plain search
(``cache_mib=0``) and the cached one back to back, same seed, same windows; each pair must choose the same
sublayers with the same fitness history.

    OMP_NUM_THREADS=1 python bench/evopress_speed.py --threads 1                 # 2 rounds x 4 generations
    OMP_NUM_THREADS=1 python bench/evopress_speed.py --threads 1 --rounds 1 --generations 3
    # one path per invocation (each under a time limit), paired afterwards: same settings and seed
    OMP_NUM_THREADS=1 python bench/evopress_speed.py --threads 1 --rounds 1 --generations 6 --paths plain --out D
    OMP_NUM_THREADS=1 python bench/evopress_speed.py --threads 1 --rounds 1 --generations 6 --paths cached --out D \
        --pair-with D/results.json

Settings as bench/depth.py's EvoPress row: 6 blocks' worth of attention and MLP sublayers, 8 offspring,
selection on 1 / 2 / 8 windows with 2 / 1 survivors, 32 calibration windows of 512 tokens (the start of
``../shared/data/wikitext-2/valid.txt``). A generation's time ends when its state file is written; the
first generation, which also scores the starting parent, is reported apart. The start is search_depth's on
this model (the block-influence seed, read from bench/results/depth); the dense reference is computed once.
On a machine shared by several processes use ``--threads 1`` (OMP_NUM_THREADS=1): two OpenMP threads on
oversubscribed cores spin and run many times slower.
Results: ``bench/results/evopress_speed/results.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
OUT = ROOT / "bench" / "results" / "evopress_speed"


def timed_evolve(model, scorer, initial: list[int], settings, pool: int) -> tuple[object, list[float]]:
    """search_depth's evolution (sublayers, same fitness and mutation) and the wall time of each generation."""
    from optimum_prune.methods.evopress import search
    from optimum_prune.methods.evopress.fitness import search_fitness

    depth = len(initial) // 2
    sets = lambda st: ({p for p in range(depth) if st[p]}, {p for p in range(depth) if st[depth + p]})  # noqa: E731
    fitness = search_fitness(model, scorer, lambda st: search.dropped_sublayers(model, *sets(st)),
                             [u % depth for u in range(2 * depth)], settings, scorer.batch_size)
    groups = [list(range(depth)), list(range(depth, 2 * depth))]
    marks = [time.perf_counter()]
    real_save = search._save_state

    parents = []

    def save(path, state):
        marks.append(time.perf_counter())
        parents.append(list(state["parent"]))
        real_save(path, state)

    search._save_state = save
    try:
        result = search.evolve(initial, lambda st, g: search.swap_mutation(st, groups, g, settings.max_swaps), fitness,
                               settings, run_key="bench", progress=False, pool=pool)
    finally:
        search._save_state = real_save
    info = fitness.info() if hasattr(fitness, "info") else {"activation_cache": None}
    return result, [b - a for a, b in zip(marks, marks[1:])], {"parents": parents, **info}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--offspring", type=int, default=8)
    parser.add_argument("--selection-windows", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--survivors", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--cache-mib", type=float, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--paths", nargs="+", choices=["plain", "cached"], default=["plain", "cached"],
                        help="run only these paths (the other can come from --pair-with)")
    parser.add_argument("--pair-with", default=None,
                        help="a results.json of this bench with the other path's rounds (same settings and seed)")
    args = parser.parse_args()

    from optimum_prune.evaluation.scorer import CalibrationScorer
    from optimum_prune.evaluation.windows import text_windows
    from optimum_prune.loading import load_model
    from optimum_prune.methods.evopress.search import EvoPressSettings
    from optimum_prune.text import read_text, tokenize_text

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, _ = load_model("smollm2")
    model.eval()
    windows = text_windows(tokenize_text(tokenizer, read_text(str(DATA))), 512, args.calibration_windows)
    scorer = CalibrationScorer(model, windows, 100, 4, "kl")  # the dense reference, once for every run
    influence = json.loads((ROOT / "bench" / "results" / "depth" / "results.json").read_text())
    seed_blocks = influence["block_influence"]["drop_layers"][: args.blocks]  # where the depth run started
    half = [1 if p in seed_blocks else 0 for p in range(model.config.num_hidden_layers)]
    rows = []
    earlier = json.loads(Path(args.pair_with).read_text()) if args.pair_with else None
    if earlier is not None:
        mine = {k: v for k, v in vars(args).items() if k not in ("out", "paths", "pair_with")}
        theirs = {k: v for k, v in earlier["settings"].items() if k not in ("out", "paths", "pair_with")}
        if mine != theirs:
            raise SystemExit(f"--pair-with {args.pair_with} ran other settings: {theirs} vs {mine}")
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            pair = {} if earlier is None else {k: v for k, v in earlier["rounds"][round_].items()
                                               if k in ("plain", "cached") and k not in args.paths}
            for name, mib in (("plain", 0), ("cached", args.cache_mib)):
                if name not in args.paths:
                    continue
                state_file = Path(tmp) / f"{round_}-{name}.json"
                settings = EvoPressSettings(generations=args.generations, offspring=args.offspring,
                                            windows=args.selection_windows, survivors=args.survivors,
                                            seed=args.seed, cache_mib=mib, state_file=str(state_file)
                                            ).resolved(1, 1, windows.shape[0])
                result, seconds, info = timed_evolve(model, scorer, half + half, settings, windows.shape[0])
                pair[name] = {"seconds_per_generation": [round(x, 2) for x in seconds],
                              "mean": statistics.mean(seconds[1:]),
                              "mean_with_first": statistics.mean(seconds),
                              "first_generation_with_start_s": round(seconds[0], 2),
                              "parent": result.state, "history": result.history, "fitness": result.fitness,
                              **info}
                print(f"round {round_} {name}: {pair[name]['mean']:.1f} s/generation "
                      f"({', '.join(f'{x:.1f}' for x in seconds[1:])}; generation 1 with the start's scoring "
                      f"{seconds[0]:.1f} s)",
                      flush=True)
            if "plain" in pair and "cached" in pair:
                plain, cached = pair["plain"], pair["cached"]
                pair["identical_choices"] = plain["parent"] == cached["parent"] and all(
                    p == c for p, c in zip(plain["parents"], cached["parents"]))
                pair["identical_history"] = all(plain[k] == cached[k] for k in ("history", "fitness"))
                pair["max_history_rel_diff"] = max(abs(p - c) / abs(p) for p, c in zip(plain["history"],
                                                                                       cached["history"]))
                pair["speedup"] = plain["mean"] / cached["mean"]
                pair["speedup_with_first"] = statistics.mean(plain["seconds_per_generation"]) / statistics.mean(
                    cached["seconds_per_generation"])  # generation 1 too (it also scores the starting parent)
                pair["speedup_after_two"] = statistics.mean(plain["seconds_per_generation"][2:]) / statistics.mean(
                    cached["seconds_per_generation"][2:]) if len(plain["seconds_per_generation"]) > 2 else None
                print(f"round {round_}: {pair['speedup']:.2f}x after generation 1 "
                      f"({pair['speedup_with_first']:.2f}x with it), same parent every generation: "
                      f"{pair['identical_choices']}, history bit-identical: {pair['identical_history']} "
                      f"(max rel. diff {pair['max_history_rel_diff']:.1e})", flush=True)
            rows.append(pair)
            (out / "results.partial.json").write_text(json.dumps(rows, indent=2))
    both = all("plain" in r and "cached" in r for r in rows)
    summary = {
        "command": "python bench/evopress_speed.py " + " ".join(f"--{k.replace('_', '-')} {v}" if not isinstance(v, list)
                                                                else f"--{k.replace('_', '-')} " + " ".join(map(str, v))
                                                                for k, v in vars(args).items() if k != "out"),
        "settings": vars(args), "machine": {"cpus": torch.get_num_threads(), "torch": torch.__version__,
                                            "platform": platform.platform()},
        "paired_with": args.pair_with, "uptime": _uptime(),
        **({"plain_s_per_generation": statistics.mean(r["plain"]["mean"] for r in rows),
            "cached_s_per_generation": statistics.mean(r["cached"]["mean"] for r in rows),
            "speedup_per_round": [round(r["speedup"], 3) for r in rows],
            "identical_choices": all(r["identical_choices"] for r in rows)} if both else {}),
        "rounds": rows,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    if both:
        print(f"plain {summary['plain_s_per_generation']:.1f} s/gen, cached {summary['cached_s_per_generation']:.1f} "
              f"s/gen, speedups {summary['speedup_per_round']}, identical: {summary['identical_choices']}")
    return 0


def _uptime() -> str | None:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
