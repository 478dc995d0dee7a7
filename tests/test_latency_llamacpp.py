"""Latency in llama.cpp (engine="llama.cpp"): the environment, tables timed on synthetic GGUF files, ZipLM."""

from __future__ import annotations

import logging
import math
import subprocess

import pytest
import torch
from zoo import FAMILIES, VOCAB

from optimum_prune import Pruner, get_adapter
from optimum_prune.evaluation import table_cache
from optimum_prune.evaluation.latency_table import (InferenceEnvironment, LatencyTable, get_latency_table,
                                                    latency_table_path, measure_llamacpp_table)

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

ENV = InferenceEnvironment(engine="llama.cpp", mode="decode", seq_len=8, threads=1)
FAST = dict(repeats=2, warmup=0, progress=False)
CALIB = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def llama():
    return FAMILIES["llama-gqa"].build()


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """One table cache for the module: the ZipLM test reuses the table the table test measured."""
    return tmp_path_factory.mktemp("llamacpp_cache")


# ------------------------------------------------------------------------------------ the environment


def test_llamacpp_environment_normalizes_and_validates():
    env = InferenceEnvironment(engine="llama_cpp", dtype="q4_k_m")
    assert (env.engine, env.dtype, env.device, env.llamacpp) == ("llama.cpp", "Q4_K_M", "cpu", True)
    assert InferenceEnvironment(engine="llama.cpp").dtype == "f16"  # llama.cpp's default type
    assert InferenceEnvironment(engine="llama.cpp", dtype="float32").dtype == "f32"
    assert InferenceEnvironment(engine="llama.cpp").resolved().threads >= 1
    cases = [(dict(engine="vllm"), "engine must be 'torch' or 'llama.cpp'"),
             (dict(engine="llama.cpp", dtype="int3"), "one of f32, f16, bf16, Q8_0"),
             (dict(engine="llama.cpp", device="cuda"), "use device='cpu'"),
             (dict(dtype="Q8_0"), "need engine='llama.cpp'"),
             (dict(engine="llama.cpp", threads=0), "threads must be a positive integer")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            InferenceEnvironment(**kwargs)
    with pytest.raises(ValueError, match="not a torch dtype"):
        _ = env.torch_dtype


def test_torch_keys_are_unchanged_by_the_engine_field():
    torch_env = InferenceEnvironment(seq_len=8, threads=1)
    assert torch_env.engine == "torch" and "engine" not in torch_env.key()
    assert torch_env.key().startswith("torch=") and ";dtype=float32;batch=1;seq_len=8;mode=prefill;threads=1" in \
        torch_env.key()
    key = ENV.key()
    assert key.startswith("engine=llama.cpp;llama_cpp=") and ";dtype=f16;" in key and ";mode=decode;" in key
    old = {k: v for k, v in torch_env.to_dict().items() if k != "engine"}  # a table cached before the field
    assert InferenceEnvironment(**old) == torch_env
    assert InferenceEnvironment(**ENV.to_dict()) == ENV


def test_ziplm_config_checks_a_llamacpp_environment_before_the_model_loads():
    from optimum_prune import ZipLMConfig
    from optimum_prune.methods.base import ConfigError

    with pytest.raises(ConfigError, match="latency: .*GGUF type"):
        ZipLMConfig(target_speedup=2.0, latency=dict(engine="llama.cpp", dtype="int3"))


# ------------------------------------------------------------------------------------ tables


def test_llamacpp_table_is_measured_cached_and_reused(llama, cache_root, monkeypatch, caplog):
    calls = []
    real = table_cache.measure_llamacpp_table

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(table_cache, "measure_llamacpp_table", counting)
    tmp_path = cache_root / "latency"
    table = get_latency_table(llama, ENV, cache_dir=tmp_path, mlp_levels=2, **FAST)
    assert len(calls) == 1 and table.environment.engine == "llama.cpp" and table.environment_key == ENV.key()
    assert set(table.attention) == {(0, 0), (1, 1), (1, 2), (2, 1), (2, 2)} and table.mlp_grid == [24, 48]
    times = [*table.attention.values(), *table.mlp.values(), table.rest_ms, table.dense_ms]
    assert all(math.isfinite(t) and t >= 0 for t in times) and table.dense_ms > 0
    assert LatencyTable.from_dict(table.to_dict()).environment == table.environment
    torch_env = InferenceEnvironment(mode="decode", seq_len=8, threads=1)
    assert latency_table_path(llama, ENV, cache_dir=tmp_path, mlp_levels=2) != \
        latency_table_path(llama, torch_env, cache_dir=tmp_path, mlp_levels=2)
    with caplog.at_level(logging.WARNING, logger=table_cache.__name__):
        again = get_latency_table(llama, ENV, cache_dir=tmp_path, mlp_levels=2, **FAST)
    assert len(calls) == 1 and again == table
    line = [r.getMessage() for r in caplog.records if "reusing" in r.getMessage()]
    assert len(line) == 1 and "for llama.cpp cpu f16, batch 1 x 8 tokens, decode" in line[0]
    assert "llama.cpp cpu f16" in table.to_text()


def test_table_files_are_timed_in_groups_that_fit_in_memory(llama, monkeypatch, tmp_path):
    from optimum_prune.evaluation import llamacpp_table
    from optimum_prune.export.synthetic import SyntheticShape

    dims = get_adapter(llama).dims(llama.config)
    probes = llamacpp_table._Probes(tmp_path, ENV, SyntheticShape(32, 8, 64), 4, None)
    levels = [("attention", (g, q)) for g in (1, 2) for q in (1, 2)] + [("mlp", 24), ("mlp", 48)]
    assert llamacpp_table._groups(levels, probes, 10_000, dims, ENV) == [levels]  # all fit: one child process
    monkeypatch.setattr(llamacpp_table, "_available_bytes", lambda: 0)
    assert llamacpp_table._groups(levels, probes, 10_000, dims, ENV) == [[level] for level in levels]
    assert [layer.n_head for layer in probes.layers("attention", (2, 2))] == [1, 4, 4, 4, 4]  # anchor, then D
    assert [layer.n_ff for layer in probes.layers("mlp", 24)] == [32, 24, 24, 24, 24]


def test_a_family_llamacpp_cannot_run_is_refused_before_timing():
    from optimum_prune.export import GGUFExportError

    with pytest.raises(GGUFExportError, match="cannot export 'opt' to GGUF"):
        measure_llamacpp_table(FAMILIES["opt"].build(), ENV, mlp_levels=2, **FAST)


def test_synthetic_files_keep_llamacpp_loadable():
    from optimum_prune.export.plan import LayerPlan
    from optimum_prune.export.synthetic import SyntheticShape, write_synthetic_gguf

    shape = SyntheticShape(hidden_size=32, head_dim=8, context_length=64)
    with pytest.raises(ValueError, match="first layer .* needs attention heads"):
        write_synthetic_gguf("x.gguf", [LayerPlan(0, 0, 0, 32, "none", "full")], shape)
    with pytest.raises(ValueError, match="last layer .* needs an FFN"):
        write_synthetic_gguf("x.gguf", [LayerPlan(0, 2, 1, 0, "full", "zero")], shape)


def test_a_crashing_llamacpp_child_names_the_signal_and_the_rebuild():
    from optimum_prune.evaluation.llamacpp_timing import LlamaCppTimingError, _raise_for
    from optimum_prune.export import LlamaCppCrashError

    with pytest.raises(LlamaCppCrashError, match="SIGILL .*rebuild llama-cpp-python.*--no-cache-dir"):
        _raise_for(subprocess.CompletedProcess([], -4, "", ""), 2)  # pip's cache would reinstall the same build
    with pytest.raises(LlamaCppTimingError, match="could not load"):
        _raise_for(subprocess.CompletedProcess([], 1, "", "llama.cpp could not load x.gguf\n"), 1)


def test_the_timing_child_runs_under_the_child_prefix(llama, tmp_path, monkeypatch):
    """CHILD_PREFIX (e.g. a script that keeps a shared machine quiet) wraps the timing child, which still times."""
    from optimum_prune.evaluation import llamacpp_timing

    path = llamacpp_timing.export_for_timing(llama, tmp_path, ENV)
    marker = tmp_path / "prefix-ran"
    monkeypatch.setattr(llamacpp_timing, "CHILD_PREFIX", ["sh", "-c", 'touch "$0"; exec "$@"', str(marker)])
    ms = llamacpp_timing.time_gguf_files([path], ENV, rounds=2, repeats=1, warmup=0)
    assert marker.is_file()
    assert len(ms) == 2 and all(len(row) == 1 and row[0] > 0 for row in ms)


# ------------------------------------------------------------------------------------ ZipLM


def test_ziplm_timed_in_llamacpp_records_the_engine_and_the_measured_speedup(tmp_path, cache_root, monkeypatch):
    monkeypatch.setenv("OPTIMUM_PRUNE_CACHE", str(cache_root))  # the table measured above, if it ran
    pruner = Pruner(FAMILIES["llama-gqa"].build())
    # tiny models time as noise: measure once, do not re-aim on it (re-aiming is tested in test_ziplm.py)
    pruner.prune(target_speedup=1.5, latency=dict(engine="llama.cpp", mode="decode", seq_len=8, threads=1),
                 calibration=CALIB, search_iterations=0, probe_samples=0, latency_repeats=2, latency_mlp_levels=2,
                 speedup_rounds=1, speedup_tolerance=math.inf, progress=False)
    config = pruner.model.config.pruning_config
    config = config if isinstance(config, dict) else config.to_dict()
    assert config["latency_environment"]["engine"] == "llama.cpp"
    assert config["latency_environment"]["dtype"] == "f16" and config["latency_environment"]["mode"] == "decode"
    assert config["measured_speedup"] is not None and config["measured_speedup"] > 0
    pruner.save_pretrained(tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "engine=llama.cpp" in card and "measured speedup" in card
