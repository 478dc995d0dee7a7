#!/usr/bin/env python
"""Depth pruning on SmolLM2-135M: 6 of 30 blocks' worth removed by last-n, angular, block influence and
EvoPress (attention and MLP sublayers chosen independently), one-shot perplexity of each.

    python bench/depth.py                                   # ~10 min on 2 cores
    python bench/depth.py --rows evopress --generations 100  # resumes from results/depth/evopress.state.json
    python bench/depth.py --table-only                      # re-render results.md from results.json

Calibration (strategies' statistics and EvoPress fitness): the first 32 of the engine bench's
windows of ``valid.txt``. Perplexity: the project protocol on ``test.txt``. Results in ``bench/results/depth/``.
``--heal-steps N`` still heals each row (continued pretraining on ``valid.txt``, seq 256, batch 4, lr 1e-4) and
stores the figure in results.json, but the table leaves it out: without a dense model healed the same way it
cannot be compared with anything (healing on WikiText-2 also adapts to the test domain).
``bench/recovery.py`` heals with that control.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
OUT = ROOT / "bench" / "results" / "depth"
WINDOWS = ROOT / "bench" / "results" / "engine" / "windows-128x512.pt"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--heal-steps", type=int, default=0, help="uncontrolled healing (see the docstring)")
    parser.add_argument("--heal-seq-len", type=int, default=256)
    parser.add_argument("--heal-lr", type=float, default=1e-4)
    parser.add_argument("--generations", type=int, default=30)
    parser.add_argument("--offspring", type=int, default=8)
    parser.add_argument("--selection-windows", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--survivors", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--calibration-windows", type=int, default=32, help="of the engine bench's 128 x 512")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--rows", nargs="*", default=["last", "angular", "block_influence", "evopress"])
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--table-only", action="store_true", help="only re-render results.md from results.json")
    args = parser.parse_args()
    if args.table_only:
        write_table(json.loads((Path(args.out) / "results.json").read_text()), Path(args.out))
        return 0

    from optimum_prune import Pruner
    from optimum_prune.evaluation import perplexity
    from optimum_prune.methods.evopress.search import EvoPressSettings

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Pruner.from_pretrained("smollm2")
    windows = torch.load(WINDOWS)[: args.calibration_windows]
    test = str(DATA / "test.txt")

    def ppl(model) -> float:
        return perplexity(model, base.tokenizer, test, max_windows=args.eval_windows, progress=False).perplexity

    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results["dense"] = {"perplexity": ppl(base.model), "params": sum(p.numel() for p in base.model.parameters())}
    for row in args.rows:
        pruner = Pruner(copy.deepcopy(base.model), base.tokenizer)
        start = time.perf_counter()
        if row == "evopress":
            pruner.prune(method="evopress", target="depth", drop_ratio=args.blocks / 30, calibration=windows,
                         num_samples=windows.shape[0], seq_len=windows.shape[1],
                         evopress=EvoPressSettings(generations=args.generations, offspring=args.offspring,
                                                   windows=args.selection_windows, survivors=args.survivors, seed=0,
                                                   state_file=str(out / "evopress.state.json")))
        else:
            pruner.prune(method="layerchop", num_layers=args.blocks, strategy=row, calibration=windows,
                         num_samples=windows.shape[0], seq_len=windows.shape[1])
        search_seconds = time.perf_counter() - start
        config = pruner.pruning_config
        before = ppl(pruner.model)
        row_result = {"search_seconds": round(search_seconds, 1), "perplexity_before_healing": before,
                      "drop_layers": config.drop_layers, "drop_attention": config.drop_attention,
                      "drop_mlp": config.drop_mlp, "params": sum(p.numel() for p in pruner.model.parameters()),
                      "settings": vars(args) | {"rows": [row]}}
        print(f"{row}: {before:.2f} before healing ({search_seconds:.0f} s search)", flush=True)
        if args.heal_steps:
            start = time.perf_counter()
            metrics = pruner.heal(train_dataset=str(DATA / "valid.txt"), max_steps=args.heal_steps,
                                  seq_len=args.heal_seq_len, per_device_train_batch_size=4,
                                  learning_rate=args.heal_lr, disable_tqdm=True)
            row_result.update(perplexity_after_healing=ppl(pruner.model),
                              heal_seconds=round(time.perf_counter() - start, 1),
                              heal_train_loss=metrics.get("train_loss"), heal_control="none")
            print(f"{row}: {row_result['perplexity_after_healing']:.2f} after healing (no control: not in the "
                  "table; see bench/recovery.py)", flush=True)
        if row == "evopress":
            row_result["search"] = {k: v for k, v in (config.search or {}).items() if k != "history"}
        results[row] = row_result
        results_path.write_text(json.dumps(results, indent=2))
    results_path.write_text(json.dumps(results, indent=2))
    print(write_table(results, out))
    return 0


def write_table(results: dict, out: Path) -> str:
    """results.md: one-shot perplexities only (healed figures need a healed dense control: bench/recovery.py)."""
    lines = ["| strategy | removed | perplexity (one-shot) | search (s) | parameters |",
             "|---|---|---:|---:|---:|",
             f"| dense | – | {results['dense']['perplexity']:.2f} | – | {results['dense']['params']:,} |"]
    for row in ("last", "angular", "block_influence", "evopress"):
        if row not in results:
            continue
        r = results[row]
        removed = (f"blocks {r['drop_layers']}" if r["drop_layers"] else
                   f"attention {r['drop_attention']}, MLP {r['drop_mlp']}")
        lines.append(f"| {row} | {removed} | {r['perplexity_before_healing']:.2f} | {r['search_seconds']:.0f} | "
                     f"{r['params']:,} |")
    lines += ["", "Healed perplexities are left out: no dense model was healed the same way, so they cannot be told "
                  "apart from adaptation to WikiText-2 (bench/recovery.py reports healing against that control)."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
