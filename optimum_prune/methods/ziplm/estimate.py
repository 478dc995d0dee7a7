"""How long a ZipLM run will take on this machine, said before the long steps start.

One probe forward of the dense model at the calibration shape gives this machine's speed for this
model; each step is then counted in forwards of the same model (calibration windows, scored
candidates, timed runs) plus the OBS updates of the level database. It is an estimate: a busy
machine takes longer, and it says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ...evaluation.models import max_positions
from ...modeling.adapters import get_adapter

# Costs relative to a plain forward of the same tokens, from runs of SmolLM2-135M on 2 CPU cores (refitted on the
# quick start's phase times, fast preset, idle: table 14 s, level database 55 s, probes 48 s; bench/results/quickstart).
HOOKED_PASS = 3.0
"""The database pass accumulates a Hessian per projection as it forwards the windows."""
OBS_FLOP_RATE = 0.25
"""Greedy OBS updates (rank-one, memory-bound) run at about this fraction of the forward's FLOP rate."""
STACK_OVERHEAD = 0.5
"""Building the random-weight stack for each latency-table level (a stack of at most 16 blocks, timed per block)."""
PROBE_PASS = 2.9
"""A sensitivity probe: the refitted output projection swapped in, then the model run from the probed block on."""
GGUF_WRITE_RATE = 30e6
"""engine="llama.cpp": bytes of GGUF written per second (exports and synthetic table files, random weights included)."""
GGUF_READ_RATE = 2.5e9
"""engine="llama.cpp": weight bytes a decode step streams per second (SmolLM2 f16: 110 ms per token, 1 thread)."""


@dataclass
class ZipLMEstimate:
    """Seconds per step; zero for a step that is skipped (a cached table, a reused database)."""

    table_s: float
    database_s: float
    search_s: float
    measure_s: float
    window_s: float = 0.0
    """The probe: seconds of one forward of one calibration window here."""

    @property
    def total_s(self) -> float:
        return self.table_s + self.database_s + self.search_s + self.measure_s

    def describe(self) -> str:
        parts = [f"{name} {_minutes(s)}" for name, s in (("latency table", self.table_s), ("level database",
                 self.database_s), ("search", self.search_s), ("speedup checks", self.measure_s)) if s > 0]
        return (f"ZipLM will take about {_minutes(self.total_s)} here ({', '.join(parts)}), "
                "judged from one forward of this model; longer if the machine is busy")


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _forward_seconds(model: Any, seq_len: int) -> float:
    """One timed forward of one window of random tokens (after one warm-up), on the model's device."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids.to(device))
        start = time.perf_counter()
        model(input_ids=ids.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return time.perf_counter() - start


def estimate_ziplm(model: Any, config: Any, options: Any, *, table_known: bool, database_known: bool = False,
                   window_seconds: float | None = None) -> ZipLMEstimate:
    """Seconds per step of ZipLM's ``run`` for these settings (``table_known``/``database_known``: skipped steps;
    ``window_seconds``: a forward of one calibration window, measured here when not given)."""
    dims = get_adapter(model).dims(model.config)
    layers = dims.num_layers
    targets = len(config.targets)
    calibration = options.calibration
    given = isinstance(calibration, torch.Tensor) and calibration.dim() == 2  # token ids: their own shape
    samples, seq_len = tuple(calibration.shape) if given else (options.num_samples, options.seq_len)
    probe_len = min(seq_len, max_positions(model) or seq_len)
    t_window = window_seconds or _forward_seconds(model, probe_len) * seq_len / probe_len  # one calibration window
    n_params = sum(p.numel() for p in model.parameters())
    flop_rate = 2 * n_params * seq_len / t_window

    env = dict(config.latency or {})
    env_tokens = env.get("batch_size", 1) * env.get("seq_len", 512)
    t_env = t_window * env_tokens / seq_len  # one timed forward in the latency environment
    repeats = config.latency_repeats
    warmup = 3
    if table_known:
        table = 0.0
    else:
        levels = dims.num_kv_heads * dims.heads_per_group + (config.latency_mlp_levels or 16) + 1
        stack = min(layers, 16) / layers
        table = (warmup + repeats) * t_env * (2 + levels * stack * STACK_OVERHEAD)
    if database_known:
        database = 0.0
    else:
        F, d = dims.intermediate_size, dims.hidden_size
        steps = min(F, config.database_steps)
        obs_flops = layers * 2 * steps * (F * F + d * F)
        database = samples * t_window * HOOKED_PASS + obs_flops / (flop_rate * OBS_FLOP_RATE)
    probes = (layers * config.probe_samples + config.probe_samples) * PROBE_PASS  # 2 per layer, from its block on
    scored = config.search_iterations * config.search_samples + 4 * config.search_samples
    search = (probes + targets * scored) * t_window
    measure = 0.0
    if config.measure_speedup:
        runs_per_check = config.speedup_rounds * 2 * (4 + 2)  # rounds x (dense, pruned) x (repeats + warm-up)
        measure = targets * 2 * runs_per_check * t_env * 0.8  # about two checks per target; pruned runs faster
    if _llamacpp(env):
        table, measure = _llamacpp_costs(config, env, dims, n_params, t_env, table_known)
    return ZipLMEstimate(table, database, search, measure, t_window)


def _llamacpp(env: dict[str, Any]) -> bool:
    from ...evaluation.environment import InferenceEnvironment

    return "engine" in env and InferenceEnvironment(**env).llamacpp


def _llamacpp_costs(config: Any, env: dict[str, Any], dims: Any, n_params: int, t_env: float,
                    table_known: bool) -> tuple[float, float]:
    """engine="llama.cpp": the table writes synthetic GGUF files and times them in rounds; each speedup check
    exports the dense and the pruned model and times both in paired rounds."""
    from ...evaluation.environment import InferenceEnvironment

    environment = InferenceEnvironment(**env)
    per_weight = {"f32": 4.0, "f16": 2.0, "bf16": 2.0}.get(environment.dtype, 5.0)  # quantized: f32, then llama.cpp
    step = (per_weight * n_params / GGUF_READ_RATE * environment.batch_size if environment.mode == "decode"
            else t_env)
    table = 0.0
    if not table_known:
        levels = dims.num_kv_heads * dims.heads_per_group + (config.latency_mlp_levels or 16)
        depth = min(dims.num_layers, 16)
        written = per_weight * n_params * (1 + levels * depth / dims.num_layers / 2)
        table = written / GGUF_WRITE_RATE + config.latency_repeats * (levels + 3) * 4 * step * 0.5
    measure = 0.0
    if config.measure_speedup:
        check = 2 * per_weight * n_params / GGUF_WRITE_RATE + config.speedup_rounds * 2 * (4 + 2) * step * 0.8
        measure = len(config.targets) * 2 * check
    return table, measure


def say(estimate: ZipLMEstimate, logger: Any, preset: str | None = None) -> None:
    """Log the estimate: a warning (seen without -v) when it is a minute or more, naming the fast preset
    when it is not in use."""
    text = estimate.describe()
    if estimate.total_s < 60:
        logger.info(text)
    elif preset is None:
        logger.warning("%s. preset='fast' (--preset fast) sizes a first try to minutes", text)
    else:
        logger.warning(text)


