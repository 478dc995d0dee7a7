"""Evaluating dense and pruned models: perplexity, KL to the dense model, latency, size, lm-eval-harness.

The perplexity protocol is the project's (see ``../shared/data/README.md``): read the whole text as one
string, tokenize it once, cut non-overlapping windows of 512 tokens from the start, and report the exp of
the mean token NLL over the first 40 windows (each window predicts its own 511 next tokens).

Every function taking ``device`` runs where the model already is by default; a given ``device`` moves the
model there (in place). Models are run in eval mode under ``torch.no_grad`` and their training flag restored.
ZipLM's latency tables live in ``optimum_prune.evaluation.latency_table``.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "DATASETS": "text", "DatasetUnavailableError": "text", "read_text": "text", "tokenize_text": "text",
    "add_cli": "evaluation.cli", "run_cli": "evaluation.cli",
    "lm_eval": "evaluation.harness",
    "ReferenceLogprobs": "evaluation.kl", "kl_divergence": "evaluation.kl", "kl_to_reference": "evaluation.kl",
    "reference_logprobs": "evaluation.kl",
    "is_causal_lm": "evaluation.models",
    "PerplexityResult": "evaluation.ppl", "perplexity": "evaluation.ppl",
    "EvaluationReport": "evaluation.report", "evaluate": "evaluation.report",
    "SizeResult": "evaluation.size", "count_parameters": "evaluation.size", "model_size": "evaluation.size",
    "LatencyResult": "evaluation.timing", "measure_latency": "evaluation.timing",
    "text_windows": "evaluation.windows",
}
_ALIASES = {"add_cli": "add_eval_cli", "run_cli": "run_eval_cli"}
_load = lazy_exports("optimum_prune", {name: module for name, module in _EXPORTS.items()})


def __getattr__(name: str):
    """Public names load on first use (the CLI parser imports this package and must stay light)."""
    if name in _ALIASES:
        import importlib

        return getattr(importlib.import_module(f"optimum_prune.{_EXPORTS[name]}"), _ALIASES[name])
    return _load(name)


__all__ = [
    "DATASETS",
    "DatasetUnavailableError",
    "EvaluationReport",
    "LatencyResult",
    "PerplexityResult",
    "ReferenceLogprobs",
    "SizeResult",
    "add_cli",
    "count_parameters",
    "evaluate",
    "is_causal_lm",
    "kl_divergence",
    "kl_to_reference",
    "lm_eval",
    "measure_latency",
    "model_size",
    "perplexity",
    "read_text",
    "reference_logprobs",
    "run_cli",
    "text_windows",
    "tokenize_text",
]
