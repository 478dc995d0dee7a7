"""PruningConfig: exact round trips through config.json, and validation errors that name the fix."""

from __future__ import annotations

import json

import pytest

from optimum_prune import Pruner, PruningConfig, PruningConfigError
from optimum_prune.modeling.pruning_config import ModelDims
from zoo import FAMILIES

DIMS = ModelDims(num_layers=4, num_heads=8, num_kv_heads=2, head_dim=8, hidden_size=64, intermediate_size=100)

FULL = PruningConfig(
    remove_heads={0: [1, 5], 3: [0, 1, 2, 3]},
    remove_neurons={2: [0, 7, 99]},
    drop_attention=[1],
    drop_mlp=[3],
    drop_layers=[2],
    num_original_layers=4,
    method="ziplm",
    base_model="org/model",
    target_speedup=[1.5, 2.0],
    measured_speedup=1.98,
    latency_environment={"device": "cpu", "dtype": "float32", "batch_size": 1, "seq_len": 512},
    calibration={"dataset": "wikitext2", "num_samples": 128, "seq_len": 512, "seed": 0},
    layer_sparsity={"model.layers.0.mlp.down_proj": 0.5},
    layer_bits={"model.layers.0.mlp.down_proj": 4},
    metrics={"wikitext2_ppl": 21.5},
    search={"generations": 10},
)


def test_round_trip_is_exact():
    text = FULL.to_json_string()
    again = PruningConfig.from_json_string(text)
    assert again == FULL
    assert again.to_json_string() == text
    assert PruningConfig.from_dict(json.loads(json.dumps(FULL.to_dict()))) == FULL


def test_lives_in_config_json_and_round_trips(tmp_path):
    pruner = Pruner(FAMILIES["llama-gqa"].build())
    spec = PruningConfig(remove_heads={0: [0, 1]}, drop_mlp=[2], method="manual", metrics={"note": 1})
    pruner.apply(spec)
    pruner.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["pruning_config"]
    loaded = PruningConfig.from_dict(stored)
    assert loaded.remove_heads == {0: [0, 1]} and loaded.drop_mlp == [2]
    assert loaded.num_original_layers == 4 and loaded.method == "manual" and loaded.metrics == {"note": 1}
    assert loaded == pruner.pruning_config


def test_json_keys_and_order_normalized():
    cfg = PruningConfig(remove_heads={"3": [2, 1, 2]}, drop_layers=[5, 1])
    assert cfg.remove_heads == {3: [1, 2]} and cfg.drop_layers == [1, 5]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(drop_layers=[4]), r"`drop_layers` has layer 4, out of range: valid layers are 0..3"),
        (dict(drop_mlp=[-1]), r"`drop_mlp` has layer -1"),
        (dict(remove_heads={0: [8]}), r"`remove_heads\[0\]` has index\(es\) \[8\], out of range: each layer has 8 query heads"),
        (dict(remove_heads={9: [0]}), r"`remove_heads` has layer 9"),
        (dict(remove_neurons={1: [100]}), r"`remove_neurons\[1\]` has index\(es\) \[100\].*100 FFN neurons"),
        (dict(remove_heads={0: list(range(8))}), r"removes all query heads of layer 0.*put 0 in `drop_attention`"),
        (dict(remove_neurons={0: list(range(100))}), r"removes all FFN neurons of layer 0.*put 0 in `drop_mlp`"),
        (dict(remove_heads={0: [0]}), r"unequal query heads \[3, 4\].*same number of query heads from each group"),
        (dict(drop_layers=[0, 1, 2, 3]), r"removes all 4 layers"),
    ],
)
def test_validation_errors_name_the_fix(kwargs, message):
    with pytest.raises(PruningConfigError, match=message):
        PruningConfig(**kwargs).validate(DIMS)


@pytest.mark.parametrize("heads", [[0, 1, 2, 3], [0, 4], [0, 1, 4, 5], [0, 1, 2, 3, 4]])
def test_gqa_rule_accepts_whole_groups_and_equal_removals(heads):
    # whole group 0; one from each group; two from each group; whole group 0 plus one of group 1
    PruningConfig(remove_heads={0: heads}).validate(DIMS)


def test_everything_removed_is_fine_when_the_sublayer_is_dropped():
    PruningConfig(remove_heads={0: list(range(8))}, drop_attention=[0]).validate(DIMS)
    PruningConfig(remove_neurons={0: list(range(100))}, drop_layers=[0]).validate(DIMS)


@pytest.mark.parametrize(
    "data, field",
    [
        ({"remove_heads": [1, 2]}, "remove_heads"),
        ({"remove_heads": {"zero": [1]}}, "remove_heads"),
        ({"remove_neurons": {"0": "1,2"}}, r"remove_neurons\[0\]"),
        ({"drop_layers": 3}, "drop_layers"),
        ({"drop_mlp": ["a"]}, "drop_mlp"),
        ({"num_original_layers": "four"}, "num_original_layers"),
        ({"remove_head": {}}, r"unknown field\(s\) \['remove_head'\]"),
        ({"format_version": 99}, "format_version"),
    ],
)
def test_corrupt_dict_names_the_field(data, field):
    with pytest.raises(PruningConfigError, match=field):
        PruningConfig.from_dict(data)


def test_merge_is_a_union_and_keeps_provenance():
    a = PruningConfig(remove_heads={0: [1]}, drop_layers=[3], method="a")
    b = PruningConfig(remove_heads={0: [2], 1: [0]}, drop_mlp=[1], measured_speedup=1.5)
    m = a.merge(b)
    assert m.remove_heads == {0: [1, 2], 1: [0]} and m.drop_layers == [3] and m.drop_mlp == [1]
    assert m.method == "a" and m.measured_speedup == 1.5
