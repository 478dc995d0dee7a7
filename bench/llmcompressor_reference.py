#!/usr/bin/env python
"""Reference rows: llm-compressor's SparseGPT / GPTQ on *our* calibration windows.

Runs inside the separate venv described in ``bench/requirements-llmcompressor.txt``
(llmcompressor pins transformers / compressed-tensors versions that differ from
the main project).  Standalone: imports only torch, transformers, datasets
(a dependency of llmcompressor), llmcompressor, compressed_tensors and stdlib.

Example::

    /work/llmc-venv/bin/python bench/llmcompressor_reference.py \
        --model /tmp/smollm2-dense --windows /tmp/llmc/windows.pt \
        --recipe sparsegpt50 --output /tmp/llmc/out-sparsegpt50 \
        --json bench/results/llmcompressor/sparsegpt50.json \
        --eval-text ../shared/data/wikitext-2/test.txt

``--windows`` is a LongTensor [num_samples, seq_len] of token ids.  They are fed
to ``llmcompressor.oneshot`` as an already tokenized ``datasets.Dataset``
(``input_ids`` + all-ones ``attention_mask``) with
``num_calibration_samples=num_samples``, ``max_seq_length=seq_len``,
``shuffle_calibration_samples=False`` and batch size 1.  The collator is
llmcompressor's own truncation collator, wrapped so that every batch it emits is
recorded; the script then checks that the batches are exactly the windows (each
window once, unchanged) and writes the result of that check into the JSON.

Recipes
-------
sparsegpt50        SparseGPTModifier(sparsity=0.5, mask_structure="0:0",
                   targets=["Linear"], ignore=["re:.*lm_head"],
                   dampening_frac=0.01, block_size=128)
gptq4g128          GPTQModifier(int4 symmetric, group 128 -- identical to the
                   "W4A16" preset, targets=["Linear"], ignore=["lm_head"],
                   dampening_frac=0.01, block_size=128, actorder=llmc default)
gptq3g128          same with num_bits=3 (custom QuantizationScheme in config_groups)
sparsegpt50_gptq4  both modifiers, in this order, in one oneshot call
dense              no compression (wall_s = 0); only the perplexity is computed

Layers whose input width is not a multiple of the group size (SmolLM2-135M:
hidden 576 = 4.5 x 128, so q/k/v/gate/up/o_proj) are rejected by llm-compressor
0.14 for the "group" strategy (ValueError at initialize; compressed-tensors'
forward also refuses them).  ``--indivisible`` chooses what to do:
  error   keep llmc's behaviour (the run fails on such a model);
  block   use strategy="block" with block_structure=[1, G] for *all* quantized
          layers: per output row, groups of G input columns, ragged last group
          (576 -> 4 x 128 + 1 x 64).  Numerically the same grouping as "group"
          where the width is divisible.  (default)
  ignore  leave the indivisible layers unquantized (llmc's own suggestion).
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata as md
import json
import math
import os
import platform
import resource
import sys
import time
import warnings


def _rss_mib() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


RECIPES = ("sparsegpt50", "gptq4g128", "gptq3g128", "sparsegpt50_gptq4", "dense")


def build_recipe(name: str, model, args):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from llmcompressor.modifiers.quantization import GPTQModifier

    info: dict = {}

    def sgpt():
        info["sparsegpt"] = dict(
            sparsity=0.5,
            mask_structure="0:0",
            targets=["Linear"],
            ignore=["re:.*lm_head"],
            dampening_frac=0.01,
            block_size=128,
        )
        return SparseGPTModifier(**info["sparsegpt"])

    def gptq(bits: int):
        G = args.group_size
        ignore = ["lm_head"]
        indivisible = []
        for n, m in model.named_modules():
            if type(m).__name__ == "Linear" and not n.endswith("lm_head"):
                cols = m.weight.shape[-1]
                if cols >= G and cols % G:
                    indivisible.append(n)
        strategy = "group"
        extra: dict = {"group_size": G}
        if indivisible and args.indivisible == "block":
            strategy = "block"
            extra = {"block_structure": [1, G]}
        elif indivisible and args.indivisible == "ignore":
            ignore = ignore + indivisible
        weights = QuantizationArgs(
            num_bits=bits,
            type="int",
            strategy=strategy,
            symmetric=True,  # llmc default for W4A16 / WnA16 presets
            dynamic=False,
            **extra,
        )
        kw = dict(
            config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
            ignore=ignore,
            dampening_frac=0.01,
            block_size=128,
        )
        info["gptq"] = dict(
            num_bits=bits,
            group_size=G,
            strategy=strategy,
            symmetric=True,
            ignore=ignore if len(ignore) <= 4 else ignore[:1] + [f"... {len(ignore) - 1} indivisible layers"],
            dampening_frac=0.01,
            block_size=128,
            actorder="llmcompressor default (not passed)",
            indivisible_policy=args.indivisible,
            indivisible_layers=len(indivisible),
        )
        return GPTQModifier(**kw)

    if name == "sparsegpt50":
        mods = [sgpt()]
    elif name == "gptq4g128":
        mods = [gptq(4)]
    elif name == "gptq3g128":
        mods = [gptq(3)]
    elif name == "sparsegpt50_gptq4":
        mods = [sgpt(), gptq(4)]
    else:
        raise ValueError(name)
    return mods, info


class RecordingCollator:
    """llmcompressor's own truncation collator, recording what it emits."""

    def __init__(self, max_seq_length: int):
        from llmcompressor.datasets.utils import DataCollatorWithTruncation

        self.inner = DataCollatorWithTruncation(max_seq_length)
        self.batches = []

    def __call__(self, features, return_tensors="pt"):
        out = self.inner(features, return_tensors)
        self.batches.append(out["input_ids"].clone())
        return out


def check_windows(windows, batches) -> dict:
    import torch

    seen = collections.Counter()
    bad_shape = 0
    unknown = 0
    index = {tuple(w.tolist()): i for i, w in enumerate(windows)}
    for b in batches:
        for row in b:
            if row.numel() != windows.shape[1]:
                bad_shape += 1
            key = tuple(row.tolist())
            if key in index:
                seen[index[key]] += 1
            else:
                unknown += 1
    counts = collections.Counter(seen.values())
    missing = sum(1 for i in range(len(windows)) if i not in seen)
    return {
        "collator_calls": len(batches),
        "rows_emitted": int(sum(b.shape[0] for b in batches)),
        "distinct_windows_seen": len(seen),
        "missing_windows": missing,
        "rows_not_matching_any_window": unknown,
        "rows_with_wrong_length": bad_shape,
        "times_seen_histogram": {str(k): v for k, v in sorted(counts.items())},
        "all_windows_used_unchanged": missing == 0 and unknown == 0 and bad_shape == 0,
    }


def weight_stats(model) -> dict:
    import torch

    total = zeros = 0
    per = []
    n_mod = 0
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}" and not n.endswith("lm_head"):
            w = getattr(m, "weight", None)
            if w is None:
                continue
            w = w.detach()
            z = int((w == 0).sum())
            total += w.numel()
            zeros += z
            per.append(z / w.numel())
            n_mod += 1
    return {
        "decoder_linear_modules": n_mod,
        "decoder_linear_zero_fraction": zeros / max(total, 1),
        "decoder_linear_zero_fraction_min": min(per) if per else None,
        "decoder_linear_zero_fraction_max": max(per) if per else None,
    }


def perplexity(model, tokenizer, path: str, seq_len: int = 512, n_windows: int = 40) -> dict:
    """Project convention: whole file as one string, tokenize once, non-overlapping
    512-token windows, mean of the per-window mean NLL (511 predicted positions
    each) over the first 40 windows, ppl = exp."""
    import torch

    with open(path, encoding="utf-8") as f:
        text = f.read()
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n_avail = ids.numel() // seq_len
    n = min(n_windows, n_avail)
    losses = []
    model.eval()
    dev = next(model.parameters()).device
    with torch.no_grad():
        for i in range(n):
            x = ids[i * seq_len : (i + 1) * seq_len].unsqueeze(0).to(dev)
            out = model(input_ids=x, labels=x, use_cache=False)
            losses.append(float(out.loss))
    mean = sum(losses) / len(losses)
    return {
        "perplexity": math.exp(mean),
        "mean_nll": mean,
        "eval_windows": n,
        "eval_seq_len": seq_len,
        "eval_tokens_in_file": int(ids.numel()),
        "eval_text": os.path.abspath(path),
        "eval_text_encoding": "utf-8 (BOM, if any, kept as text)",
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF safetensors checkpoint dir")
    p.add_argument("--windows", required=True, help="LongTensor [N, L] of token ids (torch.save)")
    p.add_argument("--recipe", required=True, choices=RECIPES)
    p.add_argument("--output", help="dir for the compressed model (save_compressed=True)")
    p.add_argument("--json", required=True, help="result JSON path")
    p.add_argument("--eval-text", help="text file for perplexity (e.g. ../shared/data/wikitext-2/test.txt)")
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--indivisible", choices=("error", "block", "ignore"), default="block")
    p.add_argument("--verify-reload", action="store_true",
                   help="reload --output with transformers and recompute perplexity")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    # -- capture warnings (loguru WARNING+ and python warnings) for the JSON
    captured: list[str] = []
    import llmcompressor  # noqa: F401  (configures loguru on import: add our sinks after)
    from loguru import logger

    def _sink(msg):
        r = msg.record
        captured.append(f"{r['level'].name}: {r['message'][:400]}")

    logger.add(_sink, level="WARNING", filter=lambda r: r["level"].name != "METRIC")
    sample_lines: list[str] = []
    logger.add(lambda m: sample_lines.append(m.record["message"]), level="INFO",
               filter=lambda r: "samples" in r["message"] or "Quantizing" in r["message"])
    _orig_showwarning = warnings.showwarning

    def _showwarning(message, category, filename, lineno, file=None, line=None):
        captured.append(f"{category.__name__}: {str(message)[:400]}")
        _orig_showwarning(message, category, filename, lineno, file, line)

    warnings.showwarning = _showwarning

    from transformers import AutoModelForCausalLM, AutoTokenizer

    windows = torch.load(args.windows)
    assert windows.dtype == torch.long and windows.dim() == 2, (windows.dtype, windows.shape)
    num_samples, seq_len = map(int, windows.shape)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    rss_after_load = _rss_mib()

    result: dict = {
        "recipe": args.recipe,
        "model": os.path.abspath(args.model),
        "windows": os.path.abspath(args.windows),
        "num_samples": num_samples,
        "seq_len": seq_len,
        "llmcompressor_version": md.version("llmcompressor"),
        "compressed_tensors_version": md.version("compressed-tensors"),
        "transformers_version": md.version("transformers"),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "host_cpus": os.cpu_count(),
        "peak_rss_mib_after_model_load": round(rss_after_load, 1),
    }

    if args.recipe == "dense":
        result.update(wall_s=0.0, settings={})
        result["peak_rss_mib"] = round(_rss_mib(), 1)
        result["weights"] = weight_stats(model)
    else:
        from datasets import Dataset
        from llmcompressor import oneshot

        ds = Dataset.from_dict(
            {
                "input_ids": windows.tolist(),
                "attention_mask": torch.ones_like(windows).tolist(),
            }
        )
        collator = RecordingCollator(seq_len)
        mods, info = build_recipe(args.recipe, model, args)

        # count what actually reaches the first decoder layer's q_proj
        first_linear = None
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers.0." in f".{n}":
                first_linear = (n, m)
                break
        fl_calls = {"calls": 0, "tokens": 0}

        def _count(_m, inp, _out):
            fl_calls["calls"] += 1
            fl_calls["tokens"] += int(inp[0].shape[:-1].numel())

        h = first_linear[1].register_forward_hook(_count)

        oneshot_kwargs = dict(
            model=model,
            tokenizer=tokenizer,
            dataset=ds,
            recipe=mods,
            num_calibration_samples=num_samples,
            max_seq_length=seq_len,
            shuffle_calibration_samples=False,
            batch_size=1,
            data_collator=collator,
            pipeline="sequential",
        )
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        model = oneshot(**oneshot_kwargs)
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        h.remove()
        result["wall_s"] = round(wall, 2)
        # CPU time of this process during oneshot (less sensitive to other load on
        # a shared machine than wall time) and the 1-min load average around it
        result["oneshot_cpu_s"] = round(
            (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime), 2)
        result["loadavg_1min_before_after"] = [round(load0[0], 2), round(os.getloadavg()[0], 2)]
        result["peak_rss_mib"] = round(_rss_mib(), 1)  # peak up to end of oneshot

        result["settings"] = {
            **info,
            "oneshot": {k: v for k, v in oneshot_kwargs.items()
                        if k not in ("model", "tokenizer", "dataset", "recipe", "data_collator")},
            "data_collator": "llmcompressor DataCollatorWithTruncation (wrapped to record batches)",
        }
        # resolved quantization args actually attached to the modules
        resolved = None
        for n, m in model.named_modules():
            s = getattr(m, "quantization_scheme", None)
            if s is not None and getattr(s, "weights", None) is not None:
                wd = s.weights.model_dump(mode="json")
                resolved = {"example_module": n, **{k: wd.get(k) for k in (
                    "num_bits", "type", "symmetric", "strategy", "group_size",
                    "block_structure", "actorder", "observer", "dynamic")}}
                break
        if resolved is not None:
            result["settings"]["gptq_resolved_weight_args"] = resolved
            if "gptq" in result["settings"]:
                result["settings"]["gptq"]["actorder"] = resolved.get("actorder")
        quantized_modules = sum(
            1 for _, m in model.named_modules()
            if getattr(getattr(m, "quantization_scheme", None), "weights", None) is not None
        )
        result["quantized_modules"] = quantized_modules

        wc = check_windows(windows, collator.batches)
        wc["first_decoder_linear"] = first_linear[0]
        wc["first_decoder_linear_forward_calls"] = fl_calls["calls"]
        wc["first_decoder_linear_tokens"] = fl_calls["tokens"]
        hist = collections.Counter()
        for line in sample_lines:
            if " using " in line and " samples" in line:
                try:
                    hist[int(line.split(" using ")[1].split()[0])] += 1
                except Exception:
                    pass
        if hist:
            wc["sparsegpt_hessian_num_samples_histogram"] = {str(k): v for k, v in hist.items()}
        result["window_check"] = wc
        result["weights"] = weight_stats(model)

    if args.eval_text:
        t0 = time.perf_counter()
        result.update(perplexity(model, tokenizer, args.eval_text, args.eval_seq_len, args.eval_windows))
        result["eval_s"] = round(time.perf_counter() - t0, 2)

    if args.output and args.recipe != "dense":
        t0 = time.perf_counter()
        model.save_pretrained(args.output, save_compressed=True)
        tokenizer.save_pretrained(args.output)
        result["output"] = os.path.abspath(args.output)
        result["save_s"] = round(time.perf_counter() - t0, 2)
        try:
            with open(os.path.join(args.output, "config.json")) as f:
                qc = json.load(f).get("quantization_config") or {}
            result["saved_format"] = qc.get("format")
            result["saved_quant_method"] = qc.get("quant_method")
        except Exception as e:  # pragma: no cover
            result["saved_format"] = f"unreadable: {e}"
        if args.verify_reload and args.eval_text:
            del model
            kw = {}
            if result.get("saved_quant_method") == "compressed-tensors":
                from transformers import CompressedTensorsConfig

                kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
            m2 = AutoModelForCausalLM.from_pretrained(args.output, dtype=torch.float32, **kw)
            result["reload_weights"] = weight_stats(m2)
            r2 = perplexity(m2, tokenizer, args.eval_text, args.eval_seq_len, args.eval_windows)
            result["reload_perplexity"] = r2["perplexity"]
    else:
        result["output"] = None

    result["peak_rss_mib_end"] = round(_rss_mib(), 1)
    # de-duplicate warnings, keep order
    seen = set()
    result["warnings"] = [w for w in captured if not (w in seen or seen.add(w))][:60]

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(json.dumps({k: result.get(k) for k in (
        "recipe", "wall_s", "peak_rss_mib", "perplexity", "reload_perplexity")}, default=str))


if __name__ == "__main__":
    sys.exit(main())
