"""LayerChop: which blocks each strategy removes, the reloadable result, and healing through the Trainer."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pytest
import torch
import transformers
from zoo import FAMILIES, NEW_FAMILIES, TEXT, VOCAB, Family, _llama, char_tokenizer

from optimum_prune import Pruner, PruningConfig, PruningConfigError
from optimum_prune.engine.importance import angular_distance, block_influence
from optimum_prune.methods.layerchop.strategies import STRATEGIES, choose_layers
from optimum_prune.session import CompressionSession

CALIB = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
PROBE = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
# 0 1 2 ... 7 0 1 2 ...: a pattern a tiny model learns in a few dozen steps.
PATTERN = (torch.arange(16 * 32).reshape(16, 32) % 8 + 3)
LLAMA6 = Family("llama-6", lambda: transformers.LlamaConfig(**_llama(num_hidden_layers=6)), "AutoModelForCausalLM")


def outputs(model, ids=PROBE):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def lm_loss(model, ids=PATTERN) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss)


def prune(family: Family, num_layers: int, strategy: str, **kwargs) -> Pruner:
    pruner = Pruner(family.build())
    pruner.prune("layerchop", num_layers=num_layers, strategy=strategy, calibration=CALIB, batch_size=4,
                 progress=False, **kwargs)
    return pruner


# ------------------------------------------------------------------------------ choosing and removing blocks
@pytest.mark.parametrize("strategy", ["last", "angular", "block_influence"])
@pytest.mark.parametrize("family", ["llama-gqa", "opt", "gpt2", "bert", *NEW_FAMILIES])
def test_each_strategy_drops_n_layers_and_reloads_with_identical_logits(family, strategy, tmp_path):
    pruner = prune(FAMILIES[family], 2, strategy)
    config = pruner.pruning_config
    assert len(config.drop_layers) == 2 and config.num_original_layers == 4
    assert pruner.model.config.num_hidden_layers == 2
    assert config.method == "layerchop" and config.search["strategy"] == strategy
    assert config.search["dropped"] == config.drop_layers and config.metrics["layers_removed"] == 2
    assert (config.calibration is None) == (strategy == "last")
    pruner.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["pruning_config"]["method"] == "layerchop"
    assert saved["pruning_config"]["search"]["strategy"] == strategy
    reloaded = getattr(transformers, FAMILIES[family].auto_class).from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2
    torch.testing.assert_close(outputs(reloaded), outputs(pruner.model), rtol=1e-5, atol=1e-5)


def test_last_keeps_the_final_block():
    model = LLAMA6.build()
    drop, info = choose_layers(model, None, 3, "last")
    assert drop == [2, 3, 4] and info["dropped"] == drop
    # the rule as stated for a 30-layer model: n=6 drops 23..28
    deep = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_llama(num_hidden_layers=30, hidden_size=16,
                                                                            intermediate_size=16)))
    assert choose_layers(deep, None, 6, "last")[0] == list(range(23, 29))


def test_angular_drops_the_contiguous_window_of_least_distance():
    model = LLAMA6.build()
    drop, info = choose_layers(model, CALIB, 3, "angular")
    assert drop == list(range(drop[0], drop[0] + 3))
    scores = angular_distance(model, CALIB, span=3)
    assert drop[0] == min(scores, key=scores.get)
    assert info["scores"] == {str(k): pytest.approx(v, abs=1e-6) for k, v in scores.items()}


def test_block_influence_drops_the_least_influential_blocks():
    model = LLAMA6.build()
    drop, info = choose_layers(model, CALIB, 2, "block_influence")
    scores = block_influence(model, CALIB, span=1)
    assert drop == sorted(sorted(scores, key=scores.get)[:2])
    assert max(scores[i] for i in drop) <= min(scores[i] for i in scores if i not in drop)


def test_a_model_missing_layers_is_chopped_by_original_index(tmp_path):
    pruner = Pruner(LLAMA6.build())
    pruner.apply(PruningConfig(drop_layers=[2]))
    scores = block_influence(pruner.model, CALIB, span=1)
    assert sorted(scores) == [0, 1, 3, 4, 5]  # keys are original indices
    assert choose_layers(pruner.model, None, 2, "last")[0] == [3, 4]
    with pytest.raises(ValueError, match=r"from 1 to 4 \(the model has 5 blocks left, 1 already removed"):
        choose_layers(pruner.model, None, 5, "last")
    drop, _ = choose_layers(pruner.model, CALIB, 2, "angular")
    kept = [0, 1, 3, 4, 5]
    assert drop == kept[kept.index(drop[0]):kept.index(drop[0]) + 2]  # contiguous among the remaining blocks
    pruner.prune("layerchop", num_layers=2, strategy="block_influence", calibration=CALIB, progress=False)
    expected = sorted(sorted(scores, key=scores.get)[:2])
    assert pruner.pruning_config.drop_layers == sorted([2, *expected])
    pruner.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 3
    torch.testing.assert_close(outputs(reloaded), outputs(pruner.model), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ EvoPress wiring
@dataclass
class FakeSearch:
    drop_layers: list[int]
    info: dict = field(default_factory=dict)


def test_evopress_strategy_calls_the_depth_search(monkeypatch, tmp_path):
    calls = {}

    def search_depth(model, input_ids, *, num_blocks, progress, **kwargs):
        calls.update(num_blocks=num_blocks, progress=progress, samples=input_ids.shape[0], **kwargs)
        return FakeSearch([2, 0], {"generations": 3, "fitness": torch.tensor(0.25), "history": (1.0, 0.5)})

    import optimum_prune.methods.evopress as fake

    monkeypatch.setattr(fake, "search_depth", search_depth, raising=False)
    pruner = Pruner(FAMILIES["llama-gqa"].build())
    pruner.prune("layerchop", num_layers=2, strategy="evopress", strategy_options={"generations": 3},
                 calibration=CALIB, progress=False)
    assert calls == {"num_blocks": 2, "progress": False, "samples": 8, "generations": 3}
    config = pruner.pruning_config
    assert config.drop_layers == [0, 2] and config.search["strategy"] == "evopress"
    assert config.search["fitness"] == 0.25 and config.search["history"] == [1.0, 0.5]
    pruner.save_pretrained(tmp_path)  # the search info is JSON-ready
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(outputs(reloaded), outputs(pruner.model), rtol=1e-5, atol=1e-5)

    monkeypatch.setattr(fake, "search_depth", lambda *a, **k: FakeSearch([0, 7]), raising=False)
    with pytest.raises(RuntimeError, match="expected 2 distinct original indices"):
        choose_layers(FAMILIES["llama-gqa"].build(), CALIB, 2, "evopress")


# ------------------------------------------------------------------------------ bad requests
def test_bad_requests_fail_before_any_calibration(monkeypatch):
    monkeypatch.setattr(CompressionSession, "calibration_data",
                        lambda *a, **k: pytest.fail("calibration must not run for a bad request"))
    pruner = Pruner(FAMILIES["llama-gqa"].build())
    for n in (0, 4, 7, -1, 1.5):
        with pytest.raises(ValueError, match=r"num_layers must be an integer from 1 to 3"):
            pruner.prune("layerchop", num_layers=n, calibration=CALIB)
    with pytest.raises(ValueError, match="last, angular, block_influence, evopress"):
        pruner.prune("layerchop", num_layers=1, strategy="random", calibration=CALIB)
    with pytest.raises(ValueError, match="num_layers="):
        pruner.prune("layerchop", calibration=CALIB)
    with pytest.raises(ValueError, match="sparsity"):
        pruner.prune("layerchop", num_layers=1, sparsity=0.5)
    with pytest.raises(ValueError, match="no options"):
        pruner.prune("layerchop", num_layers=1, strategy="angular", strategy_options={"generations": 2})
    with pytest.raises(ValueError, match="layerchop"):
        pruner.prune("chop", num_layers=1)
    assert pruner.model.config.num_hidden_layers == 4 and pruner.pruning_config.is_empty
    assert set(STRATEGIES) == {"last", "angular", "block_influence", "evopress"}


def test_gpt2_with_layer_index_scaling_cannot_drop_blocks(monkeypatch):
    config = FAMILIES["gpt2"].make_config()
    config.scale_attn_by_inverse_layer_idx = True
    torch.manual_seed(0)
    pruner = Pruner(transformers.GPT2LMHeadModel(config).eval())
    monkeypatch.setattr(CompressionSession, "calibration_data",
                        lambda *a, **k: pytest.fail("calibration must not run"))
    for strategy in ("last", "angular"):
        with pytest.raises(PruningConfigError, match="scale_attn_by_inverse_layer_idx"):
            pruner.prune("layerchop", num_layers=1, strategy=strategy, calibration=CALIB)
    assert pruner.model.config.n_layer == 4


# ------------------------------------------------------------------------------ healing
def test_heal_lowers_the_lm_loss_and_the_healed_model_reloads(tmp_path):
    pruner = prune(FAMILIES["llama-gqa"], 1, "last")
    before = lm_loss(pruner.model)
    metrics = pruner.heal(PATTERN, max_steps=30, learning_rate=1e-3, per_device_train_batch_size=4,
                          disable_tqdm=True)
    after = lm_loss(pruner.model)
    assert after < before - 0.5 and math.isfinite(metrics["train_loss"]) and metrics["global_step"] == 30
    assert not pruner.model.training
    config = pruner.pruning_config
    assert config.method == "layerchop" and config.drop_layers == [2]
    assert config.metrics["heal_steps"] == 30 and config.metrics["heal_train_loss"] == pytest.approx(
        metrics["train_loss"], abs=1e-4)
    assert config.metrics["heal_tokens"] == PATTERN.numel() and config.metrics["layers_removed"] == 1
    pruner.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["pruning_config"]
    assert saved["metrics"]["heal_steps"] == 30
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(outputs(reloaded), outputs(pruner.model), rtol=1e-5, atol=1e-5)
    assert lm_loss(reloaded) == pytest.approx(after, rel=1e-4)


def test_heal_resumes_from_a_trainer_checkpoint(tmp_path):
    run = tmp_path / "run"
    first = prune(FAMILIES["llama-gqa"], 1, "last")
    first.save_pretrained(tmp_path / "pruned")
    metrics = first.heal(PATTERN, max_steps=4, learning_rate=1e-3, output_dir=run, save_steps=2, disable_tqdm=True)
    assert metrics["global_step"] == 4
    assert {p.name for p in run.iterdir()} >= {"checkpoint-2", "checkpoint-4"}
    # a new process: the un-healed checkpoint again, continuing the interrupted run up to 6 steps
    second = Pruner.from_pretrained(str(tmp_path / "pruned"))
    metrics = second.heal(PATTERN, max_steps=6, learning_rate=1e-3, output_dir=run, save_steps=2,
                          resume_from_checkpoint=True, disable_tqdm=True)
    assert metrics["global_step"] == 6 and metrics["train_steps_per_second"] > 0
    state = json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    logged = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert logged[:4] == [1, 2, 3, 4]  # the first run's history came back with the checkpoint
    assert second.pruning_config.metrics["heal_steps"] == 6
    with pytest.raises(ValueError, match="output_dir"):
        second.heal(PATTERN, max_steps=1, resume_from_checkpoint=True)


def test_heal_can_distill_from_the_dense_model():
    dense = Pruner(FAMILIES["llama-gqa"].build())
    pruner = prune(FAMILIES["llama-gqa"], 1, "last")
    metrics = pruner.heal(CALIB, distill_from=dense, max_steps=3, learning_rate=1e-3, disable_tqdm=True)
    assert math.isfinite(metrics["train_loss"])
    assert pruner.pruning_config.metrics["heal_distillation_alpha"] == 1.0
    with pytest.raises(ValueError, match="distill_from"):
        pruner.heal(CALIB, alpha=0.5, max_steps=1)


def test_heal_reads_text_and_keeps_a_sparse_model_sparse():
    pruner = Pruner(FAMILIES["llama-gqa"].build(), char_tokenizer())
    pruner.prune("magnitude", sparsity=0.5, progress=False)
    zeros = [(n, p == 0) for n, p in pruner.model.named_parameters() if p.dim() == 2 and "layers" in n]
    pruner.heal([TEXT * 2], max_steps=3, seq_len=32, learning_rate=1e-3, disable_tqdm=True)
    for name, was_zero in zeros:
        assert torch.all(dict(pruner.model.named_parameters())[name][was_zero] == 0), name
    assert pruner.pruning_config.metrics["heal_tokens"] == 3 * 4 * 32


@pytest.mark.parametrize("family", ["bert", "bert-mlm"])
def test_heal_refuses_encoders(family):
    pruner = Pruner(FAMILIES[family].build())
    with pytest.raises(ValueError, match="causal language model"):
        pruner.heal(CALIB, max_steps=1)


# ------------------------------------------------------------------------------ command line
def test_cli_layerchop_prune_then_heal(tmp_path, capsys):
    from optimum_prune.cli import main

    FAMILIES["llama-gqa"].build().save_pretrained(tmp_path / "dense")
    char_tokenizer().save_pretrained(tmp_path / "dense")
    (tmp_path / "text.txt").write_text(TEXT * 3)
    assert main(["prune", "--model", str(tmp_path / "dense"), "--method", "layerchop", "--num-layers", "2",
                 "--strategy", "angular", "--calibration", str(tmp_path / "text.txt"), "--num-samples", "4",
                 "--seq-len", "32", "--output", str(tmp_path / "out")]) == 0
    assert "dropped layers" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["pruning_config"]["method"] == "layerchop"
    assert main(["heal", "--model", str(tmp_path / "out"), "--train-data", str(tmp_path / "text.txt"),
                 "--max-steps", "2", "--seq-len", "32", "--batch-size", "2", "--learning-rate", "1e-3",
                 "--checkpoint-dir", str(tmp_path / "run"), "--save-steps", "1",
                 "--output", str(tmp_path / "healed")]) == 0
    assert "heal_steps: 2" in capsys.readouterr().out
    healed = json.loads((tmp_path / "healed" / "config.json").read_text())["pruning_config"]
    assert healed["metrics"]["heal_steps"] == 2 and healed["drop_layers"] == config["pruning_config"]["drop_layers"]
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "healed")

    assert main(["prune", "--model", str(tmp_path / "dense"), "--method", "layerchop",
                 "--output", str(tmp_path / "x")]) == 2
    assert "--num-layers" in capsys.readouterr().err
    assert main(["prune", "--model", str(tmp_path / "dense"), "--num-layers", "4", "--strategy", "last",
                 "--output", str(tmp_path / "x")]) == 2
    assert "from 1 to 3" in capsys.readouterr().err and not (tmp_path / "x").exists()
