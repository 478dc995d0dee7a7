"""Method configs: round trips, validation before any work, the registry, and a CLI flag for every field."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest
from zoo import FAMILIES

from optimum_prune import (REGISTRY, EvoPressBitsConfig, EvoPressConfig, GPTQConfig, HealConfig,
                           LayerChopConfig, MagnitudeConfig, MethodConfig, Pruner, Quantizer, RunConfig,
                           SparseGPTConfig, WandaConfig, ZipLMConfig)
from optimum_prune.cli import build_parser
from optimum_prune.methods.base import type_hints
from optimum_prune.methods.registry import Registry, _load
from optimum_prune.session import CompressionSession

EXAMPLES = [
    ZipLMConfig(target_speedup=[1.25, 2.0], latency={"seq_len": 64, "threads": 1}, search_iterations=3,
                finetune={"train_dataset": "data.txt", "max_steps": 5, "warmup_steps": 2}),
    SparseGPTConfig(sparsity=0.7, schedule="hessian-kmeans", schedule_options={"num_groups": 3}),
    SparseGPTConfig(sparsity={0: 0.5, 3: 0.25}),
    WandaConfig(n_m="2:4"),
    MagnitudeConfig(sparsity=0.3),
    GPTQConfig(bits={0: 8, 1: 4}, group_size=None, act_order=True, sparsity=0.5),
    LayerChopConfig(num_layers=2, strategy="evopress", strategy_options={"generations": 3}),
    EvoPressConfig(target="depth", drop_ratio=0.25, evopress={"generations": 7, "survivors": [4, 2]}),
    EvoPressConfig(target="sparsity", sparsity=0.7, evopress={"level_store": "store", "recalibrate": False}),
    EvoPressConfig(target="structure", target_speedup=1.5, latency={"mode": "decode"}),
    EvoPressBitsConfig(average_bits=3, act_order=True),
    HealConfig(train_dataset="data.txt", max_steps=20, distill_from="org/dense", bf16=True,
               training_args={"warmup_steps": 3}),
]


@pytest.mark.parametrize("config", EXAMPLES, ids=lambda c: c.name)
def test_config_round_trips_through_dict_json_and_yaml(config):
    data = config.to_dict()
    assert data["method"] == config.name
    assert MethodConfig.from_dict(data) == config  # the registry picks the class from "method"
    assert type(config).from_json(config.to_json()) == config
    assert MethodConfig.from_yaml(config.to_yaml()) == config
    assert MethodConfig.from_dict(data).to_dict() == data


def test_config_files_round_trip(tmp_path):
    config = EXAMPLES[0]
    config.to_yaml(tmp_path / "c.yaml")
    config.to_json(tmp_path / "c.json")
    assert ZipLMConfig.from_yaml(tmp_path / "c.yaml") == config == ZipLMConfig.from_json(str(tmp_path / "c.json"))


@pytest.mark.parametrize("make, match", [
    (lambda: ZipLMConfig(), "target_speedup=1.5"),
    (lambda: ZipLMConfig(target_speedup=-1), "positive"),
    (lambda: ZipLMConfig(target_speedup=1.5, latency="cpu"), "InferenceEnvironment"),
    (lambda: ZipLMConfig(target_speedup=1.5, finetune={"max_steps": 3}), "train_dataset"),
    (lambda: SparseGPTConfig(), "give `sparsity`"),
    (lambda: SparseGPTConfig(sparsity=1.2), r"sparsity must be in \[0, 1\)"),
    (lambda: SparseGPTConfig(sparsity="0.5"), r"sparsity must be in \[0, 1\)"),
    (lambda: SparseGPTConfig(sparsity=0.5, schedule="owl2"), "uniform, hessian-kmeans, owl"),
    (lambda: SparseGPTConfig(n_m="2:4", schedule="owl"), "ONE target"),
    (lambda: WandaConfig(n_m="4:2"), "0 < N < M"),
    (lambda: GPTQConfig(bits=4.5), "whole number from 2 to 8"),
    (lambda: GPTQConfig(bits=9), "whole number from 2 to 8"),
    (lambda: GPTQConfig(group_size=0), "group_size"),
    (lambda: LayerChopConfig(), "num_layers="),
    (lambda: LayerChopConfig(num_layers=2, strategy="random"), "last, angular, block_influence, evopress"),
    (lambda: EvoPressConfig(target="bits"), "target='depth'.*average_bits"),
    (lambda: EvoPressConfig(target="depth"), "exactly one"),
    (lambda: EvoPressConfig(target="sparsity", sparsity=1.5), "e.g. sparsity=0.7"),
    (lambda: EvoPressConfig(target="depth", drop_ratio=0.2, evopress={"fitness": "ppl"}), "kl, perplexity"),
    (lambda: EvoPressConfig(target="depth", drop_ratio=0.2, evopress={"generation": 3}), "no field generation"),
    (lambda: EvoPressBitsConfig(), "average_bits="),
    (lambda: HealConfig(), "train_dataset="),
    (lambda: HealConfig(train_dataset="x", max_steps=0), "max_steps must be a positive integer"),
    (lambda: RunConfig(num_samples=0), "num_samples must be a positive integer"),
    (lambda: MethodConfig.from_dict({"method": "nope"}), "unknown method 'nope'"),
    (lambda: MethodConfig.from_dict({"bits": 4}), "needs a 'method' key"),
    (lambda: GPTQConfig.from_dict({"bit": 4}), "no field bit; its fields are: bits"),
])
def test_bad_values_fail_on_construction_with_the_fix(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_registry_maps_every_name_to_its_config_and_entry():
    for spec in REGISTRY.specs():
        assert spec.config_class.name == spec.name and spec.config_class.kind == spec.kind
        assert callable(spec.run)
    assert REGISTRY.for_keyword("quantize", "evopress").config_class is EvoPressBitsConfig
    assert REGISTRY.for_keyword("prune", "evopress").config_class is EvoPressConfig
    assert set(REGISTRY.names("prune")) == {"ziplm", "layerchop", "evopress", "sparsegpt", "wanda", "magnitude",
                                            "reap"}
    with pytest.raises(ValueError, match="choose one of gptq, evopress"):
        REGISTRY.for_keyword("quantize", "awq")
    with pytest.raises(ValueError, match="registered already"):
        REGISTRY.add("gptq", "quantize", "x:y", "x:z")


def test_adding_a_method_is_one_registry_line(tmp_path, monkeypatch):
    """A method defined outside the package runs through the keyword form, the config form and a recipe."""
    from dataclasses import dataclass
    from typing import ClassVar

    import torch

    from optimum_prune.methods import option

    @dataclass
    class ScaleConfig(MethodConfig):
        """Multiply every weight of the first block by a factor (a toy method for the test)."""

        name: ClassVar[str] = "scale"
        factor: float = option(1.0, "the factor")

    def run(session, config, options):
        with torch.no_grad():
            for p in session.model.model.layers[0].parameters():
                p.mul_(config.factor)
        session._record(method="scale")
        return session.model

    import sys
    import types

    module = types.ModuleType("scale_method")
    module.ScaleConfig, module.run = ScaleConfig, run
    monkeypatch.setitem(sys.modules, "scale_method", module)
    registry = Registry()
    registry.add("scale", "prune", "scale_method:ScaleConfig", "scale_method:run")
    monkeypatch.setattr("optimum_prune.session.REGISTRY", registry)
    monkeypatch.setattr("optimum_prune.methods.registry.REGISTRY", registry)
    pruner = Pruner(FAMILIES["llama-gqa"].build())
    before = pruner.model.model.layers[0].mlp.up_proj.weight.clone()
    pruner.prune("scale", factor=2.0)
    pruner.prune(ScaleConfig(factor=0.5))
    torch.testing.assert_close(pruner.model.model.layers[0].mlp.up_proj.weight, before)
    assert [s["method"] for s in pruner.pruning_config.recipe] == ["scale", "scale"]


def test_keyword_form_builds_the_config_and_names_strays(monkeypatch):
    seen = {}

    def fake_run(self, config, run=None):
        seen.update(config=config, run=run)

    monkeypatch.setattr(CompressionSession, "run_method", fake_run)
    pruner = Pruner(FAMILIES["llama-gqa"].build())
    pruner.prune(target_speedup=2.0, search_iterations=3, seed=5, num_samples=4)
    assert seen["config"] == ZipLMConfig(target_speedup=2.0, search_iterations=3)
    assert seen["run"] == RunConfig(seed=5, num_samples=4)
    pruner.prune(sparsity=0.5)
    assert seen["config"] == SparseGPTConfig(sparsity=0.5)
    pruner.prune(num_layers=1, strategy="last")
    assert seen["config"] == LayerChopConfig(num_layers=1, strategy="last")
    pruner.prune(WandaConfig(sparsity=0.5), run=RunConfig(seq_len=16))
    assert seen["config"] == WandaConfig(sparsity=0.5) and seen["run"].seq_len == 16
    with pytest.raises(ValueError, match="`sparsity` is not a setting of ziplm .*sparsegpt"):
        pruner.prune(target_speedup=1.5, sparsity=0.5)
    with pytest.raises(ValueError, match="`average_bits` is not a setting of gptq .*evopress"):
        Quantizer(FAMILIES["llama-gqa"].build()).quantize(bits=4, average_bits=3)
    with pytest.raises(ValueError, match="quantize method"):
        pruner.prune(GPTQConfig())


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


@pytest.mark.parametrize("kind", ["prune", "quantize", "heal"])
def test_every_config_field_has_a_cli_flag(kind):
    sub = _subcommand(build_parser(), kind)
    dests = {a.dest for a in sub._actions}
    for spec in REGISTRY.specs(kind):
        cls = spec.config_class
        for f in fields(cls):
            meta = f.metadata or {}
            if meta.get("nested"):
                inner = _load(meta["nested"])
                missing = [g.name for g in fields(inner) if f"cfg__{f.name}__{g.name}" not in dests]
            else:
                missing = [] if f"cfg__{f.name}" in dests else [f.name]
            assert not missing, f"{spec.name}.{f.name}: no flag for {missing}"
            assert meta.get("help") or meta.get("nested"), f"{spec.name}.{f.name} has no documentation"
        if spec.calibrated:
            assert all(f"cfg__{f.name}" in dests for f in fields(RunConfig))
    assert type_hints(ZipLMConfig)  # annotations resolve


def test_cli_flags_build_the_same_config_as_the_python_api():
    parser = build_parser()
    args = parser.parse_args(["prune", "--output", "o", "--target-speedup", "1.5", "2", "--latency-seq-len", "64",
                              "--search-iterations", "3", "--finetune-data", "t.txt", "--stages", "2",
                              "--num-samples", "16"])
    from optimum_prune.cli.commands import _configs

    spec, config, run = _configs("prune", args)
    assert config == ZipLMConfig(target_speedup=[1.5, 2.0], latency={"seq_len": 64}, search_iterations=3,
                                 finetune={"train_dataset": "t.txt", "stages": 2})
    assert run == RunConfig(num_samples=16)
    args = parser.parse_args(["prune", "--output", "o", "--method", "evopress", "--target", "sparsity",
                              "--sparsity", "0.7", "--generations", "4", "--no-recalibrate", "--evopress-seed", "3"])
    _, config, _ = _configs("prune", args)
    assert config == EvoPressConfig(target="sparsity", sparsity=0.7,
                                    evopress={"generations": 4, "recalibrate": False, "seed": 3})
    args = parser.parse_args(["prune", "--output", "o", "--sparsity", "0:0.5,1:0.25"])
    assert _configs("prune", args)[1] == SparseGPTConfig(sparsity={0: 0.5, 1: 0.25})
    args = parser.parse_args(["quantize", "--output", "o", "--bits", "3", "--group-size", "-1"])
    assert _configs("quantize", args)[1] == GPTQConfig(bits=3, group_size=None)
    args = parser.parse_args(["heal", "--output", "o", "--train-data", "t.txt", "--batch-size", "2", "--resume",
                              "--checkpoint-dir", "ck"])
    assert _configs("heal", args)[1] == HealConfig(train_dataset="t.txt", per_device_train_batch_size=2,
                                                   resume_from_checkpoint=True, output_dir="ck")
    args = parser.parse_args(["prune", "--output", "o", "--num-layers", "2", "--sparsity", "0.5"])
    with pytest.raises(ValueError, match="--sparsity: not a setting of layerchop"):
        _configs("prune", args)


def test_run_records_are_typed_and_the_card_renders_from_them(tmp_path):
    from optimum.quantization_base import OptimumQuantizer

    from optimum_prune.records import Metrics, RunRecord

    with pytest.raises(TypeError):
        Metrics(sparsty=0.5)  # a misspelt metric fails where it is written
    metrics = Metrics.from_dict({"sparsity": 0.5, "note": 1})
    assert metrics.sparsity == 0.5 and metrics.extra == {"note": 1}
    assert metrics.merged(heal_steps=3).to_dict() == {"sparsity": 0.5, "heal_steps": 3, "note": 1}
    quantizer = Quantizer(FAMILIES["llama-gqa"].build())
    assert isinstance(quantizer, OptimumQuantizer)  # optimum's quantizer convention: quantize(save_dir=...)
    quantizer.quantize(bits=4, group_size=8, calibration=torch_ids(), num_samples=4, seq_len=16, progress=False,
                       save_dir=tmp_path / "w4")
    record = quantizer.run_record
    assert isinstance(record, RunRecord) and record.method == "gptq" and record.metrics.compression_seconds > 0
    with pytest.raises(TypeError, match="not run-record fields: methd"):
        quantizer.record(methd="x")
    card = (tmp_path / "w4" / "README.md").read_text()
    assert "| compression_seconds |" in card and "| recipe | gptq |" in card


def torch_ids():
    import torch

    return torch.randint(1, 90, (4, 16), generator=torch.Generator().manual_seed(0))


def test_requests_that_would_fail_late_fail_first(tmp_path, monkeypatch, capsys):
    from optimum_prune.cli import main

    with pytest.raises(ValueError, match="not both"):
        SparseGPTConfig(sparsity=0.7, n_m="2:4")  # N:M would silently give 50%
    monkeypatch.setattr(CompressionSession, "calibration_data",
                        lambda *a, **k: pytest.fail("no calibration for a request that cannot work"))
    pruner = Pruner(FAMILIES["llama-gqa"].build())  # 64 positions
    monkeypatch.undo()
    with pytest.raises(ValueError, match="seq_len=128 is longer than this model's 64 positions"):
        pruner.prune(sparsity=0.5, seq_len=128, num_samples=2, calibration="unused.txt")
    (tmp_path / "file").write_text("x")
    loaded = []
    monkeypatch.setattr("optimum_prune.Pruner.from_pretrained", lambda *a, **k: loaded.append(a))
    assert main(["prune", "--sparsity", "0.5", "--output", str(tmp_path / "file")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err and not loaded
    FAMILIES["gpt2"].build().save_pretrained(tmp_path / "gpt2")
    monkeypatch.undo()
    monkeypatch.setattr(CompressionSession, "calibration_data",
                        lambda *a, **k: pytest.fail("no GPTQ run for a model that cannot be saved packed"))
    assert main(["quantize", "--model", str(tmp_path / "gpt2"), "--output", str(tmp_path / "q")]) == 2
    assert "Conv1D" in capsys.readouterr().err and not (tmp_path / "q").exists()
