"""A checkpoint cannot lie or exhaust memory on load; NaN/inf is named before any solver runs.

Load paths: the plugin (Auto classes with optimum_prune imported), trust_remote_code (the copied modeling
files, without the plugin) and ``Pruner.from_pretrained``. The fuzz test mutates one saved checkpoint's
``pruning_config`` and weights: every mutation loads to the original logits or raises our error.
"""

from __future__ import annotations

import ast
import json
import random
import resource
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from test_reload import run_without_plugin
from zoo import FAMILIES, STRUCTURES, VOCAB, inputs, outputs

from optimum_prune import Pruner, Quantizer
from optimum_prune.engine.finite import NonFiniteError
from optimum_prune.engine.layers import get_weight
from optimum_prune.engine.sequential import SequentialOptions
from optimum_prune.engine.structure.database import build_database
from optimum_prune.modeling.integrity import CheckpointIntegrityError, check_config

CALIB = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
RUN = dict(calibration=CALIB, batch_size=4, progress=False)
WEIGHTS = "model.safetensors"


# ---------------------------------------------------------------------- one saved checkpoint
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A llama-gqa checkpoint with every kind of removal ("mixed"), and its logits."""
    path = tmp_path_factory.mktemp("mixed")
    pruner = Pruner(FAMILIES["llama-gqa"].build())
    pruner.apply(STRUCTURES["mixed"])
    batch = inputs()
    expected = outputs(pruner.model, batch)
    pruner.save_pretrained(path)
    return path, batch, expected


def _copy(src: Path, dst: Path, *, config=None, tensors=None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("config.json", WEIGHTS):
            shutil.copyfile(f, dst / f.name)
    config = json.loads((src / "config.json").read_text()) if config is None else config
    (dst / "config.json").write_text(json.dumps(config))
    if tensors is None:
        (dst / WEIGHTS).symlink_to(src / WEIGHTS)
    else:
        save_file(tensors, str(dst / WEIGHTS), metadata={"format": "pt"})
    return dst


def _edited(saved_path: Path, dst: Path, **fields) -> Path:
    config = json.loads((saved_path / "config.json").read_text())
    config["pruning_config"].update(fields)
    return _copy(saved_path, dst, config=config)


@contextmanager
def _nothing_built():
    """Fails the test if a model skeleton is constructed (the error must come before any allocation)."""
    calls = []
    original = transformers.LlamaModel.__init__

    def spy(self, *args, **kwargs):
        calls.append(1)
        original(self, *args, **kwargs)

    transformers.LlamaModel.__init__ = spy
    try:
        yield
    finally:
        transformers.LlamaModel.__init__ = original
        assert not calls, "a model was built before the error"


# ---------------------------------------------------------------------- 1. pruning_config, before allocation
@pytest.mark.parametrize("depth", [10**10, 2**63, -3, 0, 5])
def test_bad_depth_fails_before_anything_is_built_on_every_path(saved, tmp_path, depth):
    path = _edited(saved[0], tmp_path / "ckpt", num_original_layers=depth)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for load in (transformers.AutoModelForCausalLM.from_pretrained, Pruner.from_pretrained):
        with _nothing_built(), pytest.raises(CheckpointIntegrityError) as err:
            load(str(path))
        message = str(err.value)
        assert "num_original_layers" in message and f"is {depth}" in message and "must be 4" in message
    assert time.perf_counter() - start < 30
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing big allocated


@pytest.mark.parametrize("fields, words", [
    ({"drop_attention": [0, 7]}, ["drop_attention", "layer 7", "out of range"]),
    ({"drop_mlp": [-1]}, ["drop_mlp", "layer -1", "out of range"]),
    ({"remove_heads": {"3": [0, 4]}}, ["remove_heads[3]", "[4]", "4 query heads"]),
    ({"remove_neurons": {"0": [1, 2, 48]}}, ["remove_neurons[0]", "[48]", "48 FFN neurons"]),
    ({"remove_neurons": {"9": [1]}}, ["remove_neurons", "layer 9"]),
    ({"drop_layers": list(range(10**5))}, ["num_original_layers", "must be 100003"]),
    ({"drop_attention": "0"}, ["drop_attention", "list of layer indices"]),
    ({"remove_heads": {"3": ["x"]}}, ["remove_heads[3]", "not an integer"]),
    ({"remove_heads": {"three": [0]}}, ["remove_heads", "not an integer"]),
    ({"num_original_layers": "4"}, ["num_original_layers", "not an integer"]),
    ({"format_version": 99}, ["format_version", "upgrade"]),
])
def test_indices_types_and_sizes_are_checked_before_anything_is_built(saved, tmp_path, fields, words):
    path = _edited(saved[0], tmp_path / "ckpt", **fields)
    with _nothing_built(), pytest.raises(CheckpointIntegrityError) as err:
        transformers.AutoModelForCausalLM.from_pretrained(path)
    assert all(w in str(err.value) for w in words), str(err.value)
    with _nothing_built(), pytest.raises(CheckpointIntegrityError):
        Pruner.from_pretrained(str(path))


# ---------------------------------------------------------------------- 2. weights vs structure
def test_sublayer_dropped_in_config_but_present_in_weights_is_refused(saved, tmp_path):
    path = _edited(saved[0], tmp_path / "ckpt", drop_attention=[0, 3])  # layer 3 = block 2; its weights stay
    with pytest.raises(CheckpointIntegrityError) as err:
        transformers.AutoModelForCausalLM.from_pretrained(path)
    message = str(err.value)
    assert "`pruning_config.drop_attention` lists layer 3, yet the weights hold its attention" in message
    assert "model.layers.2.self_attn.q_proj.weight" in message


def test_missing_tensor_is_refused_naming_it_and_the_field(saved, tmp_path):
    tensors = load_file(str(saved[0] / WEIGHTS))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    path = _copy(saved[0], tmp_path / "ckpt", tensors=tensors)
    with pytest.raises(CheckpointIntegrityError, match="lacks 1 weight") as err:
        transformers.AutoModelForCausalLM.from_pretrained(path)
    assert "model.layers.1.self_attn.k_proj.weight" in str(err.value)
    assert "`pruning_config.drop_attention` does not list layer 2" in str(err.value)


@pytest.mark.parametrize("extra, words", [
    ("model.layers.0.self_attn.q_proj.weight", ["drop_attention` lists layer 0"]),
    ("model.layers.3.mlp.up_proj.weight", ["block 3 does not exist"]),
    ("model.extra.weight", ["no such tensor"]),
])
def test_extra_tensor_is_refused(saved, tmp_path, extra, words):
    tensors = load_file(str(saved[0] / WEIGHTS))
    tensors[extra] = torch.zeros(4, 32)
    path = _copy(saved[0], tmp_path / "ckpt", tensors=tensors)
    with pytest.raises(CheckpointIntegrityError) as err:
        transformers.AutoModelForCausalLM.from_pretrained(path)
    assert extra in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def test_shape_the_structure_does_not_explain_is_refused(saved, tmp_path):
    # remove_heads edited: layer 3 now loses a whole KV group instead of one head per group
    path = _edited(saved[0], tmp_path / "heads", remove_heads={"3": [0, 1]})
    with pytest.raises(CheckpointIntegrityError, match="size mismatch") as err:
        transformers.AutoModelForCausalLM.from_pretrained(path)
    assert "model.layers.2.self_attn.k_proj.weight" in str(err.value)
    assert "`pruning_config.remove_heads[3]` removes 2 query heads [0, 1]" in str(err.value)
    # a weight whose shape changed, even when the caller asks to ignore mismatched sizes
    tensors = load_file(str(saved[0] / WEIGHTS))
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(46, 32)
    path = _copy(saved[0], tmp_path / "shape", tensors=tensors)
    for kwargs in ({}, {"ignore_mismatched_sizes": True}):
        with pytest.raises(CheckpointIntegrityError, match="remove_neurons\\[0\\]` removes 3 FFN neurons"):
            transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)


def test_same_shape_edits_describe_the_same_computation(saved, tmp_path):
    """Which original head or neuron a kept slice was is provenance: an edit that keeps every shape loads the
    same weights into the same computation, so it loads to the same logits."""
    path, batch, expected = saved
    edited = _edited(path, tmp_path / "ckpt", remove_heads={"3": [1, 3]}, remove_neurons={"0": [5, 6, 7]})
    model = transformers.AutoModelForCausalLM.from_pretrained(edited).eval()
    torch.testing.assert_close(outputs(model, batch), expected, atol=1e-5, rtol=0)


def test_loading_another_head_of_the_checkpoint_still_works(saved):
    """A base model loaded from a causal-LM checkpoint leaves lm_head unused, as in plain transformers."""
    model = transformers.AutoModel.from_pretrained(saved[0])
    assert type(model).__name__ == "PrunedLlamaModel"


def test_trust_remote_code_path_refuses_the_same_checkpoints(saved, tmp_path):
    for name in ("integrity.py", "headers.py"):  # they travel with the weights: no optimum_prune imports
        remote = ast.parse((saved[0] / name).read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(remote) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(remote) if isinstance(n, ast.ImportFrom) and not n.level}
        assert imported <= {"__future__", "copy", "json", "os", "re", "struct", "typing", "torch", "transformers"}
    config = json.loads((saved[0] / "config.json").read_text())
    tensors = load_file(str(saved[0] / WEIGHTS))
    cases = {
        "depth": _edited(saved[0], tmp_path / "depth", num_original_layers=10**10),
        "head": _edited(saved[0], tmp_path / "head", remove_heads={"3": [0, 9]}),
        "unexpected": _edited(saved[0], tmp_path / "unexpected", drop_attention=[0, 3]),
        "width": _copy(saved[0], tmp_path / "width", config={**config, "intermediate_size": 10**10}),
        "hidden": _copy(saved[0], tmp_path / "hidden", config={**config, "hidden_size": 64}),
        "nan": _copy(saved[0], tmp_path / "nan", tensors={**tensors, "model.norm.weight": tensors[
            "model.norm.weight"].clone().fill_(float("nan"))}),
        "int": _copy(saved[0], tmp_path / "int", tensors={**tensors, "model.norm.weight": tensors[
            "model.norm.weight"].to(torch.int32)}),
    }
    out = run_without_plugin(f"""
        import transformers
        for name, path in {[(k, str(v)) for k, v in cases.items()]!r}:
            try:
                transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
                print(name, "LOADED")
            except ValueError as err:
                print(name, type(err).__name__, isinstance(err, RuntimeError), str(err).replace(chr(10), " "))
    """)
    lines = {line.split(" ", 1)[0]: line for line in out.splitlines() if line.split(" ", 1)[0] in cases}
    assert len(lines) == len(cases) and all("CheckpointIntegrityError True" in v for v in lines.values()), out
    assert "num_original_layers` is 10000000000" in lines["depth"]
    assert "remove_heads[3]` has index(es) [9]" in lines["head"]
    assert "drop_attention` lists layer 3" in lines["unexpected"]
    assert "`intermediate_size` gives 10000000000" in lines["width"]  # config.json vs the headers, before building
    assert "`hidden_size` is 64, but the weights were saved with 32" in lines["hidden"]
    assert "NaN/inf values" in lines["nan"] and "`model.norm.weight` is stored as I32" in lines["int"]


# ---------------------------------------------------------------------- 3. non-finite weights and activations
def _poisoned(family: str = "llama-gqa", layer: int = 2, path: str = "mlp.up_proj", count: int = 3):
    model = FAMILIES[family].build()
    module = model.model.layers[layer].get_submodule(path)
    with torch.no_grad():
        module.weight.view(-1)[:count] = float("nan")
        module.weight.view(-1)[count] = float("inf")
    return model


@pytest.mark.parametrize("method, kwargs", [
    ("sparsegpt", dict(sparsity=0.5)), ("wanda", dict(sparsity=0.5)), ("magnitude", dict(sparsity=0.5)),
    ("gptq", dict(bits=4, group_size=16)),
])
def test_non_finite_weights_are_named_before_any_work(method, kwargs, tmp_path):
    model = _poisoned()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = dict(RUN, checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(NonFiniteError) as err:
        if method == "gptq":
            Quantizer(model).quantize(**kwargs, **run)
        else:
            Pruner(model).prune(method, **kwargs, **run)
    message = str(err.value)
    assert "layer 2" in message and "`model.layers.2.mlp.up_proj`" in message and "4 of 1536 values" in message
    assert "reload it" in message and "float32" in message
    after = model.state_dict()
    assert all(torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)  # nothing compressed
    assert not (tmp_path / "ckpt").exists()  # nothing written


def test_non_finite_weights_are_named_before_the_ziplm_database():
    model = _poisoned(layer=1, path="self_attn.o_proj", count=1)
    with pytest.raises(NonFiniteError, match="layer 1, module `model.layers.1.self_attn.o_proj`.*2 of 1024"):
        build_database(model, CALIB, mlp_kept=[16, 32], options=SequentialOptions(progress=False))


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "gptq"])
def test_overflowing_activations_are_named_before_the_solver(method):
    """Finite weights whose MLP product overflows float32: the down projection's inputs hold inf."""
    model = FAMILIES["llama-gqa"].build()
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        mlp.gate_proj.weight.fill_(1e37)
        mlp.up_proj.weight.fill_(1e37)
    untouched = get_weight(mlp.down_proj).clone()
    with pytest.raises(NonFiniteError) as err:
        if method == "gptq":
            Quantizer(model).quantize(bits=4, group_size=16, **RUN)
        else:
            Pruner(model).prune(method, sparsity=0.5, **RUN)
    message = str(err.value)
    assert "layer 1" in message and "mlp_out (mlp.down_proj)" in message and "NaN/inf values of" in message
    assert "float32" in message
    assert torch.equal(get_weight(mlp.down_proj), untouched)  # its solver never ran


# ---------------------------------------------------------------------- 4. fuzz
@contextmanager
def _deadline(seconds: int):
    def fail(*_):
        raise TimeoutError(f"a case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


STRUCTURAL = ["remove_heads", "remove_neurons", "drop_attention", "drop_mlp", "drop_layers", "num_original_layers"]
ODD_VALUES = [None, True, 1.5, 4.0, "3", "x", [], {}, [[1]], {"a": 1}, -1, 10**10, -(10**10), 2**64, 1e300]


def _mutate_config(rng: random.Random, pc: dict) -> dict:
    pc = json.loads(json.dumps(pc))
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(STRUCTURAL + ["format_version", "method", "extra_field"])
        value = pc.get(name)
        op = rng.randrange(7)
        if op == 0:  # a wrong type or an extreme value
            pc[name] = rng.choice(ODD_VALUES)
        elif op == 1 and isinstance(value, int) and not isinstance(value, bool):  # an int changed
            pc[name] = value + rng.choice([-2, -1, 1, 2, 10**10, -(10**10)])
        elif op == 2 and isinstance(value, list):  # a list grown
            value.append(rng.choice([0, 1, 2, 3, 4, 7, -1, 10**9]))
        elif op == 3 and isinstance(value, list) and value:  # a list shrunk
            value.pop(rng.randrange(len(value)))
        elif op == 4 and isinstance(value, dict) and value:  # a per-layer list edited
            key = rng.choice(sorted(value))
            target = value[key]
            if rng.random() < 0.3:
                value[rng.choice(["0", "1", "2", "3", "4", "-1", "x"])] = value.pop(key)
            elif isinstance(target, list) and target and rng.random() < 0.5:
                target[rng.randrange(len(target))] = rng.choice([0, 1, 2, 3, 5, 47, 48, -1])
            else:
                value[key] = (target if isinstance(target, list) else []) + [rng.randrange(50)]
        elif op == 5:  # indices swapped between fields
            other = rng.choice(STRUCTURAL)
            pc[name], pc[other] = pc.get(other), value
        else:
            pc[name] = rng.choice([[], {}, [0], {"1": [0, 1]}, {"0": list(range(48))}, list(range(4))])
        if name == "extra_field" and rng.random() < 0.5:
            pc.pop(name, None)
    return pc


def _mutate_weights(rng: random.Random, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = dict(tensors)
    key = rng.choice(sorted(tensors))
    op = rng.randrange(3)
    if op == 0:
        del tensors[key]
    elif op == 1:
        name = rng.choice([key.replace(f"layers.{i}.", f"layers.{j}.") for i in range(3) for j in range(4)]
                          + ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
                             "model.extra.weight", "lm_head.bias"])
        if name in tensors:
            name = name + "_extra"
        tensors[name] = tensors[key].clone()
    else:
        t = tensors[key]
        shape = list(t.shape)
        dim = rng.randrange(len(shape))
        shape[dim] = max(0, shape[dim] + rng.choice([-1, 1, 8]))
        transposed = t.dim() == 2 and t.shape[0] != t.shape[1] and rng.random() < 0.2
        # a shape change only: values are not what a structure check can vouch for (same-shape edits are not fuzzed)
        tensors[key] = t.t().contiguous().clone() if transposed else torch.zeros(shape, dtype=t.dtype)
    return tensors


def test_fuzzed_checkpoints_load_exactly_or_raise_our_error(saved, tmp_path):
    path, batch, expected = saved
    rng = random.Random(17)
    base_config = json.loads((path / "config.json").read_text())
    dense_config = transformers.AutoConfig.from_pretrained(path)
    tensors = load_file(str(path / WEIGHTS))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    outcomes = {"validator": 0, "load error": 0, "loaded equal": 0}
    loaded_structures: dict[str, str] = {}

    def load_and_judge(directory: Path) -> str:
        try:
            with _deadline(60):
                model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
        except CheckpointIntegrityError:
            return "load error"
        got = outputs(model, batch)
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5, rtol=0), directory
        return "loaded equal"

    for case in range(300):
        mutated = _mutate_config(rng, base_config["pruning_config"])
        dense_config.pruning_config = mutated
        try:
            with _deadline(10):
                check_config(dense_config)
        except CheckpointIntegrityError:
            outcomes["validator"] += 1
            continue
        key = json.dumps(mutated, sort_keys=True)  # the validator passed: the weights must decide, by a real load
        if key not in loaded_structures:
            loaded_structures[key] = load_and_judge(_copy(path, tmp_path / f"c{case}",
                                                          config={**base_config, "pruning_config": mutated}))
        outcomes[loaded_structures[key]] += 1

    for case in range(80):
        mutated = _mutate_weights(rng, tensors)
        outcomes[load_and_judge(_copy(path, tmp_path / f"w{case}", tensors=mutated))] += 1

    elapsed = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(f"fuzz: 380 cases in {elapsed:.1f} s, {outcomes}, {len(loaded_structures)} configs loaded, "
          f"peak RSS +{grown / 1024:.0f} MiB")
    assert outcomes["validator"] > 100 and outcomes["load error"] > 40 and outcomes["loaded equal"] > 0
    assert grown < 500_000  # KiB
