"""Impossible requests fail before the work: no calibration data is read, no weight changes, nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from zoo import FAMILIES, TEXT, VOCAB, char_tokenizer

from optimum_prune import Pruner, Quantizer
from optimum_prune.cli import main
from optimum_prune.engine.obs import PruneSpec, compress_weight
from optimum_prune.methods.base import ConfigError
from optimum_prune.session import CompressionSession


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if calibration data is read or any block is compressed."""
    import optimum_prune.engine.compress as compress_module
    import optimum_prune.session as session_module

    def never(*args, **kwargs):
        pytest.fail("work started before the bad request was refused")

    monkeypatch.setattr(session_module, "load_calibration", never)
    monkeypatch.setattr(compress_module, "compress_weight", never)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["gpt2", "opt", "bert", "llama-gqa"])
def test_seq_len_beyond_the_positions_fails_before_calibration(family, no_work):
    """GPT-2 / OPT used to end in IndexError, BERT in a size mismatch, Llama ran past its limit silently."""
    model = FAMILIES[family].build()  # 64 positions
    before = _state(model)
    with pytest.raises(ConfigError) as err:
        Pruner(model, char_tokenizer()).prune("sparsegpt", sparsity=0.5, seq_len=65, num_samples=2,
                                              calibration="unused.txt", progress=False)
    assert "seq_len=65 is longer than this model's 64 positions" in str(err.value)
    assert "use seq_len=64 or less" in str(err.value)
    assert _unchanged(model, before)


def test_seq_len_beyond_the_positions_is_one_cli_line(tmp_path, no_work, capsys):
    FAMILIES["gpt2"].build().save_pretrained(tmp_path / "gpt2")
    char_tokenizer().save_pretrained(tmp_path / "gpt2")
    (tmp_path / "text.txt").write_text(TEXT)
    assert main(["prune", "--model", str(tmp_path / "gpt2"), "--sparsity", "0.5", "--seq-len", "100",
                 "--calibration", str(tmp_path / "text.txt"), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: seq_len=100 is longer than")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_n_m_that_does_not_divide_a_width_fails_before_any_work(method, no_work):
    """2:5 on 32-wide layers left the last 2 columns of every group of rows dense (37.5% instead of 40%)."""
    model = FAMILIES["llama-gqa"].build()  # hidden 32, FFN 48
    before = _state(model)
    with pytest.raises(ConfigError) as err:
        Pruner(model).prune(method, n_m="2:5", calibration=torch.randint(0, VOCAB, (4, 16)), progress=False)
    message = str(err.value)
    assert "n_m=\"2:5\"" in message and "layer 0's" in message and "self_attn.q_proj" in message
    assert "reads 32 inputs, not a multiple of 5" in message and "37.5% sparse instead of 40%" in message
    assert _unchanged(model, before)


def test_n_m_on_a_width_it_does_not_divide_is_refused_by_the_solver_too():
    """The engine never leaves a tail dense either (a caller that skips the method's check)."""
    for method in ("sparsegpt", "wanda"):
        with pytest.raises(ValueError, match="last 2 would stay dense"):
            compress_weight(torch.randn(4, 32), torch.eye(32), prune=PruneSpec(0.0, 2, 5, method))


@pytest.mark.parametrize("call, words", [
    (lambda m: Pruner(m).prune("sparsegpt", sparsity="0.5"), ["sparsity must be in [0, 1)", "'0.5'",
                                                               "(a str; give a number)"]),
    (lambda m: Pruner(m).prune("wanda", sparsity=0.7, n_m="2:4"), ["not both", "2:4 zeroes exactly 50%"]),
    (lambda m: Quantizer(m).quantize(bits=4.5), ["bits must be a whole number from 2 to 8", "4.5"]),
    (lambda m: Quantizer(m).quantize(bits="4"), ["bits must be a whole number from 2 to 8", "'4'"]),
])
def test_values_that_would_be_silently_changed_are_refused(call, words, no_work):
    """bits=4.5 became 4, sparsity 0.7 with 2:4 gave 50%, sparsity="0.5" ended in a TypeError."""
    model = FAMILIES["llama-gqa"].build()
    before = _state(model)
    with pytest.raises(ConfigError) as err:
        call(model)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert _unchanged(model, before)


@pytest.mark.parametrize("flags, words", [
    (["quantize", "--bits", "4.5"], ["bits", "4.5"]),
    (["prune", "--method", "wanda", "--n-m", "2:5"], ["n_m=\"2:5\"", "not a multiple of 5"]),
    (["prune", "--sparsity", "0.7", "--n-m", "2:4"], ["not both"]),
])
def test_bad_values_are_one_cli_line_before_calibration(tmp_path, no_work, capsys, flags, words):
    FAMILIES["llama-gqa"].build().save_pretrained(tmp_path / "dense")
    char_tokenizer().save_pretrained(tmp_path / "dense")
    (tmp_path / "text.txt").write_text(TEXT)
    code = main([*flags, "--model", str(tmp_path / "dense"), "--calibration", str(tmp_path / "text.txt"),
                 "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error:") and all(w in line for w in words), line
    assert not Path(tmp_path / "out").exists()


def test_output_that_is_a_file_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(CompressionSession, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("the model was loaded for an unusable --output")))
    assert main(["prune", "--sparsity", "0.5", "--output", str(tmp_path / "file")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error:") and str(tmp_path / "file") in line and "exists and is not a directory" in line
    assert (tmp_path / "file").read_text() == "x"
