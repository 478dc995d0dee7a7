"""GGUF export: llama.cpp (llama-cpp-python) runs every pruned structure exactly like transformers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from optimum_prune import Pruner, PruningConfig
from optimum_prune.export import GGUFExportError, export_gguf, plan_export
from optimum_prune.export.quantize import describe_exit
from zoo import FAMILIES, STRUCTURES, _llama, char_tokenizer, inputs

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

PROMPT_LEN, NEW_TOKENS = 12, 32

# Every structure kind, the two deci traps, and a block left with neither sublayer.
CASES: dict[str, PruningConfig] = {
    "dense": PruningConfig(),
    **STRUCTURES,  # heads (a whole KV group; one head per group), neurons, drop_attention [0, 2], drop_mlp,
    #                drop_layers, mixed
    "trap_attention_without_ffn": PruningConfig(drop_mlp=[0, 3], remove_heads={3: [0, 2]}),
    "trap_layer0_without_attention": PruningConfig(drop_attention=[0]),
    "identity_block": PruningConfig(drop_attention=[1], drop_mlp=[1]),
    "no_attention_at_all": PruningConfig(drop_attention=[0, 1, 2, 3]),
    "combined": PruningConfig(remove_heads={1: [0, 1]}, remove_neurons={1: list(range(40)), 3: [0, 1]},
                              drop_attention=[0, 3], drop_mlp=[2], drop_layers=[1]),
}


def _pruned(family: str, case: str) -> Pruner:
    pruner = Pruner(FAMILIES[family].build())
    if not CASES[case].is_empty:
        pruner.apply(CASES[case])
    return pruner


def _prompt() -> list[int]:
    return inputs(1, PROMPT_LEN)["input_ids"][0].tolist()


def _transformers_run(model, ids: list[int]) -> tuple[np.ndarray, list[int]]:
    """Logits of the prompt, and 32 greedy tokens (no EOS stop), from the transformers model."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
        seq, new = list(ids), []
        for _ in range(NEW_TOKENS):
            token = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            new.append(token)
            seq.append(token)
    return logits, new


def _llama_cpp_run(path: Path, ids: list[int]) -> tuple[np.ndarray, list[int]]:
    """The same from llama.cpp (KV cache, one token at a time after the prompt)."""
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    try:
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)])
        new = []
        for _ in range(NEW_TOKENS):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            new.append(token)
            llm.eval([token])
    finally:
        llm.close()
    return logits, new


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", ["llama-gqa", "llama-mha-tied"])
def test_f32_export_runs_exactly_in_llama_cpp(tmp_path, family, case):
    pruner = _pruned(family, case)
    ids = _prompt()
    want_logits, want_tokens = _transformers_run(pruner.model, ids)
    result = pruner.export(tmp_path / "m.gguf", dtype="f32")
    assert result.arch == ("llama" if case in ("dense", "drop_layers", "identity_block") else "deci")  # uniform: llama
    got_logits, got_tokens = _llama_cpp_run(result.path, ids)
    assert _relative(got_logits, want_logits) <= 1e-3
    assert got_tokens == want_tokens


def test_plan_encodes_the_traps_and_leaves_out_identity_blocks():
    plan = plan_export(_pruned("llama-gqa", "combined").model)
    # original layers 0, 2, 3 remain (1 dropped); 0: no attention -> zero linear attention; 2: MLP dropped
    assert [(p.attention, p.mlp) for p in plan.layers] == [("zero_linear", "full"), ("full", "zero"),
                                                           ("none", "full")]
    assert [(p.n_head, p.n_head_kv) for p in plan.layers] == [(4, 0), (4, 2), (0, 0)]
    assert plan.layers[2].n_ff == 48 - 2 and len(plan.notes) == 2
    identity = plan_export(_pruned("llama-gqa", "identity_block").model)
    assert [p.block for p in identity.layers] == [0, 2, 3]


def test_gguf_records_per_layer_arrays_and_the_structure(tmp_path):
    path = _pruned("llama-gqa", "mixed").export(tmp_path / "m.gguf", dtype="f32").path
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["general.architecture"].contents() == "deci"
    assert fields["deci.attention.head_count"].contents() == [4, 4, 2]  # layer 0 zero-linear; 3 lost a head per group
    assert fields["deci.attention.head_count_kv"].contents() == [0, 2, 2]
    assert fields["deci.feed_forward_length"].contents() == [45, 32, 48]  # layer 2's MLP: the zero FFN
    assert '"drop_layers": [1]' in fields["optimum_prune.pruning_config"].contents()


@pytest.mark.parametrize("dtype,tolerance", [("f16", 2e-2), ("bf16", 5e-2)])
def test_half_precision_exports_run(tmp_path, dtype, tolerance):
    pruner = _pruned("llama-gqa", "mixed")
    ids = _prompt()
    want, _ = _transformers_run(pruner.model, ids)
    result = pruner.export(tmp_path / f"m-{dtype}.gguf", dtype=dtype.upper())
    assert result.dtype == dtype
    got, _ = _llama_cpp_run(result.path, ids)
    assert _relative(got, want) <= tolerance


@pytest.mark.parametrize("family", ["opt", "gpt2", "bert-mlm", "qwen3", "qwen2"])
def test_unsupported_family_is_refused_before_writing(tmp_path, family):
    pruner = Pruner(FAMILIES[family].build())
    with pytest.raises(GGUFExportError, match="cannot export"):
        pruner.export(tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_bad_options_are_refused_before_writing(tmp_path):
    pruner = _pruned("llama-gqa", "dense")
    with pytest.raises(GGUFExportError, match="unknown GGUF dtype 'int3'"):
        pruner.export(tmp_path / "m.gguf", dtype="int3")
    with pytest.raises(GGUFExportError, match="unknown export format 'onnx'"):
        pruner.export(tmp_path / "m.gguf", format="onnx")
    with pytest.raises(GGUFExportError, match="should end in .gguf"):
        pruner.export(tmp_path / "m.bin")
    assert list(tmp_path.iterdir()) == []


def test_chat_template_is_embedded(tmp_path):
    tokenizer = char_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    pruner = Pruner(FAMILIES["llama-gqa"].build(), tokenizer)
    path = pruner.export(tmp_path / "m.gguf", dtype="f32").path
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert len(fields["tokenizer.ggml.tokens"].data) == 96


def test_cli_export(tmp_path):
    pruner = _pruned("llama-gqa", "mixed")
    pruner.save_pretrained(tmp_path / "ckpt")
    from optimum_prune.cli import main

    assert main(["export", "--model", str(tmp_path / "ckpt"), "--output", str(tmp_path / "m.gguf"),
                 "--dtype", "f32"]) == 0
    got, _ = _llama_cpp_run(tmp_path / "m.gguf", _prompt())
    want, _ = _transformers_run(pruner.model, _prompt())
    assert _relative(got, want) <= 1e-3


QUANTIZED_RUN = textwrap.dedent("""
    import sys, numpy as np, llama_cpp
    llm = llama_cpp.Llama(sys.argv[1], n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval([int(t) for t in sys.argv[2].split(",")])
    np.save(sys.argv[3], np.array(llm.scores[:llm.n_tokens]))
    llm.close()
""")


def test_quantized_export_through_llama_cpp(tmp_path):
    """Q8_0 by llama.cpp's quantizer; it and the run happen in child processes, so a SIGILL build skips."""
    from optimum_prune.export import LlamaCppCrashError

    pruner = _pruned("llama-gqa", "mixed")
    ids = _prompt()
    want, _ = _transformers_run(pruner.model, ids)
    try:
        result = pruner.export(tmp_path / "m.gguf", dtype="q8_0")
    except LlamaCppCrashError as err:
        pytest.skip(f"this llama-cpp-python build crashes on this CPU: {err}")
    assert result.dtype == "Q8_0" and result.path.is_file()
    proc = subprocess.run([sys.executable, "-c", QUANTIZED_RUN, str(result.path), ",".join(map(str, ids)),
                           str(tmp_path / "logits.npy")], capture_output=True, text=True)
    crash = describe_exit(proc.returncode)
    if crash:
        pytest.skip(f"this llama-cpp-python build dies with {crash} running a Q8_0 file on this CPU")
    assert proc.returncode == 0, proc.stderr
    assert _relative(np.load(tmp_path / "logits.npy"), want) <= 5e-2


def test_gguf_perplexity_matches_transformers(tmp_path):
    """evaluation.gguf: the project's perplexity from llama.cpp's logits of the exported file."""
    from optimum_prune.evaluation import perplexity
    from optimum_prune.evaluation.gguf import gguf_perplexity

    pruner = _pruned("llama-gqa", "combined")
    windows = inputs(3, 32, seed=5)["input_ids"]
    want = perplexity(pruner.model, input_ids=windows, progress=False)
    path = pruner.export(tmp_path / "m.gguf", dtype="f32").path
    got = gguf_perplexity(path, input_ids=windows, seq_len=32)
    assert (got.num_tokens, got.num_windows) == (want.num_tokens, want.num_windows) == (93, 3)
    assert abs(got.perplexity / want.perplexity - 1) <= 1e-4


def _llama_model(**config):
    """The tiny GQA Llama of the zoo with some config settings changed."""
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_llama(**config))).eval()


REFUSED_SETTINGS = {
    "gelu": (dict(hidden_act="gelu"), "hidden_act is 'gelu'"),
    "attention_bias": (dict(attention_bias=True), "biases"),
    "mlp_bias": (dict(mlp_bias=True), "biases"),
    "rope_llama3": (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 16}), "RoPE scaling 'llama3'"),
}


@pytest.mark.parametrize("case", list(REFUSED_SETTINGS))
def test_unsupported_settings_are_refused_before_writing(tmp_path, case):
    """Llama-family models whose settings the llama/deci graphs cannot reproduce: refused, naming why, no file."""
    config, reason = REFUSED_SETTINGS[case]
    with pytest.raises(GGUFExportError, match=reason):
        Pruner(_llama_model(**config)).export(tmp_path / "m.gguf", dtype="f32")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_models_and_structures_are_refused_before_writing(tmp_path):
    """A sliding window shorter than the context, a model without LM head, non-float (packed) weights, and a
    structure that removes every sublayer: each refused with its reason, nothing written."""
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(**_llama(sliding_window=8))).eval()
    with pytest.raises(GGUFExportError, match="sliding-window attention"):
        export_gguf(mistral, tmp_path / "m.gguf")
    with pytest.raises(GGUFExportError, match="no language-model head"):
        export_gguf(transformers.LlamaModel(transformers.LlamaConfig(**_llama())), tmp_path / "m.gguf")
    packed = _llama_model()
    packed.model.layers[0].mlp.down_proj.weight = torch.nn.Parameter(
        torch.zeros(32, 48, dtype=torch.int8), requires_grad=False)
    with pytest.raises(GGUFExportError, match="not a materialized float tensor"):
        export_gguf(packed, tmp_path / "m.gguf")
    empty = Pruner(_llama_model())
    empty.apply(PruningConfig(drop_attention=[0, 1, 2, 3], drop_mlp=[0, 1, 2, 3]))
    with pytest.raises(GGUFExportError, match="no layer keeps attention or an MLP"):
        empty.export(tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []
