"""Calibration sources, the data-free fallback, and the prune / quantize / eval commands end to end."""

from __future__ import annotations

import json
import logging as pylogging

import datasets
import pytest
import torch
import transformers
from zoo import FAMILIES, TEXT, char_tokenizer

from optimum_prune import calibration as calib
from optimum_prune import get_calibration_data
from optimum_prune.cli import main


def test_sources_give_the_same_windows(tmp_path):
    tok = char_tokenizer()
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    lines = TEXT.split("\n\n")
    from_file = get_calibration_data(str(path), tok, num_samples=6, seq_len=20, seed=3)
    from_list = get_calibration_data(lines, tok, num_samples=6, seq_len=20, seed=3)
    from_dataset = get_calibration_data(datasets.Dataset.from_dict({"text": lines}), tok, num_samples=6,
                                        seq_len=20, seed=3)
    assert from_file.shape == (6, 20)
    assert torch.equal(from_list, from_dataset)
    assert torch.equal(from_file, from_list)  # "\n\n".join(lines) is the file's text
    assert not torch.equal(from_file, get_calibration_data(str(path), tok, num_samples=6, seq_len=20, seed=4))
    ids = torch.randint(0, 50, (3, 7))
    assert torch.equal(get_calibration_data(ids), ids)


def test_bad_sources_say_what_to_give():
    tok = char_tokenizer()
    with pytest.raises(calib.CalibrationError, match="fewer than one window"):
        get_calibration_data(["short"], tok, num_samples=2, seq_len=64)
    with pytest.raises(FileNotFoundError, match="neither a text file nor a known dataset"):
        get_calibration_data("no-such-file.txt", tok)
    with pytest.raises(calib.CalibrationError, match="needs a tokenizer"):
        get_calibration_data([TEXT], None)
    with pytest.raises(calib.CalibrationError, match="integer tensor"):
        get_calibration_data(torch.zeros(4))


@pytest.mark.parametrize("family", ["llama-gqa", "bert"])
def test_offline_falls_back_to_data_free_calibration(family, monkeypatch, caplog):
    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(calib, "read_text", offline)
    model = FAMILIES[family].build()
    from transformers.utils import logging

    logging.enable_propagation()
    try:
        with caplog.at_level(pylogging.WARNING):
            ids, info = calib.load_calibration(None, char_tokenizer(), num_samples=3, seq_len=12, seed=0, model=model)
    finally:
        logging.disable_propagation()
    assert ids.shape == (3, 12) and ids.dtype == torch.long
    assert int(ids.max()) < model.config.vocab_size
    assert info["dataset"] == "self-generated"
    assert "data-free calibration" in caplog.text
    again, _ = calib.load_calibration(None, char_tokenizer(), num_samples=3, seq_len=12, seed=0, model=model)
    assert torch.equal(ids, again)  # seeded


@pytest.fixture
def tiny_dir(tmp_path):
    model = FAMILIES["llama-gqa"].build()
    model.save_pretrained(tmp_path / "dense")
    char_tokenizer().save_pretrained(tmp_path / "dense")
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 3)
    return tmp_path


def test_cli_prune_quantize_eval(tiny_dir, capsys):
    common = ["--calibration", str(tiny_dir / "text.txt"), "--num-samples", "4", "--seq-len", "16"]
    assert main(["prune", "--model", str(tiny_dir / "dense"), "--sparsity", "0.5", "--schedule", "owl",
                 "--output", str(tiny_dir / "sparse"), *common]) == 0
    out = capsys.readouterr().out
    assert "sparsity per layer" in out and "saved to" in out
    config = json.loads((tiny_dir / "sparse" / "config.json").read_text())
    assert config["pruning_config"]["search"]["schedule"] == "owl"
    sparse = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir / "sparse")
    assert abs((sparse.model.layers[0].mlp.up_proj.weight == 0).float().mean().item() - 0.5) < 0.15

    assert main(["quantize", "--model", str(tiny_dir / "dense"), "--bits", "4", "--group-size", "8",
                 "--output", str(tiny_dir / "w4"), *common]) == 0
    assert "compressed-tensors pack-quantized" in capsys.readouterr().out
    config = json.loads((tiny_dir / "w4" / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 4

    assert main(["eval", "--model", str(tiny_dir / "w4"), "--text", str(tiny_dir / "text.txt"), "--seq-len", "16",
                 "--max-windows", "4", "--no-latency", "--no-progress"]) == 0
    assert "perplexity" in capsys.readouterr().out.lower()


def test_cli_errors_are_one_line(tiny_dir, capsys):
    assert main(["prune", "--model", str(tiny_dir / "dense"), "--output", str(tiny_dir / "x")]) == 2
    assert "give --sparsity" in capsys.readouterr().err
    assert main(["prune", "--model", str(tiny_dir / "dense"), "--n-m", "4:2", "--output", str(tiny_dir / "x"),
                 "--calibration", str(tiny_dir / "text.txt"), "--num-samples", "2", "--seq-len", "8"]) == 2
    assert "0 < N < M" in capsys.readouterr().err
    assert not (tiny_dir / "x").exists()


def test_offline_is_detected_once_and_data_free_sampling_says_how_long(monkeypatch, caplog):
    from optimum_prune import text

    asked = []

    def no_route(*args, **kwargs):
        asked.append(args)
        raise OSError("no route to host")

    monkeypatch.setattr(text, "_hub_down", None)
    monkeypatch.setattr("socket.create_connection", no_route)
    for _ in range(3):
        with pytest.raises(text.DatasetUnavailableError, match="unreachable .*local text file"):
            text.read_text("wikitext2")
    assert len(asked) == 1  # one probe, then no retries in this process
    model = FAMILIES["llama-gqa"].build()
    from transformers.utils import logging

    logging.enable_propagation()
    try:
        with caplog.at_level(pylogging.INFO, logger="optimum_prune"):
            ids = calib.self_generated(model, char_tokenizer(), num_samples=4, seq_len=8, batch_size=2)
    finally:
        logging.disable_propagation()
    assert ids.shape == (4, 8) and "data-free calibration will take about" in caplog.text
