"""config.json's dense dimensions are checked against the safetensors headers before anything is built, on
every load path (trust_remote_code: in test_integrity.py); a seeded fuzz of OPT (MHA, biases, learned positions)
and Gemma 2 (post-norms, tied) checkpoints loads exactly or raises our error (pruning_config, dense dimensions,
weights: shapes, dtypes, keys, NaN)."""

from __future__ import annotations

import json
import random
import resource
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from test_integrity import WEIGHTS, _copy, _deadline, _mutate_config, _mutate_weights
from zoo import FAMILIES, STRUCTURES, inputs, outputs

from optimum_prune import Pruner
from optimum_prune.modeling.integrity import CheckpointIntegrityError, check_weights_before_loading
from optimum_prune.modeling.modeling_pruned import PRUNED_CLASSES


def _save(family: str, path: Path, structure: str | None = "mixed"):
    pruner = Pruner(FAMILIES[family].build())
    if structure:
        pruner.apply(STRUCTURES[structure])
    batch = inputs()
    expected = outputs(pruner.model, batch)
    pruner.save_pretrained(path)
    return path, batch, expected


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("dims")
    return {"llama": _save("llama-gqa", root / "llama"), "gpt2": _save("gpt2", root / "gpt2"),
            "dense": _save("llama-gqa", root / "dense", structure=None)}


def _with_config(src: Path, dst: Path, **fields) -> Path:
    config = json.loads((src / "config.json").read_text())
    config.update(fields)
    return _copy(src, dst, config=config)


@contextmanager
def _bounded(mib: int = 64):
    """The block may not allocate more than ``mib`` MiB (Python objects by tracemalloc, tensors by peak RSS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < mib << 20, f"{peak >> 20} MiB of Python objects"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < mib << 10, "tensor memory grew"


LOADERS = {"plugin": lambda path: transformers.AutoModelForCausalLM.from_pretrained(path),
           "pruner": lambda path: Pruner.from_pretrained(str(path), tokenizer=False)}
DIMS = [  # (checkpoint, config.json fields, words of the error)
    ("llama", {"intermediate_size": 10**10}, ["`intermediate_size` gives 10000000000", "`model.embed_tokens.weight`"]),
    ("llama", {"num_attention_heads": 10**6}, ["`num_attention_heads` gives 1000000"]),
    ("llama", {"head_dim": 10**6}, ["`head_dim` gives 1000000"]),
    ("llama", {"vocab_size": 10**10}, ["`vocab_size` gives 10000000000"]),
    ("llama", {"num_hidden_layers": 10**6, "pruning_config": None}, ["`num_hidden_layers` is 1000000",
                                                                      "hold 3 blocks"]),
    ("llama", {"hidden_size": 64}, ["`hidden_size` is 64, but the weights were saved with 32", "lm_head.weight"]),
    ("llama", {"intermediate_size": 50}, ["`intermediate_size` is 50, but the weights were saved with 48"]),
    ("llama", {"num_key_value_heads": 4}, ["model.layers.1.self_attn.k_proj.weight", "[16, 32]",
                                           "`pruning_config.remove_heads` removes nothing from layer 2"]),
    ("llama", {"vocab_size": "96"}, ["config.json holds a value LlamaConfig refuses", "'vocab_size'", "got str"]),
    ("llama", {"num_attention_heads": 0}, ["`num_attention_heads` is 0; it must be a positive integer"]),
    ("gpt2", {"n_inner": 10**10}, ["`n_inner` gives 10000000000"]),
    ("gpt2", {"n_embd": 64}, ["`n_embd` is 64, but the weights were saved with 32"]),
    ("dense", {"intermediate_size": 10**10}, ["`intermediate_size` gives 10000000000"]),
    ("dense", {"num_attention_heads": 8}, ["`num_attention_heads` is 8, but the weights were saved with 4"]),
]


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("name, fields, words", DIMS, ids=lambda v: str(v)[:40])
def test_dense_dimensions_are_checked_against_the_headers_before_allocation(checkpoints, tmp_path, loader, name,
                                                                            fields, words):
    if loader == "plugin" and name == "dense":
        pytest.skip("a dense checkpoint loads as a plain transformers model, without our classes")
    src = checkpoints[name][0]
    if fields.get("pruning_config", 0) is None:  # keep the pruning_config consistent with the new depth
        pc = json.loads((src / "config.json").read_text())["pruning_config"]
        fields = {**fields, "pruning_config": {**pc, "num_original_layers": fields["num_hidden_layers"] + 1}}
    path = _with_config(src, tmp_path / "ckpt", **fields)
    with _bounded(), _deadline(60), pytest.raises(CheckpointIntegrityError) as err:
        LOADERS[loader](path)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_nan_and_integer_weights_are_refused_on_load(checkpoints, tmp_path):
    src = checkpoints["llama"][0]
    tensors = load_file(str(src / WEIGHTS))
    tensors["model.layers.2.mlp.down_proj.weight"][0, :3] = float("nan")
    with pytest.raises(CheckpointIntegrityError, match=r"NaN/inf values in 1 tensor\(s\): "
                                                       r"`model.layers.2.mlp.down_proj.weight` \(3 of"):
        transformers.AutoModelForCausalLM.from_pretrained(_copy(src, tmp_path / "nan", tensors=tensors))
    tensors = load_file(str(src / WEIGHTS))
    tensors["lm_head.weight"] = tensors["lm_head.weight"].to(torch.int64)
    with pytest.raises(CheckpointIntegrityError, match="`lm_head.weight` is stored as I64 in model.safetensors"):
        Pruner.from_pretrained(str(_copy(src, tmp_path / "int", tensors=tensors)), tokenizer=False)


# ---------------------------------------------------------------------- fuzz: two more families
DIM_FIELDS = {"opt": ["hidden_size", "ffn_dim", "num_attention_heads", "vocab_size", "word_embed_proj_dim",
                      "num_hidden_layers"],
              "gemma2": ["hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                         "head_dim", "vocab_size", "num_hidden_layers"]}


def _mutate_dims(rng: random.Random, config: dict, fields: list[str]) -> dict:
    config = json.loads(json.dumps(config))
    for _ in range(rng.randint(1, 2)):
        name = rng.choice(fields)
        value = config[name] if type(config.get(name)) is int else 4
        config[name] = rng.choice([value + 1, value - 1, value * 2, max(1, value // 2), 0, -1, 10**10, 2**63,
                                   str(value), None, float(value)])
    return config


def _mutate_tensors(rng: random.Random, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    op = rng.randrange(4)
    if op < 2:
        return _mutate_weights(rng, tensors)
    tensors = dict(tensors)
    key = rng.choice(sorted(tensors))
    if op == 2:  # a dtype change: lossless (float64) must load exactly, an integer one must be refused
        tensors[key] = tensors[key].to(rng.choice([torch.float64, torch.int32, torch.int8, torch.bool]))
    else:  # NaN / inf values
        t = tensors[key].clone()
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
        tensors[key] = t
    return tensors


@pytest.mark.parametrize("family", ["opt", "gemma2"])
def test_fuzzed_checkpoints_of_more_families_load_exactly_or_raise_our_error(family, tmp_path):
    path, batch, expected = _save(family, tmp_path / "saved")
    rng = random.Random(1717)
    base = json.loads((path / "config.json").read_text())
    tensors = load_file(str(path / WEIGHTS))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    outcomes = {"refused before building": 0, "refused on load": 0, "loaded equal": 0}
    judged: dict[str, str] = {}
    model_class = PRUNED_CLASSES[family]["AutoModelForCausalLM"]

    def judge(directory: Path) -> str:
        try:  # the checks from_pretrained runs first (config.json, headers, a meta skeleton): cheap refusals
            with _deadline(60):
                config = transformers.AutoConfig.from_pretrained(directory)
                check_weights_before_loading(model_class, directory, {"config": config}, required=True)
        except CheckpointIntegrityError:
            return "refused before building"
        try:  # they passed: the real load must give the original logits or refuse
            with _deadline(60):
                model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
        except CheckpointIntegrityError:
            return "refused on load"
        got = outputs(model, batch)
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5, rtol=0), directory
        return "loaded equal"

    cases = [("config", i) for i in range(50)] + [("dims", i) for i in range(40)] + [("weights", i) for i in range(40)]
    for kind, i in cases:
        if kind == "weights":
            outcomes[judge(_copy(path, tmp_path / f"w{i}", tensors=_mutate_tensors(rng, tensors)))] += 1
            continue
        config = ({**base, "pruning_config": _mutate_config(rng, base["pruning_config"])} if kind == "config"
                  else _mutate_dims(rng, base, DIM_FIELDS[family]))
        key = json.dumps(config, sort_keys=True)
        if key not in judged:
            judged[key] = judge(_copy(path, tmp_path / f"{kind}{i}", config=config))
        outcomes[judged[key]] += 1
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
    print(f"{family}: {len(cases)} cases in {time.perf_counter() - start:.1f} s, {outcomes}, "
          f"peak RSS +{grown >> 10} MiB")
    assert outcomes["refused before building"] > 60 and outcomes["refused on load"] > 5
    assert outcomes["loaded equal"] > 5
    assert grown < 500_000  # KiB
