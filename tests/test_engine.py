"""The compression engine on tiny random models: SparseGPT / Wanda / magnitude / GPTQ, schedules, resume."""

from __future__ import annotations

import copy
import logging as pylogging

import pytest
import torch
from torch import nn
from zoo import FAMILIES, VOCAB

from optimum_prune import Pruner, PruningConfig, Quantizer
from optimum_prune.engine import compress as compress_module
from optimum_prune.engine.layers import get_weight, linear_groups
from optimum_prune.engine.obs import PruneSpec, compress_weight, fixed_mask, inverse_cholesky
from optimum_prune.engine.quant import QuantSpec
from optimum_prune.engine.schedule import (LayerStatistics, collect_statistics, hessian_kmeans, kmeans_1d,
                                          meet_budget, owl)
from optimum_prune.engine.sequential import SequentialOptions

CALIB = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
PROBE = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
RUN = dict(calibration=CALIB, batch_size=4, progress=False)


def output(model: nn.Module, ids: torch.Tensor = PROBE) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def block_linears(model: nn.Module):
    from optimum_prune import get_adapter

    adapter = get_adapter(model)
    for block in adapter.layers(model):
        for group in linear_groups(adapter, block):
            yield from group.modules


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sparsegpt_zero_sparsity_leaves_outputs_unchanged(family):
    model = FAMILIES[family].build()
    expected = output(model)
    # A positive sparsity too small to remove any weight: the whole OBS loop runs, nothing may move.
    Pruner(model).prune("sparsegpt", sparsity=1e-6, **RUN)
    assert torch.equal(output(model), expected)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("family", ["llama-gqa", "opt", "gpt2", "bert"])
def test_n_m_masks_are_exact(family, method):
    model = FAMILIES[family].build()
    Pruner(model).prune(method, n_m="2:4", **RUN)
    for module in block_linears(model):
        w = get_weight(module)
        zeros = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)
        assert (zeros >= 2).all(), f"{family}/{method}: a group of 4 keeps more than 2 weights"
        assert (zeros == 2).float().mean() > 0.99  # exactly 2 zeros, unless a weight was 0 already


@pytest.mark.parametrize("method,target", [("sparsegpt", 0.5), ("wanda", 0.6), ("magnitude", 0.3)])
def test_unstructured_sparsity_and_provenance(method, target):
    model = FAMILIES["llama-gqa"].build()
    pruner = Pruner(model)
    pruner.prune(method, sparsity=target, **RUN)
    for module in block_linears(model):
        w = get_weight(module)
        assert abs((w == 0).float().mean().item() - target) < 0.02
    config = pruner.pruning_config
    assert config.method == method
    assert config.layer_sparsity == {str(i): target for i in range(4)}
    if method == "magnitude":
        assert config.calibration is None  # magnitude pruning reads no data
    else:
        assert config.calibration["num_samples"] == 8 and config.calibration["seq_len"] == 32
    assert abs(config.metrics["sparsity"] - target) < 0.02


def test_sparsegpt_beats_magnitude_on_layer_error():
    torch.manual_seed(0)
    x = torch.randn(512, 64) * torch.linspace(0.1, 3, 64)  # uneven input scales, as in real layers
    H = 2 * x.t() @ x / x.shape[0]
    W = torch.randn(32, 64)
    err = {}
    for method in ("sparsegpt", "wanda", "magnitude"):
        new = compress_weight(W, H, prune=PruneSpec(0.5, method=method)).weight
        err[method] = ((x @ (new - W).t()) ** 2).mean().item()
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"]


def test_wanda_mask_is_lowest_weight_times_input_norm_per_row():
    torch.manual_seed(0)
    W, norms = torch.randn(6, 10), torch.rand(10) + 0.1
    mask = fixed_mask(W, norms ** 2, PruneSpec(0.4, method="wanda"))
    score = W.abs() * norms
    for row in range(6):
        expected = set(torch.argsort(score[row])[:4].tolist())
        assert set(torch.nonzero(mask[row]).flatten().tolist()) == expected


def test_per_layer_sparsity_dict():
    model = FAMILIES["opt"].build()
    Pruner(model).prune("sparsegpt", sparsity={0: 0.2, 1: 0.5, 2: 0.0, 3: 0.8}, **RUN)
    from optimum_prune import get_adapter

    adapter = get_adapter(model)
    for layer, target in zip(range(4), (0.2, 0.5, 0.0, 0.8)):
        ws = [get_weight(m) for g in linear_groups(adapter, adapter.layers(model)[layer]) for m in g.modules]
        frac = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
        assert abs(frac - target) < 0.02


def test_prune_errors_name_the_fix():
    pruner = Pruner(FAMILIES["llama-gqa"].build())
    with pytest.raises(ValueError, match="sparsegpt, wanda, magnitude"):
        pruner.prune("obc", sparsity=0.5, **RUN)
    with pytest.raises(ValueError, match="give `sparsity`"):
        pruner.prune("sparsegpt", **RUN)
    with pytest.raises(ValueError, match="layers \\[7\\]"):
        pruner.prune("sparsegpt", sparsity={7: 0.5}, **RUN)
    with pytest.raises(ValueError, match="uniform, hessian-kmeans, owl"):
        pruner.prune("sparsegpt", sparsity=0.5, schedule="random", **RUN)
    # an impossible sparsity fails before any calibration data is read (none could be here: no tokenizer)
    with pytest.raises(ValueError, match="sparsity must be in \\[0, 1\\)"):
        pruner.prune("sparsegpt", sparsity=1.5, calibration=["text without a tokenizer"])


def test_pruning_after_structural_pruning_uses_original_layer_indices():
    model = FAMILIES["llama-gqa"].build()
    pruner = Pruner(model)
    pruner.apply(PruningConfig(drop_layers=[1], remove_neurons={2: list(range(10))}))
    pruner.prune("sparsegpt", sparsity={0: 0.5, 2: 0.5, 3: 0.0}, **RUN)
    assert pruner.pruning_config.layer_sparsity == {"0": 0.5, "2": 0.5, "3": 0.0}
    assert pruner.pruning_config.drop_layers == [1]


def test_hessians_are_fp32_for_bf16_models():
    model = FAMILIES["llama-gqa"].build().to(torch.bfloat16)
    Pruner(model).prune("sparsegpt", sparsity=0.5, **RUN)
    for module in block_linears(model):
        assert module.weight.dtype == torch.bfloat16
        assert torch.isfinite(module.weight).all()
        assert abs((module.weight == 0).float().mean().item() - 0.5) < 0.02


def test_dampening_retries_instead_of_nans(caplog):
    H = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.5]))  # indefinite: 1% dampening is not enough
    with caplog.at_level(pylogging.WARNING):
        U, damp = inverse_cholesky(H, 0.01)
    assert damp > 0.01 and torch.isfinite(U).all()
    result = compress_weight(torch.randn(3, 4), H, prune=PruneSpec(0.5))
    assert torch.isfinite(result.weight).all() and result.damp > 0.01


def test_dead_inputs_keep_their_weights():
    x = torch.randn(64, 8)
    x[:, 3] = 0  # e.g. a ReLU neuron that never fired on the calibration data
    H = 2 * x.t() @ x / 64
    W = torch.randn(4, 8)
    result = compress_weight(W, H, prune=PruneSpec(1e-6))
    assert torch.equal(result.weight, W)
    result = compress_weight(W, H, quant=QuantSpec(8, None))
    assert torch.isfinite(result.weight).all() and (result.weight[:, 3] - W[:, 3]).abs().max() < 0.05


# ----------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gptq_8bit_is_within_1e2_of_dense(family):
    model = FAMILIES[family].build()
    expected = output(model)
    q = Quantizer(model)
    q.quantize(bits=8, group_size=16, **RUN)
    assert rel_err(output(model), expected) < FAMILIES[family].gptq_8bit_rel_err  # 1e-2 unless post-norm
    assert q.pruning_config.layer_bits == {str(i): 8 for i in range(4)}


def test_gptq_weights_sit_on_the_grid_and_fewer_bits_cost_more():
    errors = {}
    for bits in (8, 4, 3, 2):
        model = FAMILIES["llama-gqa"].build()
        expected = output(model)
        q = Quantizer(model)
        q.quantize(bits=bits, group_size=16, **RUN)
        errors[bits] = rel_err(output(model), expected)
        for name, record in q.records.items():
            assert record.codes.min() >= -(2 ** (bits - 1)) and record.codes.max() <= 2 ** (bits - 1) - 1
            assert record.scale.shape == (record.codes.shape[0], record.codes.shape[1] // 16)
    assert errors[8] < errors[4] < errors[3] < errors[2]


def test_act_order_and_channel_grids_run():
    for kwargs in (dict(act_order=True), dict(group_size=None), dict(symmetric=False, act_order=True)):
        model = FAMILIES["llama-gqa"].build()
        expected = output(model)
        Quantizer(model).quantize(bits=4, **kwargs, **RUN)
        assert rel_err(output(model), expected) < 0.3


def test_group_size_that_does_not_divide_uses_the_largest_divisor():
    assert QuantSpec(4, 128).for_columns(576).group_size == 96
    assert QuantSpec(4, 128).for_columns(1536).group_size == 128
    assert QuantSpec(4, None).for_columns(576).group_size is None


def test_sparsegpt_and_gptq_in_one_pass():
    model = FAMILIES["llama-gqa"].build()
    q = Quantizer(model)
    q.quantize(bits=4, group_size=16, sparsity=0.5, **RUN)
    for name, record in q.records.items():
        # pruned weights are exactly zero and stay zero in the packed codes
        w = get_weight(dict(model.named_modules())[name])
        assert abs((w == 0).float().mean().item() - 0.5) < 0.03
    assert q.pruning_config.method == "sparsegpt+gptq"


LINEAR_FAMILIES = ["llama-gqa", "llama-mha-tied", "mistral", "qwen2", "qwen3", "opt", "bert", "bert-cls"]


@pytest.mark.parametrize("family", LINEAR_FAMILIES)
def test_pack_save_reload_reproduces_fake_quantized_weights(family, tmp_path):
    import transformers

    fam = FAMILIES[family]
    model = fam.build()
    q = Quantizer(model)
    q.quantize(bits={0: 4, 1: 3, 2: 8, 3: 4}, group_size=16, act_order=family == "opt", **RUN)
    expected = {n: p.detach().clone() for n, p in model.state_dict().items()}
    q.save_pretrained(tmp_path / "q")
    reloaded = getattr(transformers, fam.auto_class).from_pretrained(tmp_path / "q").eval()
    logits = output(reloaded)  # the first forward decompresses
    state = reloaded.state_dict()
    for name in q.records:
        assert torch.equal(state[f"{name}.weight"], expected[f"{name}.weight"]), name
    assert torch.equal(logits, output(model))


def test_packed_file_is_about_bits_over_16_of_fp16(tmp_path):
    import transformers
    from safetensors import safe_open

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float16).eval()
    q = Quantizer(model)
    q.quantize(bits=4, group_size=128, **RUN)
    q.save_pretrained(tmp_path / "q")
    packed = scales = 0
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if key.endswith("weight_packed"):
                packed += t.numel() * t.element_size()
            elif key.endswith("weight_scale"):
                scales += t.numel() * t.element_size()
    fp16 = sum(get_weight(m).numel() * 2 for m in block_linears(model))
    assert packed == fp16 * 4 // 16
    assert scales == fp16 // 128  # one fp16 scale per 128 weights


def test_quantized_head_pruned_model_reloads_with_both_configs(tmp_path):
    import json

    import transformers

    import optimum_prune  # noqa: F401  (registers the pruned architectures)

    model = FAMILIES["llama-gqa"].build()
    pruner = Pruner(model)
    pruner.apply(PruningConfig(remove_heads={0: [0, 2]}, remove_neurons={1: list(range(16))}, drop_mlp=[3]))
    q = Quantizer(pruner.model)
    q.quantize(bits=4, group_size=8, **RUN)
    q.save_pretrained(tmp_path / "pq")
    config = json.loads((tmp_path / "pq" / "config.json").read_text())
    assert config["pruning_config"]["remove_heads"] == {"0": [0, 2]}
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["quantization_config"]["format"] == "pack-quantized"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pq").eval()
    assert torch.equal(output(reloaded), output(model))
    card = (tmp_path / "pq" / "README.md").read_text()
    assert "pack-quantized" in card


def test_conv1d_quantization_refuses_to_save_with_the_reason(tmp_path):
    q = Quantizer(FAMILIES["gpt2"].build())
    q.quantize(bits=4, group_size=16, **RUN)
    with pytest.raises(TypeError, match="Conv1D"):
        q.save_pretrained(tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_asymmetric_save_is_refused_before_writing(tmp_path):
    q = Quantizer(FAMILIES["llama-gqa"].build())
    q.quantize(bits=4, group_size=16, symmetric=False, **RUN)
    with pytest.raises(ValueError, match="symmetric=True"):
        q.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------- schedules


def test_meet_budget_is_exact_and_clipped():
    params = {0: 100, 1: 300, 2: 100}
    s = meet_budget({0: 0.3, 1: -0.1, 2: 0.0}, params, 0.7)
    assert abs(sum(params[k] * s[k] for k in s) / 500 - 0.7) < 1e-9
    assert all(0 <= v <= 0.99 for v in s.values())
    assert s[0] > s[2] > s[1]


def test_kmeans_1d_orders_clusters_by_value():
    labels, centroids = kmeans_1d([0.1, 0.2, 5.0, 5.1, 9.9, 10.0], 3)
    assert labels == [0, 0, 1, 1, 2, 2] and centroids == sorted(centroids)


def test_hessian_kmeans_prunes_low_loss_layers_harder_with_exact_budget():
    stats = {i: LayerStatistics(i, 1000, loss=float(10 ** i)) for i in range(6)}
    schedule = hessian_kmeans(stats, 0.7, num_groups=3, max_shift=0.1, normalize=None)
    s = schedule.sparsity
    assert abs(sum(s.values()) / 6 - 0.7) < 1e-9
    assert s[0] >= s[2] >= s[5] and s[0] > s[5]
    assert schedule.info["num_groups"] == 3


@pytest.mark.parametrize("normalize", ["energy", "residual"])
def test_hessian_kmeans_normalized_loss_is_scale_free(normalize):
    # losses that only follow the scale they are read at are all equal relative to it: uniform schedule
    stats = {i: LayerStatistics(i, 1000, loss=float(10 ** i), **{normalize: float(10 ** (i + 2))}) for i in range(6)}
    s = hessian_kmeans(stats, 0.7, normalize=normalize).sparsity
    assert all(abs(v - 0.7) < 1e-9 for v in s.values())
    assert len(set(hessian_kmeans(stats, 0.7, normalize=None).sparsity.values())) > 1
    with pytest.raises(ValueError, match="needs the"):
        hessian_kmeans({i: LayerStatistics(i, 1000, loss=1.0 + i) for i in range(3)}, 0.7, normalize=normalize)


def test_statistics_record_the_residual_scale_of_every_block():
    model = FAMILIES["llama-gqa"].build()
    ids = CALIB[:4]
    stats = collect_statistics(model, ids, sparsity=0.5, loss=True, outliers=False,
                               options=SequentialOptions(progress=False, device="cpu"))
    assert all(s.residual is not None and s.residual > 0 for s in stats.values())
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    expected = float(hidden[1].float().pow(2).sum(-1).flatten().median())
    assert stats[1].residual == pytest.approx(expected, rel=1e-5)


def test_owl_keeps_more_weights_in_outlier_layers():
    stats = {i: LayerStatistics(i, 1000, outlier_ratio=r) for i, r in enumerate([0.01, 0.05, 0.02, 0.03])}
    s = owl(stats, 0.7, lam=0.08).sparsity
    assert abs(sum(s.values()) / 4 - 0.7) < 1e-9
    assert s[1] == min(s.values()) and s[0] == max(s.values())
    assert max(s.values()) - min(s.values()) == pytest.approx(0.16)


@pytest.mark.parametrize("schedule", ["hessian-kmeans", "owl"])
def test_schedules_end_to_end_meet_the_budget(schedule):
    model = FAMILIES["llama-gqa"].build()
    pruner = Pruner(model)
    pruner.prune("sparsegpt", sparsity=0.6, schedule=schedule, **RUN)
    config = pruner.pruning_config
    per_layer = {int(k): v for k, v in config.layer_sparsity.items()}
    assert len(set(per_layer.values())) > 1
    assert abs(sum(per_layer.values()) / 4 - 0.6) < 1e-6  # equal-size layers: the plain mean
    assert abs(config.metrics["sparsity"] - 0.6) < 0.02
    assert config.search["schedule"] == schedule


# ----------------------------------------------------------------------------- resume


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    dense = FAMILIES["llama-gqa"].build()
    reference = Quantizer(copy.deepcopy(dense))
    reference.quantize(bits=4, group_size=16, sparsity=0.5, **RUN)

    calls = {"n": 0}
    real = compress_module.compress_weight

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * 7 + 3:  # inside block 2 (7 Linears per block)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compress_module, "compress_weight", failing)
    interrupted = Quantizer(copy.deepcopy(dense))
    with pytest.raises(KeyboardInterrupt):
        interrupted.quantize(bits=4, group_size=16, sparsity=0.5, checkpoint_dir=tmp_path / "ckpt", **RUN)
    assert (tmp_path / "ckpt" / "state.json").exists()

    calls["n"] = 0
    resumed = Quantizer(copy.deepcopy(dense))
    resumed.quantize(bits=4, group_size=16, sparsity=0.5, checkpoint_dir=tmp_path / "ckpt", **RUN)
    assert calls["n"] == 2 * 7  # only blocks 2 and 3 were compressed again
    assert torch.equal(output(resumed.model), output(reference.model))
    assert set(resumed.records) == set(reference.records)
    for name, record in reference.records.items():
        assert torch.equal(resumed.records[name].codes, record.codes)
    assert not (tmp_path / "ckpt").exists()  # removed after success


def test_checkpoint_of_other_settings_is_not_reused(tmp_path):
    model = FAMILIES["opt"].build()
    Pruner(copy.deepcopy(model)).prune("sparsegpt", sparsity=0.5, checkpoint_dir=tmp_path / "c", **RUN)
    assert not (tmp_path / "c").exists()
    a = Pruner(copy.deepcopy(model))
    a.prune("sparsegpt", sparsity=0.3, **RUN)
    b = Pruner(copy.deepcopy(model))
    b.prune("sparsegpt", sparsity=0.3, checkpoint_dir=tmp_path / "c", **RUN)
    assert torch.equal(output(a.model), output(b.model))


# ----------------------------------------------------------------------------- the sequential pass
@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "llama-gqa"])
def test_sequential_pass_gives_each_block_its_own_inputs(family):
    """Every block's input Hessians in the sequential pass equal those of the model's own forward. Gemma 2 / 3 mix
    sliding and full attention layers (other masks; Gemma 3 also other rotary embeddings), so block 0's mask and
    position embeddings may not be replayed to every block."""
    from optimum_prune import get_adapter
    from optimum_prune.engine.sequential import mixed_layer_types, run_sequential

    model = FAMILIES[family].build()
    adapter = get_adapter(model)
    assert (mixed_layer_types(model) is not None) == family.startswith("gemma")
    expected: dict[int, torch.Tensor] = {}
    handles = [adapter.mlp_linears(block)[1].register_forward_pre_hook(
        lambda m, a, i=i: expected.__setitem__(i, expected.get(i, 0) + a[0].reshape(-1, a[0].shape[-1]).t()
                                               @ a[0].reshape(-1, a[0].shape[-1])))
        for i, block in enumerate(adapter.layers(model))]
    with torch.no_grad():
        for batch in CALIB.split(4):
            model(input_ids=batch, attention_mask=torch.ones_like(batch))
    for handle in handles:
        handle.remove()
    seen: dict[int, torch.Tensor] = {}

    def step(layer, block, groups, hessians):
        seen[layer] = hessians["mlp_out"]

    step.modifies_weights = False
    run_sequential(model, CALIB, step, hessians="full", options=SequentialOptions(batch_size=4, progress=False))
    for layer, H in seen.items():
        reference = expected[layer] * (2.0 / CALIB.numel())
        assert torch.allclose(H, reference, rtol=1e-4, atol=1e-6 * reference.abs().max()), layer
