"""ZipLM: inference-aware structured pruning (per-block heads and FFN neurons chosen against measured latency).

Public API: ``ZipLMConfig`` / ``FinetuneConfig`` (settings), ``run`` (entry), ``ZipLMFamily`` (one model
per target). Latency tables live in ``optimum_prune.evaluation``; the level database and its search in
``optimum_prune.engine.structure`` (EvoPress's structure target uses them too).
"""

from ...lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "ZipLMConfig": "config", "FinetuneConfig": "config", "run": "entry", "ZipLMFamily": "family",
    "ZipLMSettings": "method", "run_ziplm": "method",
})
