"""`import optimum_prune` is light, and pruned checkpoints still load whatever the import order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from optimum_prune import Pruner
from zoo import FAMILIES, STRUCTURES, inputs, outputs


def run_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=os.environ.copy(), stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_import_loads_neither_torch_nor_transformers():
    out = run_python("""
        import sys, optimum_prune
        print(sorted(m for m in ("torch", "transformers", "numpy") if m in sys.modules))
        print(sorted(optimum_prune.__all__) == sorted(n for n in dir(optimum_prune) if n in optimum_prune.__all__))
    """)
    assert out.split("\n")[:2] == ["[]", "True"]


def test_cli_help_loads_neither_torch_nor_transformers():
    out = run_python("""
        import contextlib, io, sys
        from optimum_prune.cli import main
        for argv in (["--help"], ["prune", "--help"], ["quantize", "--help"], ["eval", "--help"]):
            with contextlib.redirect_stdout(io.StringIO()) as text:
                try:
                    main(argv)
                except SystemExit as done:
                    assert done.code == 0, argv
            assert "usage: optimum-prune" in text.getvalue(), argv
        print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
    """)
    assert out.strip() == "[]"


def test_public_names_resolve():
    import optimum_prune

    for name in optimum_prune.__all__:
        assert getattr(optimum_prune, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
        optimum_prune.NotAThing  # noqa: B018


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A pruned llama checkpoint and its expected logits, on disk for subprocesses."""
    path = tmp_path_factory.mktemp("pruned")
    pruner = Pruner(FAMILIES["llama-gqa"].build())
    pruner.apply(STRUCTURES["mixed"])
    batch = inputs()
    pruner.save_pretrained(path / "model")
    torch.save({"batch": batch, "logits": outputs(pruner.model, batch)}, path / "expected.pt")
    return path


CHECK = """
    import torch, transformers
    from transformers import AutoModelForCausalLM
    expected = torch.load({path!r} + "/expected.pt", weights_only=True)
    model = AutoModelForCausalLM.from_pretrained({path!r} + "/model").eval()
    with torch.no_grad():
        logits = model(**expected["batch"]).logits
    torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=0)
    import optimum_prune.modeling.modeling_pruned as mp
    assert type(model) is mp.PrunedLlamaForCausalLM, type(model)
    config_cls = mp.pruned_config_class("llama")
    assert AutoModelForCausalLM._model_mapping[config_cls] is mp.PrunedLlamaForCausalLM
    print("loaded", type(model).__name__)
"""

ORDERS = {
    "plugin first": "import optimum_prune",
    "transformers auto classes first": "from transformers import AutoModelForCausalLM, AutoConfig\nimport optimum_prune",
    # modeling_utils imports configuration_auto while it is itself half-initialised
    "a modeling class right after the plugin": "import optimum_prune\nfrom transformers import LlamaForCausalLM",
    "our modeling module first": "from optimum_prune.modeling.modeling_pruned import PrunedLlamaForCausalLM",
    "the Pruner first": "from optimum_prune import Pruner",
}


@pytest.mark.parametrize("order", list(ORDERS))
def test_pruned_checkpoint_loads_in_any_import_order(saved, order):
    out = run_python(ORDERS[order] + "\n" + textwrap.dedent(CHECK).format(path=str(saved)))
    assert "loaded PrunedLlamaForCausalLM" in out


def test_auto_config_alone_knows_the_pruned_type(saved):
    out = run_python(f"""
        import sys, optimum_prune
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained({str(saved / "model")!r})
        print(type(config).__name__, config.model_type, "optimum_prune.modeling.modeling_pruned" in sys.modules)
    """)
    assert out.strip() == "PrunedLlamaConfig pruned_llama False"
    assert json.loads((saved / "model" / "config.json").read_text())["model_type"] == "pruned_llama"
