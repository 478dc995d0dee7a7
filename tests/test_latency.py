"""ZipLM latency tables on tiny random models: levels, arithmetic, caching, decode mode, errors, CLI."""

from __future__ import annotations

import json
import logging
import math
import os
import time

import pytest
import torch
from zoo import FAMILIES

from optimum_prune import get_adapter
from optimum_prune.cli import main
from optimum_prune.evaluation import latency_table as lat, speedup, table_cache
from optimum_prune.evaluation.latency_table import InferenceEnvironment, LatencyTable, get_latency_table, measure_latency_table

FAST = dict(repeats=2, warmup=1, progress=False)
ENV = InferenceEnvironment(seq_len=8, threads=1)


@pytest.fixture(scope="module")
def llama():
    return FAMILIES["llama-gqa"].build()


@pytest.fixture(scope="module")
def llama_table(llama):
    return measure_latency_table(llama, ENV, mlp_levels=3, **FAST)


def expected_attention_levels(model) -> set[tuple[int, int]]:
    dims = get_adapter(model).dims(model.config)
    return {(0, 0)} | {(g, q) for g in range(1, dims.num_kv_heads + 1) for q in range(1, dims.heads_per_group + 1)}


def check_values(table: LatencyTable) -> None:
    times = [*table.attention.values(), *table.mlp.values(), table.rest_ms, table.dense_ms]
    assert all(math.isfinite(t) and t >= 0 for t in times)
    assert table.attention[(0, 0)] == 0.0 and table.mlp[0] == 0.0
    assert all(t > 0 for k, t in table.attention.items() if k != (0, 0))
    assert all(t > 0 for n, t in table.mlp.items() if n)
    assert table.dense_ms > 0


# ------------------------------------------------------------------------------------ measuring


def test_gqa_table_has_every_level(llama, llama_table):
    assert set(llama_table.attention) == {(0, 0), (1, 1), (1, 2), (2, 1), (2, 2)}
    assert set(llama_table.mlp) == {0, 16, 32, 48}
    assert llama_table.num_layers == 4 and llama_table.full_attention == (2, 2) and llama_table.full_mlp == 48
    check_values(llama_table)
    assert llama_table.environment.threads == 1
    assert llama_table.model == lat.model_signature(llama) and "kv_heads=2" in llama_table.model
    assert llama_table.environment_key == ENV.key()


@pytest.mark.parametrize("family", ["llama-mha-tied", "mistral", "qwen2", "qwen3", "opt", "gpt2", "bert", "bert-mlm"])
def test_every_family_gets_every_level(family):
    model = FAMILIES[family].build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = measure_latency_table(model, ENV, mlp_levels=2, **FAST)
    assert set(table.attention) == expected_attention_levels(model)
    assert set(table.mlp) == {0, 24, 48}
    check_values(table)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_mha_levels_are_head_counts():
    table = measure_latency_table(FAMILIES["gpt2"].build(), ENV, mlp_levels=[48], **FAST)
    assert set(table.attention) == {(0, 0), (1, 1), (2, 1), (3, 1), (4, 1)}
    assert table.mlp_grid == [48]


def test_decode_mode_on_a_tiny_llama(llama):
    env = InferenceEnvironment(seq_len=8, mode="decode", threads=1, batch_size=2)
    table = measure_latency_table(llama, env, mlp_levels=2, **FAST)
    assert set(table.attention) == expected_attention_levels(llama)
    check_values(table)
    assert table.environment.mode == "decode" and "mode=decode" in table.environment_key


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_measure_model_ms_times_pruned_models_as_they_are(mode):
    from optimum_prune import Pruner, PruningConfig

    env = InferenceEnvironment(seq_len=8, threads=1, mode=mode)
    pruner = Pruner(FAMILIES["llama-gqa"].build())
    pruner.apply(PruningConfig(remove_heads={0: [0, 1]}, remove_neurons={1: list(range(20))}, drop_attention=[2]))
    before = {k: v.clone() for k, v in pruner.model.state_dict().items()}
    ms = lat.measure_model_ms(pruner.model, env, repeats=2, warmup=1)
    assert math.isfinite(ms) and ms > 0
    assert all(torch.equal(before[k], v) for k, v in pruner.model.state_dict().items())
    with pytest.raises(ValueError, match="move it there first"):
        lat.measure_model_ms(pruner.model, InferenceEnvironment(seq_len=8, dtype="bfloat16"))
    with pytest.raises(ValueError, match="seq_len <= 64"):
        lat.measure_model_ms(pruner.model, InferenceEnvironment(seq_len=100))


def test_bert_decode_is_refused():
    with pytest.raises(ValueError, match="prefill"):
        measure_latency_table(FAMILIES["bert"].build(), InferenceEnvironment(seq_len=8, mode="decode"), **FAST)


def test_seq_len_beyond_the_positions_is_refused(llama):
    with pytest.raises(ValueError, match="seq_len <= 63"):
        measure_latency_table(llama, InferenceEnvironment(seq_len=64, mode="decode"), **FAST)


def test_pruned_model_is_refused():
    from optimum_prune import Pruner, PruningConfig

    pruner = Pruner(FAMILIES["llama-gqa"].build())
    pruner.apply(PruningConfig(remove_neurons={0: [1, 2]}))
    with pytest.raises(ValueError, match="dense model"):
        measure_latency_table(pruner.model, ENV, **FAST)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_refused(llama):
    with pytest.raises(ValueError, match="device='cpu'"):
        measure_latency_table(llama, InferenceEnvironment(device="cuda", seq_len=8), **FAST)


# --------------------------------------------------------------------------------- environment


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(device="tpu"), "'cpu', 'cuda' or 'cuda:N'"),
        (dict(dtype="float64"), "'float32', 'float16' or 'bfloat16'"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(seq_len=-1), "seq_len must be a positive integer"),
        (dict(seq_len=8.0), "seq_len must be a positive integer"),
        (dict(mode="generate"), "'prefill' or 'decode'"),
        (dict(threads=0), "threads must be a positive integer"),
    ],
)
def test_invalid_environment_names_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InferenceEnvironment(**kwargs)


def test_environment_key_and_aliases():
    env = InferenceEnvironment(dtype="bf16", device="CPU")
    assert env.dtype == "bfloat16" and env.device == "cpu" and env.torch_dtype is torch.bfloat16
    key = env.key()
    assert key == env.key() and torch.__version__ in key and "dtype=bfloat16" in key
    assert f"threads={torch.get_num_threads()}" in key and env.resolved().threads == torch.get_num_threads()
    assert InferenceEnvironment(threads=1).key() != InferenceEnvironment(threads=2).key()


def test_mlp_grid():
    grid = lat.mlp_grid(1536)
    assert len(grid) == 16 and grid[0] == 96 and grid[-1] == 1536 and all(n % 8 == 0 for n in grid)
    assert lat.mlp_grid(48, 3) == [16, 32, 48]
    assert lat.mlp_grid(50, [10, 20, 0]) == [10, 20, 50]
    assert lat.mlp_grid(5, 16) == [1, 2, 3, 4, 5]
    assert lat.mlp_grid(1000)[-1] == 1000
    with pytest.raises(ValueError, match="0..48"):
        lat.mlp_grid(48, [64])
    with pytest.raises(ValueError, match="at least 1"):
        lat.mlp_grid(48, 0)


# ---------------------------------------------------------------------------------- arithmetic


def hand_table() -> LatencyTable:
    return LatencyTable(environment=ENV, model="hand", num_layers=2, rest_ms=0.5, dense_ms=9.5,
                        attention={(1, 1): 1.0, (1, 2): 1.5, (2, 1): 1.8, (2, 2): 2.5},
                        mlp={16: 1.0, 32: 1.6, 48: 2.0})


def test_model_ms_and_speedup_arithmetic():
    table = hand_table()
    full = table.dense_levels()
    assert full == [((2, 2), 48), ((2, 2), 48)]
    assert table.model_ms(full) == pytest.approx(0.5 + 2 * (2.5 + 2.0))
    assert table.speedup(full) == pytest.approx(1.0)
    smaller = [((2, 1), 32), ((1, 1), 16)]
    assert table.model_ms(smaller) == pytest.approx(0.5 + 1.8 + 1.6 + 1.0 + 1.0)
    assert table.speedup(smaller) == pytest.approx(9.5 / 5.9)
    assert table.model_ms([((0, 0), 0), ((0, 0), 0)]) == pytest.approx(0.5)
    previous = table.model_ms(full)
    for levels in ([((2, 2), 32)] * 2, [((1, 2), 32)] * 2, [((1, 1), 16)] * 2, [((1, 1), 0)] * 2):
        assert table.model_ms(levels) <= previous
        previous = table.model_ms(levels)
    with pytest.raises(ValueError, match="one .* per layer"):
        table.model_ms(full[:1])


def test_measured_full_levels_reproduce_the_dense_time(llama_table):
    t = llama_table
    (g, q), n = t.full_attention, t.full_mlp
    assert t.speedup(t.dense_levels()) == pytest.approx(
        t.dense_ms / (t.rest_ms + t.num_layers * (t.attention[(g, q)] + t.mlp[n])))


def test_mlp_interpolation_and_lookups():
    table = hand_table()
    assert table.mlp_ms(0) == 0.0 and table.mlp_ms(16) == 1.0 and table.mlp_ms(48) == 2.0
    assert table.mlp_ms(24) == pytest.approx(1.3)
    assert table.mlp_ms(8) == pytest.approx(0.5)
    assert table.mlp_ms(40) == pytest.approx(1.8)
    with pytest.raises(ValueError, match="0..48"):
        table.mlp_ms(49)
    assert table.attention_ms(0, 0) == 0.0 and table.attention_ms(2, 1) == 1.8
    with pytest.raises(ValueError, match="1..2 KV groups"):
        table.attention_ms(3, 1)


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="finite"):
        LatencyTable(environment=ENV, model="x", num_layers=1, rest_ms=0, dense_ms=1,
                     attention={(1, 1): float("nan")}, mlp={4: 1.0})
    with pytest.raises(ValueError, match="missing"):
        LatencyTable.from_dict({"model": "x"})


# ------------------------------------------------------------------- logits on the last positions


def test_logits_to_keep_defaults_to_every_position_and_keys_only_when_set():
    env = InferenceEnvironment(seq_len=8, threads=1)
    assert env.logits_to_keep == 0 and "logits_to_keep" not in env.key()  # tables cached before the field still match
    old = {k: v for k, v in env.to_dict().items() if k != "logits_to_keep"}
    assert InferenceEnvironment(**old) == env == InferenceEnvironment(seq_len=8, threads=1, logits_to_keep=0)
    last = InferenceEnvironment(seq_len=8, threads=1, logits_to_keep=1)
    assert last.key() == env.key() + ";logits_to_keep=1" and InferenceEnvironment(**last.to_dict()) == last
    assert table_cache.latency_table_path(FAMILIES["llama-gqa"].build(), last) != \
        table_cache.latency_table_path(FAMILIES["llama-gqa"].build(), env)
    for kwargs, message in [(dict(logits_to_keep=-1), "must be 0"), (dict(logits_to_keep=True), "must be 0"),
                            (dict(logits_to_keep=9), "exceeds seq_len=8"),
                            (dict(logits_to_keep=1, mode="decode"), "applies to mode='prefill'")]:
        with pytest.raises(ValueError, match=message):
            InferenceEnvironment(seq_len=8, **kwargs)


def _head_positions(model, env) -> list[int]:
    """Positions the LM head saw in each call while ``model`` was timed in ``env``."""
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    try:
        speedup.measure_model_ms(model, env, repeats=2, warmup=1)
    finally:
        hook.remove()
    return seen


def test_prefill_with_logits_to_keep_runs_the_head_on_the_last_positions_only(llama):
    assert _head_positions(llama, InferenceEnvironment(seq_len=8, threads=1)) == [8, 8, 8]
    assert _head_positions(llama, InferenceEnvironment(seq_len=8, threads=1, logits_to_keep=1)) == [1, 1, 1]
    assert _head_positions(llama, InferenceEnvironment(seq_len=8, threads=1, logits_to_keep=3)) == [3, 3, 3]
    table = measure_latency_table(llama, InferenceEnvironment(seq_len=8, threads=1, logits_to_keep=1), mlp_levels=2,
                                  **FAST)
    assert table.environment.logits_to_keep == 1 and table.environment_key.endswith(";logits_to_keep=1")
    assert "logits on the last 1 position(s)" in table.to_text()


def test_logits_to_keep_on_a_model_without_it_names_the_fix():
    bert = FAMILIES["bert"].build()
    with pytest.raises(ValueError, match="no logits_to_keep argument.*logits_to_keep=0"):
        speedup.measure_model_ms(bert, InferenceEnvironment(seq_len=8, threads=1, logits_to_keep=1), repeats=1)


def test_logits_to_keep_flags_come_from_the_environment_field(llama, tmp_path):
    from optimum_prune.cli import build_parser
    from optimum_prune.cli.commands import _configs
    from optimum_prune.methods.ziplm.config import ZipLMConfig

    args = build_parser().parse_args(["prune", "--output", "o", "--target-speedup", "1.5",
                                      "--latency-logits-to-keep", "1"])
    assert _configs("prune", args)[1] == ZipLMConfig(target_speedup=1.5, latency={"logits_to_keep": 1})
    llama.save_pretrained(tmp_path / "m")
    assert main(["latency", "--model", str(tmp_path / "m"), "--seq-len", "8", "--threads", "1", "--logits-to-keep",
                 "1", "--mlp-levels", "2", "--repeats", "2", "--warmup", "1", "--cache-dir", str(tmp_path / "c"),
                 "--output", str(tmp_path / "t.json"), "--no-progress"]) == 0
    assert LatencyTable.load(tmp_path / "t.json").environment.logits_to_keep == 1


# ------------------------------------------------------------------------------ save and cache


def test_save_load_roundtrip(llama_table, tmp_path):
    path = llama_table.save(tmp_path / "sub" / "table.json")
    assert LatencyTable.load(path) == llama_table
    assert [p.name for p in path.parent.iterdir()] == ["table.json"]  # no temporary file left behind
    assert json.loads(path.read_text())["attention"]["2,1"] == llama_table.attention[(2, 1)]
    assert "MLP sublayer" in llama_table.to_text() and "g \\ q" in llama_table.to_text()


def test_get_latency_table_reuses_and_remeasures(llama, tmp_path, monkeypatch, caplog):
    calls = []
    real = lat.measure_latency_table

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(table_cache, "measure_latency_table", counting)
    first = get_latency_table(llama, ENV, cache_dir=tmp_path, mlp_levels=2, **FAST)
    assert len(calls) == 1 and len(list(tmp_path.glob("*.json"))) == 1
    with caplog.at_level(logging.INFO, logger=table_cache.__name__):
        again = get_latency_table(llama, ENV, cache_dir=tmp_path, mlp_levels=2, **FAST)
    assert len(calls) == 1 and again == first
    assert "reusing the latency table" in caplog.text

    get_latency_table(llama, InferenceEnvironment(seq_len=6, threads=1), cache_dir=tmp_path, mlp_levels=2, **FAST)
    assert len(calls) == 2
    get_latency_table(llama, ENV, cache_dir=tmp_path, mlp_levels=3, **FAST)  # another FFN grid
    assert len(calls) == 3
    get_latency_table(llama, ENV, cache_dir=tmp_path, mlp_levels=2, remeasure=True, **FAST)
    assert len(calls) == 4 and len(list(tmp_path.glob("*.json"))) == 3

    path = lat.latency_table_path(llama, ENV, cache_dir=tmp_path, mlp_levels=2)
    path.write_text("{not json")
    get_latency_table(llama, ENV, cache_dir=tmp_path, mlp_levels=2, **FAST)  # corrupt: measured again
    assert len(calls) == 5 and LatencyTable.load(path).model == first.model


def test_cache_dir_honours_the_environment_variable(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMUM_PRUNE_CACHE", str(tmp_path))
    assert lat.default_cache_dir() == tmp_path / "latency"
    get_latency_table(llama, ENV, mlp_levels=[48], **FAST)
    assert len(list((tmp_path / "latency").glob("*.json"))) == 1


# ------------------------------------------------------------------------------------------ CLI


def test_cli_writes_the_table(tmp_path, capsys):
    FAMILIES["llama-gqa"].build().save_pretrained(tmp_path / "dense")
    out = tmp_path / "table.json"
    args = ["latency", "--model", str(tmp_path / "dense"), "--seq-len", "8", "--mlp-levels", "2", "--repeats", "2",
            "--warmup", "1", "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    code = main([*args, "--output", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    table = LatencyTable.load(out)
    assert set(table.attention) == {(0, 0), (1, 1), (1, 2), (2, 1), (2, 2)} and set(table.mlp) == {0, 24, 48}
    assert "attention sublayer" in printed and "dense:" in printed and "measured; cached at" in printed
    assert main(args) == 0
    assert "reused the table cached at" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [(["--mode", "generate"], "'prefill' or 'decode'"),
                                            (["--dtype", "int8"], "'float32', 'float16' or 'bfloat16'")])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    code = main(["latency", "--model", str(tmp_path / "missing"), "--cache-dir", str(tmp_path), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_measure_speedup_pairs_dense_and_pruned_rounds(monkeypatch):
    from optimum_prune import Pruner, PruningConfig

    env = InferenceEnvironment(seq_len=8, threads=1)
    dense = FAMILIES["llama-gqa"].build()
    pruner = Pruner(FAMILIES["llama-gqa"].build())
    pruner.apply(PruningConfig(drop_attention=[0, 1]))
    real = lat.measure_model_ms(dense, env, repeats=2, warmup=1)
    assert math.isfinite(real) and real > 0
    # a machine that slows down 10% every call: a one-off dense timing would read the drift as speedup
    calls = []

    def drifting(model, environment, *, repeats, warmup):
        calls.append(model)
        return (1.1 ** len(calls)) * (2.0 if model is dense else 1.0)

    monkeypatch.setattr(speedup, "measure_model_ms", drifting)
    result = lat.measure_speedup(dense, pruner.model, env, rounds=3, repeats=2, warmup=1)
    assert len(result.round_speedups) == 3 and calls[::2] == [dense] * 3
    assert result.speedup == pytest.approx(2.0 / 1.1)  # within a round only one step of drift
    with pytest.raises(ValueError, match="rounds >= 1"):
        lat.measure_speedup(dense, pruner.model, env, rounds=0)


# ------------------------------------------------------------------------------------ disturbed measurements
class NoisyTimer:
    """Block times proportional to the units kept (ms, large enough to be checked), with injected disturbances."""

    disturbed_passes = 1
    passes = 0

    def __init__(self, model, adapter, env, ids, timing, depth):
        self.dims = adapter.dims(model.config)
        type(self).passes += 1
        self.noisy = type(self).passes <= type(self).disturbed_passes

    def time(self, structure):
        d = self.dims
        heads = d.num_heads - len(structure.remove_heads.get(0, []))
        neurons = d.intermediate_size - len(structure.remove_neurons.get(0, []))
        attention = 0 if 0 in structure.drop_attention else 2.0 * heads
        mlp = 0 if 0 in structure.drop_mlp else 0.5 * neurons
        t = 10.0 + attention + mlp
        if self.noisy and 0 < neurons < d.intermediate_size:
            t -= 40.0  # another process stole the core: a mid-width FFN "costs less than nothing"
        return t


CHECKED = dict(repeats=5, warmup=0, progress=False)  # enough repeats for the disturbance checks


def noisy_machine(monkeypatch, disturbed_passes: int):
    from optimum_prune.evaluation import table_measure

    NoisyTimer.passes, NoisyTimer.disturbed_passes = 0, disturbed_passes
    monkeypatch.setattr(table_measure, "StackTimer", NoisyTimer)
    dense = iter([200.0, 800.0] * disturbed_passes + [200.0, 201.0] * 5)  # before / after each pass
    monkeypatch.setattr(table_measure, "time_model", lambda *a, **k: next(dense))


def test_a_disturbed_latency_table_is_measured_again(llama, monkeypatch, caplog):
    noisy_machine(monkeypatch, disturbed_passes=1)
    with caplog.at_level(logging.WARNING, logger="optimum_prune.evaluation.table_measure"):
        table = measure_latency_table(llama, ENV, mlp_levels=[16, 32, 48], **CHECKED)
    assert NoisyTimer.passes == 2 and "looks disturbed" in caplog.text and "measuring again" in caplog.text
    assert "clearly negative" in caplog.text and "before the table" in caplog.text
    assert table.mlp[16] < table.mlp[32] < table.mlp[48] and table.dense_ms == 201.0


def test_a_latency_table_that_stays_disturbed_is_refused_with_the_busy_machine_message(llama, monkeypatch):
    from optimum_prune.evaluation.latency_table import BusyMachineError

    noisy_machine(monkeypatch, disturbed_passes=5)
    with pytest.raises(BusyMachineError, match="could not be measured steadily in 3 attempts.*machine looks busy"):
        measure_latency_table(llama, ENV, mlp_levels=[16, 32, 48], **CHECKED)
    assert NoisyTimer.passes == 3
    noisy_machine(monkeypatch, disturbed_passes=5)
    table = measure_latency_table(llama, ENV, mlp_levels=[16, 32, 48], check=False, **CHECKED)  # asked not to check
    assert NoisyTimer.passes == 1 and table.mlp[16] > 0
    noisy_machine(monkeypatch, disturbed_passes=5)
    measure_latency_table(llama, ENV, mlp_levels=[16, 32, 48], **FAST)  # 2 repeats: too coarse to judge, unchecked
    assert NoisyTimer.passes == 1


def test_a_reused_table_is_announced_with_its_age_and_environment(llama, tmp_path, caplog):
    get_latency_table(llama, ENV, cache_dir=tmp_path, mlp_levels=2, **FAST)
    with caplog.at_level(logging.WARNING, logger=table_cache.__name__):
        get_latency_table(llama, ENV, cache_dir=tmp_path, mlp_levels=2, **FAST)
    line = [r.getMessage() for r in caplog.records if "reusing" in r.getMessage()]
    assert len(line) == 1 and " ago for cpu float32, batch 1 x " in line[0] and "--remeasure-latency" in line[0]


# ------------------------------------------------------------------------ other work on the cores (CPU meter)
def busy_machine(monkeypatch, others_cores: float) -> None:
    """The kernel's accounting says other processes used ``others_cores`` cores beside ours (on top of our own)."""
    import time

    from optimum_prune.evaluation import contention

    monkeypatch.setattr(contention.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(contention, "MIN_WINDOW_S", 0.0)
    monkeypatch.setattr(contention, "_machine_busy_s",
                        lambda: time.process_time() + others_cores * time.perf_counter())


def test_cpu_meter_reads_the_others_share_of_the_cores(monkeypatch):
    from optimum_prune.evaluation import contention
    from optimum_prune.evaluation.contention import CpuMeter

    monkeypatch.undo()  # the suite switches the meter off (tests/conftest.py): here it reads this machine's /proc/stat
    with CpuMeter() as meter:
        start = time.perf_counter()
        while time.perf_counter() - start < contention.MIN_WINDOW_S * (os.cpu_count() or 1) + 0.05:
            pass
    if meter.share is not None:  # Linux
        share = meter.share  # a busy loop: our one core, or what the machine's other work left us of it
        assert 0 < share.own_cores < 1.1 and share.others_cores >= 0
        assert share.own_cores + share.others_cores < share.cpu_count + 0.2
    with CpuMeter() as meter:
        pass
    assert meter.share is None  # too short a window to count

    busy_machine(monkeypatch, others_cores=1.0)
    with CpuMeter() as meter:
        sum(i * i for i in range(200_000))
    share = meter.share
    assert share.others_cores == pytest.approx(1.0, abs=1e-3) and share.cpu_count == 2
    assert share.contended(threads=2) and not share.contended(threads=1)  # one thread leaves a core for the others
    assert "other processes used 1.00 of the 2 cores" in share.describe()
    busy_machine(monkeypatch, others_cores=0.0)
    with CpuMeter() as meter:
        sum(i * i for i in range(200_000))
    assert meter.share.others_cores == pytest.approx(0.0, abs=1e-3) and not meter.share.contended(threads=2)


def test_a_latency_table_timed_while_other_processes_take_the_cores_is_refused(llama, monkeypatch):
    from optimum_prune.evaluation.latency_table import BusyMachineError

    env = InferenceEnvironment(seq_len=8, threads=2)
    noisy_machine(monkeypatch, disturbed_passes=0)  # the timings themselves look steady
    busy_machine(monkeypatch, others_cores=1.0)
    with pytest.raises(BusyMachineError, match=r"3 attempts.*other processes used [\d.]+ of the 2 cores.*looks busy"):
        measure_latency_table(llama, env, mlp_levels=[16, 32, 48], **CHECKED)
    assert NoisyTimer.passes == 3
    noisy_machine(monkeypatch, disturbed_passes=0)
    busy_machine(monkeypatch, others_cores=0.1)  # a daemon: not enough to take our threads' cores
    table = measure_latency_table(llama, env, mlp_levels=[16, 32, 48], **CHECKED)
    assert NoisyTimer.passes == 1 and table.dense_ms == 201.0


def test_a_slow_first_dense_timing_is_timed_again_not_taken_for_a_disturbance(llama, monkeypatch):
    from optimum_prune.evaluation import table_measure

    noisy_machine(monkeypatch, disturbed_passes=0)
    dense = iter([300.0, 200.0, 204.0])  # slow right after loading, then steady
    monkeypatch.setattr(table_measure, "time_model", lambda *a, **k: next(dense))
    table = measure_latency_table(llama, ENV, mlp_levels=[16, 32, 48], **CHECKED)
    assert NoisyTimer.passes == 1 and table.dense_ms == 200.0
    noisy_machine(monkeypatch, disturbed_passes=0)
    dense = iter([200.0, 300.0, 300.0] + [200.0, 201.0] * 3)  # slower after the table: a drift, measured again
    monkeypatch.setattr(table_measure, "time_model", lambda *a, **k: next(dense))
    measure_latency_table(llama, ENV, mlp_levels=[16, 32, 48], **CHECKED)
    assert NoisyTimer.passes == 2


def test_a_cached_table_is_checked_against_a_fresh_dense_timing(llama, tmp_path, monkeypatch, caplog):
    from optimum_prune.evaluation import table_measure
    from optimum_prune.evaluation.latency_table import BusyMachineError

    noisy_machine(monkeypatch, disturbed_passes=0)
    monkeypatch.setattr(table_measure, "time_model", lambda *a, **k: 600.0)  # cached while other work ran
    first = get_latency_table(llama, ENV, cache_dir=tmp_path, mlp_levels=[16, 32, 48], **CHECKED)
    assert NoisyTimer.passes == 1 and first.dense_ms == 600.0
    monkeypatch.setattr(table_measure, "time_model", lambda *a, **k: 590.0)  # agrees: reused as is
    assert get_latency_table(llama, ENV, cache_dir=tmp_path, mlp_levels=[16, 32, 48], **CHECKED) == first
    assert NoisyTimer.passes == 1
    # the dense model times 3x faster now, so the table is measured again
    timings = iter([201.0, 201.0] + [200.0, 201.0])
    monkeypatch.setattr(table_measure, "time_model", lambda *a, **k: next(timings))
    with caplog.at_level(logging.WARNING):
        again = get_latency_table(llama, ENV, cache_dir=tmp_path, mlp_levels=[16, 32, 48], **CHECKED)
    assert NoisyTimer.passes == 2 and again.dense_ms == 201.0
    assert "timed the dense model at 600 ms, and it times 201 ms now" in caplog.text
    assert "does not match this machine now; measuring it again" in caplog.text
    assert get_latency_table(llama, ENV, cache_dir=tmp_path, mlp_levels=[16, 32, 48], check=False, **CHECKED) == again
    monkeypatch.setattr(table_measure, "time_model", lambda *a, **k: 201.0)
    busy_machine(monkeypatch, others_cores=2.0)  # both cores taken by others, so our one thread waits
    with pytest.raises(BusyMachineError, match=r"^the machine looks busy \(other processes used [\d.]+ of the 2 cores"):
        get_latency_table(llama, ENV, cache_dir=tmp_path, mlp_levels=[16, 32, 48], **CHECKED)
    assert NoisyTimer.passes == 2  # refused before any table work


def test_a_disturbed_speedup_is_measured_again_then_refused(llama, monkeypatch, caplog):
    from optimum_prune.evaluation.latency_table import BusyMachineError

    env = InferenceEnvironment(seq_len=8, threads=2)
    pruned = FAMILIES["llama-gqa"].build()
    rounds: list[tuple[float, float]] = []

    def timings(pairs):
        values = iter([t for pair in pairs for t in pair])
        rounds.clear()

        def measure(model, environment, *, repeats, warmup):
            value = next(values)
            rounds.append(value)
            return value
        monkeypatch.setattr(speedup, "measure_model_ms", measure)

    timings([(20.0, 10.0)] * 3)  # steady: one attempt
    assert lat.measure_speedup(llama, pruned, env, rounds=3).speedup == 2.0 and len(rounds) == 6
    timings([(20.0, 10.0), (30.0, 10.0), (20.0, 12.0)] + [(20.0, 10.0)] * 3)  # rounds disagree, then steady
    with caplog.at_level(logging.WARNING):
        assert lat.measure_speedup(llama, pruned, env, rounds=3).speedup == 2.0
    assert len(rounds) == 12 and "speedups from 1.667x to 3.000x" in caplog.text and "measuring again" in caplog.text
    # uneven in every attempt, no other work on the cores: this machine's noise, the median of all rounds is kept
    timings([(20.0, 10.0), (30.0, 10.0), (20.0, 12.0)] * 2 + [(20.0, 10.0), (20.0, 8.0), (20.0, 12.0)])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = lat.measure_speedup(llama, pruned, env, rounds=3)
    assert len(result.round_speedups) == 9 and result.speedup == 2.0 and len(rounds) == 18
    assert "stayed uneven" in caplog.text and "no other work seen on the cores; the median of all 9 rounds" in caplog.text
    timings([(20.0, 10.0)] * 9)
    busy_machine(monkeypatch, others_cores=1.0)  # steady numbers, but another process took a core of our two
    with pytest.raises(BusyMachineError, match=r"speedup could not be measured steadily in 3 attempts \(other "
                                               r"processes used [\d.]+ of the 2 cores.*--no-measure-speedup"):
        lat.measure_speedup(llama, pruned, env, rounds=3)
    assert len(rounds) == 18
    # busy at first, then free: the busy rounds are dropped, the free ones kept
    from optimum_prune.evaluation import contention

    calls = []

    def busy_then_free() -> float:  # other work on a core during the first attempt (2 reads), none after
        calls.append(1)
        return time.process_time() + (1.0 if len(calls) <= 2 else 0.0) * time.perf_counter()

    monkeypatch.setattr(contention, "_machine_busy_s", busy_then_free)
    timings([(40.0, 10.0)] * 3 + [(20.0, 10.0)] * 3)
    result = lat.measure_speedup(llama, pruned, env, rounds=3)
    assert result.round_speedups == (2.0, 2.0, 2.0) and result.dense_ms == 20.0 and len(calls) == 4
    timings([(2.0, 1.0), (3.0, 1.0), (2.0, 1.2)])  # a few ms: noise-dominated, not judged
    assert lat.measure_speedup(llama, pruned, env, rounds=3).speedup == 2.0
    timings([(20.0, 10.0), (30.0, 10.0), (20.0, 12.0)])
    assert lat.measure_speedup(llama, pruned, env, rounds=3, check=False).speedup == 2.0  # asked not to check
