"""The optimum-prune command line: apply, verify the reload, summary, and clear errors."""

from __future__ import annotations

import json

import pytest
import transformers

from optimum_prune.cli import main, parse_index_spec
from zoo import FAMILIES


@pytest.fixture()
def dense_dir(tmp_path):
    FAMILIES["llama-gqa"].build().save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


def test_parse_index_spec():
    assert parse_index_spec("0:1,2;3:4-6", "--x") == {0: [1, 2], 3: [4, 5, 6]}
    with pytest.raises(Exception, match="LAYER:I,J"):
        parse_index_spec("0=1", "--x")


def test_apply_saves_verifies_and_prints_the_table(dense_dir, tmp_path, capsys):
    config = tmp_path / "structure.json"
    config.write_text(json.dumps({"remove_neurons": {"1": [0, 1, 2]}}))
    code = main(["apply", "--model", str(dense_dir), "--config", str(config), "--remove-heads", "0:0,1",
                 "--drop-layers", "3", "--output", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| parameters |" in out and "whole layer" in out
    assert "max |logit difference| = 0" in out
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["pruning_config"]
    assert saved["remove_heads"] == {"0": [0, 1]} and saved["remove_neurons"] == {"1": [0, 1, 2]}
    assert saved["drop_layers"] == [3]
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 3

    assert main(["summary", str(tmp_path / "out")]) == 0
    assert '"drop_layers": [\n    3\n  ]' in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--remove-heads", "0:0"], "unequal query heads"),
        (["--drop-layers", "9"], "out of range"),
        (["--remove-neurons", "0:x"], "LAYER:I,J"),
        ([], "nothing to remove"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_writes_nothing(dense_dir, tmp_path, capsys, extra, message):
    code = main(["apply", "--model", str(dense_dir), "--output", str(tmp_path / "out"), *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unsupported_model_exits_2(tmp_path, capsys):
    transformers.T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8).save_pretrained(tmp_path)
    assert main(["apply", "--model", str(tmp_path), "--drop-layers", "0", "--output", str(tmp_path / "o")]) == 2
    assert "Supported model types" in capsys.readouterr().err
