#!/usr/bin/env python
"""Does ZipLM's speedup-check protocol (3 paired rounds x 4 decode steps) read llama.cpp speedups differently
from the bench's (10 x 8)? One seeded random SmolLM2 structure, both f16 exports timed 4 x 4 ways, alternating.

    nice -n 10 python bench/llamacpp_protocol_check.py 0      # seed; every timing child runs under /tmp/s4/quiet.sh
"""
import random
import sys
import tempfile

from optimum_prune import Pruner, PruningConfig
from optimum_prune.evaluation import llamacpp_timing as lt
from optimum_prune.evaluation.environment import InferenceEnvironment
lt.CHILD_PREFIX[:] = ["/tmp/s4/quiet.sh"]
env = InferenceEnvironment(engine="llama.cpp", mode="decode", seq_len=64, threads=1, dtype="f16")
dense = Pruner.from_pretrained("smollm2")
pruned = Pruner.from_pretrained("smollm2")
rng = random.Random(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
heads, neurons, no_attn, no_mlp = {}, {}, [], []
for layer in range(30):
    g = rng.randint(0, 3)
    if g == 0: no_attn.append(layer)
    else:
        q = rng.randint(1, 3)
        heads[layer] = [h for h in range(9) if h // 3 >= g or h % 3 >= q]
    n = rng.choice([0, 384, 768, 1152, 1536])
    if n == 0: no_mlp.append(layer)
    elif n < 1536: neurons[layer] = list(range(n, 1536))
pruned.apply(PruningConfig(remove_heads={k: v for k, v in heads.items() if v}, remove_neurons=neurons,
                           drop_attention=no_attn, drop_mlp=no_mlp))
with tempfile.TemporaryDirectory() as work:
    d = lt.export_for_timing(dense.model, work, env, "dense")
    p = lt.export_for_timing(pruned.model, work, env, "pruned")
    for i in range(4):
        for name, kw in (("check 3x4", dict(rounds=3, repeats=4)), ("bench 10x8", dict(rounds=10, repeats=8)),
                         ("check 3x8", dict(rounds=3, repeats=8)), ("10x4", dict(rounds=10, repeats=4))):
            m = lt.gguf_speedup(d, p, env, warmup=2, **kw)
            print(f"{i} {name}: {m.speedup:.4f} dense {m.dense_ms:.2f} ms pruned {m.pruned_ms:.2f} ms rounds "
                  f"{[round(r, 3) for r in m.round_speedups]}", flush=True)
