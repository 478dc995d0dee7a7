"""Data-free healing text: deterministic for a seed, deduplicated, cached (reused; refused under other settings),
resumable, selectable as train_dataset="generated", and the held-out KL helper."""

from __future__ import annotations

import json
import math

import pytest
import torch
from zoo import FAMILIES, char_tokenizer

from optimum_prune import Pruner, generated_text
from optimum_prune.calibration import CalibrationError, load_calibration
from optimum_prune.generated_text import (GeneratedTextError, GenerationSettings, deduplicate, generate_pool,
                                          generated_windows, heldout_kl)

SMALL = GenerationSettings(seed=3, max_new_tokens=24, batch_size=4, min_tokens=4, dedup_ngram=8)


@pytest.fixture(scope="module")
def model():
    return FAMILIES["llama-gqa"].build(seed=0)


def test_the_same_seed_gives_the_same_text_and_another_seed_other_text(model, tmp_path):
    tok = char_tokenizer()
    a = generate_pool(model, tok, num_texts=4, settings=SMALL, cache_dir=tmp_path / "a", progress=False)
    b = generate_pool(model, tok, num_texts=4, settings=SMALL, cache_dir=tmp_path / "b", progress=False)
    other = generate_pool(model, tok, num_texts=4, settings=GenerationSettings(**{**SMALL.__dict__, "seed": 4}),
                          cache_dir=tmp_path / "c", progress=False)
    assert a.texts == b.texts and len(a.texts) >= 4
    assert a.texts != other.texts
    held = generate_pool(model, tok, num_texts=4, settings=GenerationSettings(**{**SMALL.__dict__, "split": "heldout"}),
                         cache_dir=tmp_path / "d", progress=False)
    assert not set(held.texts) & set(a.texts)  # the held-out split draws other seeds


def test_deduplication_drops_repeats_shared_spans_and_short_texts():
    base = list(range(40))
    texts = [base, base, [99] + base[5:20] + [98], list(range(100, 140)), [1, 2], list(range(200, 240))]
    kept, counts = deduplicate(texts, ngram=8, min_tokens=4)
    assert kept == [0, 3, 5]
    assert counts == {"kept": 3, "too_short": 1, "duplicates": 2}


def test_a_pool_of_identical_samples_keeps_one(model, tmp_path):
    greedy = GenerationSettings(seed=0, max_new_tokens=24, batch_size=4, top_p=1e-6, min_tokens=4, dedup_ngram=8)
    pool = generate_pool(model, char_tokenizer(), num_texts=1, settings=greedy, cache_dir=tmp_path, progress=False)
    assert len(set(pool.texts)) == 1 and len(pool.texts) == 4 and pool.kept()[0] == [0]


def test_the_cache_is_reused_extended_resumed_and_refused_under_other_settings(model, tmp_path, monkeypatch):
    tok = char_tokenizer()
    where = tmp_path / "pool"
    first = generate_pool(model, tok, num_texts=4, settings=SMALL, cache_dir=where, progress=False)
    manifest = json.loads((where / "manifest.json").read_text())
    assert manifest["identity"]["sampling"]["seed"] == 3 and manifest["identity"]["sampling"]["top_p"] == 0.95
    real = type(model).generate
    calls = []
    monkeypatch.setattr(type(model), "generate", lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
    again = generate_pool(model, tok, num_texts=4, settings=SMALL, cache_dir=where, progress=False)
    assert again.texts == first.texts and calls == []  # read from disk, nothing sampled
    more = generate_pool(model, tok, num_texts=len(first.kept()[0]) + 4, settings=SMALL, cache_dir=where,
                         progress=False)
    assert more.texts[:len(first.texts)] == first.texts and len(calls) >= 1  # extended, the start unchanged
    # an interrupted run (a batch file missing) resumes with exactly the text an uninterrupted run has
    last = sorted(where.glob("batch-*.json"))[-1]
    last.unlink()
    resumed = generate_pool(model, tok, num_texts=len(more.kept()[0]), settings=SMALL, cache_dir=where,
                            progress=False)
    assert resumed.texts == more.texts
    with pytest.raises(GeneratedTextError, match="another sampling"):
        generate_pool(model, tok, num_texts=4, settings=GenerationSettings(**{**SMALL.__dict__, "temperature": 0.7}),
                      cache_dir=where, progress=False)
    with pytest.raises(GeneratedTextError, match="another model"):
        generate_pool(FAMILIES["llama-gqa"].build(seed=1), tok, num_texts=4, settings=SMALL, cache_dir=where,
                      progress=False)


def test_generated_windows_through_calibration_and_healing(model, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMUM_PRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(generated_text, "DEFAULTS", GenerationSettings(max_new_tokens=24, batch_size=4))
    tok = char_tokenizer()
    ids, info = load_calibration("generated:5", tok, seq_len=16, seed=3, model=model, progress=False)
    assert ids.shape == (5, 16) and info["dataset"] == "generated:5" and info["generation"]["seed"] == 3
    assert len({tuple(row) for row in ids.tolist()}) == 5
    settings = GenerationSettings(seed=3, max_new_tokens=24, batch_size=4)
    again, _ = generated_windows(model, tok, 5, 16, settings=settings, progress=False)
    assert torch.equal(ids, again)
    with pytest.raises(CalibrationError, match="pass the model"):
        load_calibration("generated", tok, seq_len=16)
    with pytest.raises(CalibrationError, match="generated:N"):
        load_calibration("generated:x", tok, seq_len=16, model=model)

    dense = Pruner(model, tok)
    pruner = Pruner(FAMILIES["llama-gqa"].build(seed=0), tok)
    pruner.prune("layerchop", num_layers=1, strategy="last", progress=False)
    with pytest.raises(ValueError, match="distill_from"):
        pruner.heal("generated", max_steps=1, seq_len=16)
    metrics = pruner.heal("generated:6", distill_from=dense, max_steps=2, seq_len=16, per_device_train_batch_size=3,
                          learning_rate=1e-3, disable_tqdm=True)
    assert math.isfinite(metrics["train_loss"])
    assert pruner.pruning_config.metrics["heal_dataset"] == "generated:6"
    assert pruner.pruning_config.metrics["heal_tokens"] == 6 * 16
    kl = heldout_kl(pruner.model, model, tok, num_windows=2, seq_len=16, progress=False,
                    settings=GenerationSettings(split="heldout", max_new_tokens=24, batch_size=4))
    assert kl > 0 and math.isfinite(kl)
