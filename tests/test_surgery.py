"""Removing structures is exact: same outputs as zeroing them in the dense model, and fewer parameters."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from optimum_prune import Pruner, PruningConfig, PruningConfigError
from optimum_prune.report import count_parameters
from zoo import FAMILIES, STRUCTURES, inputs, outputs, removed_parameter_count, zeroed_reference

ATOL = 1e-5


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_removal_equals_zeroed_dense(family, structure):
    fam, spec = FAMILIES[family], STRUCTURES[structure]
    dense = fam.build()
    batch = inputs()
    pruner = Pruner(copy.deepcopy(dense))
    pruned = pruner.apply(spec)
    if spec.drop_layers and not fam.pre_ln:
        # Post-LN blocks are not the identity when zeroed: compare with the block deleted by hand.
        ref = zeroed_reference(dense, spec, include_drop_layers=False)
        layers = ref.base_model.encoder.layer
        ref.base_model.encoder.layer = torch.nn.ModuleList(
            [b for i, b in enumerate(layers) if i not in spec.drop_layers])
    else:
        ref = zeroed_reference(dense, spec, include_drop_layers=True)
    torch.testing.assert_close(outputs(pruned, batch), outputs(ref, batch), atol=ATOL, rtol=0)
    # and the weights are really gone
    n_dense, _ = count_parameters(dense)
    n_pruned, _ = count_parameters(pruned)
    assert n_pruned == n_dense - removed_parameter_count(dense, spec)
    assert pruner.summary().params_before == n_dense
    assert pruner.summary().params_after == n_pruned


@pytest.mark.parametrize("structure", ["heads", "drop_attention", "mixed"])
@pytest.mark.parametrize("family", [f for f in FAMILIES if FAMILIES[f].generates])
def test_generate_with_kv_cache_matches_zeroed_dense(family, structure):
    fam, spec = FAMILIES[family], STRUCTURES[structure]
    dense = fam.build()
    pruned = Pruner(copy.deepcopy(dense)).apply(spec)
    ref = zeroed_reference(dense, spec, include_drop_layers=True)
    prompt = inputs(batch=2, length=6)
    prompt["attention_mask"][0, :2] = 0  # left padding: a wrong cache length gives a wrong mask
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cache = pruned(**prompt, use_cache=True).past_key_values
    assert cache.get_seq_length() == 6
    got = pruned.generate(**prompt, **kwargs)
    assert torch.equal(got, ref.generate(**prompt, **kwargs))
    # the cache path and the no-cache path agree (layer 0's attention is gone in two structures)
    assert torch.equal(got, pruned.generate(**prompt, use_cache=False, **kwargs))


@pytest.mark.parametrize("family", ["llama-gqa", "gpt2", "bert"])
def test_safetensors_hold_only_the_remaining_weights(family, tmp_path):
    fam, spec = FAMILIES[family], STRUCTURES["mixed"]
    dense = fam.build()
    dense.save_pretrained(tmp_path / "dense")
    pruner = Pruner(copy.deepcopy(dense))
    pruner.apply(spec)
    pruner.save_pretrained(tmp_path / "pruned")

    def stored(path):
        n = 0
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            for key in f.keys():
                n += f.get_slice(key).get_shape().numel() if hasattr(f.get_slice(key).get_shape(), "numel") \
                    else int(torch.tensor(f.get_slice(key).get_shape()).prod())
        return n

    removed = removed_parameter_count(dense, spec)
    assert stored(tmp_path / "dense") - stored(tmp_path / "pruned") == removed
    size_gap = (tmp_path / "dense" / "model.safetensors").stat().st_size - \
        (tmp_path / "pruned" / "model.safetensors").stat().st_size
    assert abs(size_gap - 4 * removed) < 4096  # fp32 data, up to the JSON header's change


def test_applying_twice_accumulates_in_original_indices():
    fam = FAMILIES["llama-gqa"]
    dense = fam.build()
    both = PruningConfig(remove_heads={1: [0, 2]}, remove_neurons={1: [3, 4, 10]}, drop_layers=[0])
    one_go = Pruner(copy.deepcopy(dense)).apply(both)
    pruner = Pruner(copy.deepcopy(dense))
    pruner.apply(PruningConfig(drop_layers=[0], remove_neurons={1: [4]}))
    pruner.apply(PruningConfig(remove_heads={1: [0, 2]}, remove_neurons={1: [3, 10]}))
    batch = inputs()
    torch.testing.assert_close(outputs(pruner.model, batch), outputs(one_go, batch), atol=ATOL, rtol=0)
    assert pruner.pruning_config.remove_neurons == {1: [3, 4, 10]}


def test_invalid_config_leaves_model_untouched():
    model = FAMILIES["llama-gqa"].build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningConfigError, match="unequal query heads"):
        Pruner(model).apply(PruningConfig(remove_heads={0: [0]}))
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
