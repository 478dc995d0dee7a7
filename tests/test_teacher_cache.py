"""Cached teacher logits: the cached KD loss equals the live one, the top-k loss is the documented formula, a
stale cache is refused, and an interrupted build is never read as complete (it resumes instead)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import TrainingArguments
from zoo import FAMILIES, VOCAB

from optimum_prune import Pruner
from optimum_prune.distill import DistillationTrainer, TokenWindows, kd_loss, topk_kd_loss
from optimum_prune.evaluation.models import LogitsSource
from optimum_prune.teacher_cache import TeacherCache, TeacherCacheError, build_teacher_cache

IDS = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def models():
    family = FAMILIES["llama-gqa"]
    return family.build(seed=0), family.build(seed=1)  # teacher, student (same shapes, other weights)


def trainer(student, tmp_path, **kwargs) -> DistillationTrainer:
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, seed=0)
    dataset = TokenWindows(IDS, with_index=kwargs.get("teacher_cache") is not None)
    return DistillationTrainer(model=student, args=args, train_dataset=dataset, **kwargs)


@pytest.mark.parametrize("top_k", [None, VOCAB])
def test_cached_loss_equals_the_live_teacher_loss_on_the_same_batch(models, tmp_path, top_k):
    teacher, student = models
    cache = build_teacher_cache(teacher, IDS, tmp_path / "cache", top_k=top_k, temperature=2.0, progress=False)
    live = trainer(student, tmp_path, teacher=teacher, temperature=2.0)
    cached = trainer(student, tmp_path, teacher=teacher, temperature=2.0, teacher_cache=cache)
    assert cached.teacher is None  # a step runs the student only
    batch = next(iter(cached.get_train_dataloader()))  # through the Trainer's collator: the index survives
    assert "window_index" in batch
    expected = live.compute_loss(student, {k: v for k, v in batch.items() if k != "window_index"})
    got = cached.compute_loss(student, dict(batch))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    got.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    student.zero_grad()


def reference_topk_kl(student_logits, teacher_logits, k, T):
    """KL between teacher and student coarsened to the teacher's top-k tokens + one rest bucket (float64, loops)."""
    s = student_logits.double().numpy() / T
    z = teacher_logits.double().numpy() / T
    total, count = 0.0, 0
    for srow, zrow in zip(s.reshape(-1, s.shape[-1]), z.reshape(-1, z.shape[-1])):
        p = np.exp(zrow - zrow.max()); p /= p.sum()
        q = np.exp(srow - srow.max()); q /= q.sum()
        top = np.argsort(-zrow, kind="stable")[:k]
        rest = np.setdiff1d(np.arange(len(zrow)), top)
        P = np.append(p[top], p[rest].sum())
        Q = np.append(q[top], q[rest].sum())
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(P, Q) if pi > 0)
        count += 1
    return total / count * T * T


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_topk_loss_is_the_documented_formula_and_the_full_loss_at_k_equal_vocab(T):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, VOCAB, generator=g) * 3
    teacher = torch.randn(2, 5, VOCAB, generator=g) * 3
    lse = torch.logsumexp(teacher.double() / T, -1)
    for k in (1, 4, 17):
        values, indices = teacher.topk(k, dim=-1)
        got = topk_kd_loss(student, values, indices, lse, T)
        assert got.item() == pytest.approx(reference_topk_kl(student, teacher, k, T), rel=1e-5, abs=1e-7)
        assert got.item() <= kd_loss(student, teacher, T).item() + 1e-6  # a coarsening never raises KL
    values, indices = teacher.topk(VOCAB, dim=-1)
    torch.testing.assert_close(topk_kd_loss(student, values, indices, lse, T), kd_loss(student, teacher, T),
                               rtol=1e-5, atol=1e-6)
    leaf = student.clone().requires_grad_(True)
    topk_kd_loss(leaf, *teacher.topk(4, dim=-1), lse, T).backward()
    assert torch.isfinite(leaf.grad).all()


def test_a_cache_of_another_teacher_windows_or_top_k_is_refused(models, tmp_path):
    teacher, student = models
    where = tmp_path / "cache"
    build_teacher_cache(teacher, IDS, where, top_k=8, progress=False)
    with pytest.raises(TeacherCacheError, match="teacher model"):
        build_teacher_cache(student, IDS, where, top_k=8, progress=False)
    with pytest.raises(TeacherCacheError, match="training windows"):
        build_teacher_cache(teacher, IDS.flip(0), where, top_k=8, progress=False)
    with pytest.raises(TeacherCacheError, match="top_k"):
        build_teacher_cache(teacher, IDS, where, top_k=4, progress=False)
    reused = build_teacher_cache(teacher, IDS, where, top_k=8, progress=False)  # same run: reused as it is
    with pytest.raises(TeacherCacheError, match="temperature 1.0, not 2.0"):
        reused.check_temperature(2.0)
    with pytest.raises(TeacherCacheError, match="tokens differ"):
        reused.rows(torch.tensor([0]), input_ids=IDS[1:2])
    rebuilt = build_teacher_cache(student, IDS, where, top_k=8, progress=False, rebuild=True)
    assert rebuilt.manifest["identity"]["teacher"] != reused.manifest["identity"]["teacher"]


def test_an_interrupted_build_is_never_used_as_complete_and_resumes(models, tmp_path, monkeypatch):
    teacher, _ = models
    where = tmp_path / "cache"
    calls = []
    states = LogitsSource.states

    def failing(self, input_ids):
        calls.append(input_ids.shape[0])
        if calls.count(2) == 2:
            raise KeyboardInterrupt  # killed while the second batch is computed
        return states(self, input_ids)

    monkeypatch.setattr(LogitsSource, "states", failing)
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(teacher, IDS, where, top_k=8, batch_size=2, progress=False)
    assert not where.exists()
    with pytest.raises(TeacherCacheError, match="no finished teacher cache.*interrupted build"):
        TeacherCache.open(where)
    assert json.loads((tmp_path / "cache.partial" / "state.json").read_text())["done"] == 2
    calls.clear()
    monkeypatch.setattr(LogitsSource, "states", lambda self, ids: (calls.append(ids.shape[0]), states(self, ids))[1])
    resumed = build_teacher_cache(teacher, IDS, where, top_k=8, batch_size=2, progress=False)
    assert calls.count(2) == 2 and sum(calls) <= 5  # only the four windows not written before (+ a 1-row probe)
    assert not (tmp_path / "cache.partial").exists()
    fresh = build_teacher_cache(teacher, IDS, tmp_path / "fresh", top_k=8, batch_size=3, progress=False)
    for name in ("values", "indices", "lse"):
        np.testing.assert_array_equal(resumed.arrays[name], fresh.arrays[name])
    np.testing.assert_array_equal(resumed.input_ids, IDS.numpy())


def test_heal_with_a_teacher_cache_builds_it_once_and_reuses_it(tmp_path):
    family = FAMILIES["llama-gqa"]
    dense = Pruner(family.build())
    runs = []
    for _ in range(2):
        pruner = Pruner(family.build())
        pruner.prune("layerchop", num_layers=1, strategy="last", progress=False)
        runs.append(pruner.heal(IDS, distill_from=dense, teacher_cache=tmp_path / "cache", teacher_top_k=8,
                                max_steps=2, per_device_train_batch_size=3, learning_rate=1e-3, disable_tqdm=True))
        assert math.isfinite(runs[-1]["train_loss"])
    assert runs[0]["train_loss"] == pytest.approx(runs[1]["train_loss"], rel=1e-6)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["top_k"] == 8 and manifest["num_windows"] == IDS.shape[0]
    with pytest.raises(ValueError, match="distill_from"):
        pruner.heal(IDS, teacher_cache=tmp_path / "cache", max_steps=1)


def test_gradual_ziplm_reads_one_cache_in_every_stage(tmp_path):
    from test_ziplm import CALIB, proportional_table

    train = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(5))
    losses = {}
    for cache in (None, tmp_path / "kd"):
        model = FAMILIES["llama-gqa"].build()
        pruner = Pruner(model)
        pruner.prune(target_speedup=1.8, latency_table=proportional_table(model), calibration=CALIB,
                     search_iterations=0, progress=False,
                     finetune=dict(train_dataset=train, max_steps=2, stages=2, learning_rate=1e-3, disable_tqdm=True,
                                   teacher_cache=cache, teacher_top_k=0))
        losses[cache] = [stage["train_loss"] for stage in pruner.pruning_config.search["stages"]]
    assert losses[tmp_path / "kd"] == pytest.approx(losses[None], rel=1e-4)  # a full cache is the live teacher
    assert json.loads((tmp_path / "kd" / "manifest.json").read_text())["top_k"] is None
