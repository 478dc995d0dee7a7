#!/usr/bin/env python
"""Seconds per distillation step on SmolLM2-135M: teacher in the loop vs cached teacher logits, in paired rounds.

    OMP_NUM_THREADS=1 python bench/kd_cache.py --threads 1                     # 2 rounds x 4 timed steps
    OMP_NUM_THREADS=1 python bench/kd_cache.py --threads 1 --student layerchop # student = half the blocks

Both arms run the same ``DistillationTrainer`` (AdamW, linear schedule, the same windows and seed): the live arm
runs the dense teacher's forward on every batch, the cached arm reads its top-k logits + log-sum-exp from a
``teacher_cache`` built once beforehand (its build time is reported apart). Each round runs both arms back to back
(order alternating between rounds) from fresh copies of the student; the first step of each run (warm-up) is not
counted. Windows: ``seq_len``-token windows of ``../shared/data/wikitext-2/valid.txt``. The student is the dense
model itself by default (the step-time ratio only needs the shapes); ``--student layerchop`` drops the last half
of its blocks (a student of about half the cost), ``--student ziplm`` prunes it to 1.5x (fast preset) first.
On a shared 2-core machine use ``--threads 1``: two OpenMP threads on oversubscribed cores spin and run many
times slower. Results: ``bench/results/kd_cache/results.json`` (``results_<student>.json`` for the others).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
OUT = ROOT / "bench" / "results" / "kd_cache"


def timed_run(student, ids, *, teacher=None, cache=None, steps: int, batch_size: int, seed: int) -> dict:
    """Train a copy of ``student`` for ``steps`` steps; the wall time of each step and the losses."""
    from transformers import TrainerCallback, TrainingArguments

    from optimum_prune.distill import DistillationTrainer, TokenWindows

    marks: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    model = copy.deepcopy(student).train().requires_grad_(True)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch_size,
                                 learning_rate=2e-5, report_to=[], save_strategy="no", logging_steps=1,
                                 disable_tqdm=True, seed=seed, use_cpu=not torch.cuda.is_available())
        dataset = TokenWindows(ids, with_index=cache is not None)
        trainer = DistillationTrainer(model=model, args=args, train_dataset=dataset, teacher=teacher,
                                      teacher_cache=cache, callbacks=[StepTimer()])
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    seconds = [b - a for a, b in zip(marks[::2], marks[1::2])]
    del model, trainer
    return {"step_seconds": [round(s, 3) for s in seconds], "losses": losses,
            "mean_step_s": round(statistics.fmean(seconds[1:]), 3), "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="steps per run (the first is warm-up, not counted)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--student", choices=("dense", "layerchop", "ziplm"), default="dense",
                        help="dense: the model itself; layerchop: the last half of its blocks dropped; ziplm: 1.5x")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from optimum_prune import Pruner
    from optimum_prune.evaluation.windows import text_windows
    from optimum_prune.teacher_cache import build_teacher_cache
    from optimum_prune.text import read_text, tokenize_text

    dense = Pruner.from_pretrained("smollm2")
    student = copy.deepcopy(dense.model)  # the live arm freezes its teacher: the student must be another object
    if args.student == "layerchop":
        pruned = Pruner.from_pretrained("smollm2")
        pruned.prune(method="layerchop", num_layers=pruned.model.config.num_hidden_layers // 2, strategy="last")
        student = pruned.model
    elif args.student == "ziplm":
        pruned = Pruner.from_pretrained("smollm2")
        pruned.prune(target_speedup=1.5, preset="fast", calibration=str(DATA))
        student = pruned.model
    n = args.steps * args.batch_size
    ids = text_windows(tokenize_text(dense.tokenizer, read_text(str(DATA))), args.seq_len, n)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        begin = time.perf_counter()
        cache = build_teacher_cache(dense.model, ids, Path(tmp) / "cache", tokenizer=dense.tokenizer,
                                    top_k=args.top_k, batch_size=args.batch_size)
        build_s = time.perf_counter() - begin
        cache_bytes = sum(f.stat().st_size for f in (Path(tmp) / "cache").iterdir())
        for r in range(args.rounds):
            order = ("live", "cached") if r % 2 == 0 else ("cached", "live")
            result = {}
            for arm in order:
                kwargs = {"teacher": dense.model} if arm == "live" else {"cache": cache}
                result[arm] = timed_run(student, ids, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                                        **kwargs)
                print(f"round {r + 1} {arm}: {result[arm]['mean_step_s']} s/step  (load {result[arm]['load_before']}"
                      f" -> {result[arm]['load_after']})", flush=True)
            result["ratio_live_over_cached"] = round(result["live"]["mean_step_s"] / result["cached"]["mean_step_s"], 3)
            result["order"] = list(order)
            rounds.append(result)
    ratios = [r["ratio_live_over_cached"] for r in rounds]
    summary = {
        "command": "OMP_NUM_THREADS=%s python bench/kd_cache.py %s" % (os.environ.get("OMP_NUM_THREADS", ""), " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")),
        "model": "SmolLM2-135M (embedded GGUF, dequantized fp32)", "student": args.student,
        "settings": {"batch_size": args.batch_size, "seq_len": args.seq_len, "top_k": args.top_k,
                     "timed_steps_per_run": args.steps - 1, "threads": args.threads, "windows": n},
        "cache_build_s": round(build_s, 2), "cache_bytes": cache_bytes,
        "rounds": rounds, "ratio_per_round": ratios, "ratio_median": statistics.median(ratios),
        "live_step_s_median": statistics.median(r["live"]["mean_step_s"] for r in rounds),
        "cached_step_s_median": statistics.median(r["cached"]["mean_step_s"] for r in rounds),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "loadavg_end": os.getloadavg()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "results.json" if args.student == "dense" else f"results_{args.student}.json"
    (out / name).write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("ratio_per_round", "ratio_median", "live_step_s_median",
                                             "cached_step_s_median", "cache_build_s")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
