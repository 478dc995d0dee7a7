"""Healing of structurally pruned models: reload, resume after an interruption, LoRA through peft."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from zoo import FAMILIES, STRUCTURES, inputs, outputs

from optimum_prune import Pruner
from optimum_prune import distill
from optimum_prune.methods.base import ConfigError
from optimum_prune.methods.heal import lora
from optimum_prune.methods.heal.config import HealConfig

VOCAB = 96
# Random windows: unlike a repeated pattern, the order in which they are seen changes the weights.
DATA = torch.randint(3, VOCAB, (12, 24), generator=torch.Generator().manual_seed(5))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train faster on one thread than on cores other processes are using."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pruned(family: str = "llama-gqa", structure: str = "mixed") -> Pruner:
    """Heads and neurons removed, an attention and an MLP dropped, a block removed (per-layer shapes)."""
    torch.manual_seed(0)
    pruner = Pruner(FAMILIES[family].build())
    pruner.apply(STRUCTURES[structure])
    return pruner


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def heal(pruner: Pruner, **kwargs):
    settings = dict(max_steps=6, learning_rate=3e-3, per_device_train_batch_size=4, disable_tqdm=True,
                    logging_steps=1)
    return pruner.heal(DATA, **{**settings, **kwargs})


# ------------------------------------------------------------------------------ full fine-tuning
def test_a_healed_structurally_pruned_model_reloads_with_auto_class(tmp_path):
    pruner = pruned()
    before = weights(pruner.model)
    heal(pruner, max_steps=3)
    after = weights(pruner.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # healing changed the weights
    pruner.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    batch = inputs()
    torch.testing.assert_close(outputs(reloaded, batch), outputs(pruner.model.eval(), batch), atol=1e-5, rtol=0)
    assert reloaded.config.pruning_config["metrics"]["heal_steps"] == 3


def test_distill_from_takes_a_model_or_its_pruner():
    dense = FAMILIES["llama-gqa"].build()
    for teacher in (dense, Pruner(dense)):  # a CausalLM's own .model is its trunk, not a model to distill from
        pruner = pruned()
        heal(pruner, max_steps=1, distill_from=teacher)
        assert pruner.pruning_config.metrics["heal_distillation_alpha"] == 1.0


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("lora_settings", [None, {"r": 4, "dropout": 0.2}], ids=["full", "lora"])
def test_interrupted_healing_resumes_to_the_weights_of_an_uninterrupted_run(lora_settings, tmp_path, monkeypatch):
    extra = {} if lora_settings is None else {"lora": lora_settings}
    start = pruned()
    uninterrupted = Pruner(copy.deepcopy(start.model))
    heal(uninterrupted, **extra)

    class Interrupt(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 4:  # mid-epoch (3 steps per epoch): the resume must skip the seen batches
                raise _Interrupted

    class InterruptedTrainer(distill.DistillationTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(Interrupt())

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(distill, "DistillationTrainer", InterruptedTrainer)
        with pytest.raises(_Interrupted):
            heal(Pruner(copy.deepcopy(start.model)), output_dir=run, save_steps=2, **extra)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2",
                                                                                        "checkpoint-4"]
    resumed = Pruner(copy.deepcopy(start.model))  # a new process: the un-healed model again
    metrics = heal(resumed, output_dir=run, save_steps=2, resume_from_checkpoint=True, **extra)
    assert metrics["global_step"] == 6
    expected, got = weights(uninterrupted.model), weights(resumed.model)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------ LoRA
@pytest.mark.parametrize("family", ["llama-gqa", "gpt2"])
def test_lora_trains_only_the_adapters_and_merges_to_the_adapter_models_logits(family):
    pruner = pruned(family)
    model = pruner.model
    settings = lora.lora_settings({"r": 4, "dropout": 0.0})
    names = lora.target_modules(model)
    modules = [model.get_submodule(n) for n in names]
    shapes = {tuple(m.weight.shape) for m in modules}
    assert len(shapes) > 2  # the pruned blocks' Linears have different shapes; each gets its own adapter
    expected_trainable = sum(4 * sum(m.weight.shape) for m in modules)
    peft_model, adapted = lora.wrap(model, settings)
    assert adapted == names and lora.trainable_parameters(peft_model) == expected_trainable
    distill.finetune(peft_model, DATA, alpha=0.0, max_steps=4, learning_rate=1e-2, disable_tqdm=True)
    batch = inputs()
    peft_model.eval()
    adapter_logits = outputs(peft_model, batch)
    merged = lora.merge(peft_model, {})
    assert merged is model and not any("lora" in n for n, _ in merged.named_modules())
    merged_logits = outputs(merged.eval(), batch)
    assert not torch.allclose(adapter_logits, outputs(pruned(family).model.eval(), batch))  # training moved them
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=1e-5)


def test_lora_heal_changes_only_the_targets_records_itself_and_reloads(tmp_path):
    pruner = pruned()
    before = weights(pruner.model)
    heal(pruner, max_steps=3, lora={"r": 2, "target_modules": ["q_proj", "mlp.down_proj"]}, gradient_checkpointing=True)
    after = weights(pruner.model)
    assert not pruner.model.get_input_embeddings()._forward_hooks  # the checkpointing's input-grad hook is gone
    assert after.keys() == before.keys()  # no peft module left behind
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    targets = lora.target_modules(pruner.model, ["q_proj", "mlp.down_proj"])
    assert changed == {f"{n}.weight" for n in targets}
    assert all(p.requires_grad for p in pruner.model.parameters())
    record = pruner.pruning_config.metrics["heal_lora"]
    model = pruner.model
    assert record == {"r": 2, "alpha": 4, "dropout": 0.05, "target_modules": ["q_proj", "mlp.down_proj"],
                      "adapted_linears": len(targets), "merged": True,
                      "trainable_params": sum(2 * sum(model.get_submodule(n).weight.shape) for n in targets)}
    assert pruner.pruning_config.recipe[-1]["lora"]["r"] == 2
    pruner.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    batch = inputs()
    torch.testing.assert_close(outputs(reloaded, batch), outputs(pruner.model.eval(), batch), atol=1e-5, rtol=0)


def test_bad_lora_requests_fail_before_training():
    with pytest.raises(ConfigError, match="rank"):
        HealConfig(train_dataset="t.txt", lora={"r": 0})
    with pytest.raises(ConfigError, match="dropout"):
        HealConfig(train_dataset="t.txt", lora={"dropout": 1.5})
    pruner = pruned()
    with pytest.raises(lora.LoRAError, match="self_attn.q_proj"):  # names the Linears it has
        heal(pruner, lora={"target_modules": ["query"]})
    with pytest.raises(lora.LoRAError, match="LoraConfig"):
        heal(pruner, lora={"rank_pattern_typo": 1})
    sparse = Pruner(FAMILIES["llama-gqa"].build())
    sparse.prune("magnitude", sparsity=0.5, progress=False)
    with pytest.raises(lora.LoRAError, match="zeros"):
        heal(sparse, lora={"r": 2})


def test_cli_lora_is_json():
    from optimum_prune.cli import build_parser
    from optimum_prune.cli.commands import _configs

    args = build_parser().parse_args(["heal", "--output", "o", "--train-data", "t.txt", "--lora",
                                      '{"r": 4, "target_modules": ["q_proj"]}'])
    assert _configs("heal", args)[1].lora == {"r": 4, "alpha": 8, "dropout": 0.05, "target_modules": ["q_proj"]}
