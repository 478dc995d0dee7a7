#!/usr/bin/env python
"""The support matrix (model family x feature) in docs/support_matrix.md, written from test results.

    python bench/support_matrix.py                     # runs the feature tests below (~10 min on 2 cores)
    python bench/support_matrix.py --from results.json # renders a run made with OPTIMUM_PRUNE_TEST_RESULTS set:
    OPTIMUM_PRUNE_TEST_RESULTS=results.json pytest tests/   # (tests/conftest.py records every outcome)
    python bench/support_matrix.py --from full.json rerun.json  # a later file's outcome replaces the same test's

A cell counts the tests of that feature that ran with that family (the zoo's tiny random model,
tests/zoo.py) and says whether all passed. Nothing is written by hand: a family a feature's tests do
not cover shows "not tested". The raw outcomes go to bench/results/support_matrix/results.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "support_matrix"
DOC = ROOT / "docs" / "support_matrix.md"

# feature -> (what the tests prove, [test file::function]); every function is parametrized over `family`,
# or records per-family outcomes itself (the trust_remote_code test loads every family in one process).
FEATURES: dict[str, tuple[str, list[str]]] = {
    "surgery": ("heads, neurons, sublayers, blocks and a mix removed: logits equal the dense model with those "
                "weights zeroed (1e-5), and the parameter count drops by exactly the removed weights; MoE: removing "
                "experts the router never picks leaves the logits unchanged and removes exactly their weights, "
                "neurons inside experts equal zeroing them",
                ["test_surgery.py::test_removal_equals_zeroed_dense",
                 "test_moe.py::test_heads_sublayers_and_blocks_equal_zeroed_dense",
                 "test_moe.py::test_removing_experts_the_router_never_picks_leaves_logits_unchanged"]),
    "generate": ("greedy generate with left padding equals the zeroed dense model's, with and without the KV cache",
                 ["test_surgery.py::test_generate_with_kv_cache_matches_zeroed_dense",
                  "test_moe.py::test_generate_with_kv_cache_matches_zeroed_dense_moe"]),
    "reload (plugin)": ("save, reload with the plain Auto class, logits equal (1e-5), save again",
                        ["test_reload.py::test_reload_with_plugin_and_plain_auto_class",
                         "test_moe.py::test_reload_with_plugin_moe"]),
    "reload (trust_remote_code)": ("reload in a process where optimum_prune cannot be imported, logits equal",
                                   ["test_reload.py::test_reload_with_trust_remote_code_without_the_plugin",
                                    "test_moe.py::test_reload_with_trust_remote_code_moe"]),
    "SparseGPT / GPTQ": ("SparseGPT's full OBS loop at ~0 sparsity changes nothing; 8-bit GPTQ stays close; MoE: "
                         "SparseGPT 50% makes each expert matrix 50% sparse (an unrouted expert is left as is), 8-bit "
                         "GPTQ on the experts stays close",
                         ["test_engine.py::test_sparsegpt_zero_sparsity_leaves_outputs_unchanged",
                          "test_engine.py::test_gptq_8bit_is_within_1e2_of_dense",
                          "test_moe.py::test_sparsegpt_half_sparsifies_every_expert_matrix_and_leaves_an_unrouted_expert",
                          "test_moe.py::test_gptq_8bit_on_experts_is_close_to_dense"]),
    "ZipLM": ("speedup targets met as predicted, reload with equal logits; silent heads/neurons removed at zero "
              "loss with unchanged outputs",
              ["test_ziplm.py::test_family_meets_predicted_targets_and_reloads_with_identical_logits",
               "test_ziplm.py::test_removing_zero_loss_structures_leaves_outputs_unchanged"]),
    "LayerChop / EvoPress depth": ("each LayerChop strategy drops 2 blocks and reloads with equal logits; "
                                   "EvoPress's temporary sublayer drops equal surgery and are undone",
                                   ["test_layerchop.py::test_each_strategy_drops_n_layers_and_reloads_with_identical_logits",
                                    "test_evopress.py::test_temporary_drops_match_surgery_and_are_undone",
                                    "test_moe.py::test_layerchop_and_evopress_depth_on_moe"]),
    "REAP expert pruning": ("Mixture of Experts: a useless expert scores 0 and is removed (per layer and model-wide); "
                            "25% / 50% of the experts removed, reload with equal logits, generate",
                            ["test_moe.py::test_reap_ranks_a_useless_expert_last_and_removes_it",
                             "test_moe.py::test_reap_pruned_model_reloads_and_generates"]),
}
MOE_ONLY = {"REAP expert pruning"}
"""Features that exist only for Mixture-of-Experts families (a dense family's cell says so)."""


def run_tests(results: Path) -> int:
    files = sorted({f"tests/{spec.split('::')[0]}" for _, specs in FEATURES.values() for spec in specs})
    names = " or ".join(sorted({spec.split("::")[1] for _, specs in FEATURES.values() for spec in specs}))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-k", names]
    print(" ".join(command), flush=True)
    env = {**os.environ, "OPTIMUM_PRUNE_TEST_RESULTS": str(results)}
    return subprocess.run(command, cwd=ROOT, env=env).returncode


def tally(records: list[dict]) -> dict[tuple[str, str], list[str]]:
    """(family, feature) -> the outcomes of the feature's tests that ran with that family."""
    owner = {spec: feature for feature, (_, specs) in FEATURES.items() for spec in specs}
    cells: dict[tuple[str, str], list[str]] = {}
    for record in records:
        file = record["nodeid"].split("::")[0].rsplit("/", 1)[-1]
        feature = owner.get(f"{file}::{record['test']}")
        if feature is None:
            continue
        # a test over every family that failed before saying which: it counts against all of them ("*")
        per_family = record.get("family_outcomes") or {record["family"] or "*": record["outcome"]}
        for family, outcome in per_family.items():
            cells.setdefault((family, feature), []).append(outcome)
    return cells


def cell(outcomes: list[str] | None) -> str:
    if not outcomes:
        return "not tested"
    passed = outcomes.count("passed")
    if passed == len(outcomes):
        return f"pass ({passed})"
    return f"**FAIL** ({passed}/{len(outcomes)} pass)"


def render(records: list[dict], source: str) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from zoo import FAMILIES, MOE_FAMILIES  # noqa: E402  (the tests' own lists of tiny models)

    import torch
    import transformers

    cells = tally(records)
    known = {**FAMILIES, **MOE_FAMILIES}
    families = list(known) + sorted({f for f, _ in cells} - set(known) - {"*"})
    lines = [
        "# Support matrix",
        "",
        "Generated by `bench/support_matrix.py` from the test suite's results; do not edit by hand.",
        f"Source: {source}; {datetime.date.today().isoformat()}, transformers {transformers.__version__}, "
        f"torch {torch.__version__}.",
        "",
        "Each row is a tiny random model of the family (`tests/zoo.py`: hidden 32, 4 layers, 4 query heads, 2 KV "
        "heads where the family has GQA; Mixture-of-Experts families: 6 experts of width 24, 2 per token). A cell "
        "counts the tests of that feature that ran with it: `pass (n)` = all n passed, `not tested` = no test of that feature covers the family (which is not a "
        "claim that it fails).",
        "",
        "| family (model_type) | " + " | ".join(FEATURES) + " |",
        "|---|" + "---|" * len(FEATURES),
    ]
    for family in families:
        model_type = known[family].make_config().model_type if family in known else "?"
        row = ["n/a (dense)" if feature in MOE_ONLY and family not in MOE_FAMILIES else
               cell(cells.get((family, feature), []) + cells.get(("*", feature), [])) for feature in FEATURES]
        lines.append(f"| {family} (`{model_type}`) | " + " | ".join(row) + " |")
    lines += ["", "What each column's tests check:", ""]
    for feature, (proves, specs) in FEATURES.items():
        lines.append(f"- **{feature}**: {proves} ({', '.join(f'`tests/{s}`' for s in specs)}).")
    lines += ["", "Known limits of the families (not visible as a failing cell) are in "
              "[architecture.md](architecture.md#families-and-their-mechanisms). Real (not random) models: which "
              "PyPI packages ship one, the slow tests and bench rows on them, in [real_models.md](real_models.md).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", nargs="+",
                        help="results JSON(s) written with OPTIMUM_PRUNE_TEST_RESULTS set; later ones win per test")
    parser.add_argument("--output", default=str(DOC))
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    results = OUT / "results.json"
    if args.source:
        by_test: dict[str, dict] = {}
        for path in args.source:
            by_test.update({r["nodeid"]: r for r in json.loads(Path(path).read_text())})
        records = list(by_test.values())
        source = " then ".join(f"`{Path(p).name}`" for p in args.source)
    else:
        code = run_tests(results)
        records = json.loads(results.read_text())
        source = "the feature tests listed below" + ("" if code == 0 else f" (pytest exit code {code})")
    if args.source:  # keep the outcomes behind the matrix, not the whole suite's
        wanted = {spec.split("::")[1] for _, specs in FEATURES.values() for spec in specs}
        results.write_text(json.dumps([r for r in records if r["test"] in wanted], indent=1))
    Path(args.output).write_text(render(records, source))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
