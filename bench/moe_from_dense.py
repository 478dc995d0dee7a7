#!/usr/bin/env python
"""A CONSTRUCTED Mixture-of-Experts from SmolLM2-135M's real weights, then REAP expert pruning against baselines.

    python bench/moe_from_dense.py --shared 768 --name qwen2moe-shared768-8x96-top2   # the committed row
    python bench/moe_from_dense.py --name mixtral-8x192-top2      # every neuron routed (unusable: see NOTES)

No real Mixture-of-Experts model is installable here (no PyPI package ships one), so this builds one that is not
trained: each layer's dense SwiGLU FFN (1536 neurons) is split into ``--experts`` experts of equal width.

With ``--shared N`` the N neurons of largest mean contribution form an always-on shared expert and the model is
a ``Qwen2MoeForCausalLM`` (its shared-expert sigmoid gate set to 0, i.e. x0.5, undone by doubling the shared down
projection); the other neurons are split as below. Without it, a ``MixtralForCausalLM`` routes every neuron.

1. Calibration: ``--calib-windows`` windows of 512 tokens of WikiText-2 valid (seed 0); the input of every FFN is
   recorded, and for each token the contribution of each neuron (|silu(g)*u| x the norm of its down-projection
   column).
2. Neurons are clustered by co-activation: balanced spherical k-means on each neuron's contribution profile over the
   calibration tokens (every expert gets exactly 1536/E neurons).
3. The router is fitted, not trained: ridge regression from the FFN input to the norm of each expert's output on
   the calibration tokens; top-k of its prediction picks the experts. Its logits are scaled down (x1e-3) so the
   Mixtral router's renormalised top-k weights are all ~1/k, and each expert's down projection is multiplied by k:
   a token gets the dense FFN restricted to the neurons of its k experts. Self-check: with top-k = E the MoE
   equals the dense model (max logit difference printed and asserted).
4. The MoE is a transformers ``MixtralForCausalLM`` (fused expert tensors), so optimum-prune's mixtral adapter,
   REAP and surgery apply unchanged.

Then, on the shared protocol (WikiText-2 test, first ``--eval-windows`` windows of 512 tokens): perplexity of the
dense model and the MoE; REAP (``Pruner.prune(method="reap", experts_ratio=r)``, per layer) at r = 0.25 and 0.5
against two baselines removing the same number of experts per layer: least often routed (frequency on the
calibration windows) and random (seed 0). Every model of the largest ratio (REAP and both baselines) is saved,
reloaded with the plain Auto class (logits compared; optimum_prune is imported) and generates. Results:
bench/results/moe/<name>.{json,md}; ``--resume`` keeps the rows already there and measures only the missing ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
OUT = ROOT / "bench" / "results" / "moe"


def capture_ffn_inputs(model, windows: torch.Tensor, per_layer: int, seed: int) -> list[torch.Tensor]:
    """A random subset of ``per_layer`` token positions' FFN inputs (the post-attention norm's output), per layer."""
    layers = model.model.layers
    store: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.mlp.register_forward_hook(lambda m, args, out, i=i: store[i].append(args[0].reshape(-1, args[0].shape[-1])))
             for i, layer in enumerate(layers)]
    with torch.no_grad():
        for start in range(0, windows.shape[0], 2):
            model(windows[start:start + 2])
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(seed)
    total = windows.numel()
    pick = torch.randperm(total, generator=g)[:per_layer]
    return [torch.cat(s)[pick] for s in store]


def balanced_assignment(sim: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each row (neuron) to one column (expert), greedily by similarity, no column above ``capacity``."""
    n, e = sim.shape
    order = torch.argsort(sim.flatten(), descending=True).tolist()
    owner = [-1] * n
    load = [0] * e
    left = n
    for flat in order:
        i, j = divmod(flat, e)
        if owner[i] < 0 and load[j] < capacity:
            owner[i] = j
            load[j] += 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(owner)


def split_layer(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor, experts: int, seed: int,
                shared: int = 0, iterations: int = 15):
    """(shared neuron indices, neuron index lists per expert, router weight [E, H]) for one dense SwiGLU FFN, from
    calibration inputs x; the ``shared`` neurons of largest mean contribution stay in an always-on shared expert."""
    act = F.silu(x @ wg.T) * (x @ wu.T)                                 # [T, I]
    contrib = act.abs() * wd.norm(dim=0)                                # [T, I]
    order = torch.argsort(contrib.mean(0), descending=True)
    shared_idx, routed_idx = order[:shared].sort().values, order[shared:].sort().values
    profiles = F.normalize(contrib[:, routed_idx].T, dim=1)             # [I_routed, T]
    width = routed_idx.numel() // experts
    g = torch.Generator().manual_seed(seed)
    centroids = profiles[torch.randperm(profiles.shape[0], generator=g)[:experts]]
    for _ in range(iterations):
        owner = balanced_assignment(profiles @ centroids.T, width)
        centroids = F.normalize(torch.stack([profiles[owner == e].mean(0) for e in range(experts)]), dim=1)
    groups = [routed_idx[torch.nonzero(owner == e).flatten()] for e in range(experts)]
    # the norm of each expert's output on each calibration token: what the router should rank
    target = torch.stack([(act[:, idx] @ wd[:, idx].T).norm(dim=1) for idx in groups], dim=1)  # [T, E]
    xtx = x.T @ x
    ridge = 1e-3 * xtx.diagonal().mean()
    router = torch.linalg.solve(xtx + ridge * torch.eye(x.shape[1]), x.T @ target).T        # [E, H]
    return shared_idx, groups, router


def build_moe(dense, inputs: list[torch.Tensor], experts: int, top_k: int, seed: int, shared: int = 0,
              logit_scale: float = 1e-3):
    """The dense model's attention, norms and embeddings, its FFNs split into experts: a MixtralForCausalLM, or with
    ``shared`` neurons a Qwen2MoeForCausalLM whose shared expert holds them (its sigmoid gate at 0: x0.5, undone
    by doubling the shared down projection)."""
    import transformers

    c = dense.config
    common = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings, num_experts_per_tok=top_k,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=getattr(c, "pad_token_id", None))
    routed = (c.intermediate_size - shared) // experts
    if shared:
        config = transformers.Qwen2MoeConfig(**common, intermediate_size=c.intermediate_size, num_experts=experts,
                                             moe_intermediate_size=routed, shared_expert_intermediate_size=shared,
                                             norm_topk_prob=True, qkv_bias=False, use_sliding_window=False,
                                             mlp_only_layers=[], decoder_sparse_step=1)
        moe = transformers.Qwen2MoeForCausalLM(config).eval()
    else:
        config = transformers.MixtralConfig(**common, intermediate_size=routed, num_local_experts=experts,
                                            head_dim=getattr(c, "head_dim", None), sliding_window=None)
        moe = transformers.MixtralForCausalLM(config).eval()
    sd = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, unexpected = moe.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all(".mlp." in k or k == "lm_head.weight" for k in missing), missing
    groups_per_layer = []
    with torch.no_grad():
        for i, (d, m) in enumerate(zip(dense.model.layers, moe.model.layers)):
            wg, wu, wd = d.mlp.gate_proj.weight, d.mlp.up_proj.weight, d.mlp.down_proj.weight
            shared_idx, groups, router = split_layer(inputs[i], wg, wu, wd, experts, seed + i, shared)
            groups_per_layer.append({"shared": shared_idx.tolist(), "experts": [g.tolist() for g in groups]})
            for e, idx in enumerate(groups):
                m.mlp.experts.gate_up_proj[e].copy_(torch.cat([wg[idx], wu[idx]]))
                m.mlp.experts.down_proj[e].copy_(top_k * wd[:, idx])
            m.mlp.gate.weight.copy_(logit_scale * router)
            if shared:
                m.mlp.shared_expert.gate_proj.weight.copy_(wg[shared_idx])
                m.mlp.shared_expert.up_proj.weight.copy_(wu[shared_idx])
                m.mlp.shared_expert.down_proj.weight.copy_(2 * wd[:, shared_idx])
                m.mlp.shared_expert_gate.weight.zero_()
    if config.tie_word_embeddings:
        moe.tie_weights()
    return moe, groups_per_layer


def expert_use(model, windows: torch.Tensor) -> list[torch.Tensor]:
    """How many calibration tokens each layer's router sends to each expert."""
    counts = []
    hooks = []

    def count(c: torch.Tensor, out) -> None:  # a hook that returned a value would replace the router's output
        c.add_(torch.bincount(out[2].flatten(), minlength=c.numel()))

    for layer in model.model.layers:
        n = layer.mlp.gate.weight.shape[0]
        counts.append(torch.zeros(n, dtype=torch.long))
        hooks.append(layer.mlp.gate.register_forward_hook(lambda m, a, out, c=counts[-1]: count(c, out)))
    with torch.no_grad():
        for start in range(0, windows.shape[0], 2):
            model(windows[start:start + 2])
    for h in hooks:
        h.remove()
    return counts


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--shared", type=int, default=0, help="neurons per layer in an always-on shared expert "
                                                               "(a Qwen2-MoE); 0: a Mixtral, every neuron routed")
    parser.add_argument("--skip-dense", type=float, default=None, help="the dense perplexity, already measured")
    parser.add_argument("--name", default="results", help="results file name")
    parser.add_argument("--calib-windows", type=int, default=16, help="512-token windows of valid.txt (seed 0)")
    parser.add_argument("--fit-tokens", type=int, default=6144, help="calibration tokens per layer for the split")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in <out>/<name>.json (same settings; the rebuilt experts must equal "
                             "the recorded ones) and measure only the missing ones")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from optimum_prune import Pruner, PruningConfig
    from optimum_prune.calibration import get_calibration_data
    from optimum_prune.evaluation import perplexity
    from optimum_prune.loading import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    dense, tokenizer, _ = load_model("smollm2")
    windows = get_calibration_data(str(DATA / "valid.txt"), tokenizer, num_samples=args.calib_windows, seq_len=512,
                                   seed=args.seed)
    test = str(DATA / "test.txt")

    def ppl(model) -> float:
        start = time.perf_counter()
        value = perplexity(model, tokenizer, test, max_windows=args.eval_windows, progress=False).perplexity
        print(f"  perplexity {value:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
        return value

    done: dict[str, dict] = {}
    if args.resume and (out / f"{args.name}.json").exists():
        previous = json.loads((out / f"{args.name}.json").read_text())
        same = ("experts", "top_k", "shared", "calib_windows", "fit_tokens", "eval_windows", "seed")
        changed = [k for k in same if previous["settings"].get(k) != getattr(args, k)]
        if changed:
            raise SystemExit(f"--resume: {out / args.name}.json was measured with other settings: {changed}")
        done = previous["rows"]
        print(f"--resume: rows kept from {args.name}.json: {', '.join(done)}", flush=True)

    inputs = capture_ffn_inputs(dense, windows, args.fit_tokens, args.seed)
    moe, groups = build_moe(dense, inputs, args.experts, args.top_k, args.seed, args.shared)
    del inputs
    if done and previous["expert_neurons"] != groups:
        raise SystemExit("--resume: the rebuilt MoE's experts differ from the recorded ones; rerun without --resume")
    seconds["build"] = round(time.perf_counter() - t0, 1)
    print(f"built {args.experts} experts top-{args.top_k} in {seconds['build']} s", flush=True)

    # self-check: every token to every expert is the dense model (the split itself loses nothing)
    probe = windows[:1, :128]
    check = copy.deepcopy(moe)
    for layer in check.model.layers:  # every expert, each weighted exactly 1/E: down projections x E/k
        layer.mlp.gate.top_k = args.experts
        if hasattr(layer.mlp, "top_k"):
            layer.mlp.top_k = args.experts
        layer.mlp.gate.weight.data.zero_()
        layer.mlp.experts.down_proj.data *= args.experts / args.top_k
    with torch.no_grad():
        all_experts_diff = (check(probe).logits - dense(probe).logits).abs().max().item()
    del check
    print(f"all experts routed vs dense: max logit difference {all_experts_diff:.2e}", flush=True)
    assert all_experts_diff < 1e-3, all_experts_diff

    rows: dict[str, dict] = {}
    print("dense", flush=True)
    rows["dense"] = done["dense"] if "dense" in done else {"perplexity": args.skip_dense or ppl(dense), "params": params(dense),
                     "perplexity_from": "--skip-dense" if args.skip_dense else "measured",
                     "ffn_params_active_per_token": 3 * dense.config.hidden_size * dense.config.intermediate_size
                     * dense.config.num_hidden_layers}
    dense_width = dense.config.intermediate_size
    del dense
    print("moe", flush=True)
    rows["moe"] = {"perplexity": done["moe"]["perplexity"] if "moe" in done else ppl(moe), "params": params(moe), "experts_per_layer": args.experts,
                   "ffn_params_active_per_token": 3 * moe.config.hidden_size * moe.config.num_hidden_layers
                   * (args.shared + args.top_k * (dense_width - args.shared) // args.experts)}
    use = expert_use(moe, windows)
    rows["moe"]["routed_tokens_min_max_share"] = [round(min(float(c.min()) / float(c.sum()) for c in use), 4),
                                                 round(max(float(c.max()) / float(c.sum()) for c in use), 4)]
    if "moe" in done:
        assert rows["moe"]["routed_tokens_min_max_share"] == done["moe"]["routed_tokens_min_max_share"], \
            (rows["moe"], done["moe"])
    write(out, args, moe, all_experts_diff, seconds, rows, groups)

    rng = random.Random(args.seed)
    for ratio in args.ratios:
        n_remove = round(args.experts * ratio)
        tag = f"{round(100 * ratio)}%"
        check_reload = ratio == max(args.ratios)  # every pruned model of the largest ratio is saved and reloaded
        # drawn before any row is skipped, so a resumed run removes the same random experts as a full one
        baselines = {
            "frequency": {i: sorted(torch.argsort(c, stable=True)[:n_remove].tolist()) for i, c in enumerate(use)},
            "random": {i: sorted(rng.sample(range(args.experts), n_remove)) for i in range(len(use))},
        }
        if f"reap {tag}" in done and (not check_reload or "reload" in done[f"reap {tag}"]):
            rows[f"reap {tag}"] = done[f"reap {tag}"]
        else:
            start = time.perf_counter()
            pruner = Pruner(copy.deepcopy(moe), tokenizer)
            pruner.prune(method="reap", experts_ratio=ratio, calibration=windows, num_samples=windows.shape[0],
                         seq_len=windows.shape[1], progress=False)
            reap_seconds = round(time.perf_counter() - start, 1)
            removed = pruner.pruning_config.remove_experts
            print(f"REAP {tag} ({reap_seconds} s)", flush=True)
            rows[f"reap {tag}"] = {"perplexity": ppl(pruner.model), "params": params(pruner.model),
                                   "seconds": reap_seconds, "removed": {str(k): list(v) for k, v in removed.items()}}
            if check_reload:
                rows[f"reap {tag}"]["reload"] = reload_and_generate(pruner, tokenizer, windows)
                print(f"  reload: {rows[f'reap {tag}']['reload']}", flush=True)
            del pruner
            write(out, args, moe, all_experts_diff, seconds, rows, groups)
        for name, remove in baselines.items():
            key = f"{name} {tag}"
            if key in done and (not check_reload or "reload" in done[key]):
                assert done[key]["removed"] == {str(k): v for k, v in remove.items()}, key
                rows[key] = done[key]
                continue
            pruner = Pruner(copy.deepcopy(moe), tokenizer)
            pruner.apply(PruningConfig(remove_experts=remove))
            print(f"{name} {tag}", flush=True)
            rows[key] = {"perplexity": ppl(pruner.model), "params": params(pruner.model),
                         "removed": {str(k): v for k, v in remove.items()}}
            if check_reload:
                rows[key]["reload"] = reload_and_generate(pruner, tokenizer, windows)
                print(f"  reload: {rows[key]['reload']}", flush=True)
            del pruner
            write(out, args, moe, all_experts_diff, seconds, rows, groups)

    write(out, args, moe, all_experts_diff, seconds, rows, groups)
    return 0


def write(out: Path, args, moe, all_experts_diff: float, seconds: dict, rows: dict, groups: list) -> None:
    """results.json and results.md from the rows so far (written after every row: a cut run keeps its rows)."""
    import transformers

    result = {"settings": {**vars(args), "machine": platform.processor() or platform.machine(),
                           "torch": torch.__version__, "transformers": transformers.__version__,
                           "load_average_now": os.getloadavg()},
              "construction": "constructed, not trained: SmolLM2-135M-Instruct's FFNs split by balanced k-means of "
                              "neuron contribution profiles (with --shared: the neurons of largest mean contribution kept in an "
                              "always-on shared expert); router fitted by ridge regression to expert output norms",
              "all_experts_vs_dense_max_logit_diff": all_experts_diff, "seconds": seconds, "rows": rows,
              "expert_neurons": groups}
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    width = getattr(moe.config, "moe_intermediate_size", None) or moe.config.intermediate_size
    shared = f" + a shared expert of {args.shared} neurons" if args.shared else ""
    lines = [f"Constructed MoE (not trained) from SmolLM2-135M-Instruct: {args.experts} experts of "
             f"{width} neurons per layer{shared}, top-{args.top_k}; WikiText-2 test, first "
             f"{args.eval_windows} windows of 512 tokens.", "",
             "| model | experts / layer | parameters | perplexity | vs MoE |", "|---|---:|---:|---:|---:|"]
    base = rows["moe"]["perplexity"] if "moe" in rows else float("nan")
    for name, r in rows.items():
        experts = ("dense FFN" if name == "dense" else args.experts if name == "moe"
                   else args.experts - round(args.experts * float(name.split()[-1][:-1]) / 100))
        lines.append(f"| {name} | {experts} | {r['params']:,} | {r['perplexity']:.2f} | "
                     f"{r['perplexity'] / base:.3f}x |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def reload_and_generate(pruner, tokenizer, windows) -> dict:
    """Save, reload with the plain Auto class: max logit difference, and both models' greedy continuations (a
    failure is recorded as the row's ``reload.error``, so the perplexity already measured is kept)."""
    try:
        return _reload_and_generate(pruner, tokenizer, windows)
    except Exception as exc:  # noqa: BLE001 - recorded in the results, not hidden
        return {"error": f"{type(exc).__name__}: {exc}"}


def _reload_and_generate(pruner, tokenizer, windows) -> dict:
    import transformers

    prompt = tokenizer(["The capital of France is"], return_tensors="pt")
    with tempfile.TemporaryDirectory() as tmp:
        pruner.save_pretrained(tmp)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
        with torch.no_grad():
            diff = (reloaded(windows[:1, :128]).logits - pruner.model(windows[:1, :128]).logits).abs().max().item()
        kwargs = dict(max_new_tokens=12, do_sample=False)
        a = reloaded.generate(**prompt, **kwargs)
        b = pruner.model.generate(**prompt, **kwargs)
    return {"max_logit_diff": diff, "generate_equal": bool(torch.equal(a, b)),
            "continuation": tokenizer.decode(a[0][prompt["input_ids"].shape[1]:])}


if __name__ == "__main__":
    raise SystemExit(main())
