"""Tiny random models of every supported family, and the structures the tests remove from them."""

from __future__ import annotations

import copy
import string
from dataclasses import dataclass
from typing import Callable

import torch
import transformers
from tokenizers import Tokenizer, models
from torch import nn
from transformers import PreTrainedTokenizerFast

from optimum_prune import PruningConfig, get_adapter
from optimum_prune.modeling.adapters import get_module, set_module

VOCAB = 96


@dataclass(frozen=True)
class Family:
    """A tiny model factory plus what the tests need to know about it."""

    name: str
    make_config: Callable[[], transformers.PretrainedConfig]
    auto_class: str
    pre_ln: bool = True
    generates: bool = True
    gptq_8bit_rel_err: float = 1e-2
    """Bound on 8-bit GPTQ's relative logit error. Post-norm families (Gemma 2/3, OLMo 2) normalize each
    sublayer's output to the residual's scale, so weight noise reaches the logits undamped where a tiny
    pre-norm model's sublayers barely move its residual (8-bit round-to-nearest: 0.015-0.016 there, 0.001-0.005
    for the others; GPTQ beats it on every family)."""

    def build(self, seed: int = 0) -> transformers.PreTrainedModel:
        torch.manual_seed(seed)
        model = getattr(transformers, self.auto_class).from_config(self.make_config())
        # Random init leaves norms at 1 and biases at 0: randomize them so their slicing is exercised too.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name.lower():
                    p.add_(torch.randn_like(p) * 0.1)
        return model.eval()


def _llama(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    base.update(kw)
    return base


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama-gqa", lambda: transformers.LlamaConfig(**_llama()), "AutoModelForCausalLM"),
    Family("llama-mha-tied", lambda: transformers.LlamaConfig(**_llama(num_key_value_heads=4, tie_word_embeddings=True)),
           "AutoModelForCausalLM"),
    Family("mistral", lambda: transformers.MistralConfig(**_llama(sliding_window=None)), "AutoModelForCausalLM"),
    Family("qwen2", lambda: transformers.Qwen2Config(**_llama()), "AutoModelForCausalLM"),
    Family("qwen3", lambda: transformers.Qwen3Config(**_llama(head_dim=8)), "AutoModelForCausalLM"),
    Family("opt", lambda: transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=4,
                                                 num_attention_heads=4, word_embed_proj_dim=32,
                                                 max_position_embeddings=64), "AutoModelForCausalLM"),
    Family("gpt2", lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_inner=48,
                                                   n_positions=64), "AutoModelForCausalLM"),
    Family("bert", lambda: transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4,
                                                   num_attention_heads=4, intermediate_size=48,
                                                   max_position_embeddings=64), "AutoModel", pre_ln=False,
           generates=False),
    Family("bert-mlm", lambda: transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4,
                                                       num_attention_heads=4, intermediate_size=48,
                                                       max_position_embeddings=64), "AutoModelForMaskedLM",
           pre_ln=False, generates=False),
    Family("bert-cls", lambda: transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4,
                                                       num_attention_heads=4, intermediate_size=48, num_labels=3,
                                                       max_position_embeddings=64),
           "AutoModelForSequenceClassification", pre_ln=False, generates=False),
    # issue 14's dense families: each one's own mechanism is switched on, and sized like the others
    Family("granite", lambda: transformers.GraniteConfig(**_llama(embedding_multiplier=2.0, residual_multiplier=0.5,
                                                                 attention_multiplier=0.3, logits_scaling=4.0)),
           "AutoModelForCausalLM"),
    Family("gemma", lambda: transformers.GemmaConfig(**_llama(head_dim=16, tie_word_embeddings=True)),
           "AutoModelForCausalLM"),
    Family("gemma2", lambda: transformers.Gemma2Config(**_llama(
        head_dim=16, tie_word_embeddings=True, sliding_window=4, query_pre_attn_scalar=16,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0)), "AutoModelForCausalLM", gptq_8bit_rel_err=2e-2),
    Family("gemma3_text", lambda: transformers.Gemma3TextConfig(**_llama(
        head_dim=16, tie_word_embeddings=True, sliding_window=4, query_pre_attn_scalar=16,
        final_logit_softcapping=3.0, layer_types=["sliding_attention", "full_attention"] * 2)),
           "AutoModelForCausalLM", gptq_8bit_rel_err=2e-2),
    Family("olmo2", lambda: transformers.Olmo2Config(**_llama(eos_token_id=2)), "AutoModelForCausalLM",
           gptq_8bit_rel_err=2e-2),
    Family("phi3", lambda: transformers.Phi3Config(**_llama(pad_token_id=0, bos_token_id=1, eos_token_id=2)),
           "AutoModelForCausalLM"),
    Family("gpt_neox", lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=64, use_parallel_residual=True, attention_bias=True, bos_token_id=0, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
           "AutoModelForCausalLM"),
]}
NEW_FAMILIES = ("granite", "gemma", "gemma2", "gemma3_text", "olmo2", "phi3", "gpt_neox")


def _moe(**kw):
    """6 experts of width 24, 2 picked per token; otherwise sized like the dense families."""
    return _llama(num_experts_per_tok=2, **kw)


# Mixture-of-Experts families (transformers 5 fused expert tensors); Qwen2-MoE adds a shared expert. Kept apart
# from FAMILIES: their FFN neurons sit inside experts, so the dense structure tests do not apply as written.
MOE_FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("mixtral", lambda: transformers.MixtralConfig(**_moe(intermediate_size=24, num_local_experts=6)),
           "AutoModelForCausalLM"),
    Family("qwen2_moe", lambda: transformers.Qwen2MoeConfig(**_moe(
        moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=6, norm_topk_prob=False)),
           "AutoModelForCausalLM"),
    Family("qwen3_moe", lambda: transformers.Qwen3MoeConfig(**_moe(moe_intermediate_size=24, num_experts=6,
                                                                  head_dim=8, norm_topk_prob=True)),
           "AutoModelForCausalLM"),
    Family("olmoe", lambda: transformers.OlmoeConfig(**_moe(intermediate_size=24, num_experts=6, eos_token_id=2,
                                                           pad_token_id=0)), "AutoModelForCausalLM"),
]}


def never_routed(model: nn.Module, layer: int, expert: int) -> None:
    """Make ``expert`` of ``layer`` unreachable: its router logit is below -500 for every token (probability 0).

    Every token's embedding gets a constant 0.05 in channel 0 (the random blocks barely move it; the others
    keep their random values, so routing stays diverse): the router input's channel 0 is then always
    positive (0.5 or more in these models), and the expert's router row reads only that channel, negated.
    """
    adapter = get_adapter(model)
    router, _ = adapter.experts.modules(adapter.layers(model)[layer])
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 0.05
        router.weight[expert] = 0.0
        router.weight[expert, 0] = -1e3

# Valid for 4 query heads sharing 2 KV heads: a whole KV group, and one head from each group.
STRUCTURES: dict[str, PruningConfig] = {
    "heads": PruningConfig(remove_heads={0: [0, 1], 2: [1, 3]}),
    "neurons": PruningConfig(remove_neurons={0: [0, 5, 7], 3: list(range(20))}),
    "drop_attention": PruningConfig(drop_attention=[0, 2]),
    "drop_mlp": PruningConfig(drop_mlp=[1]),
    "drop_layers": PruningConfig(drop_layers=[1]),
    "mixed": PruningConfig(remove_heads={3: [0, 2]}, remove_neurons={0: [1, 2, 3]}, drop_attention=[0],
                           drop_mlp=[2], drop_layers=[1]),
}


def inputs(batch: int = 2, length: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, VOCAB, (batch, length), generator=g),
            "attention_mask": torch.ones(batch, length, dtype=torch.long)}


def outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _zero_inputs(module: nn.Module, columns: torch.Tensor) -> None:
    """Zero input features of a Linear ((out, in) weight) or Conv1D ((in, out) weight)."""
    if isinstance(module, transformers.pytorch_utils.Conv1D):
        module.weight[columns, :] = 0
    else:
        module.weight[:, columns] = 0


def _zero_all(module: nn.Module) -> None:
    module.weight.zero_()
    if module.bias is not None:
        module.bias.zero_()


def zeroed_reference(model: nn.Module, structure: PruningConfig, *, include_drop_layers: bool) -> nn.Module:
    """The dense model with exactly the removed structures' output weights set to zero."""
    ref = copy.deepcopy(model)
    adapter = get_adapter(ref)
    dims = adapter.dims(ref.config)
    layers = adapter.layers(ref)
    hd = dims.head_dim
    with torch.no_grad():
        for layer, heads in structure.remove_heads.items():
            cols = torch.tensor([h * hd + i for h in heads for i in range(hd)])
            _zero_inputs(get_module(layers[layer], adapter.attention_out), cols)
            kept_q = [h for h in range(dims.num_heads) if h not in heads]
            kept = {"q": kept_q, "k": sorted({h // dims.heads_per_group for h in kept_q})}
            for path, part in adapter.head_norms:  # a norm over the whole projection: its statistic loses the heads
                norm = get_module(layers[layer], path)
                set_module(layers[layer], path, KeptChannelsNorm(norm, kept[part], hd))
        for layer, neurons in structure.remove_neurons.items():
            _zero_inputs(get_module(layers[layer], adapter.mlp_out), torch.tensor(neurons))
        gone = set(structure.drop_layers) if include_drop_layers else set()
        for layer in set(structure.drop_attention) | gone:
            _zero_all(get_module(layers[layer], adapter.attention_out))
        for layer in set(structure.drop_mlp) | gone:
            _zero_all(get_module(layers[layer], adapter.mlp_out))
    return ref


class KeptChannelsNorm(nn.Module):
    """A norm over a whole projection, computed on the kept heads' channels only (the others give zeros)."""

    def __init__(self, norm: nn.Module, kept_heads: list[int], head_dim: int) -> None:
        super().__init__()
        self.keep = torch.tensor([h * head_dim + i for h in kept_heads for i in range(head_dim)])
        self.norm = copy.deepcopy(norm)
        self.norm.weight = nn.Parameter(norm.weight.data[self.keep].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        out[..., self.keep] = self.norm(x[..., self.keep])
        return out


def removed_parameter_count(model: nn.Module, structure: PruningConfig) -> int:
    """Parameters that removing ``structure`` must delete from the dense ``model``, counted by hand."""
    adapter = get_adapter(model)
    dims = adapter.dims(model.config)
    layers = adapter.layers(model)
    H, hd = dims.hidden_size, dims.head_dim
    total = 0
    for layer, block in enumerate(layers):
        if layer in structure.drop_layers:
            total += sum(p.numel() for p in block.parameters())
            continue
        if layer in structure.drop_attention:
            mods = {adapter.attention, adapter.attention_out, *adapter.sublayer_norms(model.config, "attention")}
            # count each module once even when one contains another
            counted = {id(p): p for m in mods for p in get_module(block, m).parameters()}
            total += sum(p.numel() for p in counted.values())
        elif layer in structure.remove_heads:
            heads = structure.remove_heads[layer]
            groups_gone = sum(1 for c in dims.kept_heads_per_kv_group(heads) if c == 0)
            q_bias = any(get_module(block, p.path).bias is not None for p in adapter.attention_in)
            per_head = hd * H + (hd if q_bias else 0)
            total += len(heads) * (per_head + hd * H)  # q rows (+bias) and out-proj columns
            total += groups_gone * 2 * per_head  # k and v rows (+bias)
            total += sum(hd * (len(heads) if part == "q" else groups_gone) for _, part in adapter.head_norms)
        if layer in structure.drop_mlp:
            mods = {*adapter.mlp_in, adapter.mlp_out, *adapter.sublayer_norms(model.config, "mlp")}
            total += sum(p.numel() for m in mods for p in get_module(block, m).parameters())
        elif layer in structure.remove_neurons:
            n = len(structure.remove_neurons[layer])
            for path in adapter.mlp_in:
                rows = n * adapter.fused_mlp_in.get(path, 1)
                total += rows * (H + (1 if get_module(block, path).bias is not None else 0))
            total += n * H
    return total


CHARS = string.ascii_letters + string.digits + " \n.,;:!?'\"-()"
TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "\n\n" + "Pack my box with five dozen liquor jugs!\n") * 6


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (a BPE model without merges), ids below the zoo's vocabulary size."""
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(CHARS)}}
    assert len(vocab) <= VOCAB
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
                                  unk_token="<unk>")
    tok.model_max_length = 64
    return tok
