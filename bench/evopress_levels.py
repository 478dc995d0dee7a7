#!/usr/bin/env python
"""EvoPress per-Linear levels on SmolLM2-135M: 70% average sparsity (SparseGPT levels) and 3 average bits
(GPTQ levels), next to the engine bench's uniform / scheduler / OWL 70% and uniform GPTQ 3-bit rows.

    python bench/evopress_levels.py                         # both rows
    python bench/evopress_levels.py --rows sparsity-70 --generations 40

Same protocol as ``bench/engine.py``: the level stores are built on its 128 x 512 calibration windows of
``valid.txt`` (seed 0); the fitness is Top-K KL to the dense model on the first windows of the same set
(multi-step selection on 1 → 2 → 8 windows); perplexity on the first 40 x 512 windows of ``test.txt``.
Level stores live in ``bench/results/evopress_levels/stores`` (git-ignored) and are reused across runs.
Results: ``bench/results/evopress_levels/results.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
OUT = ROOT / "bench" / "results" / "evopress_levels"
ENGINE = ROOT / "bench" / "results" / "engine"
WINDOWS = ENGINE / "windows-128x512.pt"
REFERENCE_ROWS = {"sparsity-70": ["sparsegpt-70", "scheduler-70", "owl-70"], "bits-3": ["gptq-w3g128"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=["sparsity-70", "bits-3"], choices=list(REFERENCE_ROWS))
    parser.add_argument("--generations", type=int, default=60)
    parser.add_argument("--offspring", type=int, default=8)
    parser.add_argument("--selection-windows", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--survivors", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--sparsity-levels", type=float, nargs="+",
                        default=[0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9])
    parser.add_argument("--bit-levels", type=float, nargs="+", default=[2, 3, 4, 5])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--table-only", action="store_true", help="rewrite results.md from results.json")
    args = parser.parse_args()
    if args.table_only:
        write_table(Path(args.out))
        return 0

    from optimum_prune import Pruner, Quantizer
    from optimum_prune.evaluation import perplexity
    from optimum_prune.methods.evopress.search import EvoPressSettings

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Pruner.from_pretrained("smollm2")
    windows = torch.load(WINDOWS)
    test = str(DATA / "test.txt")

    def ppl(model) -> float:
        return perplexity(model, base.tokenizer, test, max_windows=args.eval_windows, progress=False).perplexity

    results_path = out / "results.json"
    for row in args.rows:
        kind, value = row.split("-")
        settings = EvoPressSettings(generations=args.generations, offspring=args.offspring,
                                    windows=args.selection_windows, survivors=args.survivors, seed=0,
                                    level_store=str(out / "stores" / row), state_file=str(out / f"{row}.state.json"),
                                    levels=args.sparsity_levels if kind == "sparsity" else args.bit_levels)
        model = copy.deepcopy(base.model)
        start = time.perf_counter()
        if kind == "sparsity":
            session = Pruner(model, base.tokenizer)
            session.prune(method="evopress", target="sparsity", sparsity=int(value) / 100, calibration=windows,
                          num_samples=windows.shape[0], seq_len=windows.shape[1], evopress=settings)
        else:
            session = Quantizer(model, base.tokenizer)
            session.quantize(method="evopress", average_bits=float(value), group_size=128, act_order=True,
                             calibration=windows, num_samples=windows.shape[0], seq_len=windows.shape[1],
                             evopress=settings)
        wall = time.perf_counter() - start
        search = session.pruning_config.search
        entry = {"perplexity": ppl(session.model), "wall_s": round(wall, 1),
                 "level_store_s": search["level_store_seconds"], "search_s": search["search_seconds"],
                 "level_store_mib": search["level_store_mib"], "model_mib": search["model_mib"],
                 "average": search["average"], "start": search["start"], "seed_fitness": search["seed_fitness"],
                 "fitness": search["fitness"], "generations": search["generations"],
                 "evaluations": search["evaluations"], "levels": search["level_values"],
                 "level_histogram": _histogram(search["levels"]), "final": search.get("final", "store"),
                 "stitched_fitness": search.get("stitched_fitness"), "sequential_fitness": search.get("sequential_fitness"),
                 "sequential_pass_s": search.get("sequential_pass_seconds")}
        if entry["sequential_fitness"] is not None:  # the other candidate's perplexity, for the record
            entry["other_perplexity"] = ppl(_other_final(base.model, search))
        if kind == "bits":
            with tempfile.TemporaryDirectory() as tmp:
                session.save_pretrained(tmp)
                entry["file_mib"] = round(sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors")) / 2**20, 1)
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}
        results[row] = entry
        print(f"evopress {row}: perplexity {entry['perplexity']:.2f} (store {entry['level_store_s']:.0f} s, "
              f"search {entry['search_s']:.0f} s, start {entry['start']})", flush=True)
        results_path.write_text(json.dumps(results, indent=2))
        del session, model
    results = json.loads(results_path.read_text())  # rows written meanwhile by another run are kept
    results.setdefault("settings", {})[",".join(args.rows)] = vars(args) | {
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "cpus": os.cpu_count()}
    results_path.write_text(json.dumps(results, indent=2))
    write_table(out)
    return 0


def write_table(out: Path) -> None:
    """results.md from results.json, with the engine bench's reference rows."""
    results = json.loads((out / "results.json").read_text())
    engine = json.loads((ENGINE / "results.json").read_text())["rows"] if (ENGINE / "results.json").is_file() else {}
    lines = ["| target | method | perplexity | average | compression wall time (s) | level store | search (s) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row, references in REFERENCE_ROWS.items():
        for name in references:
            if name in engine:
                r = engine[name]
                lines.append(f"| {row} | {name} (engine bench) | {r['perplexity']:.2f} | – | {r['wall_s']:.0f} | – | – |")
        if row in results:
            r = results[row]
            final = f", final: {r['final']}" if r.get("sequential_fitness") is not None else ""
            built = f"built in {r['level_store_s']:.0f} s" if r["level_store_s"] >= 1 else "reused (see NOTES.md)"
            lines.append(f"| {row} | EvoPress (start: {r['start']}{final}) | {r['perplexity']:.2f} | {r['average']:.4g} | "
                         f"{r['wall_s']:.0f} | {r['level_store_mib']:.0f} MiB on disk (model {r['model_mib']:.0f} MiB), "
                         f"{built} | {r['search_s']:.0f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _other_final(dense, search: dict) -> torch.nn.Module:
    """The final candidate the search did not keep: stitched from the store, or the sequential pass."""
    from optimum_prune.engine.compress import compress_model
    from optimum_prune.engine.level_store import LevelStore
    from optimum_prune.engine.sequential import SequentialOptions
    from optimum_prune.methods.evopress.levels import StoreLoader, level_plan

    store = LevelStore(search["level_store"])
    state = [store.levels.index(search["levels"][str(u.layer)][u.path]) for u in store.units]
    model = copy.deepcopy(dense)
    if search["final"] == "sequential":
        StoreLoader(model, store).load(state)
    else:
        compress_model(model, torch.load(WINDOWS), level_plan(store, state, dampening=0.01, blocksize=128),
                       SequentialOptions(progress=False))
    return model


def _histogram(levels: dict[str, dict[str, float]]) -> dict[str, int]:
    """How many Linears got each level."""
    counts: dict[str, int] = {}
    for per_layer in levels.values():
        for value in per_layer.values():
            counts[f"{value:g}"] = counts.get(f"{value:g}", 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: float(kv[0])))


if __name__ == "__main__":
    raise SystemExit(main())
