import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _cpu_meter_off(monkeypatch):
    """The CPU meter (evaluation/contention.py) refuses timings taken while other processes use the cores; tiny
    models time in milliseconds, so on a busy dev machine it would refuse them. The suite switches it off (nothing
    known, nothing refused on that ground); the tests of the meter switch it back on or fake it."""
    from optimum_prune.evaluation import contention

    monkeypatch.setattr(contention, "_machine_busy_s", lambda: None)


# ---------------------------------------------------------------------- support matrix (bench/support_matrix.py)
# With OPTIMUM_PRUNE_TEST_RESULTS=<file>, every test's outcome is written there as JSON: its function, its
# `family` parameter, and (for tests that cover several families in one process) a per-family outcome
# recorded with `record_property("family_outcomes", {...})`. Nothing changes when the variable is unset.
_RESULTS: list[dict] = []


def pytest_runtest_setup(item):
    if os.environ.get("OPTIMUM_PRUNE_TEST_RESULTS"):
        params = getattr(getattr(item, "callspec", None), "params", {})
        item.user_properties.append(("family", params.get("family")))


def pytest_runtest_logreport(report):
    if not os.environ.get("OPTIMUM_PRUNE_TEST_RESULTS"):
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        properties = dict(report.user_properties)
        _RESULTS.append({"nodeid": report.nodeid, "test": report.nodeid.split("::")[-1].split("[")[0],
                         "outcome": report.outcome, "seconds": round(report.duration, 3),
                         "family": properties.get("family"),
                         "family_outcomes": properties.get("family_outcomes")})


def pytest_sessionfinish(session):
    path = os.environ.get("OPTIMUM_PRUNE_TEST_RESULTS")
    if path:
        import json

        with open(path, "w", encoding="utf-8") as f:
            json.dump(_RESULTS, f, indent=1)
