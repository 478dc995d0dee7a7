"""Mixture-of-Experts families: experts removed for real, exact where the router never picks them, reloaded."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

from optimum_prune import Pruner, PruningConfig, Quantizer
from optimum_prune.methods.evopress.search import dropped_sublayers
from optimum_prune.modeling.adapters import get_adapter, get_module
from optimum_prune.modeling.integrity import CheckpointIntegrityError
from optimum_prune.modeling.pruning_config import PruningConfigError
from test_reload import run_without_plugin
from zoo import FAMILIES, MOE_FAMILIES, inputs, never_routed, outputs, zeroed_reference

# expert neurons: every kept expert of a layer loses the same number (8 of 24), at its own indices
MIXED = PruningConfig(remove_experts={0: [1, 4], 2: [0, 2, 5]}, remove_heads={3: [0, 2]}, drop_attention=[0],
                      drop_mlp=[2], drop_layers=[1],
                      remove_expert_neurons={0: {e: list(range(e, e + 8)) for e in (0, 2, 3, 5)},
                                             3: {e: list(range(2 * e, 2 * e + 8)) for e in range(6)}})


def _moe_zeroed(model, structure: PruningConfig):
    """The dense model with the removed heads / sublayers / blocks' / expert neurons' outputs zeroed (experts kept)."""
    attention_only = PruningConfig(remove_heads=structure.remove_heads, remove_neurons=structure.remove_neurons,
                                   drop_attention=sorted(set(structure.drop_attention) | set(structure.drop_layers)))
    ref = zeroed_reference(model, attention_only, include_drop_layers=False)
    adapter = get_adapter(ref)
    with torch.no_grad():
        for layer in set(structure.drop_mlp) | set(structure.drop_layers):
            block = adapter.layers(ref)[layer]
            get_module(block, adapter.experts.experts).down_proj.zero_()
            if adapter.mlp_out:
                get_module(block, adapter.mlp_out).weight.zero_()
        for layer, experts in structure.remove_expert_neurons.items():
            down = get_module(adapter.layers(ref)[layer], adapter.experts.experts).down_proj
            for expert, neurons in experts.items():
                down[expert][:, neurons] = 0
    return ref


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_removing_experts_the_router_never_picks_leaves_logits_unchanged(family):
    model = MOE_FAMILIES[family].build()
    for layer, expert in ((1, 3), (2, 0), (2, 5)):
        never_routed(model, layer, expert)
    batch = inputs()
    expected = outputs(model, batch)
    before = sum(p.numel() for p in model.parameters())
    pruned = Pruner(copy.deepcopy(model)).apply(PruningConfig(remove_experts={1: [3], 2: [0, 5]}))
    torch.testing.assert_close(outputs(pruned, batch), expected, atol=1e-5, rtol=0)
    H, layout = model.config.hidden_size, get_adapter(model).experts
    experts = get_module(get_adapter(model).layers(model)[0], layout.experts)
    per_expert = H + experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()  # router row + weights
    assert before - sum(p.numel() for p in pruned.parameters()) == 3 * per_expert
    block = get_adapter(pruned).layers(pruned)[2]
    router, experts = layout.modules(block)
    assert router.weight.shape[0] == experts.gate_up_proj.shape[0] == experts.num_experts == router.num_experts == 4


STRUCTURE = PruningConfig(remove_heads={3: [0, 2]}, drop_attention=[0], drop_mlp=[2], drop_layers=[1],
                          remove_expert_neurons={3: {e: list(range(2 * e, 2 * e + 8)) for e in range(6)}})


def _structure(family: str) -> PruningConfig:
    """Heads, sublayers, a block, neurons inside every expert of layer 3; Qwen2-MoE also loses neurons of its
    shared expert (its dense FFN)."""
    extra = PruningConfig(remove_neurons={0: [1, 2, 30]}) if family == "qwen2_moe" else PruningConfig()
    return STRUCTURE.merge(extra)


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_heads_sublayers_and_blocks_equal_zeroed_dense(family):
    dense = MOE_FAMILIES[family].build()
    structure = _structure(family)
    pruned = Pruner(copy.deepcopy(dense)).apply(structure)
    batch = inputs()
    torch.testing.assert_close(outputs(pruned, batch), outputs(_moe_zeroed(dense, structure), batch), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_generate_with_kv_cache_matches_zeroed_dense_moe(family):
    dense = MOE_FAMILIES[family].build()
    structure = _structure(family)
    pruned = Pruner(copy.deepcopy(dense)).apply(structure)
    ref = _moe_zeroed(dense, structure)
    prompt = inputs(batch=2, length=6)
    prompt["attention_mask"][0, :2] = 0  # left padding; layer 0's attention is gone
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = pruned.generate(**prompt, **kwargs)
    assert torch.equal(got, ref.generate(**prompt, **kwargs))
    assert torch.equal(got, pruned.generate(**prompt, use_cache=False, **kwargs))


def _save_mixed(family: str, path) -> tuple[torch.Tensor, dict]:
    pruner = Pruner(MOE_FAMILIES[family].build())
    pruner.apply(MIXED)
    batch = inputs()
    expected = outputs(pruner.model, batch)
    pruner.save_pretrained(path)
    return expected, batch


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_reload_with_plugin_moe(family, tmp_path):
    expected, batch = _save_mixed(family, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["pruning_config"]
    assert saved["remove_experts"] == {"0": [1, 4], "2": [0, 2, 5]}
    assert saved["remove_expert_neurons"]["0"] == {"0": list(range(8)), "2": list(range(2, 10)),
                                                   "3": list(range(3, 11)), "5": list(range(5, 13))}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(outputs(reloaded, batch), expected, atol=1e-5, rtol=0)
    layout = get_adapter(reloaded).experts
    H = reloaded.config.hidden_size
    assert layout.modules(get_adapter(reloaded).layers(reloaded)[0])[1].gate_up_proj.shape == (4, 2 * 16, H)
    assert layout.modules(get_adapter(reloaded).layers(reloaded)[2])[1].down_proj.shape == (6, H, 16)  # layer 3
    reloaded.save_pretrained(tmp_path / "again")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    torch.testing.assert_close(outputs(again, batch), expected, atol=1e-5, rtol=0)


def test_reload_with_trust_remote_code_moe(tmp_path, record_property):
    cases = []
    for family in MOE_FAMILIES:
        path = tmp_path / family
        expected, batch = _save_mixed(family, path)
        torch.save({"expected": expected, "batch": batch}, path / "reference.pt")
        cases.append((str(path), family))
    out = run_without_plugin(f"""
        import torch, transformers
        for path, family in {cases!r}:
            try:
                ref = torch.load(path + "/reference.pt")
                model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
                assert type(model).__module__.startswith("transformers_modules"), type(model)
                with torch.no_grad():
                    diff = (model(**ref["batch"]).logits - ref["expected"]).abs().max().item()
                assert diff <= 1e-5, (path, diff)
                print("ok", family)
            except Exception as err:
                print("FAILED", family, repr(err)[:300])
    """)
    failed = {line.split()[1] for line in out.splitlines() if line.startswith("FAILED ")}
    record_property("family_outcomes", {f: "failed" if f in failed else "passed" for f in MOE_FAMILIES})
    assert out.count("ok ") == len(cases), out


def test_expert_structures_that_cannot_hold_fail_naming_the_fix(tmp_path):
    model = MOE_FAMILIES["mixtral"].build()
    with pytest.raises(PruningConfigError, match=r"leaves 1 expert\(s\), but the router picks 2 .*keep at least 2"):
        Pruner(copy.deepcopy(model)).apply(PruningConfig(remove_experts={0: [0, 1, 2, 3, 4]}))
    with pytest.raises(PruningConfigError, match=r"out of range: each layer has 6 experts"):
        Pruner(copy.deepcopy(model)).apply(PruningConfig(remove_experts={0: [6]}))
    with pytest.raises(PruningConfigError, match="no dense FFN .* remove whole experts with `remove_experts`"):
        Pruner(copy.deepcopy(model)).apply(PruningConfig(remove_neurons={0: [1]}))
    with pytest.raises(PruningConfigError, match="no Mixture-of-Experts layers"):
        Pruner(FAMILIES["llama-gqa"].build()).apply(PruningConfig(remove_experts={0: [1]}))
    with pytest.raises(PruningConfigError, match=r"different numbers of neurons from the kept experts .*one fused"):
        Pruner(copy.deepcopy(model)).apply(PruningConfig(remove_expert_neurons={0: {0: list(range(8))}}))
    with pytest.raises(PruningConfigError, match=r"leaves each expert 20 FFN neurons: keep a multiple of 8"):
        Pruner(copy.deepcopy(model)).apply(PruningConfig(remove_expert_neurons={0: {e: [1, 2, 3, 4]
                                                                                    for e in range(6)}}))
    with pytest.raises(PruningConfigError, match=r"removes all neurons of expert 2; .*`remove_experts\[0\]`"):
        Pruner(copy.deepcopy(model)).apply(PruningConfig(remove_expert_neurons={0: {2: list(range(24))}}))
    # a checkpoint whose expert tensors disagree with its pruning_config names the field
    pruner = Pruner(model)
    pruner.apply(PruningConfig(remove_experts={0: [1]}))
    pruner.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["pruning_config"]["remove_experts"] = {"0": [1, 2]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointIntegrityError, match=r"`pruning_config.remove_experts\[0\]` removes 2 experts"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def _calibration(n: int = 8, length: int = 16) -> torch.Tensor:
    return torch.randint(3, 96, (n, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family,scope", [("mixtral", "layer"), ("qwen2_moe", "global")])
def test_reap_ranks_a_useless_expert_last_and_removes_it(family, scope):
    model = MOE_FAMILIES[family].build()
    adapter = get_adapter(model)
    with torch.no_grad():  # expert 4 of layer 1 adds nothing wherever it is picked
        adapter.experts.modules(adapter.layers(model)[1])[1].down_proj[4].zero_()
    pruner = Pruner(model)
    pruner.prune(method="reap", experts_ratio=0.25, scope=scope, calibration=_calibration(), progress=False)
    record = pruner.model.config.pruning_config
    saliency = record["search"]["saliency"]["1"]
    assert saliency["4"] == 0.0 and min(v for e, v in saliency.items() if e != "4") > 0
    assert record["search"]["routed_tokens"]["1"]["4"] > 0  # it was routed to, and added nothing
    assert 4 in record["remove_experts"]["1"]
    # per layer: 25% of 6 rounds to 2 in each of 4 layers; model-wide: 25% of 24
    assert sum(len(v) for v in record["remove_experts"].values()) == (8 if scope == "layer" else 6)
    assert record["method"] == "reap"


@pytest.mark.parametrize("family,ratio", [("olmoe", 0.25), ("qwen3_moe", 0.5)])
def test_reap_pruned_model_reloads_and_generates(family, ratio, tmp_path):
    pruner = Pruner(MOE_FAMILIES[family].build())
    pruner.prune(method="reap", experts_ratio=ratio, calibration=_calibration(), progress=False)
    kept = {6 - round(6 * ratio + 1e-9)}  # 2 or 3 removed of 6 in every layer
    layout = get_adapter(pruner.model).experts
    assert {layout.modules(b)[1].num_experts for b in get_adapter(pruner.model).layers(pruner.model)} == kept
    batch = inputs()
    expected = outputs(pruner.model, batch)
    pruner.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(outputs(reloaded, batch), expected, atol=1e-5, rtol=0)
    prompt = inputs(batch=1, length=5)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(reloaded.generate(**prompt, **kwargs), pruner.model.generate(**prompt, **kwargs))


def test_reap_refuses_a_ratio_that_leaves_fewer_experts_than_top_k_before_calibrating():
    pruner = Pruner(MOE_FAMILIES["mixtral"].build())
    with pytest.raises(ValueError, match=r"experts_ratio=0.75 would leave layer 0 1 of its 6 experts, fewer than the 2 "
                                         r".*use experts_ratio <= 0.667"):
        pruner.prune(method="reap", experts_ratio=0.75, calibration="not read: the check comes first")
    with pytest.raises(ValueError, match="no Mixture-of-Experts layer"):
        Pruner(FAMILIES["llama-gqa"].build()).prune(method="reap", experts_ratio=0.25, calibration=_calibration())
    from optimum_prune.cli.flags import config_flag_names
    from optimum_prune.methods.experts.config import REAPConfig
    assert {"--experts-ratio", "--scope"} <= set(config_flag_names(REAPConfig))


# ----------------------------------------------------------------------------- the engine on experts
def _expert_matrices(model):
    """(layer, expert, [out, in] weight) of every expert's gate/up and down matrices."""
    adapter = get_adapter(model)
    for layer, block in enumerate(adapter.layers(model)):
        _, experts = adapter.experts.modules(block)
        for param in (experts.gate_up_proj, experts.down_proj):
            yield from ((layer, e, w) for e, w in enumerate(param.data))


@pytest.mark.parametrize("family", ["mixtral"])
def test_sparsegpt_half_sparsifies_every_expert_matrix_and_leaves_an_unrouted_expert(family, caplog):
    model = MOE_FAMILIES[family].build()
    never_routed(model, 1, 3)
    unrouted = [get_adapter(model).experts.modules(get_adapter(model).layers(model)[1])[1].gate_up_proj[3].clone()]
    pruner = Pruner(model)
    with caplog.at_level("WARNING"):
        pruner.prune(method="sparsegpt", sparsity=0.5, calibration=_calibration(), batch_size=4, progress=False)
    experts = get_adapter(model).experts.modules(get_adapter(model).layers(model)[1])[1]
    assert torch.equal(experts.gate_up_proj[3], unrouted[0])  # no token reached it: left as it was, and said so
    assert "layer 1: experts [3]" in caplog.text and "received no calibration token" in caplog.text
    for layer, e, w in _expert_matrices(model):
        assert (w == 0).float().mean().item() == (0.0 if (layer, e) == (1, 3) else 0.5)
    assert torch.isfinite(outputs(model, inputs())).all()


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_gptq_8bit_on_experts_is_close_to_dense(family):
    model = MOE_FAMILIES[family].build()
    before = [w.clone() for _, _, w in _expert_matrices(model)]
    expected = outputs(model, inputs())
    quantizer = Quantizer(model)
    quantizer.quantize(bits=8, group_size=8, calibration=_calibration(), batch_size=4, progress=False)
    got = outputs(model, inputs())
    assert ((got - expected).norm() / expected.norm()).item() < MOE_FAMILIES[family].gptq_8bit_rel_err
    # every expert matrix moved onto an 8-bit grid (changed, by little)
    for (_, _, w), b in zip(_expert_matrices(model), before):
        assert not torch.equal(w, b) and ((w - b).norm() / b.norm()).item() < 2e-2


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_layerchop_and_evopress_depth_on_moe(family, tmp_path):
    model = MOE_FAMILIES[family].build()
    dense = outputs(model, inputs())
    with dropped_sublayers(model, {0, 2}, {1}):  # EvoPress's temporary drops: the MoE sublayer goes whole
        temporary = outputs(model, inputs())
    torch.testing.assert_close(outputs(model, inputs()), dense, atol=0, rtol=0)
    pruned = Pruner(copy.deepcopy(model)).apply(PruningConfig(drop_attention=[0, 2], drop_mlp=[1]))
    torch.testing.assert_close(temporary, outputs(pruned, inputs()), atol=1e-5, rtol=1e-5)
    pruner = Pruner(model)
    pruner.prune("layerchop", num_layers=2, strategy="angular", calibration=_calibration(), progress=False)
    assert len(pruner.pruning_config.drop_layers) == 2
    pruner.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(outputs(reloaded, inputs()), outputs(pruner.model, inputs()), atol=1e-5, rtol=1e-5)


def test_searches_that_do_not_cover_experts_yet_refuse_before_any_work():
    pruner = Pruner(MOE_FAMILIES["mixtral"].build())
    with pytest.raises(ValueError, match=r"ZipLM's structure search does not cover Mixture-of-Experts FFNs yet .*"
                                         r"method='reap'"):
        pruner.prune(target_speedup=1.5, calibration="not read: the check comes first")
    with pytest.raises(ValueError, match="EvoPress's structure search does not cover Mixture-of-Experts"):
        pruner.prune(method="evopress", target="structure", target_speedup=1.5, calibration="not read")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_a_dense_checkpoint_in_the_hub_layout_loads(family, tmp_path):
    model = MOE_FAMILIES[family].build()
    model.save_pretrained(tmp_path)  # transformers writes the Hub layout (Mixtral: per-expert w1 / w2 / w3)
    loaded = Pruner.from_pretrained(str(tmp_path)).model
    torch.testing.assert_close(outputs(loaded, inputs()), outputs(model, inputs()), atol=1e-6, rtol=0)
