"""Before/after figures a person can look at: perplexity on a few windows and greedy text, dense next to compressed.

The dense figures are taken before the method runs (it changes the model in place), on the same
windows and the same prompt as the compressed ones.
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import dataclass
from typing import Any


@dataclass
class Figures:
    """What one model scored: perplexity on the --eval-text windows, and its greedy continuation of --prompt."""

    perplexity: float | None = None
    generation: str | None = None


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    """--eval-windows / --prompt / --max-new-tokens (with --eval-text, defined beside --output)."""
    p.add_argument("--eval-windows", type=int, default=40, metavar="N",
                   help="--eval-text windows of 512 tokens to score (default 40, the project's protocol)")
    p.add_argument("--prompt", help="also print the greedy continuation of this prompt, before and after")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens generated from --prompt (default 24)")


def measure(session: Any, args: argparse.Namespace) -> Figures:
    """Perplexity and greedy text of the session's model, as the flags ask (nothing when they ask nothing)."""
    figures = Figures()
    if getattr(session.model, "_block_stream", None) is not None:
        return figures  # streamed from disk (--max-memory): evaluating would need the whole model in memory
    causal = _is_causal(session.model)
    if getattr(args, "eval_text", None) and causal:
        from ..evaluation import perplexity

        figures.perplexity = perplexity(session.model, session.tokenizer, args.eval_text,
                                        max_windows=args.eval_windows, progress=False).perplexity
    if getattr(args, "prompt", None) and causal and session.tokenizer is not None:
        import torch

        batch = session.tokenizer(args.prompt, return_tensors="pt").to(next(session.model.parameters()).device)
        with torch.no_grad():
            out = session.model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False,
                                         pad_token_id=session.tokenizer.eos_token_id)
        figures.generation = session.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return figures


def _is_causal(model: Any) -> bool:
    from ..evaluation.models import is_causal_lm

    return is_causal_lm(model)


def render(before: Figures, after: Figures, args: argparse.Namespace) -> str:
    """The before/after lines: perplexity with its ratio, then the two continuations."""
    lines = []
    if before.perplexity is not None and after.perplexity is not None:
        lines.append(f"perplexity on {args.eval_windows} windows of {args.eval_text}: dense {before.perplexity:.2f} "
                     f"-> pruned {after.perplexity:.2f} ({after.perplexity / before.perplexity:.2f}x)")
    if before.generation is not None and after.generation is not None:
        lines.append(f"prompt: {args.prompt!r}")
        lines.append(f"  dense:  {before.generation.strip()!r}")
        lines.append(f"  pruned: {after.generation.strip()!r}")
    return "\n".join(lines)


def reload_hint(path: Any, task_class: str = "AutoModelForCausalLM") -> str:
    """The one command that reloads a saved checkpoint with plain transformers."""
    code = f"import optimum_prune, transformers; m = transformers.{task_class}.from_pretrained({json.dumps(str(path))})"
    return f"reload: python -c {shlex.quote(code)}"
