"""EleutherAI's lm-eval-harness on an in-memory model (the optional ``[lm-eval]`` extra)."""

from __future__ import annotations

from typing import Any

from torch import nn


def lm_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str],
    *,
    batch_size: int = 8,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
) -> dict[str, Any]:
    """Run EleutherAI's lm-eval-harness tasks on an in-memory model; returns ``simple_evaluate``'s dict.

    Needs the optional extra: ``pip install "optimum-prune[lm-eval]"``.
    """
    try:
        import lm_eval as harness
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ImportError(
            'lm-eval-harness is not installed; install it with: pip install "optimum-prune[lm-eval]"') from err
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return harness.simple_evaluate(model=lm, tasks=list(tasks), batch_size=batch_size, limit=limit,
                                   num_fewshot=num_fewshot)
