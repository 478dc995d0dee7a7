"""Timing GGUF files in llama.cpp (llama-cpp-python), in an InferenceEnvironment with engine="llama.cpp".

Files are timed in a child process (``python -m optimum_prune.evaluation.llamacpp_timing SPEC OUT``): a
llama.cpp build that dies on this CPU (SIGILL) becomes a ``LlamaCppCrashError`` instead of killing the caller,
and llama.cpp's threads and logs stay out of the caller's process. The child loads every file, then times them
in rounds (forward order in even rounds, reversed in odd ones), each file a median of ``repeats`` calls after
``warmup`` untimed ones per round, so that machine drift falls on every file alike (paired rounds).

* decode: ``batch_size`` sequences of ``seq_len`` random tokens are evaluated once (untimed); a timed call
  evaluates one more token per sequence, and the KV cache is cut back to ``seq_len`` after each call.
* prefill: a timed call evaluates ``batch_size`` x ``seq_len`` tokens from an empty cache (cleared after it).

Contexts use llama.cpp's default settings (flash attention, KV types) except the sizes and threads, and logits
are computed for the last token of each sequence, as generation does.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .environment import InferenceEnvironment
    from .timing import SpeedupMeasurement

MAX_UBATCH = 512
"""llama.cpp's default physical batch: longer prefills run as several of these, as llama.cpp runs them."""
CHILD_PREFIX: list[str] = []
"""A command every timing child runs under (e.g. ``["taskset", "-c", "1"]``, or a script that keeps a shared
machine quiet while it runs); empty by default. ``bench/ziplm_llamacpp.py --timing-prefix`` sets it."""


class LlamaCppTimingError(RuntimeError):
    """llama.cpp could not load or run a file being timed (the message carries llama.cpp's last log lines)."""


def time_gguf_files(paths: Sequence[str | os.PathLike], environment: InferenceEnvironment, *, rounds: int = 5,
                    repeats: int = 4, warmup: int = 2, preheat: int = 1, seed: int = 0) -> list[list[float]]:
    """Median ms of one call of each file, per round: ``result[round][file]`` (see the module docstring);
    ``preheat`` untimed calls of each file once after loading, ``warmup`` more before each round's timed ones."""
    env = environment.resolved()
    if not env.llamacpp:
        raise ValueError(f"time_gguf_files times in llama.cpp; the environment's engine is {env.engine!r}")
    if rounds < 1 or repeats < 1 or warmup < 0 or preheat < 0:
        raise ValueError(f"need rounds >= 1, repeats >= 1, warmup >= 0 and preheat >= 0, got {rounds}, {repeats}, "
                         f"{warmup}, {preheat}")
    env.check_available()
    files = [str(Path(p).resolve()) for p in paths]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"no GGUF file at {missing[0]}")
    spec = {"files": files, "mode": env.mode, "batch_size": env.batch_size, "seq_len": env.seq_len,
            "threads": env.threads, "rounds": rounds, "repeats": repeats, "warmup": warmup, "preheat": preheat,
            "seed": seed}
    with tempfile.TemporaryDirectory(prefix="optimum_prune_llamacpp_") as work:
        spec_path, out_path = Path(work) / "spec.json", Path(work) / "times.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        proc = subprocess.run([*CHILD_PREFIX, sys.executable, "-m", __name__, str(spec_path), str(out_path)],
                              capture_output=True, text=True)
        _raise_for(proc, len(files))
        return json.loads(out_path.read_text(encoding="utf-8"))["ms"]


def _raise_for(proc: subprocess.CompletedProcess, count: int) -> None:
    """A crash or failure of the timing child, as an error naming it (and the rebuild hint for SIGILL)."""
    from ..export.quantize import REBUILD_HINT, LlamaCppCrashError, describe_exit

    crash = describe_exit(proc.returncode)
    if crash:
        hint = f"; {REBUILD_HINT}" if "SIGILL" in crash else ""
        raise LlamaCppCrashError(f"llama.cpp died with {crash} while timing {count} GGUF file(s){hint}")
    if proc.returncode != 0:
        tail = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()][-4:]
        raise LlamaCppTimingError("llama.cpp could not time the GGUF file(s): " + " | ".join(tail))


@contextmanager
def _quiet_vocab():
    """The export's 'placeholder vocabulary' warning is noise for a file that is only timed."""
    log = logging.getLogger("optimum_prune.export.vocab")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def export_for_timing(model: Any, directory: str | os.PathLike, environment: InferenceEnvironment,
                      name: str = "model") -> Path:
    """``model`` exported to ``directory/name.gguf`` in the environment's GGUF type (what llama.cpp will run)."""
    from ..export import export_gguf

    with _quiet_vocab():
        return export_gguf(model, Path(directory) / f"{name}.gguf", dtype=environment.dtype).path


def gguf_speedup(dense_path: str | os.PathLike, pruned_path: str | os.PathLike, environment: InferenceEnvironment,
                 *, rounds: int = 5, repeats: int = 4, warmup: int = 2) -> SpeedupMeasurement:
    """Speedup of one GGUF file over another in llama.cpp: the median over paired rounds of dense ms / pruned ms."""
    from .timing import SpeedupMeasurement

    ms = time_gguf_files([dense_path, pruned_path], environment, rounds=rounds, repeats=repeats, warmup=warmup)
    ratios = [d / p for d, p in ms]
    return SpeedupMeasurement(statistics.median(ratios), statistics.median(d for d, _ in ms),
                              statistics.median(p for _, p in ms), tuple(ratios))


def measure_gguf_speedup(dense: Any, pruned: Any, environment: InferenceEnvironment, *, rounds: int = 5,
                         repeats: int = 4, warmup: int = 2) -> SpeedupMeasurement:
    """Speedup of ``pruned`` over ``dense`` (transformers models) as llama.cpp runs their GGUF exports, in paired
    rounds; the files are exported to a temporary directory in the environment's type and removed after."""
    with tempfile.TemporaryDirectory(prefix="optimum_prune_speedup_") as work:
        dense_path = export_for_timing(dense, work, environment, "dense")
        pruned_path = export_for_timing(pruned, work, environment, "pruned")
        return gguf_speedup(dense_path, pruned_path, environment, rounds=rounds, repeats=repeats, warmup=warmup)


def measure_gguf_model_ms(model: Any, environment: InferenceEnvironment, *, repeats: int = 20,
                          warmup: int = 3) -> float:
    """Median ms of one call (prefill, or one decode step) of ``model``'s GGUF export in llama.cpp."""
    with tempfile.TemporaryDirectory(prefix="optimum_prune_timing_") as work:
        path = export_for_timing(model, work, environment)
        return time_gguf_files([path], environment, rounds=1, repeats=repeats, warmup=warmup)[0][0]


# ------------------------------------------------------------------------------------------- the child


class _TimedFile:
    """One GGUF file loaded in llama.cpp with a context and a batch shaped for the environment."""

    def __init__(self, llama_cpp: Any, path: str, spec: dict[str, Any]) -> None:
        import random

        self.lib = llama_cpp
        self.path = path
        batch, length = spec["batch_size"], spec["seq_len"]
        self.decode = spec["mode"] == "decode"
        self.length = length
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise LlamaCppTimingError(f"llama.cpp could not load {path}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = batch * (length + 1)
        params.n_batch = batch * length
        params.n_ubatch = min(params.n_batch, MAX_UBATCH)
        params.n_seq_max = batch
        params.n_threads = params.n_threads_batch = spec["threads"]
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise LlamaCppTimingError(f"llama.cpp could not create a context for {path} (n_ctx {params.n_ctx})")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        rng = random.Random(spec["seed"])
        self.tokens = [[rng.randrange(n_vocab) for _ in range(length + 1)] for _ in range(batch)]
        self.batch = llama_cpp.llama_batch_init(batch * length, 0, batch)
        if self.decode:
            self._fill(0, length)
            self._run()  # the KV cache every timed step attends to
            self._fill(length, 1)
        else:
            self._fill(0, length)

    def _fill(self, start: int, count: int) -> None:
        """Positions start..start+count-1 of every sequence; logits for each sequence's last token only."""
        b, n = self.batch, 0
        for seq, tokens in enumerate(self.tokens):
            for i in range(count):
                b.token[n], b.pos[n], b.n_seq_id[n] = tokens[start + i], start + i, 1
                b.seq_id[n][0] = seq
                b.logits[n] = i == count - 1
                n += 1
        b.n_tokens = n

    def _run(self) -> None:
        status = self.lib.llama_decode(self.ctx, self.batch)
        if status != 0:
            raise LlamaCppTimingError(f"llama_decode returned {status} for {self.path}")
        self.lib.llama_synchronize(self.ctx)

    def _reset(self) -> None:
        if self.decode:
            self.lib.llama_memory_seq_rm(self.memory, -1, self.length, -1)
        else:
            self.lib.llama_memory_clear(self.memory, True)

    def median_ms(self, repeats: int, warmup: int) -> float:
        times = []
        for i in range(warmup + repeats):
            start = time.perf_counter()
            self._run()
            elapsed = (time.perf_counter() - start) * 1e3
            self._reset()
            if i >= warmup:
                times.append(elapsed)
        return statistics.median(times)

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def _child(spec_path: str, out_path: str) -> int:
    import llama_cpp

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
    if not os.environ.get("OPTIMUM_PRUNE_LLAMACPP_LOG"):
        llama_cpp.llama_log_set(quiet, None)
    llama_cpp.llama_backend_init()
    timed = []
    try:
        for path in spec["files"]:
            timed.append(_TimedFile(llama_cpp, path, spec))
            timed[-1].median_ms(1, spec["preheat"])  # first-call allocations, caches
        ms = []
        for r in range(spec["rounds"]):
            order = list(range(len(timed))) if r % 2 == 0 else list(reversed(range(len(timed))))
            row = [0.0] * len(timed)
            for i in order:
                row[i] = timed[i].median_ms(spec["repeats"], spec["warmup"])
            ms.append(row)
    except LlamaCppTimingError as err:
        print(err, file=sys.stderr)
        return 1
    finally:
        for item in timed:
            item.close()
    Path(out_path).write_text(json.dumps({"ms": ms}), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_child(*sys.argv[1:3]))
