"""Pruned checkpoints reload with plain transformers: with the plugin, with trust_remote_code, from the Hub cache."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

from optimum_prune import Pruner
from zoo import FAMILIES, STRUCTURES, inputs, outputs

# Run Python with optimum_prune made unimportable, as on a machine where the plugin is not installed.
NO_PLUGIN_PRELUDE = textwrap.dedent("""
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "optimum_prune" or name.startswith("optimum_prune."):
                raise ImportError("optimum_prune is blocked in this process")
    sys.meta_path.insert(0, _Block())
    try:
        import optimum_prune
        raise SystemExit("optimum_prune must not be importable here")
    except ImportError:
        pass
""")


def run_without_plugin(code: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([sys.executable, "-c", NO_PLUGIN_PRELUDE + textwrap.dedent(code)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _save_pruned(family: str, structure: str, path) -> tuple[torch.Tensor, dict]:
    fam = FAMILIES[family]
    pruner = Pruner(fam.build())
    pruner.apply(STRUCTURES[structure])
    batch = inputs()
    expected = outputs(pruner.model, batch)
    pruner.save_pretrained(path)
    return expected, batch


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_reload_with_plugin_and_plain_auto_class(family, structure, tmp_path):
    expected, batch = _save_pruned(family, structure, tmp_path)
    auto = getattr(transformers, FAMILIES[family].auto_class)
    reloaded = auto.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(outputs(reloaded, batch), expected, atol=1e-5, rtol=0)
    # and it saves again as the same checkpoint
    reloaded.save_pretrained(tmp_path / "again")
    again = auto.from_pretrained(tmp_path / "again").eval()
    torch.testing.assert_close(outputs(again, batch), expected, atol=1e-5, rtol=0)


def test_reload_with_trust_remote_code_without_the_plugin(tmp_path, record_property):
    cases = []
    for family in FAMILIES:
        for structure in ("heads", "neurons", "drop_attention", "drop_mlp", "mixed"):
            path = tmp_path / f"{family}-{structure}"
            expected, batch = _save_pruned(family, structure, path)
            torch.save({"expected": expected, "batch": batch}, path / "reference.pt")
            cases.append((str(path), FAMILIES[family].auto_class, family))
    # one process for every case (a process per family would cost seconds each); each case reports on its own line
    out = run_without_plugin(f"""
        import torch, transformers
        for path, auto, family in {cases!r}:
            try:
                ref = torch.load(path + "/reference.pt")
                model = getattr(transformers, auto).from_pretrained(path, trust_remote_code=True).eval()
                assert type(model).__module__.startswith("transformers_modules"), type(model)
                with torch.no_grad():
                    out = model(**ref["batch"])
                got = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
                diff = (got - ref["expected"]).abs().max().item()
                assert diff <= 1e-5, (path, diff)
                print("ok", family, path)
            except Exception as err:
                print("FAILED", family, path, repr(err)[:300])
    """)
    lines = [line.split(" ", 2) for line in out.splitlines() if line.startswith(("ok ", "FAILED "))]
    failed = {family for status, family, _ in lines if status == "FAILED"}
    record_property("family_outcomes", {f: "failed" if f in failed else "passed" for f in FAMILIES})
    assert sum(1 for status, _, _ in lines if status == "ok") == len(cases), out


def test_without_plugin_and_without_trust_remote_code_is_a_clear_error(tmp_path):
    _save_pruned("llama-gqa", "heads", tmp_path)
    out = run_without_plugin(f"""
        import transformers
        try:
            transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        except ValueError as err:
            print("refused:", err)
    """)
    assert "refused:" in out and "trust_remote_code=True" in out


@pytest.mark.parametrize("family", ["llama-gqa", "opt", "gpt2", "bert"])
def test_only_whole_blocks_removed_saves_a_standard_checkpoint(family, tmp_path):
    expected, batch = _save_pruned(family, "drop_layers", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert not config["model_type"].startswith("pruned_")
    assert "auto_map" not in config and not list(tmp_path.glob("*.py"))
    assert config["pruning_config"]["drop_layers"] == [1]  # kept as provenance
    torch.save({"expected": expected, "batch": batch}, tmp_path / "reference.pt")
    run_without_plugin(f"""
        import torch, transformers
        ref = torch.load({str(tmp_path / "reference.pt")!r})
        model = transformers.{FAMILIES[family].auto_class}.from_pretrained({str(tmp_path)!r}).eval()
        assert model.config.num_hidden_layers == 3
        with torch.no_grad():
            out = model(**ref["batch"])
        got = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        assert (got - ref["expected"]).abs().max().item() <= 1e-5
    """)


def _populate_hub_cache(cache_dir, repo_id: str, folder) -> None:
    """Lay out ``folder`` as huggingface_hub's cache does after a download of ``repo_id``."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    for f in folder.iterdir():
        if f.is_file():
            (snapshot / f.name).write_bytes(f.read_bytes())


def test_load_by_repo_id_from_the_hub_cache_offline(tmp_path):
    expected, batch = _save_pruned("llama-gqa", "mixed", tmp_path / "model")
    cache = tmp_path / "hub"
    _populate_hub_cache(cache, "me/tiny-pruned", tmp_path / "model")
    torch.save({"expected": expected, "batch": batch}, tmp_path / "reference.pt")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    check = f"""
        import torch, transformers
        ref = torch.load({str(tmp_path / "reference.pt")!r})
        model = transformers.AutoModelForCausalLM.from_pretrained("me/tiny-pruned", **KW).eval()
        with torch.no_grad():
            assert (model(**ref["batch"]).logits - ref["expected"]).abs().max().item() <= 1e-5
        print("ok")
    """
    # with the plugin
    proc = subprocess.run([sys.executable, "-c", "import optimum_prune\nKW = {}\n" + textwrap.dedent(check)],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr
    # without it
    assert "ok" in run_without_plugin("KW = {'trust_remote_code': True}\n" + textwrap.dedent(check), env=env)


def test_config_that_does_not_match_the_weights_is_an_error(tmp_path):
    _save_pruned("llama-gqa", "mixed", tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())

    # fewer heads removed than the weights say: shape mismatch
    wrong = copy.deepcopy(config)
    wrong["pruning_config"]["remove_heads"] = {}
    config_path.write_text(json.dumps(wrong))
    with pytest.raises(RuntimeError, match="mismatch|size"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)

    # an MLP the weights do not have: missing weights, never a silent random init
    wrong = copy.deepcopy(config)
    wrong["pruning_config"]["drop_mlp"] = []
    config_path.write_text(json.dumps(wrong))
    with pytest.raises(RuntimeError, match="lacks .* weight"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_corrupt_pruning_config_in_config_json_names_the_field(tmp_path):
    _save_pruned("llama-gqa", "heads", tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["pruning_config"]["remove_heads"] = {"0": "all"}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"remove_heads\[0\]"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_saved_files_get_the_permissions_a_plain_save_pretrained_gives(tmp_path):
    import os

    import torch

    from optimum_prune import Pruner, Quantizer

    def modes(directory):
        return {f: os.stat(directory / f).st_mode & 0o777 for f in os.listdir(directory)}

    model = FAMILIES["llama-gqa"].build()
    model.save_pretrained(tmp_path / "plain")
    plain = modes(tmp_path / "plain")
    pruner = Pruner(FAMILIES["llama-gqa"].build())
    pruner.apply({"remove_heads": {0: [0, 1]}, "drop_layers": [3]})
    pruner.save_pretrained(tmp_path / "pruned")
    quantizer = Quantizer(FAMILIES["llama-gqa"].build())
    quantizer.quantize(bits=4, group_size=8, calibration=torch.randint(1, 90, (4, 16)), num_samples=4, seq_len=16,
                       progress=False)
    quantizer.save_pretrained(tmp_path / "packed")
    for saved in ("pruned", "packed"):
        got = modes(tmp_path / saved)
        assert {f: got[f] for f in plain} == plain, saved  # the files transformers writes: the same modes
        assert os.stat(tmp_path / saved).st_mode & 0o777 == os.stat(tmp_path / "plain").st_mode & 0o777
