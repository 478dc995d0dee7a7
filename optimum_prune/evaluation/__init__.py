"""Evaluating dense and pruned models: perplexity, KL to the dense model, latency, size, lm-eval-harness.

The perplexity protocol is the project's (see ``../shared/data/README.md``): read the whole text as one
string, tokenize it once, cut non-overlapping windows of 512 tokens from the start, and report the exp of
the mean token NLL over the first 40 windows (each window predicts its own 511 next tokens).

Every function taking ``device`` runs where the model already is by default; a given ``device`` moves the
model there (in place). Models are run in eval mode under ``torch.no_grad`` and their training flag restored.
ZipLM's latency tables live in ``optimum_prune.evaluation.latency_table``.
"""

from __future__ import annotations

from ..text import DATASETS, DatasetUnavailableError, read_text, tokenize_text
from .cli import add_eval_cli as add_cli, run_eval_cli as run_cli
from .harness import lm_eval
from .kl import ReferenceLogprobs, kl_divergence, kl_to_reference, reference_logprobs
from .models import is_causal_lm
from .perplexity import PerplexityResult, perplexity
from .report import EvaluationReport, evaluate
from .size import SizeResult, count_parameters, model_size
from .timing import LatencyResult, measure_latency
from .windows import text_windows

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
