"""push_to_hub uploads a complete, reloadable checkpoint and a model card, in one commit (to a local fake Hub)."""

from __future__ import annotations

import json

import torch
import transformers
import yaml

from hub_server import fake_hub  # noqa: F401  (pytest fixture)
from optimum_prune import Pruner, PruningConfig
from zoo import FAMILIES, inputs, outputs


def test_push_to_hub_uploads_everything_in_one_commit(fake_hub, tmp_path):  # noqa: F811
    pruner = Pruner(FAMILIES["llama-gqa"].build(), base_model="org/tiny-llama")
    pruner.apply(PruningConfig(remove_heads={0: [0, 1]}, drop_mlp=[1], drop_layers=[3], method="manual",
                               measured_speedup=1.31, latency_environment={"device": "cpu", "batch_size": 1}))
    expected = outputs(pruner.model, inputs())
    info = pruner.push_to_hub("me/tiny-pruned", private=True)

    created = fake_hub.created[0]
    assert (created["organization"], created["name"], created["visibility"]) == ("me", "tiny-pruned", "private")
    assert len(fake_hub.commits) == 1
    commit = fake_hub.commits[0]
    assert commit.repo_id == "me/tiny-pruned" and info.oid == commit.oid
    assert "parameters" in commit.summary
    names = set(commit.files)
    assert {"config.json", "model.safetensors", "README.md", "modeling_pruned.py", "surgery.py", "adapters.py",
            "pruning_config.py", "generation_config.json"} <= names

    config = json.loads(commit.files["config.json"])
    assert config["model_type"] == "pruned_llama"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_pruned.PrunedLlamaForCausalLM"
    assert config["pruning_config"]["base_model"] == "org/tiny-llama"

    card = commit.files["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "org/tiny-llama"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"optimum-prune", "pruned", "manual"} <= set(meta["tags"])
    assert "| parameters |" in card and "whole layer" in card
    assert "| measured speedup | 1.31 |" in card and "device=cpu" in card

    # what was uploaded is a checkpoint that reloads to the same model
    out = tmp_path / "downloaded"
    out.mkdir()
    for name, data in commit.files.items():
        (out / name).write_bytes(data)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(outputs(reloaded, inputs()), expected, atol=1e-5, rtol=0)


def test_pushing_again_makes_a_second_commit_on_the_existing_repo(fake_hub):  # noqa: F811
    pruner = Pruner(FAMILIES["bert"].build())
    pruner.apply(PruningConfig(remove_neurons={0: [1, 2, 3]}))
    pruner.push_to_hub("me/bert-pruned")
    pruner.apply(PruningConfig(drop_attention=[2]))
    pruner.push_to_hub("me/bert-pruned", commit_message="drop attention 2")
    assert [c.summary for c in fake_hub.commits][1] == "drop attention 2"
    config = json.loads(fake_hub.repos["me/bert-pruned"]["config.json"])
    assert config["pruning_config"]["drop_attention"] == [2]
    card = fake_hub.repos["me/bert-pruned"]["README.md"].decode()
    assert "pipeline_tag: feature-extraction" in card


def test_a_push_that_cannot_happen_fails_in_one_line_before_the_work(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from optimum_prune.cli import main
    from optimum_prune.session import PushError, check_push

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    import pytest

    with pytest.raises(PushError, match="no Hugging Face token"):
        check_push("me/model")
    monkeypatch.setenv("HF_TOKEN", "t")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "t")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(PushError, match="127.0.0.1 is unreachable"):
        check_push("me/model")
    loaded = []
    monkeypatch.setattr("optimum_prune.Pruner.from_pretrained", lambda *a, **k: loaded.append(a))
    assert main(["prune", "--model", "x", "--sparsity", "0.5", "--output", str(tmp_path / "o"),
                 "--push-to-hub", "me/model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: cannot push to the Hub" in err and not loaded  # before loading anything
