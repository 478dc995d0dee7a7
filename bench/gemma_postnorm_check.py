"""Gemma 3 270M, per sublayer: the raw output projection energy ZipLM ranked by (before this fix) vs the energy its
post-norm writes vs the KL to the dense model when the sublayer is dropped (the model's own forward; NW windows of 256
WikiText-2 valid tokens at token offsets 1000, 4000, ..., <bos> first).   python bench/gemma_postnorm_check.py [NW=2] [model dir]"""
import sys, time, json, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import transformers, optimum_prune  # noqa
from optimum_prune.modeling.adapters import get_adapter, get_module
torch.manual_seed(0)
M = sys.argv[2] if len(sys.argv) > 2 else "/tmp/s5/h14/gemma3-270m-hf"
OUT = Path(__file__).resolve().parent / "results" / "ziplm_gemma" / "postnorm_check.json"
model = transformers.AutoModelForCausalLM.from_pretrained(M, dtype=torch.float32).eval()
tok = transformers.AutoTokenizer.from_pretrained(M)
text = open("/work/shared/data/wikitext-2/valid.txt").read()
ids = tok(text[:200000], return_tensors="pt").input_ids[0]
NW, L = int(sys.argv[1]) if len(sys.argv) > 1 else 2, 256
starts = [1000 + i * 3000 for i in range(NW)]
x = torch.stack([ids[s:s + L] for s in starts])
x[:, 0] = tok.bos_token_id
ad = get_adapter(model)
layers = ad.layers(model)
stats = {}
def rec(key):
    def hook(m, a, out):
        y = out.detach().float().reshape(-1, out.shape[-1])
        stats.setdefault(key, []).append(y)
    return hook
hs = []
for i, b in enumerate(layers):
    hs.append(get_module(b, ad.attention_out).register_forward_hook(rec((i, "attention", "y"))))
    hs.append(get_module(b, ad.mlp_out).register_forward_hook(rec((i, "mlp", "y"))))
    hs.append(get_module(b, ad.attention_post_norm(model.config)).register_forward_hook(rec((i, "attention", "z"))))
    hs.append(get_module(b, ad.mlp_post_norm(model.config)).register_forward_hook(rec((i, "mlp", "z"))))
    hs.append(b.register_forward_pre_hook(lambda m, a, k, i=i: stats.setdefault((i, "h"), []).append(
        (a[0] if a else k["hidden_states"]).detach().float().reshape(-1, 640)), with_kwargs=True))
t = time.time()
with torch.no_grad():
    ref = torch.log_softmax(model(x).logits.float(), -1)
for h in hs: h.remove()
print("dense forward", time.time() - t, flush=True)
rows = []
for i in range(len(layers)):
    h = torch.cat(stats[(i, "h")]); scale = float(h.pow(2).sum(-1).median())
    for kind in ("attention", "mlp"):
        y = torch.cat(stats[(i, kind, "y")]); z = torch.cat(stats[(i, kind, "z")])
        norm = get_module(layers[i], getattr(ad, kind + "_post_norm")(model.config))
        with torch.no_grad(): w = norm(torch.full((1, 640), 1e3)).float()[0] * (1e6 + norm.eps) ** 0.5 / 1e3
        r2 = float(y.pow(2).mean())
        raw = float(y.pow(2).sum(-1).mean())         # = 1/2 tr(W H W^T) with H = 2/n sum x x^T
        post = float(z.pow(2).sum(-1).mean())
        gained = float(((w * y) ** 2).sum(-1).mean() / r2)
        exact_t = float((((w * y) ** 2).sum(-1) / y.pow(2).mean(-1)).mean()) / scale
        rms_t = y.pow(2).mean(-1).sqrt()
        rows.append(dict(layer=i, kind=kind, scale=scale, raw=raw / scale, post=post / scale, gained=gained / scale,
                         y_rms=r2 ** 0.5, rms_t_median=float(rms_t.median()), rms_t_max=float(rms_t.max()),
                         w_eff_rms=float(w.pow(2).mean().sqrt()), exact_t=exact_t))
# actual KL when the sublayer is dropped (its raw output zeroed: the post-norm of zeros is zero)
for r in rows:
    mod = get_module(layers[r["layer"]], ad.attention_out if r["kind"] == "attention" else ad.mlp_out)
    hd = mod.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    with torch.no_grad():
        lp = torch.log_softmax(model(x).logits.float(), -1)
    hd.remove()
    r["kl"] = float((ref.exp() * (ref - lp)).sum(-1).mean())
    print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
json.dump(rows, open(str(OUT), "w"), indent=1)
from scipy.stats import spearmanr
kl = [r["kl"] for r in rows]
for key in ("raw", "post", "gained", "exact_t"):
    print(key, "spearman vs KL", spearmanr([r[key] for r in rows], kl).correlation)
