"""EvoPress's exact savings (parent activations reused, early stops, identical candidates once) leave the search
as it was: the same parents, fitness history and choices with the cache on as with it off."""

from __future__ import annotations

import pytest
import torch
from zoo import FAMILIES, VOCAB

import optimum_prune.methods.evopress.search as search
from optimum_prune.evaluation.prefix_cache import PrefixCache, choose_boundaries
from optimum_prune.methods.evopress.search import EvoPressSettings, dropped_sublayers, search_depth

CALIB = torch.randint(0, VOCAB, (12, 32), generator=torch.Generator().manual_seed(1))
SETTINGS = dict(generations=8, offspring=6, windows=[2, 4, 12], survivors=[3, 2], seed=0)


def trajectory(monkeypatch, tmp_path, model, cache_mib, name, **kwargs):
    """The depth search's result and its parent after every generation (from the state file's rewrites)."""
    parents = []
    real = search._save_state
    monkeypatch.setattr(search, "_save_state", lambda path, state: (parents.append((state["parent"],
                                                                                      state["fitness"])),
                                                                     real(path, state)))
    settings = EvoPressSettings(**SETTINGS, cache_mib=cache_mib, state_file=tmp_path / f"{name}.json")
    result = search_depth(model, CALIB, settings=settings, progress=False, batch_size=4, **kwargs)
    monkeypatch.setattr(search, "_save_state", real)
    return result, parents


@pytest.mark.parametrize("family,sublayers", [("llama-gqa", True), ("llama-gqa", False), ("gpt2", True),
                                              ("opt", True), ("bert", True)])
def test_cache_on_and_off_give_the_same_search(monkeypatch, tmp_path, family, sublayers):
    model = FAMILIES[family].build()
    off, off_parents = trajectory(monkeypatch, tmp_path, model, 0, "off", num_blocks=1, sublayers=sublayers)
    on, on_parents = trajectory(monkeypatch, tmp_path, model, 512, "on", num_blocks=1, sublayers=sublayers)
    small, small_parents = trajectory(monkeypatch, tmp_path, model, 0.1, "small", num_blocks=1,
                                      sublayers=sublayers)  # a few boundaries only
    assert off.info["activation_cache"] is None and on.info["activation_cache"]["resumed"] > 0
    assert len(small.info["activation_cache"]["boundaries"]) < len(on.info["activation_cache"]["boundaries"])
    for run, parents in ((on, on_parents), (small, small_parents)):
        assert [p for p, _ in parents] == [p for p, _ in off_parents]  # the same parent every generation
        assert [f for _, f in parents] == pytest.approx([f for _, f in off_parents], rel=1e-9, abs=0)
        assert (run.drop_layers, run.drop_attention, run.drop_mlp) == (off.drop_layers, off.drop_attention,
                                                                        off.drop_mlp)
        assert run.info["fitness"] == pytest.approx(off.info["fitness"], rel=1e-9, abs=0)
        assert run.info["seed_fitness"] == pytest.approx(off.info["seed_fitness"], rel=1e-9, abs=0)
        assert run.info["evaluations"] == off.info["evaluations"] and run.info["start"] == off.info["start"]
    # on this CPU the reuse is bit-exact: the skipped blocks compute the same numbers in any batch
    assert [f for _, f in on_parents] == [f for _, f in off_parents]


def test_resumed_forward_equals_the_full_forward_and_unknown_inputs_run_normally():
    model = FAMILIES["llama-gqa"].build()
    cache = PrefixCache(model, CALIB, 512)
    parent = [(0, 0), (1, 0), (0, 0), (0, 1)]
    cache.set_parent(parent)
    with dropped_sublayers(model, {1}, {3}):
        cache.fill(model, [0, 3, 5], batch_size=2)
    candidate = [(0, 0), (1, 0), (1, 0), (0, 0)]  # first change at block 2
    start = cache.start_for(candidate)
    assert start == 2 and cache.missing([0, 3, 5], 2) == []
    with dropped_sublayers(model, {1, 2}, set()):
        with torch.no_grad():
            full = model(input_ids=CALIB[[0, 5]]).logits
            with cache.resume(model, start):
                resumed = model(input_ids=CALIB[[0, 5]]).logits
                other = model(input_ids=CALIB[[1, 2]]).logits  # not cached: every block runs
            plain = model(input_ids=CALIB[[1, 2]]).logits
    assert torch.equal(resumed, full) and torch.equal(other, plain)
    assert all(not hasattr(b, "__dict__") or "forward" not in b.__dict__ for b in model.model.layers)
    cache.set_parent([(0, 0), (1, 1), (0, 0), (0, 1)])  # a new parent: boundaries past block 1 are stale
    assert all(set(per) <= {1} for per in cache.states.values())


def test_a_candidate_that_becomes_the_parent_hands_over_its_states():
    """The boundary states a candidate computes in a resumed forward with ``capture`` are adopted when it becomes
    the parent: those windows need no refill, and the states equal the new parent's own fill bit for bit. A
    candidate that does not become the parent leaves nothing behind; the capture stays within its budget."""
    model = FAMILIES["llama-gqa"].build()
    parent, winner, loser = [(0, 0), (1, 0), (0, 0), (0, 1)], [(0, 0), (1, 0), (1, 0), (0, 0)], [(0, 0), (1, 0),
                                                                                                  (0, 0), (1, 1)]
    cache = PrefixCache(model, CALIB, 512)
    cache.set_parent(parent)
    with dropped_sublayers(model, {1}, {3}):
        cache.fill(model, [0, 3, 5], batch_size=2)
    start = cache.start_for(winner)
    assert start == 2
    with torch.no_grad():
        with dropped_sublayers(model, {1, 3}, {3}), cache.resume(model, cache.start_for(loser), capture=loser):
            model(input_ids=CALIB[[0, 3]])
        with dropped_sublayers(model, {1, 2}, set()), cache.resume(model, start, capture=winner):
            model(input_ids=CALIB[[0, 3]])  # resumed at boundary 2
            model(input_ids=CALIB[[1]])  # a window without states: every block runs, its states are kept too
            model(input_ids=CALIB[[2], :8])  # not a scoring window: nothing kept
    assert set(cache.pending) == {tuple(winner), tuple(loser)}
    cache.set_parent(winner)
    assert cache.pending == {} and cache.stats.adopted_windows == 3
    assert cache.missing([0, 3, 1], 3) == [] and cache.missing([0, 3, 1], 4) == []
    assert cache.missing([0, 3, 1, 5], 2) == [1]  # at or before the first change the old parent's stay
    assert cache.missing([5], 3) == [5]  # past it a window the winner did not run needs a fill
    fresh = PrefixCache(model, CALIB, 512)
    fresh.set_parent(winner)
    with dropped_sublayers(model, {1, 2}, set()):
        fresh.fill(model, [0, 3, 1], batch_size=2)
    for w in (0, 3, 1):
        for b in (3, 4):
            assert torch.equal(cache.states[w][b], fresh.states[w][b])
    # a capture nobody adopts is dropped; none is kept past the capture budget
    with torch.no_grad(), dropped_sublayers(model, {1, 3}, {3}), cache.resume(model, 3, capture=loser):
        model(input_ids=CALIB[[0]])
    assert cache.pending[tuple(loser)]
    cache.discard_captured()
    assert cache.pending == {}
    cache.capture_bytes = 0
    with torch.no_grad(), dropped_sublayers(model, {1, 3}, {3}), cache.resume(model, 3, capture=loser):
        model(input_ids=CALIB[[0]])
    cache.set_parent(loser)
    assert cache.stats.adopted_windows == 3 and cache.missing([0], 4) == [0]


def test_boundaries_fit_the_budget():
    assert choose_boundaries(30, 32, 2**20, 10_000) == list(range(1, 31))
    picked = choose_boundaries(30, 32, 2**20, 32 * 8)
    assert len(picked) <= 8 and picked[-1] == 30 and picked[0] == 1
    assert choose_boundaries(30, 32, 2**20, 16) == []


def test_sparsity_and_structure_searches_choose_the_same_with_the_cache(tmp_path):
    from test_ziplm import proportional_table

    from optimum_prune import Pruner

    fast = dict(generations=4, offspring=4, windows=[2, 4, 12], survivors=[2, 2], seed=0, recalibrate=False)
    runs, models = {}, {}
    for mib in (0, 512):
        pruner = Pruner(FAMILIES["llama-gqa"].build())
        pruner.prune(method="evopress", target="sparsity", sparsity=0.5, calibration=CALIB, batch_size=4,
                     progress=False, evopress=dict(fast, cache_mib=mib, level_store=str(tmp_path / "store"),
                                                   levels=[0.3, 0.4, 0.5, 0.6, 0.7]))
        sparsity = pruner.pruning_config.search
        weights = {k: v.clone() for k, v in pruner.model.state_dict().items()}
        pruner = Pruner(FAMILIES["llama-gqa"].build())
        pruner.prune(method="evopress", target="structure", target_speedup=1.5, calibration=CALIB, batch_size=4,
                     latency_table=proportional_table(pruner.model), progress=False, measure_speedup=False,
                     evopress=dict(fast, cache_mib=mib))
        runs[mib] = (sparsity, pruner.pruning_config.search)
        models[mib] = weights
    # the model is left with the chosen levels loaded even where the final fitness came from scored windows
    assert models[0].keys() == models[512].keys()
    assert all(torch.equal(models[0][k], models[512][k]) for k in models[0])
    for off, on in zip(runs[0], runs[512]):
        assert off["activation_cache"] is None and on["activation_cache"]["resumed"] > 0
        assert on["levels"] == off["levels"] and on["history"] == off["history"]
        assert on["fitness"] == pytest.approx(off["fitness"], rel=1e-9, abs=0)
        assert on["evaluations"] == off["evaluations"]


@pytest.mark.parametrize("top_k", [5, None])
def test_window_by_window_kl_equals_the_batched_kl_bit_for_bit(monkeypatch, request, top_k):
    """The windowed mean (EvoPress's fast path) sums the same chunks in the same order as kl_to_reference, chunks
    spanning windows included, and stops at the same chunk with the same lower bound. One thread: with more, a CPU
    matmul splits its work by batch shape, so a batch of 3 and a single window differ in the last bits of the logits
    (that is the backbone, not the summation this test is about)."""
    import optimum_prune.evaluation.models as models
    from optimum_prune.evaluation.kl import kl_to_reference, mean_kl_of_windows, reference_logprobs, window_kl
    from optimum_prune.evaluation.models import LogitsSource

    monkeypatch.setattr(models, "CHUNK_ELEMENTS", VOCAB * 13)  # 13-position chunks across 32-token windows
    request.addfinalizer(lambda threads=torch.get_num_threads(): torch.set_num_threads(threads))
    torch.set_num_threads(1)
    dense = FAMILIES["llama-gqa"].build().eval()
    reference = reference_logprobs(dense, CALIB, top_k, batch_size=3, progress=False)
    with dropped_sublayers(dense, {1}, {2}) as model, torch.no_grad():
        source = LogitsSource.probing(model, CALIB, torch.device("cpu"))
        per_window = [window_kl(source, reference, r, torch.device("cpu"))[0] for r in range(CALIB.shape[0])]
        for rows, batch in (([0, 5, 7, 2, 9], 3), ([4, 1, 11], 2), (list(range(12)), 4)):
            expect = kl_to_reference(model, reference.subset(rows), batch_size=batch, progress=False)
            asked = []
            got = mean_kl_of_windows(lambda i: asked.append(i) or per_window[rows[i]], len(rows), CALIB.shape[1],
                                     batch, lambda: VOCAB)
            assert got == expect and asked == sorted(set(asked)) and len(asked) == len(rows)
            threshold = 0.75 * expect  # reached after about three quarters of the positions
            stopped = kl_to_reference(model, reference.subset(rows), batch_size=batch, progress=False,
                                      stop_above=threshold)
            asked.clear()
            early = mean_kl_of_windows(lambda i: asked.append(i) or per_window[rows[i]], len(rows), CALIB.shape[1],
                                       batch, lambda: VOCAB, stop_above=threshold)
            assert early == stopped and threshold <= early < expect
            assert len(asked) < len(rows)  # the windows after the stop were never asked for


def test_fast_path_reuses_scored_windows(monkeypatch, tmp_path):
    """The windowed fitness reuses (state, window) scores (the parent at every last step) while choosing what the
    plain fitness chooses, with the same fitness values."""
    model = FAMILIES["llama-gqa"].build()
    off, off_parents = trajectory(monkeypatch, tmp_path, model, 0, "off", num_blocks=1, sublayers=True)
    on, on_parents = trajectory(monkeypatch, tmp_path, model, 512, "on", num_blocks=1, sublayers=True)
    windows = on.info["window_scores"]
    assert windows["reused"] > 0 and windows["scored"] > 0
    assert len({tuple(p) for p, _ in on_parents}) > 1  # the parent changed: its scored windows were handed over
    assert on.info["activation_cache"]["adopted_windows"] > 0
    assert on_parents == off_parents and on.info["fitness"] == off.info["fitness"]
    assert (on.drop_attention, on.drop_mlp) == (off.drop_attention, off.drop_mlp)
    assert "window_scores" not in off.info


@pytest.mark.parametrize("top_k", [5, None])
def test_lazy_window_and_reused_buffers_give_the_same_kl(monkeypatch, request, top_k):
    """A window read lazily (the head of a chunk runs only when one of its positions is read) and scored in reused
    logits / log-probs buffers gives window_kl's numbers bit for bit; a stop inside the window leaves the head of
    its later chunks uncomputed, with the same stopped mean."""
    import optimum_prune.evaluation.models as models
    from optimum_prune.evaluation.kl import KLWorkspace, WindowKL, mean_kl_of_windows, reference_logprobs, window_kl
    from optimum_prune.evaluation.models import LogitsSource

    monkeypatch.setattr(models, "CHUNK_ELEMENTS", VOCAB * 13)  # 13-position chunks: 3 per 32-token window
    request.addfinalizer(lambda threads=torch.get_num_threads(): torch.set_num_threads(threads))
    torch.set_num_threads(1)
    dense = FAMILIES["llama-gqa"].build().eval()
    reference = reference_logprobs(dense, CALIB, top_k, batch_size=3, progress=False)
    cpu = torch.device("cpu")
    with dropped_sublayers(dense, {1}, {2}) as model, torch.no_grad():
        source = LogitsSource.probing(model, CALIB, cpu)
        workspace = KLWorkspace()
        for row in (0, 7, 11):
            want = window_kl(source, reference, row, cpu)[0]
            lazy, vocab = window_kl(source, reference, row, cpu, lazy=True, workspace=workspace)
            assert isinstance(lazy, WindowKL) and vocab == VOCAB and lazy.done == 0
            assert torch.equal(lazy[2:9], want[2:9]) and lazy.done == 13 and not lazy.complete
            assert torch.equal(lazy.values(), want) and lazy.complete
        assert workspace.trusted is (True if top_k else None)  # Top-K: buffers used (checked once); full: not needed
        full = window_kl(source, reference, 4, cpu)[0]
        threshold = 0.2 * full.double().mean().item()  # reached inside the first chunks of the window
        expect = mean_kl_of_windows(lambda i: full, 1, CALIB.shape[1], 1, lambda: VOCAB, stop_above=threshold)
        lazy = WindowKL(source, reference, 4, cpu, workspace)
        got = mean_kl_of_windows(lambda i: lazy, 1, CALIB.shape[1], 1, lambda: VOCAB, stop_above=threshold)
        assert got == expect and threshold <= got < full.double().mean().item()
        assert 0 < lazy.done < CALIB.shape[1]  # the head of the last chunk never ran
