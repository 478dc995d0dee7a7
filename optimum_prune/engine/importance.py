"""Block importance from calibration activations: ShortGPT's block influence and the angular distance.

Both compare the residual stream entering a block (or a run of blocks) with the stream leaving it:
a block that barely turns the stream can go. One forward with ``output_hidden_states`` gives them all.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import original_layer_indices


@torch.no_grad()
def hidden_states(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4):
    """Yield the tuple of hidden states (embeddings, after block 0, ..., after the last block) per batch."""
    device = next(model.parameters()).device
    for batch in input_ids.split(batch_size):
        batch = batch.to(device)
        out = model(input_ids=batch, attention_mask=torch.ones_like(batch), output_hidden_states=True,
                    **({"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}))
        yield out.hidden_states


def block_influence(model: nn.Module, input_ids: torch.Tensor, *, span: int = 1, batch_size: int = 4
                    ) -> dict[int, float]:
    """ShortGPT's BI of every run of ``span`` blocks: 1 − mean cosine(stream in, stream out) over tokens.

    Keys are the original index of the run's first block. The last hidden state of transformers models
    has the final norm applied, so the last run is compared on the normalized stream (as in ShortGPT).
    """
    originals = original_layer_indices(model)
    sums = torch.zeros(len(originals) - span + 1, dtype=torch.float64)
    count = 0
    for states in hidden_states(model, input_ids, batch_size):
        for i in range(len(sums)):
            a, b = states[i].float(), states[i + span].float()
            sums[i] += torch.nn.functional.cosine_similarity(a, b, dim=-1).double().sum()
        count += states[0].shape[0] * states[0].shape[1]
    return {originals[i]: float(1 - sums[i] / count) for i in range(len(sums))}


def angular_distance(model: nn.Module, input_ids: torch.Tensor, *, span: int = 1, batch_size: int = 4
                     ) -> dict[int, float]:
    """Gromov et al.'s angular distance arccos(cos)/π of every run of ``span`` blocks (last token per window)."""
    originals = original_layer_indices(model)
    sums = torch.zeros(len(originals) - span + 1, dtype=torch.float64)
    count = 0
    for states in hidden_states(model, input_ids, batch_size):
        for i in range(len(sums)):
            a, b = states[i][:, -1].float(), states[i + span][:, -1].float()
            cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)
            sums[i] += (torch.arccos(cos) / math.pi).double().sum()
        count += states[0].shape[0]
    return {originals[i]: float(sums[i] / count) for i in range(len(sums))}
