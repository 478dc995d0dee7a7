"""llama.cpp's own quantizer (``llama_model_quantize`` in llama-cpp-python), run in a child process.

A llama.cpp build whose CPU kernels the machine cannot execute dies with SIGILL; in a child process that
becomes a ``LlamaCppCrashError`` naming the signal and the fix, instead of killing the caller.
Run as ``python -m optimum_prune.export.quantize IN.gguf OUT.gguf Q4_K_M``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .plan import GGUFExportError

QUANT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1",
               "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K")
"""llama.cpp file types (``LLAMA_FTYPE_MOSTLY_<name>``) the export offers."""

REBUILD_HINT = ('rebuild llama-cpp-python without native CPU flags: CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install '
                "--no-cache-dir --force-reinstall --no-deps --no-binary llama-cpp-python llama-cpp-python "
                "(--no-cache-dir: pip would reinstall its cached build; docs/gguf.md)")


class LlamaCppCrashError(RuntimeError):
    """The llama.cpp child process died from a signal (SIGILL: its build uses instructions this CPU refuses)."""


def check_quantize_available(qtype: str) -> None:
    """Fail before any work when llama-cpp-python is missing or lacks the requested type."""
    try:
        import llama_cpp
    except ImportError as err:
        raise GGUFExportError(f"dtype {qtype!r} is quantized by llama.cpp's own quantizer: pip install "
                              "llama-cpp-python (or export dtype='f16' and run llama-quantize yourself)") from err
    if not hasattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}"):
        raise GGUFExportError(f"this llama-cpp-python has no file type {qtype!r}; choose one of {', '.join(QUANT_TYPES)}")


def describe_exit(returncode: int) -> str | None:
    """'SIGILL (illegal instruction)' for a child killed by a signal, None for a normal exit."""
    signum = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    if not signum:
        return None
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
    return f"{name} (illegal instruction)" if name == "SIGILL" else name


def run_quantize(src: str | os.PathLike, dst: str | os.PathLike, qtype: str, threads: int = 0) -> None:
    """Quantize the GGUF file ``src`` into ``dst`` with llama.cpp (1-D tensors stay f32, as llama.cpp decides)."""
    cmd = [sys.executable, "-m", "optimum_prune.export.quantize", str(src), str(dst), qtype, str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    crash = describe_exit(proc.returncode)
    if crash:
        hint = f"; {REBUILD_HINT}" if "SIGILL" in crash else ""
        raise LlamaCppCrashError(f"llama.cpp's quantizer died with {crash} while writing {qtype}{hint}")
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise GGUFExportError(f"llama.cpp could not quantize to {qtype}: " + " | ".join(tail))


def _main(src: str, dst: str, qtype: str, threads: str = "0") -> int:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = int(threads)
    status = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if status != 0 or not Path(dst).is_file():
        print(f"llama_model_quantize returned {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(*sys.argv[1:]))
