"""The evaluation API on tiny random models: perplexity protocol, KL, latency, size, read_text, CLI."""

from __future__ import annotations

import argparse
import json
import math
import sys

import pytest
import torch
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging
from zoo import CHARS, FAMILIES, TEXT, VOCAB, char_tokenizer

from optimum_prune import evaluation as ev
from optimum_prune.evaluation import models as ev_models

def random_ids(n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama():
    return FAMILIES["llama-gqa"].build()


@pytest.fixture(scope="module")
def perturbed(llama):
    model = FAMILIES["llama-gqa"].build()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


# --------------------------------------------------------------------------------------- text


def test_read_text_list_file_dataset(tmp_path):
    import datasets

    rows = ["first line", "", " = Heading = ", "last"]
    joined = "first line\n\n\n\n = Heading = \n\nlast"
    assert ev.read_text(rows) == joined
    assert ev.read_text(datasets.Dataset.from_dict({"text": rows})) == joined
    assert ev.read_text(datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": rows})})) == joined
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeff = A = \n b\n".encode())
    assert ev.read_text(str(path)) == "\ufeff = A = \n b\n"  # read as plain UTF-8, like the benchmarks
    assert ev.read_text(path, strip_bom=True) == " = A = \n b\n"


def test_read_text_errors(monkeypatch):
    import datasets

    with pytest.raises(FileNotFoundError, match="wikitext2"):
        ev.read_text("no/such/file.txt")
    with pytest.raises(ValueError, match="'text' column"):
        ev.read_text(datasets.Dataset.from_dict({"content": ["a"]}))

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ev.DatasetUnavailableError, match="local text file"):
        ev.read_text("wikitext2")


def test_tokenize_text_once_without_length_warning():
    tok = char_tokenizer()
    logger = logging.get_logger("transformers.tokenization_utils_base")
    with CaptureLogger(logger) as captured:
        ids = ev.tokenize_text(tok, TEXT)
    assert "longer than the specified maximum" not in captured.out
    assert ids.dtype == torch.long and ids.dim() == 1 and ids.numel() == len(TEXT)  # one token per char, no BOS
    assert ids[0].item() == CHARS.index("T") + 1


def test_text_windows():
    ids = torch.arange(1000)
    w = ev.text_windows(ids, seq_len=100, max_windows=4)
    assert w.shape == (4, 100) and torch.equal(w[1], torch.arange(100, 200))
    assert ev.text_windows(ids, seq_len=300, max_windows=40).shape == (3, 300)  # tail dropped
    with pytest.raises(ValueError, match="fewer than one window"):
        ev.text_windows(torch.arange(10), seq_len=512)


# --------------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize("family", ["llama-gqa", "gpt2", "opt"])
@pytest.mark.parametrize("split_head", [True, False])
def test_perplexity_matches_model_loss(family, split_head, monkeypatch):
    model = FAMILIES[family].build()
    monkeypatch.setattr(ev_models, "CHUNK_ELEMENTS", VOCAB * 7)  # many small chunks, not aligned with windows
    if not split_head:
        monkeypatch.setattr(ev_models.LogitsSource, "of", classmethod(lambda cls, m, probe: cls(m)))
    ids = random_ids(1, 5 * 24 + 7).view(-1)
    result = ev.perplexity(model, input_ids=ids, seq_len=24, max_windows=4, batch_size=3, progress=False)
    windows = ids[: 4 * 24].view(4, 24)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    expected = math.exp(sum(losses) / len(losses))
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert (result.num_windows, result.seq_len, result.num_tokens) == (4, 24, 4 * 23)
    assert result.mean_nll == pytest.approx(math.log(result.perplexity))


def test_head_split_is_used_and_detected(llama):
    probe = random_ids(1, 8)
    assert ev_models.LogitsSource.of(llama, probe).head is llama.lm_head
    bert_lm = FAMILIES["bert-mlm"].build()  # head after a transform: not head(backbone(x))
    assert ev_models.LogitsSource.of(bert_lm, probe).head is None


def test_perplexity_from_text_with_tokenizer(llama):
    tok = char_tokenizer()
    result = ev.perplexity(llama, tok, TEXT, seq_len=32, max_windows=3, progress=False)
    direct = ev.perplexity(llama, input_ids=ev.tokenize_text(tok, TEXT), seq_len=32, max_windows=3, progress=False)
    assert result == direct and result.num_windows == 3
    assert 1 < result.perplexity < 10 * VOCAB


def test_perplexity_errors(llama):
    with pytest.raises(ValueError, match="causal language models"):
        ev.perplexity(FAMILIES["bert-mlm"].build(), input_ids=random_ids(2, 16), progress=False)
    with pytest.raises(ValueError, match="fewer than one window"):
        ev.perplexity(llama, char_tokenizer(), "short text", seq_len=512, progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        ev.perplexity(llama, None, TEXT, progress=False)


# ---------------------------------------------------------------------------------------- KL


def test_kl_self_is_zero(llama):
    ids = random_ids(3, 20)
    assert ev.kl_divergence(llama, llama, ids, progress=False) == pytest.approx(0, abs=1e-6)
    assert ev.kl_divergence(llama, llama, ids, top_k=5, progress=False) == pytest.approx(0, abs=1e-6)
    cached = ev.reference_logprobs(llama, ids, top_k=5, progress=False)
    assert ev.kl_to_reference(llama, cached, ids, progress=False) == pytest.approx(0, abs=1e-6)


def test_kl_perturbed_and_top_k_lower_bound(llama, perturbed, monkeypatch):
    monkeypatch.setattr(ev_models, "CHUNK_ELEMENTS", VOCAB * 9)
    ids = random_ids(3, 20, seed=3)
    full = ev.kl_divergence(perturbed, llama, ids, batch_size=2, progress=False)
    assert full > 1e-4
    for k in (1, 5, 20):
        top = ev.kl_divergence(perturbed, llama, ids, top_k=k, batch_size=2, progress=False)
        # Merging tokens into a "rest" bucket can only lose information (data processing inequality).
        assert 0 < top <= full * (1 + 1e-5) + 1e-7
    assert ev.kl_divergence(perturbed, llama, ids, top_k=VOCAB + 10, progress=False) == pytest.approx(full, rel=1e-5)

    # Manual full KL from the logits.
    with torch.no_grad():
        logp = torch.log_softmax(llama(input_ids=ids).logits.float(), -1)
        logq = torch.log_softmax(perturbed(input_ids=ids).logits.float(), -1)
    manual = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    assert full == pytest.approx(manual, rel=1e-4)

    # The cached reference gives the same numbers as the streaming computation.
    cached = ev.reference_logprobs(llama, ids, top_k=5, batch_size=2, progress=False)
    assert cached.indices.shape == (3, 20, 5) and cached.rest_logprob.shape == (3, 20)
    assert ev.kl_to_reference(perturbed, cached, batch_size=2, progress=False) == pytest.approx(
        ev.kl_divergence(perturbed, llama, ids, top_k=5, progress=False), rel=1e-5)
    cached_full = ev.reference_logprobs(llama, ids, top_k=None, progress=False)
    assert cached_full.logprobs.shape == (3, 20, VOCAB) and cached_full.indices is None
    assert ev.kl_to_reference(perturbed, cached_full, ids, progress=False) == pytest.approx(full, rel=1e-5)
    with pytest.raises(ValueError, match="differ"):
        ev.kl_to_reference(perturbed, cached, random_ids(3, 20, seed=9), progress=False)


# ----------------------------------------------------------------------------- latency & size


def test_latency_restores_threads(llama):
    before = torch.get_num_threads()
    result = ev.measure_latency(llama, seq_len=16, repeats=3, warmup=1, threads=1)
    assert torch.get_num_threads() == before
    assert result.median_ms > 0 and result.p10_ms <= result.median_ms <= result.p90_ms
    assert (result.threads, result.batch_size, result.seq_len, result.repeats) == (1, 1, 16, 3)
    assert result.device == "cpu" and result.dtype == "float32"
    given = ev.measure_latency(FAMILIES["bert"].build(), {"input_ids": random_ids(2, 8)}, repeats=2, warmup=0)
    assert (given.batch_size, given.seq_len) == (2, 8)


@pytest.mark.parametrize("family", ["llama-mha-tied", "bert"])
def test_model_size_directory_matches_memory(family, tmp_path):
    model = FAMILIES[family].build()
    model.save_pretrained(tmp_path)
    memory, disk = ev.model_size(model), ev.model_size(tmp_path)
    assert memory.source == "memory" and disk.source == "safetensors"
    unique = {id(p): p for p in model.parameters()}.values()
    assert disk.parameters == memory.parameters == sum(p.numel() for p in unique)
    assert 0 <= disk.file_bytes - memory.file_bytes < 64 * 1024  # the safetensors header


def test_model_size_counts_int_buffers_at_their_bytes():
    layer = torch.nn.Linear(8, 8)
    layer.register_buffer("qweight", torch.zeros(8, 2, dtype=torch.int32))  # packed 4-bit weights
    size = ev.model_size(layer)
    assert size.parameters == 72 and size.file_bytes == 72 * 4 + 16 * 4


# ------------------------------------------------------------------------------ evaluate & CLI


def test_evaluate_report(llama, perturbed):
    report = ev.evaluate(perturbed, char_tokenizer(), TEXT, reference=llama, top_k=4, seq_len=32, max_windows=2,
                         latency={"repeats": 2, "warmup": 0, "seq_len": 8}, progress=False, name="tiny")
    assert report.perplexity.num_windows == 2 and report.kl_divergence > 0 and report.kl_top_k == 4
    assert report.latency.seq_len == 8 and report.size.parameters > 0
    data = json.loads(json.dumps(report.to_dict()))
    assert data["perplexity"]["seq_len"] == 32 and data["model"] == "tiny"
    table = report.to_markdown()
    assert "perplexity (2 x 32 tokens)" in table and "KL to reference (top-4)" in table and "`tiny`" in table

    encoder = ev.evaluate(FAMILIES["bert-mlm"].build(), char_tokenizer(), TEXT, latency=False, progress=False)
    assert encoder.perplexity is None and encoder.latency is None and encoder.size.parameters > 0


def test_lm_eval_missing_extra(llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes ``import lm_eval`` fail
    with pytest.raises(ImportError, match=r'pip install "optimum-prune\[lm-eval\]"'):
        ev.lm_eval(llama, char_tokenizer(), ["hellaswag"])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optimum-prune")
    ev.add_cli(parser.add_subparsers(dest="command"))
    return parser


def test_cli_eval(llama, perturbed, tmp_path, capsys):
    model_dir, ref_dir, text = tmp_path / "model", tmp_path / "dense", tmp_path / "test.txt"
    perturbed.save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    llama.save_pretrained(ref_dir)
    text.write_text(TEXT)
    out = tmp_path / "out" / "eval.json"
    args = _parser().parse_args(["eval", "--model", str(model_dir), "--text", str(text), "--seq-len", "32",
                                 "--max-windows", "3", "--reference", str(ref_dir), "--top-k", "8",
                                 "--repeats", "2", "--threads", "1", "--latency-seq-len", "16",
                                 "--json", str(out), "--no-progress"])
    assert args.latency is True and args.command == "eval"
    assert ev.run_cli(args) == 0
    printed = capsys.readouterr().out
    assert "| perplexity (3 x 32 tokens) |" in printed and "on disk, safetensors" in printed
    data = json.loads(out.read_text())
    assert data["perplexity"]["num_windows"] == 3 and data["kl_divergence"] > 0 and data["latency"]["threads"] == 1
    expected = ev.perplexity(perturbed, char_tokenizer(), TEXT, seq_len=32, max_windows=3, progress=False)
    assert data["perplexity"]["perplexity"] == pytest.approx(expected.perplexity, rel=1e-5)

    text.write_text(TEXT[:300])
    args = _parser().parse_args(["eval", "--model", str(model_dir), "--text", str(text), "--no-latency",
                                 "--no-progress"])  # 512-token windows: the text is too short
    assert args.latency is False
    assert ev.run_cli(args) == 2
    assert "fewer than one window" in capsys.readouterr().err
