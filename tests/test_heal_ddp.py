"""Healing on two processes (torchrun, gloo on CPU) follows the one-process run with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ddp_heal

TESTS = Path(__file__).resolve().parent


@pytest.mark.slow  # two interpreters start and import transformers: ~20 s idle, minutes on a loaded machine
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is needed")
def test_two_process_healing_matches_one_process_with_the_same_global_batch(tmp_path):
    steps = 4
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "ddp_heal.py", str(tmp_path / "ddp"),
                           "2", str(steps)], cwd=TESTS, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert two["world_size"] == 2 and two["global_step"] == steps

    one = ddp_heal.run(str(tmp_path / "single"), 4, steps)  # one process, 4 windows per step: the same batches
    assert one["world_size"] == 1
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)
    weights = load_file(tmp_path / "ddp" / "weights.safetensors")
    trained = one["model"].state_dict()
    assert weights.keys() == trained.keys()
    dense = ddp_heal.FAMILIES["llama-gqa"].build(seed=3).state_dict()
    assert any(not torch.equal(trained[k], dense[k]) for k in trained)  # the runs did train
    for key, value in trained.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=1e-6, msg=key)
