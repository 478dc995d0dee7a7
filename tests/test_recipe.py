"""Recipes: stages in order on one model, recorded in the checkpoint, re-run bit-identically from it."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from zoo import FAMILIES, TEXT, char_tokenizer

from optimum_prune import ConfigError, GPTQConfig, HealConfig, Pruner, Recipe, ZipLMConfig
from optimum_prune.cli import main


def proportional_table(model, rest_ms: float = 2.0):
    from optimum_prune.evaluation.latency_table import InferenceEnvironment, LatencyTable, model_signature
    from optimum_prune import get_adapter

    dims = get_adapter(model).dims(model.config)
    attention = {(g, q): 0.25 * g * q for g in range(1, dims.num_kv_heads + 1) for q in range(1, dims.heads_per_group + 1)}
    mlp = {n: 0.02 * n for n in sorted({dims.intermediate_size, *range(8, dims.intermediate_size, 8)})}
    per_layer = attention[(dims.num_kv_heads, dims.heads_per_group)] + mlp[dims.intermediate_size]
    return LatencyTable(environment=InferenceEnvironment(seq_len=16), model=model_signature(model), attention=attention,
                        mlp=mlp, rest_ms=rest_ms, dense_ms=rest_ms + dims.num_layers * per_layer,
                        num_layers=dims.num_layers)


@pytest.fixture
def base(tmp_path):
    """A tiny dense Llama with a tokenizer, saved to disk, a text file and a latency table file."""
    model = FAMILIES["llama-gqa"].build()
    tokenizer = char_tokenizer()
    model.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    (tmp_path / "text.txt").write_text(TEXT * 4)
    proportional_table(model).save(tmp_path / "table.json")
    return tmp_path


def three_stages(base) -> str:
    text = str(base / "text.txt")
    return f"""
run: {{calibration: {text}, num_samples: 8, seq_len: 16, batch_size: 4, progress: false}}
stages:
  - {{method: ziplm, target_speedup: 1.5, latency_table: {base / 'table.json'}, search_iterations: 2,
     search_samples: 2, measure_speedup: false}}
  - {{method: heal, train_dataset: {text}, max_steps: 2, seq_len: 16, per_device_train_batch_size: 2,
     learning_rate: 0.001}}
  - {{method: gptq, bits: 4, group_size: 8}}
"""


def weights(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def test_three_stage_recipe_reruns_bit_identically_from_its_checkpoint(base):
    (base / "recipe.yaml").write_text(three_stages(base))
    pruner = Pruner.from_pretrained(str(base / "dense"))
    pruner.run(base / "recipe.yaml")
    config = pruner.pruning_config
    assert [s["method"] for s in config.recipe] == ["ziplm", "heal", "gptq"]
    assert config.recipe[0]["run"]["num_samples"] == 8 and "run" not in config.recipe[1]
    assert config.recipe[0]["dampening"] == 0.01  # defaults resolved
    assert config.remove_heads or config.remove_neurons
    pruner.save_pretrained(base / "first")
    saved = json.loads((base / "first" / "config.json").read_text())
    assert "quantization_config" in saved and len(saved["pruning_config"]["recipe"]) == 3

    again = Pruner.from_pretrained(str(base / "dense"))
    again.run(Recipe.from_checkpoint(base / "first"))
    again.save_pretrained(base / "second")
    first, second = weights(base / "first"), weights(base / "second")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name

    # the same from the command line, and the result reloads with plain transformers
    assert main(["run", "--recipe-from", str(base / "first"), "--model", str(base / "dense"),
                 "--output", str(base / "third")]) == 0
    third = weights(base / "third")
    assert all(torch.equal(first[name], third[name]) for name in first)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(base / "third")
    assert reloaded(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_recipe_round_trips_and_refuses_bad_orders(base, tmp_path):
    recipe = Recipe([ZipLMConfig(target_speedup=1.5), HealConfig(train_dataset="x.txt"), GPTQConfig(bits=3)])
    for path in (tmp_path / "r.yaml", tmp_path / "r.json"):
        recipe.save(path)
        assert Recipe.load(path) == recipe
    assert Recipe.from_dict(recipe.to_dict()["stages"]) == recipe
    with pytest.raises(ConfigError, match="quantization must be the last stage"):
        Recipe([GPTQConfig(), HealConfig(train_dataset="x.txt")])
    with pytest.raises(ConfigError, match="'method' key"):
        Recipe.from_dict({"stages": [{"bits": 4}]})
    with pytest.raises(ConfigError, match="records no recipe"):
        Pruner(FAMILIES["llama-gqa"].build()).model.save_pretrained(tmp_path / "plain") or \
            Recipe.from_checkpoint(tmp_path / "plain")
    with pytest.raises(ConfigError, match="ONE target speedup"):
        Pruner(FAMILIES["llama-gqa"].build()).run([ZipLMConfig(target_speedup=[1.5, 2.0])])
