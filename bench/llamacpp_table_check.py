#!/usr/bin/env python
"""Does a llama.cpp latency table predict llama.cpp speedups? SmolLM2-135M, random heterogeneous structures.

    nice -n 10 python bench/llamacpp_table_check.py --threads 1 --trials 3

Measures the table (f16 decode after 64 cached tokens, 8 FFN widths, 5 rounds), then for each trial draws a
seeded random structure (per layer: 0..3 KV groups x 1..3 query heads, an FFN width from the grid or none),
and prints the table's predicted speedup next to the speedup of the GGUF exports measured in llama.cpp in 5
paired rounds (``measure_speedup``). Figures: bench/results/ziplm_llamacpp/NOTES.md.
"""

from __future__ import annotations

import argparse
import random
import time

from optimum_prune import Pruner, PruningConfig
from optimum_prune.evaluation.latency_table import InferenceEnvironment, measure_llamacpp_table, measure_speedup
from optimum_prune.modeling.adapters import get_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    model = Pruner.from_pretrained("smollm2").model
    env = InferenceEnvironment(engine="llama.cpp", mode="decode", seq_len=64, threads=args.threads, dtype="f16")
    start = time.time()
    table = measure_llamacpp_table(model, env, mlp_levels=8, repeats=5, progress=False)
    print(table, f"\ntable: {time.time() - start:.0f} s", flush=True)
    dims = get_adapter(model).dims(model.config)
    groups, per_group, width = dims.num_kv_heads, dims.heads_per_group, dims.intermediate_size
    rng = random.Random(0)
    for trial in range(args.trials):
        levels, heads, neurons, no_attention, no_mlp = [], {}, {}, [], []
        for layer in range(table.num_layers):
            g, q = rng.randint(0, groups), rng.randint(1, per_group)
            if g == 0:
                no_attention.append(layer)
            else:
                heads[layer] = [h for h in range(dims.num_heads) if h // per_group >= g or h % per_group >= q]
            n = rng.choice([0] + table.mlp_grid)
            if n == 0:
                no_mlp.append(layer)
            elif n < width:
                neurons[layer] = list(range(n, width))
            levels.append(((g, q) if g else (0, 0), n))
        structure = PruningConfig(remove_heads={k: v for k, v in heads.items() if v}, remove_neurons=neurons,
                                  drop_attention=no_attention, drop_mlp=no_mlp)
        pruned = Pruner.from_pretrained("smollm2")
        pruned.apply(structure)
        timing = measure_speedup(model, pruned.model, env, rounds=5)
        print(f"trial {trial}: predicted {table.speedup(levels):.3f}x measured {timing.speedup:.3f}x rounds "
              f"{[round(r, 3) for r in timing.round_speedups]}", flush=True)


if __name__ == "__main__":
    main()
