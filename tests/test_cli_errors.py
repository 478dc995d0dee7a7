"""Every expected CLI failure is one ``error:`` line (exit 2), Ctrl-C exits 130; kills and corrupt state recover."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from zoo import FAMILIES, TEXT, char_tokenizer

from optimum_prune import Pruner
from optimum_prune import saving
from optimum_prune.cli import main
from optimum_prune.engine import checkpoint as checkpoint_module
from optimum_prune.engine import compress as compress_module
from optimum_prune.engine.checkpoint import CheckpointError


@pytest.fixture
def tiny(tmp_path):
    """A tiny Llama with a tokenizer in ``dense/`` and calibration text in ``text.txt``."""
    FAMILIES["llama-gqa"].build().save_pretrained(tmp_path / "dense")
    char_tokenizer().save_pretrained(tmp_path / "dense")
    (tmp_path / "text.txt").write_text(TEXT * 3)
    return tmp_path


def prune_args(tiny: Path, *extra: str, output: str = "out", sparsity: str = "0.5") -> list[str]:
    return ["prune", "--model", str(tiny / "dense"), "--sparsity", sparsity, "--output", str(tiny / output),
            "--calibration", str(tiny / "text.txt"), "--num-samples", "4", "--seq-len", "16", "--batch-size", "2",
            "--no-progress", *extra]


def error_line(capsys) -> str:
    """The one ``error:`` line on stderr (no traceback, nothing else that starts with ``error:``)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    return lines[0]


def interrupt_in_block(monkeypatch, block: int, per_block: int = 7) -> dict[str, int]:
    """Make the compression of ``block`` raise KeyboardInterrupt (as Ctrl-C would); returns the call counter."""
    calls = {"n": 0, "at": block * per_block + 1}
    real = compress_module.compress_weight

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compress_module, "compress_weight", failing)
    return calls


# ----------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_says_how_to_resume_and_the_rerun_resumes(tiny, monkeypatch, capsys):
    ckpt = tiny / "ckpt"
    interrupt_in_block(monkeypatch, 2)
    assert main(prune_args(tiny, "--checkpoint-dir", str(ckpt))) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"interrupted; rerun the same command to resume from {ckpt}"
    assert json.loads((ckpt / "state.json").read_text())["next_block"] == 2
    assert not (tiny / "out").exists()

    monkeypatch.undo()
    calls = interrupt_in_block(monkeypatch, 99)  # counts only
    assert main(prune_args(tiny, "--checkpoint-dir", str(ckpt))) == 0
    assert calls["n"] == 2 * 7  # blocks 2 and 3 only
    monkeypatch.undo()
    resumed = transformers.AutoModelForCausalLM.from_pretrained(tiny / "out")
    assert main(prune_args(tiny, output="ref")) == 0
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny / "ref")
    for (name, a), b in zip(resumed.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert not ckpt.exists()


def test_ctrl_c_without_checkpoint_dir_just_says_interrupted(tiny, monkeypatch, capsys):
    interrupt_in_block(monkeypatch, 1)
    assert main(prune_args(tiny)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted"


def test_debug_shows_the_traceback(tiny, capsys):
    assert main(["--debug", "prune", "--model", str(tiny / "missing"), "--sparsity", "0.5",
                 "--output", str(tiny / "o")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: the directory")


# ----------------------------------------------------------------------------- full disk, permissions


def test_full_disk_in_checkpoint_dir_names_the_file_and_the_cause(tiny, monkeypatch, capsys):
    def full(tensors, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", full)
    assert main(prune_args(tiny, "--checkpoint-dir", str(tiny / "ckpt"))) == 2
    line = error_line(capsys)
    assert "no space left on device" in line and "block_0000.safetensors" in line and str(tiny / "ckpt") in line


def test_full_disk_behind_torch_save_internal_error_is_named(tiny, monkeypatch, capsys):
    """torch.save reports a failed write as '[enforce fail ...] unexpected pos': the OS cause is found and named."""
    def broken(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(checkpoint_module.torch, "save", broken)
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda path: SimpleNamespace(free=0))
    assert main(prune_args(tiny, "--checkpoint-dir", str(tiny / "ckpt"))) == 2
    line = error_line(capsys)
    assert "no space left on device" in line and "activations_0001.pt" in line
    assert "enforce fail" not in line


def test_full_disk_while_saving_the_output_keeps_the_old_one(tiny, monkeypatch, capsys):
    (tiny / "out").mkdir()
    (tiny / "out" / "keep.txt").write_text("previous")

    def full(tensors, filename, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    assert main(prune_args(tiny)) == 2
    line = error_line(capsys)
    assert line == f"error: {tiny / 'out' / 'model.safetensors'}: no space left on device (free some space or " \
                   "write elsewhere)"  # the output's name, not the temporary directory's
    assert (tiny / "out" / "keep.txt").read_text() == "previous"


def test_permission_denied_names_the_path(tiny, monkeypatch, capsys):
    def denied(tensors, filename, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", filename)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", denied)
    assert main(prune_args(tiny)) == 2
    line = error_line(capsys)
    assert "permission denied" in line and "model.safetensors" in line


# ----------------------------------------------------------------------------- bad inputs


def test_truncated_safetensors_is_named(tiny, capsys):
    weights = tiny / "dense" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert main(prune_args(tiny)) == 2
    line = error_line(capsys)
    assert str(weights) in line and "truncated or corrupt" in line and "restore it" in line
    assert not (tiny / "out").exists()


@pytest.mark.parametrize("name", ["./no-such-model", "{tmp}/no/such/model"])
def test_model_naming_a_missing_directory_says_so(tiny, capsys, monkeypatch, name):
    monkeypatch.chdir(tiny)
    name = name.format(tmp=tiny)
    assert main(prune_args(tiny)[:1] + ["--model", name] + prune_args(tiny)[3:]) == 2
    line = error_line(capsys)
    assert f"the directory {name} does not exist" in line and "Hub" not in line and "repo" not in line


def test_missing_directory_exits_2_as_a_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "optimum_prune.cli", "summary", "./nowhere/model"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("error: the directory ./nowhere/model does not exist. Give a local "
                                                    "checkpoint directory, a .gguf file, or an embedded name "
                                                    "(smollm2, minilm)")


@pytest.mark.parametrize("content, words", [(b"", "is empty"), (b" \n\n", "is empty (only whitespace)"),
                                            (bytes(range(256)) * 4, "is not UTF-8 text"),
                                            (b"abc\x00def" * 10, "holds NUL bytes")])
def test_empty_or_binary_calibration_file_is_named(tiny, capsys, content, words):
    (tiny / "text.txt").write_bytes(content)
    assert main(prune_args(tiny)) == 2
    line = error_line(capsys)
    assert f"calibration file {tiny / 'text.txt'} {words}" in line and "expected a plain UTF-8 text file" in line


# ----------------------------------------------------------------------------- checkpoint_dir


def test_tampered_checkpoint_dir_says_to_remove_it(tiny, monkeypatch, capsys):
    ckpt = tiny / "ckpt"
    interrupt_in_block(monkeypatch, 2)
    assert main(prune_args(tiny, "--checkpoint-dir", str(ckpt))) == 130
    monkeypatch.undo()
    block = ckpt / "block_0001.safetensors"
    data = bytearray(block.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte of a weight changed
    block.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(prune_args(tiny, "--checkpoint-dir", str(ckpt))) == 2
    line = error_line(capsys)
    assert "corrupt block_0001.safetensors" in line and "remove it" in line and "pick another checkpoint_dir" in line
    assert block.exists() and not (tiny / "out").exists()  # nothing removed, nothing saved


def test_checkpoint_of_another_run_or_a_foreign_directory_is_refused(tiny, monkeypatch, capsys):
    ckpt = tiny / "ckpt"
    interrupt_in_block(monkeypatch, 2)
    assert main(prune_args(tiny, "--checkpoint-dir", str(ckpt))) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main(prune_args(tiny, "--checkpoint-dir", str(ckpt), sparsity="0.3")) == 2
    line = error_line(capsys)
    assert "a different run (the method settings changed)" in line and "remove it" in line

    foreign = tiny / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    assert main(prune_args(tiny, "--checkpoint-dir", str(foreign))) == 2
    assert "not a checkpoint of this tool" in error_line(capsys)
    assert (foreign / "notes.txt").read_text() == "precious"  # never written into, never removed


def test_checkpoint_killed_before_its_first_manifest_starts_over(tiny, monkeypatch):
    ckpt = tiny / "ckpt"
    ckpt.mkdir()
    (ckpt / "block_0000.safetensors").write_bytes(b"half")  # killed after the first file, before state.json
    (ckpt / ".state.json.abc123.tmp").write_text("{")
    model = FAMILIES["opt"].build()
    Pruner(model).prune("sparsegpt", sparsity=0.5, calibration=torch.randint(0, 90, (4, 16)), batch_size=2,
                        progress=False, checkpoint_dir=ckpt)
    assert not ckpt.exists()


def test_checkpoint_error_is_raised_by_the_python_api(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable manifest.*remove it"):
        Pruner(FAMILIES["opt"].build()).prune("sparsegpt", sparsity=0.5, calibration=torch.randint(0, 90, (4, 16)),
                                              progress=False, checkpoint_dir=tmp_path / "c")


# ----------------------------------------------------------------------------- a kill between the two renames


class Killed(BaseException):
    """Stands for the process dying: no handler of the saver may run after it."""


def kill_after_first_rename(monkeypatch) -> None:
    real = os.replace
    calls = {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] > 1:
            raise Killed
        return real(src, dst)

    monkeypatch.setattr(saving.os, "replace", replace)


def save_killed_between_renames(monkeypatch, out: Path) -> None:
    """``out`` holds old.txt; a save of new.txt into it is killed after the first rename."""
    with saving.atomic_directory(out) as tmp:
        (tmp / "old.txt").write_text("old")
    kill_after_first_rename(monkeypatch)
    with pytest.raises(Killed):
        with saving.atomic_directory(out) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert not out.exists() and list(out.parent.glob(f".{out.name}.*.old"))


def test_next_save_completes_an_interrupted_swap(tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    save_killed_between_renames(monkeypatch, out)
    with caplog.at_level("WARNING", logger="optimum_prune.saving"):
        assert saving.recover_interrupted_save(out) == "completed"
    assert "completed it" in caplog.text
    assert (out / "new.txt").read_text() == "new" and not (out / "old.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no backup, no partial left


def test_interrupted_swap_without_the_new_copy_rolls_back_on_save(tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    save_killed_between_renames(monkeypatch, out)
    for partial in tmp_path.glob(".out.*.partial"):
        saving.shutil.rmtree(partial)
    with caplog.at_level("WARNING", logger="optimum_prune.saving"):
        with saving.atomic_directory(out) as tmp:
            assert (out / "old.txt").read_text() == "old"  # rolled back before this save swaps
            (tmp / "third.txt").write_text("3")
    assert "rolled it back" in caplog.text
    assert [p.name for p in out.iterdir()] == ["third.txt"]


def test_load_recovers_an_interrupted_save_of_a_checkpoint(tmp_path, monkeypatch, caplog):
    out = tmp_path / "model"
    first = FAMILIES["llama-gqa"].build(seed=0)
    second = FAMILIES["llama-gqa"].build(seed=1)
    first.save_pretrained(out)
    kill_after_first_rename(monkeypatch)
    with pytest.raises(Killed):
        with saving.atomic_directory(out) as tmp:
            second.save_pretrained(tmp)
    monkeypatch.undo()
    assert not out.exists()
    with caplog.at_level("WARNING", logger="optimum_prune.saving"):
        pruner = Pruner.from_pretrained(str(out), tokenizer=False)
    assert "completed it" in caplog.text
    assert torch.equal(pruner.model.lm_head.weight, second.lm_head.weight)


def test_recipe_stages_sharing_a_checkpoint_dir_resume_the_interrupted_stage(tmp_path, monkeypatch):
    """Each calibrated stage checkpoints into its own subdirectory, so a rerun resumes the stage that was cut."""
    from optimum_prune.recipe import Recipe

    calib = torch.randint(0, 90, (4, 16), generator=torch.Generator().manual_seed(0))
    recipe = {"run": {"calibration": calib, "batch_size": 2, "progress": False, "checkpoint_dir": str(tmp_path / "c")},
              "stages": [{"method": "sparsegpt", "sparsity": 0.5}, {"method": "gptq", "bits": 4, "group_size": 16}]}
    reference = Pruner(FAMILIES["opt"].build()).run({**recipe, "run": {**recipe["run"], "checkpoint_dir": None}})
    interrupt_in_block(monkeypatch, 4 + 2, per_block=6)  # stage 2 (gptq), block 2
    with pytest.raises(KeyboardInterrupt) as info:
        Pruner(FAMILIES["opt"].build()).run(Recipe.from_dict(recipe))
    assert info.value.checkpoint_dir == str(tmp_path / "c" / "stage-2-gptq")
    monkeypatch.undo()
    calls = interrupt_in_block(monkeypatch, 99, per_block=6)
    resumed = Pruner(FAMILIES["opt"].build()).run(Recipe.from_dict(recipe))
    assert calls["n"] == 4 * 6 + 2 * 6  # stage 1 again, then blocks 2 and 3 of stage 2
    for (name, a), b in zip(resumed.model.state_dict().items(), reference.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_only_writer_failures_are_blamed_on_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(saving.shutil, "disk_usage", lambda path: SimpleNamespace(free=0))

    def fails(error):
        def write(path):
            raise error
        return write

    with pytest.raises(ValueError, match="a bad value"):
        saving.atomic_write(tmp_path / "f.pt", fails(ValueError("a bad value")))
    with pytest.raises(OSError) as info:
        saving.atomic_write(tmp_path / "f.pt", fails(RuntimeError("[enforce fail] unexpected pos 1 vs 0")))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "f.pt")
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary file left


def test_unknown_model_type_is_named_as_unsupported_not_as_a_corrupt_file(tmp_path, capsys):
    """A config.json whose model_type transformers does not know says so and where the supported families are."""
    from optimum_prune.cli import main

    (tmp_path / "config.json").write_text('{"architectures": ["FooForCausalLM"], "model_type": "foo"}')
    code = main(["prune", "--model", str(tmp_path), "--target-speedup", "1.5", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "model type this transformers version does not know" in err
    assert "support_matrix" in err and "restore it" not in err and not (tmp_path / "out").exists()
