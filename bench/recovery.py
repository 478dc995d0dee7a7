#!/usr/bin/env python
"""Recovery of pruned SmolLM2-135M against an honest control: every healed row is compared with the dense model
healed with the same data, steps, learning rate and loss.

    python bench/recovery.py                                        # every row, every heal (hours on a CPU)
    python bench/recovery.py --rows ziplm-1.5 --heals oneshot full --steps 40 --label smoke   # a small smoke run
    python bench/recovery.py --data generated                       # heal on text the dense model generates

Rows (``--rows``): ``ziplm-<speedup>`` (one-shot ZipLM, preset "fast", calibrated on ``valid.txt``),
``layerchop-<strategy>`` (``--blocks`` blocks), ``evopress-depth-<ratio>`` (attention / MLP sublayers,
``--generations``). Heals (``--heals``): ``oneshot`` (no training), ``full`` (all weights) and ``lora`` (peft
LoRA adapters, merged back), both with the loss ``--alpha`` (1: distillation from the dense model, 0: plain LM
loss). The control is the dense model healed by the same heal: it runs first, once per heal setting, and a healed
figure is never reported without it (``ratio`` = perplexity / the control's). With alpha=1 the dense model
distilled from itself has zero loss and zero gradient, so its control equals the dense model; it is still run.

Data (``--data``): ``wikitext`` (``valid.txt``: the evaluation's domain, so healing also adapts to it) or
``generated`` (text the dense model samples itself; data-free). Perplexity: the shared WikiText-2 protocol on
``test.txt`` (``--eval-windows`` windows of 512). KL(dense || model) per token on held-out text: generated
text (split "heldout") when ``optimum_prune.generated_text`` is present, else ``test.txt`` windows after the
perplexity windows (``kl_text`` says which). Each row runs in its own process, so ``peak_rss_mib``
(``ru_maxrss``) is that row's peak; pruned models are made once and kept under ``--cache-dir``. Results are
written after every row to ``bench/results/recovery/{results.json,table.md}`` (+ ``recovery.png``); a row
already there with the same settings is not run again (``--force`` re-runs); rows healed with other settings
(``--lr``, ``--steps`` ...) are kept as other rows. ``--checkpoint ROW=PATH`` starts a row from a model pruned
earlier (ZipLM's latency table and speedup checks want a quiet machine, healing does not):

    python bench/recovery.py --rows ziplm-1.5 ziplm-2.0 --checkpoint ziplm-1.5=out/1.5x ziplm-2.0=out/2x ...

A checkpoint row may take any name, so models pruned with other settings stay other rows next to the same
control (e.g. ``--rows ziplm-1.5-default --checkpoint ziplm-1.5-default=out/1.5x``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
OUT = ROOT / "bench" / "results" / "recovery"
HEALS = ("oneshot", "full", "lora")


# ------------------------------------------------------------------------------ settings
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=["ziplm-1.5", "ziplm-2.0", "layerchop-angular",
                                                     "evopress-depth-0.2"])
    parser.add_argument("--heals", nargs="+", choices=HEALS, default=list(HEALS))
    parser.add_argument("--data", choices=["wikitext", "generated"], default="wikitext")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of every heal (control included)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate of full healing")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="learning rate of LoRA healing")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=1.0, help="weight of the distillation loss (0: LM loss)")
    parser.add_argument("--teacher-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="cache the teacher's top-k logits once per data set (when the package has it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blocks", type=int, default=6, help="LayerChop: blocks removed")
    parser.add_argument("--generations", type=int, default=30, help="EvoPress depth search generations")
    parser.add_argument("--calibration-windows", type=int, default=32, help="512-token windows of valid.txt")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--kl-windows", type=int, default=16)
    parser.add_argument("--kl-seq-len", type=int, default=256)
    parser.add_argument("--kl-max-new-tokens", type=int, default=512, help="tokens per held-out generated text")
    parser.add_argument("--kl-gen-batch", type=int, default=8, help="texts sampled at once for the held-out pool")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per row (on a shared 2-core machine two threads spin and run slower)")
    parser.add_argument("--label", default=None, help="e.g. 'smoke': written next to every row and in the table")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--cache-dir", default=os.path.join(os.environ.get("OPTIMUM_PRUNE_CACHE", os.path.expanduser(
        "~/.cache/optimum-prune")), "recovery"), help="pruned models and teacher caches (large, not in git)")
    parser.add_argument("--checkpoint", nargs="*", default=[], metavar="ROW=PATH",
                        help="start ROW from a pruned checkpoint saved earlier (e.g. ziplm-1.5=/tmp/ziplm/1.5x: "
                             "ZipLM pruned on a quiet machine) instead of pruning here")
    parser.add_argument("--force", action="store_true", help="run rows again even if results.json has them")
    parser.add_argument("--table-only", action="store_true", help="only re-render table.md and the plot")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one row in this process
    return parser.parse_args(argv)


def heal_settings(args: argparse.Namespace, heal: str) -> dict | None:
    """Everything a heal's result depends on (a control matches a row when these are equal)."""
    if heal == "oneshot":
        return None
    return {"heal": heal, "data": args.data, "steps": args.steps, "seq_len": args.seq_len,
            "batch_size": args.batch_size, "learning_rate": args.lora_lr if heal == "lora" else args.lr,
            "alpha": args.alpha, "seed": args.seed, **({"lora_r": args.lora_r} if heal == "lora" else {})}


def row_id(row: str, heal: str) -> str:
    return f"{row}/{heal}"


def result_key(args: argparse.Namespace, one: str) -> str:
    """The key of a row in results.json: rows healed with other settings (another learning rate, more steps) are
    other rows, not replacements."""
    settings = heal_settings(args, one.split("/")[1])
    if settings is None:
        return one
    return one + f"@{settings['data']}-{settings['steps']}x{settings['batch_size']}x{settings['seq_len']}" \
                 f"-lr{settings['learning_rate']:g}-alpha{settings['alpha']:g}"


def checkpoints(args: argparse.Namespace) -> dict[str, Path]:
    """``--checkpoint ROW=PATH`` as {row: path}."""
    given = {}
    for item in args.checkpoint:
        row, sep, path = item.partition("=")
        if not sep or not row or not path:
            raise SystemExit(f"--checkpoint takes ROW=PATH (e.g. ziplm-1.5=/tmp/ziplm/1.5x), got {item!r}")
        given[row] = Path(path).resolve()
    return given


# ------------------------------------------------------------------------------ one row (child process)
def make_pruned(row: str, args: argparse.Namespace, dense) -> dict:
    """Prune the dense model as ``row`` says and save it under the cache; returns how it went."""
    from optimum_prune import Pruner

    path = model_dir(row, args)
    info_path = path / "recovery_prune.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    if row in checkpoints(args):  # pruned elsewhere: what its own pruning record says
        config = Pruner.from_pretrained(str(path)).pruning_config
        search = config.search or {}
        return {"model": str(path), "checkpoint": True, "measured_speedup": config.measured_speedup,
                "predicted_speedup": search.get("predicted_speedup"), "method": config.method,
                "structure": {k: getattr(config, k) for k in ("drop_layers", "drop_attention", "drop_mlp")
                              if getattr(config, k, None)}}
    pruner = Pruner.from_pretrained("smollm2")
    calibration = dict(calibration=str(DATA / "valid.txt"), num_samples=args.calibration_windows, seq_len=512)
    start = time.perf_counter()
    if row.startswith("ziplm-"):
        pruner.prune(target_speedup=float(row.split("-", 1)[1]), preset="fast", calibration=str(DATA / "valid.txt"))
    elif row.startswith("layerchop-"):
        pruner.prune(method="layerchop", num_layers=args.blocks, strategy=row.split("-", 1)[1], **calibration)
    elif row.startswith("evopress-depth-"):
        from optimum_prune.methods.evopress.search import EvoPressSettings

        pruner.prune(method="evopress", target="depth", drop_ratio=float(row.rsplit("-", 1)[1]),
                     evopress=EvoPressSettings(generations=args.generations, seed=args.seed,
                                               state_file=str(Path(args.cache_dir) / f"{row}.state.json")),
                     **calibration)
    else:
        raise SystemExit(f"unknown row {row!r}: ziplm-<speedup>, layerchop-<strategy> or evopress-depth-<ratio>")
    seconds = time.perf_counter() - start
    config = pruner.pruning_config
    info = {"model": str(path), "calibration_windows": args.calibration_windows, "prune_seconds": round(seconds, 1),
            "prune_peak_rss_mib": peak_mib(),
            "params": sum(p.numel() for p in pruner.model.parameters()),
            "measured_speedup": getattr(config, "measured_speedup", None),
            "structure": {k: getattr(config, k) for k in ("drop_layers", "drop_attention", "drop_mlp")
                          if getattr(config, k, None)}}
    pruner.save_pretrained(str(path))
    info_path.write_text(json.dumps(info, indent=2))
    return info


def model_dir(row: str, args: argparse.Namespace) -> Path:
    """Where the pruned model of ``row`` is kept: named by everything that made it (or the ``--checkpoint`` given)."""
    if row in checkpoints(args):
        return checkpoints(args)[row]
    if row.startswith("ziplm-"):
        name = f"{row}-fast"
    elif row.startswith("evopress-"):
        name = f"{row}-cal{args.calibration_windows}-gen{args.generations}-seed{args.seed}"
    else:
        name = f"{row}-{args.blocks}blocks-cal{args.calibration_windows}"
    return Path(args.cache_dir) / "models" / name


def model_name(row: str, args: argparse.Namespace) -> str:
    if row in checkpoints(args):
        return str(model_dir(row, args))
    return "dense" if row == "dense" else model_dir(row, args).name


def peak_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def kl_windows(args: argparse.Namespace, dense, tokenizer):
    """Held-out windows for KL to the dense model, and what they are."""
    try:
        from optimum_prune.generated_text import GenerationSettings, generated_windows
    except ImportError:
        from optimum_prune.text import read_text, tokenize_text

        ids = tokenize_text(tokenizer, read_text(str(DATA / "test.txt")))
        start = args.eval_windows * 512  # after the perplexity windows
        n = args.kl_windows * args.kl_seq_len
        return ids.reshape(-1)[start:start + n].view(args.kl_windows, args.kl_seq_len), "wikitext-2 test (held out)"
    windows, _ = generated_windows(dense, tokenizer, args.kl_windows, args.kl_seq_len,
                                   settings=GenerationSettings(split="heldout", seed=args.seed,
                                                               max_new_tokens=args.kl_max_new_tokens,
                                                               batch_size=args.kl_gen_batch),
                                   cache_dir=Path(args.cache_dir) / "generated" / (
                                       f"heldout-{args.kl_max_new_tokens}x{args.kl_gen_batch}-seed{args.seed}"),
                                   progress=False)
    return windows, "generated by the dense model (held-out split)"


def run_one(args: argparse.Namespace) -> dict:
    """One row: load (or make) the model, heal it as asked, measure; prints the result as JSON."""
    import torch

    from optimum_prune import Pruner
    from optimum_prune.evaluation import perplexity
    from optimum_prune.evaluation.kl import kl_divergence
    from optimum_prune.methods.heal.config import HealConfig

    torch.set_num_threads(args.threads)
    row, heal = args.one.split("/")
    dense = Pruner.from_pretrained("smollm2")
    result: dict = {"row": row, "heal": heal, "settings": heal_settings(args, heal), "model": model_name(row, args)}
    if row == "dense":
        pruner = Pruner.from_pretrained("smollm2")
    else:
        result["prune"] = make_pruned(row, args, dense)
        pruner = Pruner.from_pretrained(str(model_dir(row, args)))
    result["params"] = sum(p.numel() for p in pruner.model.parameters())
    start = time.perf_counter()
    if heal != "oneshot":
        fields = {f for f in HealConfig.__dataclass_fields__}
        data = "generated" if args.data == "generated" else str(DATA / "valid.txt")
        kwargs = dict(train_dataset=data, max_steps=args.steps, seq_len=args.seq_len,
                      per_device_train_batch_size=args.batch_size, seed=args.seed, alpha=args.alpha,
                      learning_rate=args.lora_lr if heal == "lora" else args.lr, disable_tqdm=True,
                      logging_steps=max(1, args.steps // 10))
        if args.alpha > 0 or args.data == "generated":
            kwargs["distill_from"] = dense.model
        if args.alpha > 0 and args.teacher_cache and "teacher_cache" in fields:
            windows = f"{args.data}-{args.steps * args.batch_size}x{args.seq_len}-seed{args.seed}"  # same windows
            kwargs["teacher_cache"] = str(Path(args.cache_dir) / "teacher" / windows)
        if heal == "lora":
            kwargs["lora"] = {"r": args.lora_r}
        metrics = pruner.heal(**kwargs)
        recorded = pruner.pruning_config.metrics or {}
        result.update(heal_seconds=round(time.perf_counter() - start, 1),
                      train_loss=metrics.get("train_loss"),
                      train_tokens=args.steps * args.batch_size * args.seq_len,
                      teacher_cache=kwargs.get("teacher_cache") is not None,
                      heal_record={k: v for k, v in recorded.items() if k.startswith("heal_")})
    else:
        result.update(heal_seconds=0.0, train_tokens=0)
    model = pruner.model.eval()
    result["perplexity"] = perplexity(model, pruner.tokenizer, str(DATA / "test.txt"), max_windows=args.eval_windows,
                                      progress=False).perplexity
    windows, kl_text = kl_windows(args, dense.model, dense.tokenizer)
    result["kl"] = kl_divergence(model, dense.model, windows, progress=False)
    result.update(kl_text=f"{kl_text}, {windows.shape[0]} x {windows.shape[1]} tokens", eval_windows=args.eval_windows,
                  peak_rss_mib=peak_mib(), threads=args.threads, label=args.label)
    return result


# ------------------------------------------------------------------------------ the orchestration
def plan(args: argparse.Namespace) -> list[str]:
    """Controls first (dense with every heal asked for), then each pruned row with each heal."""
    return [row_id("dense", h) for h in args.heals] + [row_id(r, h) for r in args.rows for h in args.heals]


def child_argv(args: argparse.Namespace, one: str) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--one", one]
    for key, value in vars(args).items():
        if key in ("one", "force", "rows", "heals", "table_only") or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            argv += [flag, *map(str, value)] if value else []
        else:
            argv += [flag, str(value)]
    return argv


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    if args.table_only:
        write_table(results, out)
        return 0
    for one in plan(args):
        row, heal = one.split("/")
        key = result_key(args, one)
        old = results["rows"].get(key)
        if old and not args.force and old.get("settings") == heal_settings(args, heal) and \
                old.get("eval_windows") == args.eval_windows and old.get("label") == args.label and \
                old.get("model") == model_name(row, args):
            print(f"{one}: kept from {path}", flush=True)
            continue
        print(f"{one}: running", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        start = time.perf_counter()
        proc = subprocess.run(child_argv(args, one), env=env, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{one}: failed (exit {proc.returncode}); rows so far are in {path}", flush=True)
            return 1
        result = json.loads(lines[-1][len("RESULT "):])
        result["row_seconds"] = round(time.perf_counter() - start, 1)
        result["load_average"] = [round(x, 2) for x in os.getloadavg()]
        results["rows"][key] = result
        results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count()}
        path.write_text(json.dumps(results, indent=2))
        write_table(results, out)
        print(f"{one}: perplexity {result['perplexity']:.2f}, KL {result['kl']:.4f}", flush=True)
    return 0


def control_of(results: dict, result: dict) -> dict | None:
    """The dense row healed with exactly this row's heal settings (and measured the same way), if there is one."""
    for other in results["rows"].values():
        if other["row"] == "dense" and other["settings"] == result["settings"] and \
                other["eval_windows"] == result["eval_windows"] and other.get("kl_text") == result.get("kl_text") and \
                other.get("label") == result.get("label"):
            return other
    return None


def write_table(results: dict, out: Path) -> None:
    """table.md (a healed row without its control shows no figures) and the plot."""
    labels = sorted({str(r.get("label")) for r in results["rows"].values() if r.get("label")})
    lines = [f"Rows labeled {', '.join(labels)}: not results of the issue's protocol (see NOTES.md).", ""] \
        if labels else []
    lines += ["| model | params (M) | heal | data | steps | lr | training tokens | perplexity | / control | "
              "KL to dense | heal s | peak MiB | label |",
              "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    points: dict[str, list[tuple[float, float]]] = {}
    for result in results["rows"].values():
        control = control_of(results, result)
        settings = result["settings"] or {}
        head = (f"| {result['row']} | {result['params'] / 1e6:.1f} | {result['heal']} | "
                f"{settings.get('data', '–')} | "
                f"{settings.get('steps', 0)} | {settings.get('learning_rate', '–')} | "
                f"{result['train_tokens']:,} |")
        if control is None:
            lines.append(head + " no control yet | – | – | – | – | " + str(result.get("label") or "") + " |")
            continue
        ratio = result["perplexity"] / control["perplexity"]
        lines.append(head + f" {result['perplexity']:.2f} | {ratio:.3f} | {result['kl']:.4f} | "
                            f"{result['heal_seconds']:.0f} | {result['peak_rss_mib']:.0f} | "
                            f"{result.get('label') or ''} |")
        if result["row"] != "dense":  # one line per heal setting: rows healed at another lr or budget apart
            series = result["heal"] if not settings else (
                f"{result['heal']} {settings['steps']}x{settings['batch_size']}x{settings['seq_len']} "
                f"lr {settings['learning_rate']:g}")
            points.setdefault(series, []).append((float(result["params"]) / 1e6, ratio))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    try:
        from optimum_prune.plotting import plot_tradeoff

        plot_tradeoff(points, out / "recovery.png", x_label="parameters (M)", y_label="perplexity / control",
                      title="SmolLM2-135M: recovery against the dense control", log_y=False, reference=1.0)
    except ImportError:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
