"""Loading for pruning: GGUF files become savable models; bad input fails clearly; saves are atomic."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import transformers

from gguf_writer import write_gguf_of_architecture, write_llama_gguf
from optimum_prune import Pruner, PruningConfig, UnsupportedArchitectureError
from zoo import FAMILIES, inputs, outputs

pytest.importorskip("gguf")


def _tiny_llama(tie: bool) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_gguf_loads_as_a_savable_model(tie, tmp_path):
    dense = _tiny_llama(tie)
    write_llama_gguf(dense, str(tmp_path / "tiny.gguf"))
    pruner = Pruner.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    batch = inputs()
    torch.testing.assert_close(outputs(pruner.model, batch), outputs(dense, batch), atol=1e-5, rtol=0)
    assert getattr(pruner.model.config, "quantization_config", None) is None
    pruner.apply(PruningConfig(remove_heads={0: [0, 1]}, drop_mlp=[1]))
    expected = outputs(pruner.model, batch)
    pruner.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(outputs(reloaded, batch), expected, atol=1e-5, rtol=0)


def test_gguf_file_path_directly(tmp_path):
    write_llama_gguf(_tiny_llama(False), str(tmp_path / "tiny.gguf"))
    pruner = Pruner.from_pretrained(str(tmp_path / "tiny.gguf"), gguf_file="tiny.gguf")
    pruner.save_pretrained(tmp_path / "plain")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "plain").model_type == "llama"


@pytest.mark.parametrize("architecture, message", [
    ("rwkv6", r"'rwkv6' model \(GGUF general.architecture\), read without dequantizing: optimum-prune does not "
              r"support .*Supported model types: llama.* GGUF files load for: llama, mistral, qwen2, qwen3, gpt2, "
              r"gemma2, gemma3_text, phi3, qwen3_moe, qwen2_moe; choose"),
    ("falcon", r"'falcon' model .*does not support the architecture 'falcon'.* GGUF files load for: llama"),
    ("gptneox", r"'gptneox' model .*optimum-prune supports the family \(gpt_neox\), but transformers .* cannot "
                r"dequantize its GGUF files. Load the original checkpoint instead .*GGUF files load for: llama"),
])
def test_unsupported_gguf_fails_from_its_metadata_before_anything_is_dequantized(architecture, message, tmp_path,
                                                                                   monkeypatch):
    import gguf
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    write_gguf_of_architecture(str(tmp_path / "model.gguf"), architecture)

    def never(*args, **kwargs):
        raise AssertionError("the GGUF file was read beyond its metadata")

    monkeypatch.setattr(gguf, "dequantize", never)
    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", never)  # config, tokenizer and weights all go through it
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", never)
    before = sorted(os.listdir(tmp_path))
    start = time.process_time()
    with pytest.raises(UnsupportedArchitectureError, match=message):
        Pruner.from_pretrained(str(tmp_path), gguf_file="model.gguf")
    assert time.process_time() - start < 2.0  # CPU seconds of this process: the header only
    assert sorted(os.listdir(tmp_path)) == before


def test_gguf_architecture_names_map_to_model_types(tmp_path):
    from optimum_prune.loading import check_gguf_architecture, gguf_loadable_model_types

    loadable = gguf_loadable_model_types()
    assert {"llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "qwen3_moe", "qwen2_moe"} <= set(loadable)
    assert "gpt_neox" not in loadable and "olmo2" not in loadable  # supported families transformers reads no GGUF of
    for architecture, model_type in [("llama", "llama"), ("gemma3", "gemma3_text"), ("qwen3moe", "qwen3_moe")]:
        write_gguf_of_architecture(str(tmp_path / f"{architecture}.gguf"), architecture, floats=64)
        assert check_gguf_architecture(str(tmp_path / f"{architecture}.gguf")) == model_type


def test_unsupported_architecture_lists_the_supported_ones():
    config = transformers.T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    model = transformers.T5ForConditionalGeneration(config)
    with pytest.raises(UnsupportedArchitectureError, match=r"'T5ForConditionalGeneration'.*llama, mistral, qwen2, "
                                                          r"qwen3, opt, gpt2, bert"):
        Pruner(model)


def test_unsupported_family_says_what_it_lacks():
    config = transformers.PhimoeConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, num_local_experts=2)
    with pytest.raises(UnsupportedArchitectureError, match=r"'phimoe'\): no adapter describes where this "
                                                          r"Mixture-of-Experts family .*supported MoE families: mixtral"
                                                          r".* Supported model types: .*phi3, gpt_neox, mixtral"):
        Pruner(transformers.PhimoeForCausalLM(config))
    with pytest.raises(UnsupportedArchitectureError, match="no architecture adapter says where this family keeps"):
        Pruner(transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)))


def test_unsupported_architecture_fails_before_loading_weights(tmp_path):
    config = transformers.T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    config.save_pretrained(tmp_path)  # no weights at all: the error must come from the config alone
    with pytest.raises(UnsupportedArchitectureError, match="Supported model types"):
        Pruner.from_pretrained(str(tmp_path))


def test_corrupt_or_missing_checkpoint_says_how_to_fix_it(tmp_path):
    from optimum_prune import ModelLoadError

    FAMILIES["llama-gqa"].build().save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not a valid JSON.*Restore it from the original checkpoint"):
        Pruner.from_pretrained(str(tmp_path / "model"))
    with pytest.raises(ModelLoadError, match="Give a local checkpoint directory.*smollm2"):
        Pruner.from_pretrained(str(tmp_path / "no" / "such" / "model"))


def test_local_directory_round_trip_keeps_the_head(tmp_path):
    FAMILIES["bert-cls"].build().save_pretrained(tmp_path / "dense")
    pruner = Pruner.from_pretrained(str(tmp_path / "dense"), tokenizer=False)
    assert isinstance(pruner.model, transformers.BertForSequenceClassification)
    pruner.apply(PruningConfig(remove_neurons={0: [1, 2]}))
    pruner.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["PrunedBertForSequenceClassification"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    pruner = Pruner(FAMILIES["llama-gqa"].build())
    pruner.apply(PruningConfig(remove_heads={0: [0, 1]}))

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(pruner.model.config), "save_pretrained", explode)
    with pytest.raises(OSError, match="disk full"):
        pruner.save_pretrained(tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_the_previous_output(tmp_path, monkeypatch):
    pruner = Pruner(FAMILIES["gpt2"].build())
    pruner.save_pretrained(tmp_path / "out")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    pruner.apply(PruningConfig(drop_mlp=[0]))
    monkeypatch.setattr(type(pruner.model.config), "save_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        pruner.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").model_type == "gpt2"


def test_gpt2_with_layer_index_scaling_refuses_to_renumber_blocks():
    config = FAMILIES["gpt2"].make_config()
    config.scale_attn_by_inverse_layer_idx = True
    model = transformers.GPT2LMHeadModel(config).eval()
    with pytest.raises(Exception, match="use `drop_attention` and `drop_mlp`"):
        Pruner(model).apply(PruningConfig(drop_layers=[1]))
    assert len(model.transformer.h) == 4
    Pruner(model).apply(PruningConfig(drop_attention=[1], drop_mlp=[1]))  # the suggested fix works
