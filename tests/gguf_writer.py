"""Write a tiny Llama GGUF file (the llama.cpp layout) from a transformers model, for tests."""

from __future__ import annotations

import numpy as np
import torch


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved for its RoPE; transformers undoes this on load."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(model: torch.nn.Module, path: str) -> None:
    """Save a LlamaForCausalLM (untied or tied embeddings) as an F32 GGUF with a byte-level vocab."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = [f"<t{i}>" for i in range(cfg.vocab_size)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * cfg.vocab_size)
    w.add_token_types([gguf.TokenType.NORMAL] * cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names.update({
            p + "input_layernorm.weight": f"blk.{i}.attn_norm.weight",
            p + "self_attn.q_proj.weight": f"blk.{i}.attn_q.weight",
            p + "self_attn.k_proj.weight": f"blk.{i}.attn_k.weight",
            p + "self_attn.v_proj.weight": f"blk.{i}.attn_v.weight",
            p + "self_attn.o_proj.weight": f"blk.{i}.attn_output.weight",
            p + "post_attention_layernorm.weight": f"blk.{i}.ffn_norm.weight",
            p + "mlp.gate_proj.weight": f"blk.{i}.ffn_gate.weight",
            p + "mlp.up_proj.weight": f"blk.{i}.ffn_up.weight",
            p + "mlp.down_proj.weight": f"blk.{i}.ffn_down.weight",
        })
    for hf_name, gguf_name in names.items():
        t = sd[hf_name]
        if hf_name.endswith("q_proj.weight"):
            t = _permute(t, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            t = _permute(t, cfg.num_key_value_heads)
        w.add_tensor(gguf_name, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gguf_of_architecture(path: str, architecture: str, *, floats: int = 1 << 20) -> None:
    """A GGUF file whose general.architecture is ``architecture``: a few keys, a vocab and one F32 tensor."""
    import gguf

    w = gguf.GGUFWriter(path, architecture)
    w.add_name(f"tiny-{architecture}")
    w.add_block_count(1)
    w.add_context_length(16)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(8)])
    w.add_token_scores([0.0] * 8)
    w.add_token_types([gguf.TokenType.NORMAL] * 8)
    w.add_tensor("token_embd.weight", np.zeros((floats // 8, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
