"""The ``optimum-prune`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from .loading import DEFAULT_MODEL, EMBEDDED_MODELS, TASKS


def parse_index_spec(text: str, option: str) -> dict[int, list[int]]:
    """'0:1,2;3:0-63' -> {0: [1, 2], 3: [0..63]}."""
    out: dict[int, list[int]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        layer, sep, items = part.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"{option}: expected LAYER:I,J,... (e.g. '0:1,2;3:0-7'), got {part!r}")
        try:
            indices: list[int] = []
            for item in filter(None, (i.strip() for i in items.split(","))):
                lo, dash, hi = item.partition("-")
                indices += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
            out.setdefault(int(layer), []).extend(indices)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option}: {part!r} is not LAYER:I,J or LAYER:I-J with integers") from None
    return out


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optimum-prune", description="Make transformers models smaller and faster.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    apply = sub.add_parser("apply", help="remove explicit heads / neurons / sublayers / layers, save, verify the reload")
    apply.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"Hub id, directory, .gguf file, or an embedded model ({', '.join(EMBEDDED_MODELS)}); "
                            f"default: {DEFAULT_MODEL}")
    apply.add_argument("--gguf-file", help="GGUF file inside --model's directory or repo")
    apply.add_argument("--task", choices=list(TASKS), help="model head to load (default: from config.json)")
    apply.add_argument("--config", help="a PruningConfig JSON file (original indices)")
    apply.add_argument("--remove-heads", default="", help="query heads per layer, e.g. '0:1,2;3:0-2'")
    apply.add_argument("--remove-neurons", default="", help="FFN neurons per layer, e.g. '4:0-767'")
    apply.add_argument("--drop-attention", type=int, nargs="*", default=[], metavar="LAYER")
    apply.add_argument("--drop-mlp", type=int, nargs="*", default=[], metavar="LAYER")
    apply.add_argument("--drop-layers", type=int, nargs="*", default=[], metavar="LAYER")
    apply.add_argument("--output", required=True, help="directory for the pruned checkpoint")
    apply.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload to this Hub repo")
    apply.add_argument("--no-verify", action="store_true", help="skip reloading the output and comparing logits")

    prune = sub.add_parser("prune", help="ZipLM to measured target speedups, or sparsify with SparseGPT / Wanda / "
                                         "magnitude (optionally scheduled per layer)")
    _model_args(prune)
    prune.add_argument("--method", choices=["ziplm", "layerchop", "evopress", "sparsegpt", "wanda", "magnitude"],
                       help="default: ziplm with --target-speedup, layerchop with --num-layers, else sparsegpt")
    prune.add_argument("--num-layers", type=int, help="LayerChop: how many whole blocks to remove")
    prune.add_argument("--strategy", default="angular", choices=["angular", "block_influence", "last", "evopress"],
                       help="LayerChop: which blocks go (default: the contiguous window of least angular distance)")
    prune.add_argument("--target", choices=["depth", "sparsity"], help="EvoPress: what to search (depth: attention "
                       "and MLP sublayers dropped independently; sparsity: a SparseGPT level per Linear at the "
                       "average --sparsity)")
    prune.add_argument("--drop-ratio", type=float, help="EvoPress depth: fraction of blocks' worth of sublayers")
    prune.add_argument("--generations", type=int, help="EvoPress: generations (default scaled to the problem)")
    prune.add_argument("--state-file", help="EvoPress: search state file; an interrupted search resumes from it")
    prune.add_argument("--level-store", help="EvoPress sparsity: directory of the per-Linear level store (reused)")
    prune.add_argument("--fitness", choices=["kl", "perplexity"], default="kl",
                       help="EvoPress fitness: KL to the dense model (default) or the candidate's calibration perplexity")
    prune.add_argument("--no-recalibrate", action="store_true",
                       help="EvoPress sparsity / bits: keep the model stitched from the level store "
                       "(skip the sequential pass at the chosen levels)")
    prune.add_argument("--target-speedup", type=float, nargs="+", metavar="X",
                       help="ZipLM: one or more speedups (e.g. 1.5 2 3); several targets write OUTPUT/<target>x")
    prune.add_argument("--latency-table", help="ZipLM: a table saved by `optimum-prune latency` (else measured "
                                               "here for --latency-* and cached)")
    prune.add_argument("--latency-batch-size", type=int, default=1)
    prune.add_argument("--latency-seq-len", type=int, default=512)
    prune.add_argument("--latency-mode", choices=["prefill", "decode"], default="prefill")
    prune.add_argument("--threads", type=int, help="ZipLM: CPU threads of the inference environment")
    prune.add_argument("--search-iterations", type=int, default=30, help="ZipLM: randomized refinement steps")
    prune.add_argument("--finetune-data", help="gradual ZipLM: text file or dataset name to fine-tune on between "
                                               "pruning steps (token-level distillation from the dense model)")
    prune.add_argument("--finetune-steps", type=int, default=100, help="gradual ZipLM: optimizer steps per stage")
    prune.add_argument("--stages", type=int, default=3, help="gradual ZipLM: pruning steps up to a single target")
    prune.add_argument("--learning-rate", type=float, default=5e-5, help="gradual ZipLM: fine-tuning learning rate")
    prune.add_argument("--sparsity", type=_per_layer(float), help="fraction, or per layer: '0:0.5,1:0.7'")
    prune.add_argument("--n-m", help="N:M semi-structured sparsity, e.g. 2:4")
    prune.add_argument("--schedule", default="uniform", choices=["uniform", "hessian-kmeans", "owl"],
                       help="spread --sparsity over the layers (budget met exactly)")
    _calibration_args(prune)

    heal = sub.add_parser("heal", help="continued pretraining of a pruned causal LM (LayerChop healing, "
                                       "transformers Trainer)")
    _model_args(heal)
    heal.add_argument("--train-data", required=True, help="text file or dataset name (e.g. fineweb-edu) to train on")
    heal.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    heal.add_argument("--learning-rate", type=float, default=2e-5)
    heal.add_argument("--batch-size", type=int, default=4, help="windows per device and step")
    heal.add_argument("--gradient-accumulation-steps", type=int, default=1)
    heal.add_argument("--seq-len", type=int, default=512, help="tokens per training window")
    heal.add_argument("--num-samples", type=int, help="training windows (default: max steps x batch size)")
    heal.add_argument("--seed", type=int, default=0)
    heal.add_argument("--distill-from", metavar="MODEL",
                      help="dense model to distill from instead of the plain LM loss")
    heal.add_argument("--alpha", type=float, help="with --distill-from: weight of the distillation loss (default 1)")
    heal.add_argument("--checkpoint-dir", help="keep Trainer checkpoints here (every --save-steps)")
    heal.add_argument("--save-steps", type=int, default=500)
    heal.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --checkpoint-dir")
    heal.add_argument("--gradient-checkpointing", action="store_true")
    heal.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    heal.add_argument("--eval-text", help="text file: print the perplexity after healing")

    quant = sub.add_parser("quantize", help="GPTQ-quantize (packed compressed-tensors checkpoint)")
    _model_args(quant)
    quant.add_argument("--bits", type=_per_layer(int), default=4, help="2..8, or per layer: '0:8,1:4,...'")
    quant.add_argument("--group-size", type=int, default=128, help="columns per scale; -1 = per output channel")
    quant.add_argument("--act-order", action="store_true", help="columns by decreasing Hessian diagonal")
    quant.add_argument("--asymmetric", action="store_true", help="asymmetric grid (in-memory only for now)")
    quant.add_argument("--sparsity", type=float, help="also prune with SparseGPT in the same pass")
    quant.add_argument("--method", default="gptq", choices=["gptq", "evopress"],
                       help="evopress: a bit-width per Linear at --average-bits, searched over stored GPTQ levels")
    quant.add_argument("--average-bits", type=float, help="EvoPress: the exact average bit-width (e.g. 3)")
    quant.add_argument("--generations", type=int, help="EvoPress: generations (default scaled to the problem)")
    quant.add_argument("--level-store", help="EvoPress: directory of the per-Linear level store (reused)")
    quant.add_argument("--fitness", choices=["kl", "perplexity"], default="kl",
                       help="EvoPress fitness: KL to the dense model (default) or the candidate's calibration perplexity")
    quant.add_argument("--no-recalibrate", action="store_true",
                       help="EvoPress sparsity / bits: keep the model stitched from the level store "
                       "(skip the sequential pass at the chosen levels)")
    quant.add_argument("--state-file", help="EvoPress: search state file; an interrupted search resumes from it")
    _calibration_args(quant)

    from .evaluation import add_cli as add_eval

    add_eval(sub)

    from .ziplm.latency import add_cli as add_latency

    add_latency(sub)

    show = sub.add_parser("summary", help="print what was removed from a saved pruned model")
    show.add_argument("model", help="directory or Hub id of a pruned model")
    return parser


def _per_layer(kind: type):
    """Parser for '0.5' or '0:0.5,3:0.7' (layer:value pairs)."""

    def parse(text: str):
        if ":" not in text:
            return kind(text)
        out = {}
        for item in filter(None, (t.strip() for t in text.replace(";", ",").split(","))):
            layer, _, value = item.partition(":")
            try:
                out[int(layer)] = kind(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected LAYER:VALUE pairs like '0:0.5,1:0.7', got {item!r}") from None
        return out

    return parse


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"Hub id, directory, .gguf file, or an embedded model ({', '.join(EMBEDDED_MODELS)}); "
                        f"default: {DEFAULT_MODEL}")
    p.add_argument("--gguf-file", help="GGUF file inside --model's directory or repo")
    p.add_argument("--task", choices=list(TASKS), help="model head to load (default: from config.json)")
    p.add_argument("--output", required=True, help="directory for the compressed checkpoint")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload to this Hub repo")


def _calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", help="text file or dataset name (wikitext2, c4, fineweb-edu); default: "
                                         "wikitext2, or text sampled from the model when offline")
    p.add_argument("--num-samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", help="compute device for the current block (default: cuda if available)")
    p.add_argument("--checkpoint-dir", help="resume state; an interrupted run started again continues from it")
    p.add_argument("--eval-text", help="text file: print the perplexity after compression (e.g. wikitext-2/test.txt)")


def _run_options(args: argparse.Namespace) -> dict:
    return dict(calibration=args.calibration, num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed,
                batch_size=args.batch_size, device=args.device, checkpoint_dir=args.checkpoint_dir)


def _finish(session, args: argparse.Namespace, start: float) -> int:
    config = session.pruning_config
    if config.layer_sparsity and len(set(config.layer_sparsity.values())) > 1:
        print("sparsity per layer: " + ", ".join(f"{k}: {v:.3f}" for k, v in config.layer_sparsity.items()))
    for key, value in (config.metrics or {}).items():
        print(f"{key}: {value}")
    if args.eval_text:
        from .evaluation import perplexity

        print(f"perplexity on {args.eval_text}: {perplexity(session.model, session.tokenizer, args.eval_text).perplexity:.3f}")
    out = session.save_pretrained(args.output)
    print(f"saved to {out} ({time.perf_counter() - start:.1f} s)")
    if args.push_to_hub:
        info = session.push_to_hub(args.push_to_hub)
        print(f"pushed to {getattr(info, 'commit_url', args.push_to_hub)}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from . import Pruner

    if args.method == "layerchop" or (args.method is None and args.num_layers is not None):
        if args.num_layers is None:
            print("error: LayerChop needs --num-layers (how many whole blocks to remove)", file=sys.stderr)
            return 2
        start = time.perf_counter()
        pruner = Pruner.from_pretrained(args.model, gguf_file=args.gguf_file, task=args.task)
        pruner.prune("layerchop", num_layers=args.num_layers, strategy=args.strategy, **_run_options(args))
        print(f"dropped layers {pruner.pruning_config.drop_layers} ({args.strategy})")
        return _finish(pruner, args, start)
    if args.method == "evopress":
        start = time.perf_counter()
        pruner = Pruner.from_pretrained(args.model, gguf_file=args.gguf_file, task=args.task)
        settings = {k: v for k, v in (("generations", args.generations), ("state_file", args.state_file),
                                      ("level_store", args.level_store)) if v}
        settings.update(fitness=args.fitness, **({"recalibrate": False} if args.no_recalibrate else {}))
        pruner.prune("evopress", target=args.target, drop_ratio=args.drop_ratio, num_layers=args.num_layers,
                     sparsity=args.sparsity, evopress=settings, **_run_options(args))
        config = pruner.pruning_config
        if args.target == "sparsity":
            search = config.search
            print(f"average sparsity {search['average']:.4g} ({search['fitness_metric']} {search['fitness']:.4g}, "
                  f"{search['final']} model; level store {search['level_store_mib']:.0f} MiB on disk, "
                  f"model {search['model_mib']:.0f} MiB)")
        else:
            print(f"dropped attention {config.drop_attention}, MLP {config.drop_mlp} "
                  f"({config.search['fitness_metric']} {config.search['fitness']:.4g})")
        return _finish(pruner, args, start)
    ziplm = args.method == "ziplm" or (args.method is None and args.target_speedup)
    if not ziplm and args.sparsity is None and not args.n_m:
        print("error: give --sparsity (e.g. 0.5) or --n-m (e.g. 2:4) to sparsify, or --target-speedup (e.g. 1.5 2) "
              "for ZipLM", file=sys.stderr)
        return 2
    start = time.perf_counter()
    pruner = Pruner.from_pretrained(args.model, gguf_file=args.gguf_file, task=args.task)
    if not ziplm:
        pruner.prune(args.method, sparsity=args.sparsity, n_m=args.n_m, schedule=args.schedule, **_run_options(args))
        return _finish(pruner, args, start)
    if not args.target_speedup:
        print("error: ZipLM needs --target-speedup (e.g. 1.5, or several: 1.25 1.5 2)", file=sys.stderr)
        return 2
    latency = dict(batch_size=args.latency_batch_size, seq_len=args.latency_seq_len, mode=args.latency_mode,
                   threads=args.threads)
    targets = args.target_speedup[0] if len(args.target_speedup) == 1 else args.target_speedup
    finetune = None
    if args.finetune_data:
        finetune = dict(train_dataset=args.finetune_data, max_steps=args.finetune_steps, stages=args.stages,
                        learning_rate=args.learning_rate)
    family = pruner.prune("ziplm", target_speedup=targets, latency=latency, finetune=finetune,
                          latency_table=args.latency_table, search_iterations=args.search_iterations,
                          sparsity=args.sparsity, n_m=args.n_m, **_run_options(args))
    if len(args.target_speedup) == 1:  # one target: the Pruner holds the pruned model
        return _finish(pruner, args, start)
    print(family.to_markdown())
    if args.eval_text:
        from .evaluation import perplexity

        for target, member in family.items():
            ppl = perplexity(member.model, member.tokenizer, args.eval_text, progress=False).perplexity
            print(f"{target:g}x: perplexity on {args.eval_text}: {ppl:.3f}")
    paths = family.save_pretrained(args.output)
    print("saved " + ", ".join(str(p) for p in paths.values()) + f" ({time.perf_counter() - start:.1f} s)")
    if args.push_to_hub:
        for target, member in family.items():
            info = member.push_to_hub(f"{args.push_to_hub}-{target:g}x")
            print(f"pushed to {getattr(info, 'commit_url', args.push_to_hub)}")
    return 0


def _heal(args: argparse.Namespace) -> int:
    from . import Pruner

    start = time.perf_counter()
    pruner = Pruner.from_pretrained(args.model, gguf_file=args.gguf_file, task=args.task)
    teacher = Pruner.from_pretrained(args.distill_from).model if args.distill_from else None
    training = dict(gradient_accumulation_steps=args.gradient_accumulation_steps, bf16=args.bf16)
    if args.checkpoint_dir:
        training.update(save_strategy="steps", save_steps=args.save_steps)
    pruner.heal(args.train_data, max_steps=args.max_steps, learning_rate=args.learning_rate,
                per_device_train_batch_size=args.batch_size, seq_len=args.seq_len, num_samples=args.num_samples,
                seed=args.seed, distill_from=teacher, alpha=args.alpha, output_dir=args.checkpoint_dir,
                resume_from_checkpoint=True if args.resume else None,
                gradient_checkpointing=args.gradient_checkpointing, **training)
    return _finish(pruner, args, start)


def _quantize(args: argparse.Namespace) -> int:
    from . import Quantizer

    start = time.perf_counter()
    quantizer = Quantizer.from_pretrained(args.model, gguf_file=args.gguf_file, task=args.task)
    evopress = {k: v for k, v in (("generations", args.generations), ("state_file", args.state_file),
                                  ("level_store", args.level_store)) if v}
    evopress.update(fitness=args.fitness, **({"recalibrate": False} if args.no_recalibrate else {}))
    quantizer.quantize(args.bits, method=args.method, average_bits=args.average_bits,
                       evopress=evopress if args.method == "evopress" else None,
                       group_size=None if args.group_size == -1 else args.group_size,
                       symmetric=not args.asymmetric, act_order=args.act_order, sparsity=args.sparsity,
                       **_run_options(args))
    if args.method == "evopress":
        search = quantizer.pruning_config.search
        print(f"average bits {search['average']:.4g} ({search['fitness_metric']} {search['fitness']:.4g}, "
              f"{search['final']} model; level store "
              f"{search['level_store_mib']:.0f} MiB on disk, model {search['model_mib']:.0f} MiB)")
    print(", ".join(f"{k}: {v}" for k, v in quantizer.quantization.items()))
    return _finish(quantizer, args, start)


def _eval(args: argparse.Namespace) -> int:
    from .evaluation import run_cli

    return run_cli(args)


def _latency(args: argparse.Namespace) -> int:
    from .ziplm.latency import run_cli

    return run_cli(args)


def _apply(args: argparse.Namespace) -> int:
    import torch

    from . import Pruner, PruningConfig

    config = PruningConfig.from_json_file(args.config) if args.config else PruningConfig()
    config = config.merge(PruningConfig(
        remove_heads=parse_index_spec(args.remove_heads, "--remove-heads"),
        remove_neurons=parse_index_spec(args.remove_neurons, "--remove-neurons"),
        drop_attention=args.drop_attention, drop_mlp=args.drop_mlp, drop_layers=args.drop_layers,
    ))
    if config.is_empty:
        print("error: nothing to remove; give --config or --remove-heads/--remove-neurons/--drop-*", file=sys.stderr)
        return 2
    start = time.perf_counter()
    pruner = Pruner.from_pretrained(args.model, gguf_file=args.gguf_file, task=args.task)
    probe = _probe_inputs(pruner)
    pruner.apply(config)
    with torch.no_grad():
        expected = _logits(pruner.model, probe)
    out = pruner.save_pretrained(args.output)
    print(pruner.summary().to_markdown(changed_only=True))
    print(f"\nsaved to {out} ({time.perf_counter() - start:.1f} s)")
    if not args.no_verify:
        from .loading import auto_class, task_of_model

        reloaded = auto_class(task_of_model(pruner.model)).from_pretrained(out).eval()
        with torch.no_grad():
            diff = (_logits(reloaded, probe) - expected).abs().max().item()
        print(f"reloaded with transformers.{type(reloaded).__name__}: max |logit difference| = {diff:.3g}")
        if diff > 1e-4:
            print("error: the reloaded model differs from the pruned one", file=sys.stderr)
            return 1
    if args.push_to_hub:
        info = pruner.push_to_hub(args.push_to_hub)
        print(f"pushed to {getattr(info, 'commit_url', args.push_to_hub)}")
    return 0


def _probe_inputs(pruner) -> dict:
    import torch

    text = "The quick brown fox jumps over the lazy dog."
    if pruner.tokenizer is not None:
        return dict(pruner.tokenizer(text, return_tensors="pt"))
    return {"input_ids": torch.arange(1, 17)[None] % pruner.model.config.vocab_size}


def _logits(model, inputs: dict):
    out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _summary(args: argparse.Namespace) -> int:
    from . import Pruner

    pruner = Pruner.from_pretrained(args.model)
    print(pruner.summary().to_markdown(changed_only=True))
    print("\npruning_config:")
    print(json.dumps(pruner.pruning_config.to_dict(), indent=2, sort_keys=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    from transformers.utils import logging

    logging.set_verbosity_info() if args.verbose else logging.set_verbosity_warning()
    from . import PruningConfigError, UnsupportedArchitectureError
    from .calibration import CalibrationError

    try:
        return {"apply": _apply, "prune": _prune, "heal": _heal, "quantize": _quantize, "eval": _eval,
                "latency": _latency, "summary": _summary}[args.command](args)
    except (PruningConfigError, UnsupportedArchitectureError, argparse.ArgumentTypeError, ImportError,
            CalibrationError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
