"""The fast preset sizes ZipLM for a first try on a CPU; the CLI shows before/after figures and how to reload."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from optimum_prune import ConfigError, RunConfig, ZipLMConfig
from test_ziplm import proportional_table
from zoo import FAMILIES, char_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 40


def test_fast_preset_fills_the_defaults_and_explicit_settings_win():
    config = ZipLMConfig(target_speedup=1.25, preset="fast", search_iterations=12, latency={"batch_size": 2})
    assert config.search_iterations == 12  # given
    assert config.search_samples == 2 and config.latency_mlp_levels == 8 and config.latency_repeats == 5
    assert config.probe_samples == 1 and config.speedup_rounds == 3 and config.database_steps == 128
    assert config.speedup_tolerance == 0.05 and ZipLMConfig(
        target_speedup=1.25, preset="fast", speedup_tolerance=0.02).speedup_tolerance == 0.02
    assert config.latency == {"seq_len": 128, "batch_size": 2}
    run = config.run_settings(RunConfig())
    assert (run.num_samples, run.seq_len) == (32, 256)
    assert config.run_settings(RunConfig(num_samples=64)).num_samples == 64
    assert ZipLMConfig.from_dict(config.to_dict()) == config  # recorded resolved: re-runs the same
    plain = ZipLMConfig(target_speedup=1.25)
    assert plain.search_iterations == 30 and plain.run_settings(RunConfig()).num_samples == 128


def test_unknown_preset_and_bad_table_settings_fail_on_construction():
    with pytest.raises(ConfigError, match="preset"):
        ZipLMConfig(target_speedup=1.25, preset="turbo")
    with pytest.raises(ConfigError, match="latency_repeats"):
        ZipLMConfig(target_speedup=1.25, latency_repeats=0)
    with pytest.raises(ConfigError, match="latency_mlp_levels"):
        ZipLMConfig(target_speedup=1.25, latency_mlp_levels=-2)
    with pytest.raises(ConfigError, match="not a file"):
        ZipLMConfig(target_speedup=1.25, latency_table="/nonexistent/table.json")


def test_cli_fast_preset_prints_before_after_estimate_and_reload(tmp_path, capsys):
    from optimum_prune.cli import main

    model = FAMILIES["llama-gqa"].build()
    model.save_pretrained(tmp_path / "dense")
    char_tokenizer().save_pretrained(tmp_path / "dense")
    (tmp_path / "text.txt").write_text(TEXT)
    proportional_table(model).save(tmp_path / "table.json")  # tiny-model timings are noise: a fixed table
    out_dir = tmp_path / "out"
    code = main(["prune", "--model", str(tmp_path / "dense"), "--target-speedup", "1.25", "--preset", "fast",
                 "--seq-len", "32", "--latency-table", str(tmp_path / "table.json"),
                 "--calibration", str(tmp_path / "text.txt"),
                 "--eval-text", str(tmp_path / "text.txt"), "--eval-windows", "2", "--prompt", "the quick",
                 "--max-new-tokens", "4", "--output", str(out_dir)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = captured.out
    assert "perplexity on 2 windows" in out and "dense" in out and "-> pruned" in out
    assert "prompt: 'the quick'" in out and "  dense:  " in out and "  pruned: " in out
    reload_line = next(line for line in out.splitlines() if line.startswith("reload: python -c "))
    assert "AutoModelForCausalLM" in reload_line and str(out_dir) in reload_line
    recorded = json.loads((out_dir / "config.json").read_text())["pruning_config"]["recipe"][-1]
    assert recorded["preset"] == "fast" and recorded["search_samples"] == 2 and recorded["latency_mlp_levels"] == 8
    assert recorded["run"]["num_samples"] == 32 and recorded["run"]["seq_len"] == 32  # --seq-len given: it wins
    # the printed command reloads the checkpoint in a fresh interpreter
    command = shlex.split(reload_line[len("reload: "):])
    assert command[:2] == ["python", "-c"]
    proc = subprocess.run([sys.executable, "-c", command[2]], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_estimate_counts_the_steps_this_run_will_take(caplog):
    import logging

    from optimum_prune.methods.ziplm.estimate import estimate_ziplm, say

    model = FAMILIES["llama-gqa"].build()
    fast = ZipLMConfig(target_speedup=1.25, preset="fast")
    run = fast.run_settings(RunConfig(seq_len=32))
    est = estimate_ziplm(model, fast, run, table_known=False)
    assert min(est.table_s, est.database_s, est.search_s, est.measure_s) > 0
    assert est.total_s == pytest.approx(est.table_s + est.database_s + est.search_s + est.measure_s)
    assert est.window_s > 0
    same = dict(window_seconds=est.window_s)  # one probe for every comparison: estimates scale with the settings
    assert estimate_ziplm(model, fast, run, table_known=False, **same) == est
    assert estimate_ziplm(model, fast, run, table_known=True, **same).table_s == 0
    assert estimate_ziplm(model, fast, run, table_known=True, database_known=True, **same).database_s == 0
    slow = ZipLMConfig(target_speedup=[1.25, 1.5], search_iterations=30)
    slow_est = estimate_ziplm(model, slow, RunConfig(seq_len=32), table_known=False, **same)
    assert slow_est.search_s > est.search_s and slow_est.database_s > est.database_s
    assert slow_est.table_s > est.table_s and slow_est.measure_s > est.measure_s
    with caplog.at_level(logging.INFO, logger="optimum_prune"):
        say(est, logging.getLogger("optimum_prune.methods.ziplm.entry"))
    assert "ZipLM will take about" in caplog.text and "latency table" in caplog.text
