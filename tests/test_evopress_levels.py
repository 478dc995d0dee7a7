"""EvoPress over per-Linear sparsity and bit-width levels: the level store, budget-exact switches, save and reload."""

from __future__ import annotations

import pytest
import torch
import transformers
from zoo import FAMILIES, VOCAB

from optimum_prune import Pruner, Quantizer
from optimum_prune.engine import level_store as ls
from optimum_prune.engine.layers import get_weight
from optimum_prune.engine.level_store import LevelStore, build_level_store, sparsity_levels
from optimum_prune.engine.obs import PruneSpec, compress_weight
from optimum_prune.engine.quant import QuantSpec
from optimum_prune.engine.sequential import SequentialOptions
from optimum_prune.methods.evopress.levels import (StoreLoader, average, level_mutation, round_to_budget, seeds,
                                           shape_groups)

CALIB = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
PROBE = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
OPTIONS = SequentialOptions(batch_size=4, progress=False, device="cpu")
FAST = dict(generations=3, offspring=4, windows=[2, 4, 8], survivors=[2, 2], seed=0)


def logits(model, ids=PROBE):
    with torch.no_grad():
        return model(input_ids=ids).logits


def recording(monkeypatch):
    """Record the (weight, Hessian) pairs the store compresses, to recompute the same levels directly."""
    seen = {}
    real = ls.compress_weight

    def spy(weight, hessian, **kwargs):
        seen[weight.data_ptr()] = hessian.clone()
        return real(weight, hessian, **kwargs)

    monkeypatch.setattr(ls, "compress_weight", spy)
    return seen


def test_sparsity_levels_are_evenly_spaced_and_contain_the_target():
    levels = sparsity_levels(0.7)
    assert 0.7 in levels and levels[0] == pytest.approx(0.4) and levels[-1] == pytest.approx(0.9)
    steps = {round(b - a, 6) for a, b in zip(levels, levels[1:])}
    assert steps == {0.05}
    assert sparsity_levels(0.2)[0] == 0.0 and {round(b - a, 6) for a, b in zip(*[sparsity_levels(0.2)] * 2)} == {0}


def test_sparsity_store_holds_sparsegpt_levels_compactly_and_is_reused(tmp_path, monkeypatch):
    model = FAMILIES["llama-gqa"].build()
    seen = recording(monkeypatch)
    store = build_level_store(model, CALIB, tmp_path / "s", kind="sparsity", levels=[0.0, 0.25, 0.5], options=OPTIONS)
    modules = dict(model.named_modules())
    assert len(store.units) == 7 * model.config.num_hidden_layers and len(store.info["losses"]) == len(store.units)
    for i, unit in enumerate(store.units):
        dense = get_weight(modules[unit.name])
        assert torch.equal(store.weight(i, 0), dense.half().float())
        expected = compress_weight(dense, seen[dense.data_ptr()], prune=PruneSpec(0.5)).weight
        got = store.weight(i, 2)
        assert torch.equal(got == 0, expected == 0) and torch.equal(got, expected.half().float())
        assert store.info["losses"][i][0] == 0 and store.info["losses"][i][2] > store.info["losses"][i][1] > 0
    numel = sum(u.numel for u in store.units)
    compact = numel * (2 * (1 + 0.75 + 0.5) + 2 / 8)  # 16-bit kept values of each level + two packed masks
    assert store.nbytes() < 1.1 * compact + 65536
    assert not (tmp_path / "s.partial").exists()

    def fail(*args, **kwargs):
        raise AssertionError("a built store is reused, not recompressed")

    monkeypatch.setattr(ls, "compress_weight", fail)
    again = build_level_store(model, CALIB, tmp_path / "s", kind="sparsity", levels=[0.0, 0.25, 0.5], options=OPTIONS)
    assert again.units == store.units
    with pytest.raises(FileExistsError, match="other settings"):
        build_level_store(model, CALIB, tmp_path / "s", kind="sparsity", levels=[0.0, 0.5], options=OPTIONS)


@pytest.mark.parametrize("propagate", [None, 0.5])
def test_interrupted_store_build_resumes_at_the_first_missing_block(tmp_path, monkeypatch, propagate):
    model = FAMILIES["llama-gqa"].build()
    reference = build_level_store(model, CALIB, tmp_path / "ref", kind="sparsity", levels=[0.0, 0.5],
                                  propagate=propagate, options=OPTIONS)
    real, calls = ls.compress_weight, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 7 * 2:  # two blocks' worth of Linears, then the machine goes away
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ls, "compress_weight", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_level_store(model, CALIB, tmp_path / "s", kind="sparsity", levels=[0.0, 0.5], propagate=propagate,
                          options=OPTIONS)
    assert torch.equal(logits(model), logits(FAMILIES["llama-gqa"].build()))  # dense again after the interruption
    assert not (tmp_path / "s").exists() and len(list((tmp_path / "s.partial").glob("block-*.safetensors"))) == 2
    calls.clear()
    monkeypatch.setattr(ls, "compress_weight", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    store = build_level_store(model, CALIB, tmp_path / "s", kind="sparsity", levels=[0.0, 0.5], propagate=propagate,
                              options=OPTIONS)
    assert len(calls) == 7 * (model.config.num_hidden_layers - 2)
    for i in range(len(store.units)):
        assert torch.equal(store.weight(i, 1), reference.weight(i, 1))
    assert store.info["losses"] == reference.info["losses"]


def test_bits_store_reproduces_gptq_exactly(tmp_path, monkeypatch):
    model = FAMILIES["llama-gqa"].build()
    seen = recording(monkeypatch)
    grid = QuantSpec(4, 16, True, True)
    store = build_level_store(model, CALIB, tmp_path / "b", kind="bits", levels=[2, 3, 4], quant=grid, options=OPTIONS)
    modules = dict(model.named_modules())
    for i, unit in enumerate(store.units):
        dense = get_weight(modules[unit.name])
        expected = compress_weight(dense, seen[dense.data_ptr()], quant=QuantSpec(3, 16, True, True))
        assert torch.equal(store.weight(i, 1), expected.weight)
        record = store.record(i, 1)
        assert torch.equal(record.codes, expected.codes) and record.spec == expected.spec


@pytest.mark.parametrize("seed", range(5))
def test_level_switch_keeps_every_group_sum_and_the_range(seed):
    g = torch.Generator().manual_seed(seed)
    groups = [[0, 1, 2, 3], [4, 5], [6]]
    state = [2, 2, 2, 2, 0, 4, 3]
    sums = [sum(state[u] for u in grp) for grp in groups]
    changed = 0
    for _ in range(300):
        child = level_mutation(state, groups, 5, g, max_swaps=3)
        assert [sum(child[u] for u in grp) for grp in groups] == sums
        assert all(0 <= v < 5 for v in child) and child[6] == 3
        changed += child != state
        state = child
    assert changed == 300


def test_round_to_budget_hits_the_sum_exactly():
    assert sum(round_to_budget([0.2, 3.7, 1.5, 4.9], 10, 5)) == 10
    assert round_to_budget([0.2, 3.7, 1.5, 4.9], 10, 5) == [0, 4, 2, 4]
    with pytest.raises(ValueError, match="out of reach"):
        round_to_budget([1.0, 1.0], 9, 5)


def test_seeds_meet_the_target_exactly(tmp_path):
    model = FAMILIES["llama-gqa"].build()
    store = build_level_store(model, CALIB, tmp_path / "s", kind="sparsity", levels=[0.3, 0.4, 0.5, 0.6, 0.7],
                              options=OPTIONS)
    starts = seeds(store, 0.5, shape_groups(store))
    assert set(starts) == {"uniform", "hessian-kmeans", "obs-greedy"}
    for state in starts.values():
        assert average(store, state) == pytest.approx(0.5, abs=1e-9)
    assert starts["hessian-kmeans"] != starts["uniform"] and starts["obs-greedy"] != starts["uniform"]


def test_greedy_seed_moves_levels_to_where_they_save_more_loss():
    from types import SimpleNamespace

    from optimum_prune.engine.level_store import LinearUnit
    from optimum_prune.methods.evopress.levels import loss_greedy

    units = [LinearUnit(i, "mlp.down_proj", f"m{i}", (4, 4)) for i in range(3)]
    # unit 0 barely cares about compression, unit 2 cares a lot
    losses = [[0.0, 0.1, 0.2, 0.3], [0.0, 1.0, 2.0, 4.0], [0.0, 5.0, 20.0, 60.0]]
    store = SimpleNamespace(kind="sparsity", levels=[0.5, 0.6, 0.7, 0.8], units=units,
                            info={"losses": losses, "residual": {}})
    state = loss_greedy(store, [2, 2, 2], [[0, 1, 2]])
    assert sum(state) == 6 and state[0] == 3 and state[2] < 2
    bits = SimpleNamespace(kind="bits", levels=[2, 3, 4, 5], units=units,
                           info={"losses": [[3.0, 2.9, 2.8, 2.7], [40.0, 10.0, 3.0, 1.0], [90.0, 20.0, 5.0, 1.0]],
                                 "residual": {}})
    state = loss_greedy(bits, [1, 1, 1], [[0, 1, 2]])
    assert sum(state) == 3 and state[0] == 0 and state[2] >= state[1]


def test_evopress_sparsity_prunes_to_the_exact_average_records_and_reloads(tmp_path):
    pruner = Pruner(FAMILIES["llama-gqa"].build())
    model = pruner.prune(method="evopress", target="sparsity", sparsity=0.5, calibration=CALIB, batch_size=4,
                         progress=False, evopress=dict(FAST, level_store=str(tmp_path / "store"),
                                                       levels=[0.3, 0.4, 0.5, 0.6, 0.7]))
    config = pruner.pruning_config
    assert config.method == "evopress" and config.search["target"] == "sparsity"
    assert config.search["average"] == pytest.approx(0.5, abs=1e-9)
    assert config.metrics["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert config.search["level_store_mib"] > 0 and config.metrics["model_mib"] > 0
    assert config.search["fitness"] <= min(config.search["seed_fitness"].values())
    assert set(config.layer_sparsity) == {str(i) for i in range(model.config.num_hidden_layers)}
    pruner.save_pretrained(tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(logits(reloaded), logits(model))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "evopress" in card.lower() and "level store mib" in card and "model mib" in card


def test_evopress_bits_quantizes_to_the_average_and_reloads_packed(tmp_path):
    q = Quantizer(FAMILIES["llama-gqa"].build())
    model = q.quantize(method="evopress", average_bits=3.0, group_size=16, calibration=CALIB, batch_size=4,
                       progress=False, evopress=dict(FAST, level_store=str(tmp_path / "store")))
    config = q.pruning_config
    assert config.method == "evopress+gptq" and config.metrics["average_bits"] == pytest.approx(3.0)
    assert config.search["level_values"] == [2.0, 3.0, 4.0, 5.0]
    bits = [r.spec.bits for r in q.records.values()]
    assert len(q.records) == 7 * model.config.num_hidden_layers and min(bits) >= 2 and max(bits) <= 5
    q.save_pretrained(tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(logits(reloaded), logits(model))
    with pytest.raises(ValueError, match="average_bits"):
        Quantizer(FAMILIES["llama-gqa"].build()).quantize(method="evopress", calibration=CALIB)


def test_store_for_another_model_is_refused(tmp_path):
    model = FAMILIES["llama-gqa"].build()
    store = build_level_store(model, CALIB, tmp_path / "s", kind="sparsity", levels=[0.0, 0.5], options=OPTIONS)
    with pytest.raises(ValueError, match="another model"):
        StoreLoader(FAMILIES["opt"].build(), LevelStore(store.directory))


def test_cli_evopress_sparsity_and_bits(tmp_path, capsys):
    import json

    from zoo import TEXT, char_tokenizer

    from optimum_prune.cli import main

    FAMILIES["llama-gqa"].build().save_pretrained(tmp_path / "dense")
    char_tokenizer().save_pretrained(tmp_path / "dense")
    (tmp_path / "text.txt").write_text(TEXT * 3)
    common = ["--model", str(tmp_path / "dense"), "--generations", "2", "--calibration", str(tmp_path / "text.txt"),
              "--num-samples", "8", "--seq-len", "16"]
    assert main(["prune", *common, "--method", "evopress", "--target", "sparsity", "--sparsity", "0.5",
                 "--level-store", str(tmp_path / "store-s"), "--output", str(tmp_path / "sparse")]) == 0
    assert "average sparsity 0.5" in capsys.readouterr().out
    config = json.loads((tmp_path / "sparse" / "config.json").read_text())["pruning_config"]
    assert config["method"] == "evopress" and config["search"]["target"] == "sparsity"
    assert main(["quantize", *common, "--method", "evopress", "--average-bits", "3", "--group-size", "16",
                 "--level-store", str(tmp_path / "store-b"), "--output", str(tmp_path / "q")]) == 0
    assert "average bits 3" in capsys.readouterr().out
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["pruning_config"]["method"] == "evopress+gptq" and "quantization_config" in config


def test_propagated_bits_store_at_the_uniform_level_is_sequential_gptq_exactly(tmp_path):
    from optimum_prune.engine.compress import CompressionPlan, compress_model, uniform

    model = FAMILIES["llama-gqa"].build()
    store = build_level_store(model, CALIB, tmp_path / "b", kind="bits", levels=[2, 3, 4], quant=QuantSpec(4, 16),
                              propagate=3, options=OPTIONS)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())  # the build left it dense
    StoreLoader(model, store).load([1] * len(store.units))
    sequential = FAMILIES["llama-gqa"].build()
    layers = list(range(sequential.config.num_hidden_layers))
    compress_model(sequential, CALIB, CompressionPlan(None, quant=uniform(QuantSpec(3, 16), layers)), OPTIONS)
    assert torch.equal(logits(model), logits(sequential))
    with pytest.raises(ValueError, match="not one of the levels"):
        build_level_store(model, CALIB, tmp_path / "x", kind="bits", levels=[2, 4], propagate=3, options=OPTIONS)


def test_unreachable_target_fails_before_the_store_is_built(tmp_path, monkeypatch):
    from optimum_prune.session import CompressionSession

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration data was prepared for a request that cannot succeed")

    monkeypatch.setattr(CompressionSession, "calibration_data", no_calibration)
    pruner = Pruner(FAMILIES["llama-gqa"].build())
    with pytest.raises(ValueError, match="do not include the target 0.5"):
        pruner.prune(method="evopress", target="sparsity", sparsity=0.5, calibration=CALIB, progress=False,
                     evopress=dict(FAST, level_store=str(tmp_path / "s"), levels=[0.4, 0.6]))
    with pytest.raises(ValueError, match="outside the levels"):
        Quantizer(FAMILIES["llama-gqa"].build()).quantize(method="evopress", average_bits=6.5, calibration=CALIB,
                                                          evopress=dict(level_store=str(tmp_path / "b"),
                                                                        levels=[2, 3, 4]))
    assert not any(tmp_path.iterdir())
    monkeypatch.undo()  # the fitness needs the calibration windows, but fails before the store build
    with pytest.raises(ValueError, match="fitness='kl'"):  # an encoder has no perplexity
        Pruner(FAMILIES["bert"].build()).prune(method="evopress", target="sparsity", sparsity=0.5,
                                               calibration=CALIB, progress=False,
                                               evopress=dict(FAST, fitness="perplexity", levels=[0.4, 0.5, 0.6],
                                                             level_store=str(tmp_path / "e")))
    assert not any(tmp_path.iterdir())


def test_unit_plan_gives_every_linear_its_own_sparsity_and_bits():
    from optimum_prune.engine.compress import CompressionPlan, compress_model

    model = FAMILIES["llama-gqa"].build()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    wanted = {n: [0.25, 0.5, 0.75][i % 3] for i, n in enumerate(names)}
    compress_model(model, CALIB, CompressionPlan("sparsegpt", unit_sparsity=wanted), OPTIONS)
    modules = dict(model.named_modules())
    for name, sparsity in wanted.items():
        weight = get_weight(modules[name])
        assert float((weight == 0).float().mean()) == pytest.approx(sparsity, abs=0.02), name
    model = FAMILIES["llama-gqa"].build()
    bits = {n: QuantSpec(2 + i % 3, 16) for i, n in enumerate(names)}
    result = compress_model(model, CALIB, CompressionPlan(None, unit_quant=bits), OPTIONS)
    assert {n: r.spec.bits for n, r in result.quantized.items()} == {n: s.bits for n, s in bits.items()}


def test_dense_snapshot_restores_the_dense_weights(tmp_path):
    from optimum_prune.methods.evopress.levels import DenseSnapshot

    model = FAMILIES["llama-gqa"].build()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    store = build_level_store(model, CALIB, tmp_path / "s", kind="sparsity", levels=[0.5, 0.7], options=OPTIONS)
    snapshot = DenseSnapshot(model, store, tmp_path)
    StoreLoader(model, store).load([1] * len(store.units))
    assert not all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())
    snapshot.restore(model)
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("spoil", [False, True])
def test_sequential_pass_is_kept_only_when_its_fitness_is_lower(tmp_path, monkeypatch, spoil):
    """The final model is the better (by fitness on the seeds' windows) of the stitched one and a sequential
    SparseGPT pass at the chosen levels; spoiling the pass must make the stitched model win."""
    from optimum_prune.methods.evopress import levels as el
    from optimum_prune.engine.compress import compress_model

    if spoil:
        def spoiled(model, *args, **kwargs):
            result = compress_model(model, *args, **kwargs)
            with torch.no_grad():  # the pass only rewrites the blocks' Linears: spoil those
                for name, m in model.named_modules():
                    if isinstance(m, torch.nn.Linear) and ".layers." in name:
                        m.weight.add_(torch.randn(m.weight.shape, generator=torch.Generator().manual_seed(0)))
            return result
        monkeypatch.setattr(el, "compress_model", spoiled)
    pruner = Pruner(FAMILIES["llama-gqa"].build())
    model = pruner.prune(method="evopress", target="sparsity", sparsity=0.5, calibration=CALIB, batch_size=4,
                         progress=False, evopress=dict(FAST, level_store=str(tmp_path / "store"),
                                                       levels=[0.3, 0.4, 0.5, 0.6, 0.7]))
    search = pruner.pruning_config.search
    stitched, sequential = search["stitched_fitness"], search["sequential_fitness"]
    assert search["fitness"] == min(stitched, sequential)
    assert search["final"] == ("sequential" if sequential < stitched else "store")
    if spoil:
        assert search["final"] == "store"
    # the model left is the one named: rebuild it both ways from the dense model and the chosen levels
    store = LevelStore(tmp_path / "store")
    names = {u.name: (u, j) for u, j in zip(store.units, [store.levels.index(search["levels"][str(u.layer)][u.path])
                                                         for u in store.units])}
    rebuilt = FAMILIES["llama-gqa"].build()
    state = [j for _, j in names.values()]
    if search["final"] == "store":
        StoreLoader(rebuilt, store).load(state)
    else:
        compress_model(rebuilt, CALIB, el.level_plan(store, state, dampening=0.01, blocksize=128), OPTIONS)
    assert torch.equal(logits(rebuilt), logits(model))


def test_without_recalibrate_the_stitched_model_is_kept(tmp_path):
    q = Quantizer(FAMILIES["llama-gqa"].build())
    q.quantize(method="evopress", average_bits=3.0, group_size=16, calibration=CALIB, batch_size=4, progress=False,
               evopress=dict(FAST, level_store=str(tmp_path / "store"), recalibrate=False))
    search = q.pruning_config.search
    assert search["final"] == "store" and "sequential_fitness" not in search
    store = LevelStore(tmp_path / "store")
    for i, unit in enumerate(store.units):
        level = store.levels.index(search["levels"][str(unit.layer)][unit.path])
        assert torch.equal(q.records[unit.name].codes, store.record(i, level).codes)
