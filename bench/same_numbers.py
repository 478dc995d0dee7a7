"""Fingerprints of the engine's results at fixed seeds, to show a refactor changed no number.

Runs SparseGPT 50%, GPTQ W4 (group 16) and ZipLM's level database + DP choice (no timing: a fixed,
proportional latency table; no refinement) and ZipLM with 4 refinement steps on a random Llama-style
model, and prints a SHA-256 of every resulting weight tensor (plus the chosen structure). Only the
public API is used, so the same script runs on any revision:

    python bench/same_numbers.py > after.json
    git worktree add /tmp/before <rev> && PYTHONPATH=/tmp/before python bench/same_numbers.py > before.json
    diff before.json after.json && echo identical
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch
import transformers


def model() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def calibration() -> torch.Tensor:
    return torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(1))


def digest(m: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(m.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def latency_table(m):
    try:
        from optimum_prune.evaluation.latency_table import InferenceEnvironment, LatencyTable, model_signature
    except ImportError:  # before the measuring package
        from optimum_prune.ziplm.latency import InferenceEnvironment, LatencyTable, model_signature
    from optimum_prune import get_adapter

    dims = get_adapter(m).dims(m.config)
    attention = {(g, q): 0.25 * g * q for g in range(1, dims.num_kv_heads + 1) for q in range(1, dims.heads_per_group + 1)}
    mlp = {n: 0.02 * n for n in sorted({dims.intermediate_size, *range(8, dims.intermediate_size, 8)})}
    per_layer = attention[(dims.num_kv_heads, dims.heads_per_group)] + mlp[dims.intermediate_size]
    return LatencyTable(environment=InferenceEnvironment(seq_len=32), model=model_signature(m), attention=attention,
                        mlp=mlp, rest_ms=2.0, dense_ms=2.0 + dims.num_layers * per_layer, num_layers=dims.num_layers)


def main() -> None:
    from optimum_prune import Pruner, Quantizer

    ids = calibration()
    common = dict(calibration=ids, num_samples=16, seq_len=32, batch_size=4, progress=False)
    out = {}
    p = Pruner(model())
    p.prune(method="sparsegpt", sparsity=0.5, **common)
    out["sparsegpt-50"] = digest(p.model)
    q = Quantizer(model())
    q.quantize(bits=4, group_size=16, **common)
    out["gptq-w4-g16"] = digest(q.model)
    for iterations in (0, 4):
        m = model()
        p = Pruner(m)
        p.prune(target_speedup=1.5, latency_table=latency_table(m), search_iterations=iterations,
                search_samples=4, measure_speedup=False, **common)
        config = p.pruning_config
        out[f"ziplm-1.5x-iter{iterations}"] = {
            "weights": digest(p.model), "remove_heads": {str(k): v for k, v in config.remove_heads.items()},
            "remove_neurons": {str(k): len(v) for k, v in config.remove_neurons.items()},
            "drop_attention": config.drop_attention, "drop_mlp": config.drop_mlp}
    json.dump(out, sys.stdout, indent=2, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
