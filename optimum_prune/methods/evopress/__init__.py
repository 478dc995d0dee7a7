"""EvoPress (arXiv 2410.14649): evolutionary search of per-unit levels (depth, structure, sparsity, bit-width).

Public API: ``EvoPressConfig`` / ``EvoPressBitsConfig`` (settings), ``run`` / ``run_bits`` (entries),
``EvoPressSettings`` (the search itself) and ``search_depth`` (the depth search LayerChop can use).
"""

from ...lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "EvoPressConfig": "config", "EvoPressBitsConfig": "config", "EvoPressSettings": "config",
    "run": "entry", "run_bits": "entry", "search_depth": "search", "search_structure": "search",
})
