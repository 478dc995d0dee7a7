"""Healing run by each process of a ``torchrun`` / ``accelerate launch`` job (tests/test_heal_ddp.py starts it).

    torchrun --standalone --nproc_per_node 2 tests/ddp_heal.py OUT_DIR PER_DEVICE_BATCH STEPS

Every process builds the same tiny Llama and the same windows; the Trainer splits each global batch between
the processes (gloo on CPU). Rank 0 writes the healed weights and the Trainer's per-step log to OUT_DIR.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file

from zoo import FAMILIES, VOCAB

from optimum_prune.methods.heal.training import heal


def windows() -> torch.Tensor:
    return torch.randint(3, VOCAB, (16, 24), generator=torch.Generator().manual_seed(5))


def run(out_dir: str, per_device_batch: int, steps: int) -> dict:
    """Heal the tiny model; returns the metrics and the per-step losses (from the Trainer's saved state)."""
    model = FAMILIES["llama-gqa"].build(seed=3)
    model.config.use_cache = False
    checkpoints = os.path.join(out_dir, "trainer")
    metrics = heal(model, windows(), max_steps=steps, learning_rate=1e-3, per_device_train_batch_size=per_device_batch,
                   logging_steps=1, output_dir=checkpoints, save_steps=steps, disable_tqdm=True)
    state = json.load(open(os.path.join(checkpoints, f"checkpoint-{steps}", "trainer_state.json")))
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    return {"model": model, "metrics": metrics, "losses": losses,
            "world_size": int(os.environ.get("WORLD_SIZE", "1"))}


if __name__ == "__main__":
    out, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    result = run(out, batch, steps)
    if int(os.environ.get("RANK", "0")) == 0:
        save_file({k: v.contiguous() for k, v in result["model"].state_dict().items()}, os.path.join(out, "weights.safetensors"))
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"losses": result["losses"], "world_size": result["world_size"],
                       "global_step": result["metrics"]["global_step"]}, f)
