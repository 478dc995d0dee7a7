"""The one timer (wall-clock ms of repeated calls after warm-up, CUDA synchronised) and prefill latency.

``measure_latency`` and the latency tables both time through ``time_calls``, so their numbers compare.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .models import accepts, eval_no_grad, max_positions, place

logger = logging.get_logger(__name__)


@dataclass
class LatencyResult:
    """Wall-clock time of one prefill forward pass (no KV cache), over ``repeats`` runs after warm-up."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    warmup: int
    threads: int
    batch_size: int
    seq_len: int
    device: str
    dtype: str


def time_calls(run: Callable[[], Any], *, repeats: int, warmup: int, device: str | torch.device,
               reset: Callable[[], None] | None = None) -> list[float]:
    """Wall-clock ms of ``repeats`` calls of ``run`` after ``warmup`` untimed ones; ``reset`` runs untimed after
    each call. On CUDA the device is synchronised before and after every call, so the time is the work's."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    times = []
    for i in range(warmup + repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = (time.perf_counter() - start) * 1e3
        if reset is not None:
            reset()
        if i >= warmup:
            times.append(elapsed)
    return times


def median_ms(run: Callable[[], Any], *, repeats: int, warmup: int, device: str | torch.device,
              reset: Callable[[], None] | None = None) -> float:
    """Median of ``time_calls``: the steady time of one call of ``run``."""
    return statistics.median(time_calls(run, repeats=repeats, warmup=warmup, device=device, reset=reset))


@contextlib.contextmanager
def pinned_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the block (None: leave it), restored afterwards."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def measure_latency(
    model: nn.Module,
    inputs: dict[str, torch.Tensor] | None = None,
    *,
    batch_size: int = 1,
    seq_len: int = 512,
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    device: str | torch.device | None = None,
) -> LatencyResult:
    """Median wall-clock time of a prefill forward pass (``use_cache=False``), the cost pruning reduces.

    Without ``inputs``, random tokens from a seeded generator ([batch_size, seq_len]). ``threads`` sets
    ``torch.set_num_threads`` during the measurement only.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    run_device = place(model, device)
    if inputs is None:
        limit = max_positions(model)
        if limit is not None and seq_len > limit:
            logger.warning("seq_len %d is beyond the model's max_position_embeddings (%d)", seq_len, limit)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        generator = torch.Generator().manual_seed(0)
        inputs = {"input_ids": torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator),
                  "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long)}
    inputs = {k: v.to(run_device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if "use_cache" not in inputs and accepts(model, "use_cache"):
        inputs["use_cache"] = False
    shape = next((v.shape for k, v in inputs.items() if k in ("input_ids", "inputs_embeds")), None)
    batch, length = (int(shape[0]), int(shape[1])) if shape is not None else (batch_size, seq_len)
    with pinned_threads(threads):
        used_threads = torch.get_num_threads()
        with eval_no_grad(model):
            times = time_calls(lambda: model(**inputs), repeats=repeats, warmup=warmup, device=run_device)
    deciles = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    return LatencyResult(median_ms=statistics.median(times), p10_ms=deciles[0], p90_ms=deciles[-1],
                         repeats=repeats, warmup=warmup, threads=used_threads, batch_size=batch, seq_len=length,
                         device=str(run_device), dtype=str(dtype).replace("torch.", ""))


@dataclass(frozen=True)
class SpeedupMeasurement:
    """A measured speedup and the timings behind it."""

    speedup: float
    """Median over rounds of (dense ms / pruned ms) within the round."""
    dense_ms: float
    pruned_ms: float
    round_speedups: tuple[float, ...]
