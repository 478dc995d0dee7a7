"""The README's quick start, timed as a newcomer runs it, plus how fast the package imports and the CLI starts.

    python bench/quickstart.py [--runs 1]

Runs the README's second command exactly as written (a fresh latency-table cache each run, so the table is
measured as on a new machine), and records: wall time, the measured speedup, perplexity before/after,
`python -X importtime -c "import optimum_prune"` total, and `optimum-prune --help` wall time. The 1-minute
load average before and after each step says how busy the machine was, and a reference forward (a random-weight
model of SmolLM2-135M's shapes, 128 tokens, 2 threads, median of 10) timed before and after each run says how fast
the VM itself was: this VM has phases (about 330 ms fast, 520-790 ms slow) with nothing else running in it. Results go to
bench/results/quickstart/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "quickstart"


def readme_command() -> str:
    """The README's second command (the quick start), continuation lines joined, comment dropped."""
    block = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    joined = block.replace("\\\n", " ")
    lines = [line.split("#", 1)[0].strip() for line in joined.splitlines() if line.strip()]
    return lines[1]


def load() -> float:
    return os.getloadavg()[0]


def import_seconds() -> float:
    """Total of `python -X importtime -c "import optimum_prune"` (microseconds of the top-level line)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import optimum_prune"], capture_output=True,
                          text=True, check=True)
    top = [line for line in proc.stderr.splitlines() if line.rstrip().endswith("| optimum_prune")]
    return int(top[-1].split("|")[1]) / 1e6


def help_seconds() -> float:
    exe = Path(sys.executable).with_name("optimum-prune")
    start = time.perf_counter()
    subprocess.run([str(exe), "--help"], capture_output=True, check=True)
    return time.perf_counter() - start


REFERENCE = """
import time, torch, transformers
torch.set_num_threads(2); torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
model, ids, times = transformers.LlamaForCausalLM(config).eval(), torch.randint(0, 49152, (1, 128)), []
with torch.no_grad():
    for _ in range(12):
        start = time.perf_counter(); model(ids); times.append(1000 * (time.perf_counter() - start))
print(sorted(times[2:])[5])
"""


def reference_ms() -> float:
    """Median ms of the reference forward (SmolLM2-135M's shapes, random weights, 128 tokens, 2 threads)."""
    proc = subprocess.run([sys.executable, "-c", REFERENCE], capture_output=True, text=True, check=True)
    return round(float(proc.stdout.split()[-1]), 1)


def run_quickstart(command: str) -> dict:
    """Run the command in the repository root with an empty latency-table cache; parse what it printed."""
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as cache:
        env["OPTIMUM_PRUNE_CACHE"] = cache
        argv = shlex.split(command)
        argv[0] = str(Path(sys.executable).with_name(argv[0]))
        reference_before, load_before = reference_ms(), load()
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    out, err = proc.stdout, proc.stderr
    ppl = re.search(r"dense ([0-9.]+) -> pruned ([0-9.]+) \(([0-9.]+)x\)", out)
    speed = re.search(r"measured_speedup: ([0-9.]+)", out)
    estimate = re.search(r"ZipLM will take about ([^(]+)\(", err)
    return {"returncode": proc.returncode, "wall_s": round(wall, 1), "load_before": load_before, "load_after": load(),
            "reference_ms_before": reference_before, "reference_ms_after": reference_ms(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "measured_speedup": float(speed.group(1)) if speed else None,
            "perplexity_dense": float(ppl.group(1)) if ppl else None,
            "perplexity_pruned": float(ppl.group(2)) if ppl else None,
            "perplexity_ratio": float(ppl.group(3)) if ppl else None,
            "estimate": estimate.group(1).strip() if estimate else None,
            "stdout_tail": out.splitlines()[-12:], "stderr_errors": [line for line in err.splitlines()
                                                                       if line.startswith(("error", "WARNING"))][-5:]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    command = readme_command()
    results = {"command": command, "cpus": os.cpu_count(),
               "import_s": [round(import_seconds(), 3) for _ in range(3)],
               "help_s": [round(help_seconds(), 3) for _ in range(3)],
               "runs": []}
    for _ in range(args.runs):
        results["runs"].append(run_quickstart(command))
        print(json.dumps(results["runs"][-1], indent=2))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
