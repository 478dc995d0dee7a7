"""EvoPress: budget-exact mutations, multi-step selection, reversible sublayer drops, resumable depth search."""

from __future__ import annotations

import copy

import pytest
import torch
from zoo import FAMILIES, NEW_FAMILIES, VOCAB

from optimum_prune.methods.evopress.search import (EvoPressSettings, dropped_sublayers, evolve, search_depth, swap_mutation)
from optimum_prune.modeling.pruning_config import PruningConfig
from optimum_prune.modeling.surgery import apply_structure

CALIB = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
PROBE = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
FAST = dict(generations=4, offspring=4, windows=[2, 4, 8], survivors=[2, 2], seed=0)


def outputs(model, ids=PROBE):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.parametrize("seed", range(10))
def test_mutation_never_breaks_the_budget(seed):
    g = torch.Generator().manual_seed(seed)
    state = [1, 0, 0, 1, 0, 0, 0, 1] + [0, 1, 1, 0, 0, 0, 0, 0]
    groups = [list(range(8)), list(range(8, 16))]
    for _ in range(200):
        child = swap_mutation(state, groups, g, max_swaps=3)
        assert [sum(child[u] for u in grp) for grp in groups] == [3, 2]
        assert child != state or all(sum(state[u] for u in grp) in (0, len(grp)) for grp in groups)
        state = child


def test_evolve_is_elitist_and_finds_the_optimum_of_a_toy_problem():
    target = {2, 5, 6}
    fit = lambda state, step: float(sum(1 for u, v in enumerate(state) if v and u not in target))  # noqa: E731
    settings = EvoPressSettings(**{**FAST, "generations": 40}).resolved(5, 3, 8)
    result = evolve([1, 1, 1, 0, 0, 0, 0, 0], lambda s, g: swap_mutation(s, [list(range(8))], g, 3), fit, settings,
                    run_key="toy", progress=False)
    assert result.fitness == 0 and {u for u, v in enumerate(result.state) if v} == target
    assert all(a >= b for a, b in zip(result.history, result.history[1:]))  # never gets worse


def test_fresh_windows_draw_minibatches_and_rescore_the_parent_on_them():
    target = {2, 5, 6}
    calls = []

    def fit(state, step, rows):  # the minibatch shifts every score, as real windows do
        calls.append((tuple(state), step, tuple(rows)))
        return float(sum(1 for u, v in enumerate(state) if v and u not in target)) + 0.01 * sum(rows)

    settings = EvoPressSettings(generations=30, offspring=4, windows=[1, 2, 4], survivors=[2, 1], seed=0)
    result = evolve([1, 1, 1, 0, 0, 0, 0, 0], lambda s, g: swap_mutation(s, [list(range(8))], g, 3), fit, settings,
                    run_key="toy", progress=False, pool=16)
    assert {u for u, v in enumerate(result.state) if v} == target
    per_step = {}
    for state, step, rows in calls[1:]:
        assert len(rows) == settings.windows[step] and len(set(rows)) == len(rows) and max(rows) < 16
        per_step.setdefault(step, set()).add(rows)
    assert len(per_step[2]) > 5  # fresh windows, not the same ones every generation
    last_step = [c for c in calls[1:] if c[1] == 2]
    assert len(last_step) == 2 * settings.generations  # the survivor and the re-entering parent, same rows
    assert all(a[2] == b[2] for a, b in zip(last_step[::2], last_step[1::2]))
    again = evolve([1, 1, 1, 0, 0, 0, 0, 0], lambda s, g: swap_mutation(s, [list(range(8))], g, 3), fit, settings,
                   run_key="toy", progress=False, pool=16)
    assert again.state == result.state and again.fitness == result.fitness  # seeded


@pytest.mark.parametrize("family", ["llama-gqa", "opt", "bert", *NEW_FAMILIES])
def test_temporary_drops_match_surgery_and_are_undone(family):
    model = FAMILIES[family].build()
    dense = outputs(model)
    with dropped_sublayers(model, {0, 2}, {1}):
        temporary = outputs(model)
    torch.testing.assert_close(outputs(model), dense)
    pruned = copy.deepcopy(model)
    apply_structure(pruned, PruningConfig(drop_attention=[0, 2], drop_mlp=[1]))
    torch.testing.assert_close(temporary, outputs(pruned), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sublayers", [False, True])
def test_depth_search_drops_exactly_n_and_beats_its_seeds(sublayers):
    model = FAMILIES["llama-gqa"].build()
    result = search_depth(model, CALIB, num_blocks=2, sublayers=sublayers, settings=EvoPressSettings(**FAST),
                          progress=False)
    if sublayers:
        assert len(result.drop_attention) == 2 and len(result.drop_mlp) == 2 and not result.drop_layers
    else:
        assert len(result.drop_layers) == 2
    info = result.info
    assert info["fitness"] <= min(info["seed_fitness"].values()) + 1e-12
    assert info["tokens"] == [2 * 32, 4 * 32, 8 * 32] and info["generations"] == 4


def test_interrupted_search_resumes_to_the_same_result(tmp_path, monkeypatch):
    model = FAMILIES["llama-gqa"].build()
    settings = dict(FAST, generations=6)
    expected = search_depth(model, CALIB, num_blocks=2, sublayers=True, settings=EvoPressSettings(**settings),
                            progress=False)
    state_file = tmp_path / "search.json"
    import optimum_prune.evaluation.scorer as method

    calls = {"n": 0}
    original = method.CalibrationScorer.__call__

    def flaky(self, m, rows=None):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        return original(self, m, rows)

    import optimum_prune.methods.evopress.fitness as fitness  # the cached fitness scores window by window
    window_kl = fitness.window_kl

    def flaky_window(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        return window_kl(*args, **kwargs)

    monkeypatch.setattr(method.CalibrationScorer, "__call__", flaky)
    monkeypatch.setattr(fitness, "window_kl", flaky_window)
    with pytest.raises(KeyboardInterrupt):
        search_depth(model, CALIB, num_blocks=2, sublayers=True, settings=EvoPressSettings(**settings,
                                                                                            state_file=state_file),
                     progress=False)
    monkeypatch.setattr(method.CalibrationScorer, "__call__", original)
    monkeypatch.setattr(fitness, "window_kl", window_kl)
    assert state_file.is_file()
    resumed = search_depth(model, CALIB, num_blocks=2, sublayers=True,
                           settings=EvoPressSettings(**settings, state_file=state_file), progress=False)
    assert resumed.drop_attention == expected.drop_attention and resumed.drop_mlp == expected.drop_mlp
    assert resumed.info["fitness"] == pytest.approx(expected.info["fitness"])
    assert resumed.info["history"] == expected.info["history"]


def test_bad_requests_say_what_to_give():
    model = FAMILIES["llama-gqa"].build()
    with pytest.raises(ValueError, match="exactly one"):
        search_depth(model, CALIB)
    with pytest.raises(ValueError, match="1 to 3"):
        search_depth(model, CALIB, num_blocks=4)


def test_pruner_evopress_depth_records_the_search_and_reloads(tmp_path):
    import transformers

    from optimum_prune import Pruner

    pruner = Pruner(FAMILIES["llama-gqa"].build())
    with pytest.raises(ValueError, match="target='depth'.*average_bits"):
        pruner.prune(method="evopress", target="bits", drop_ratio=0.25)
    with pytest.raises(ValueError, match="e.g. sparsity=0.7"):
        pruner.prune(method="evopress", target="sparsity", drop_ratio=0.25)
    with pytest.raises(ValueError, match="1 to 3"):
        pruner.prune(method="evopress", target="depth", drop_ratio=0.99)
    pruned = pruner.prune(method="evopress", target="depth", drop_ratio=0.5, calibration=CALIB, progress=False,
                          evopress=dict(FAST, generations=2))
    config = pruner.pruning_config
    assert config.method == "evopress" and len(config.drop_attention) == 2 and len(config.drop_mlp) == 2
    assert config.search["target"] == "depth" and config.search["generations"] == 2
    pruner.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "evopress" in card and "search fitness" in card and "search generations | 2" in card
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(outputs(reloaded), outputs(pruned), rtol=1e-5, atol=1e-5)


def test_cli_evopress_depth(tmp_path, capsys):
    import json

    from zoo import TEXT, char_tokenizer

    from optimum_prune.cli import main

    model = FAMILIES["llama-gqa"].build()
    model.save_pretrained(tmp_path / "dense")
    char_tokenizer().save_pretrained(tmp_path / "dense")
    (tmp_path / "text.txt").write_text(TEXT * 3)
    args = ["prune", "--model", str(tmp_path / "dense"), "--method", "evopress", "--target", "depth",
            "--drop-ratio", "0.25", "--generations", "2", "--calibration", str(tmp_path / "text.txt"),
            "--num-samples", "8", "--seq-len", "16", "--output", str(tmp_path / "out")]
    assert main(args) == 0
    assert "dropped attention" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "config.json").read_text())["pruning_config"]
    assert config["method"] == "evopress" and len(config["drop_attention"]) == 1 == len(config["drop_mlp"])
    assert main(args[:-2] + ["--target", "depth", "--drop-ratio", "0.99", "--output", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("seed", range(5))
def test_budget_mutation_never_exceeds_the_budget(seed):
    from optimum_prune.methods.evopress.search import budget_mutation

    g = torch.Generator().manual_seed(seed)
    costs = [tuple(sorted(torch.rand(5, generator=g).tolist())) for _ in range(8)]
    budget = sum(c[2] for c in costs)
    state = [2] * 8
    moved = 0
    for _ in range(200):
        child = budget_mutation(state, costs, budget, g, max_swaps=3)
        assert sum(costs[i][j] for i, j in enumerate(child)) <= budget + 1e-12
        moved += child != state
        state = child
    assert moved > 50


def test_evopress_structure_search_stays_within_the_latency_budget(tmp_path):
    import transformers
    from test_ziplm import proportional_table

    from optimum_prune import Pruner

    pruner = Pruner(FAMILIES["llama-gqa"].build())
    table = proportional_table(pruner.model)
    pruned = pruner.prune(method="evopress", target="structure", target_speedup=1.5, latency_table=table,
                          calibration=CALIB, progress=False, evopress=dict(FAST, generations=3))
    config = pruner.pruning_config
    assert config.method == "evopress" and config.search["target"] == "structure"
    assert config.search["predicted_speedup"] >= 1.5 * (1 - 1e-9)
    assert config.search["fitness"] <= config.search["start_fitness"] + 1e-12  # never worse than ZipLM's DP start
    assert config.measured_speedup is not None and config.remove_neurons
    pruner.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(outputs(reloaded), outputs(pruned), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one target_speedup"):
        Pruner(FAMILIES["llama-gqa"].build()).prune(method="evopress", target="structure", latency_table=table)


def test_perplexity_fitness_is_the_candidates_own_calibration_nll():
    from optimum_prune.evaluation import perplexity

    model = FAMILIES["llama-gqa"].build()
    settings = EvoPressSettings(**FAST, fitness="perplexity")
    result = search_depth(model, CALIB, num_blocks=1, sublayers=True, settings=settings, progress=False)
    info = result.info
    assert info["fitness_metric"].startswith("calibration log-perplexity")
    assert info["fitness"] <= min(info["seed_fitness"].values()) + 1e-12
    with dropped_sublayers(model, set(result.drop_attention), set(result.drop_mlp)):  # unchopped: index = position
        nll = perplexity(model, input_ids=CALIB[:8], batch_size=4, progress=False).mean_nll
    assert info["fitness"] == pytest.approx(nll, rel=1e-6)


def test_perplexity_fitness_refuses_encoders_and_unknown_metrics():
    with pytest.raises(ValueError, match="fitness='kl'"):
        search_depth(FAMILIES["bert"].build(), CALIB, num_blocks=1,
                     settings=EvoPressSettings(**FAST, fitness="perplexity"), progress=False)
    with pytest.raises(ValueError, match="kl, perplexity"):
        search_depth(FAMILIES["llama-gqa"].build(), CALIB, num_blocks=1,
                     settings=EvoPressSettings(**FAST, fitness="ppl"), progress=False)


def test_settings_that_do_not_steer_the_search_keep_its_state_file_key():
    base = EvoPressSettings(**FAST).search_key()
    assert EvoPressSettings(**FAST, recalibrate=False, state_file="x", level_store="y").search_key() == base
    assert EvoPressSettings(**dict(FAST, generations=99)).search_key() == base
    assert EvoPressSettings(**FAST, fitness="perplexity").search_key() != base
    assert EvoPressSettings(**dict(FAST, seed=1)).search_key() != base
