"""Evaluating dense and pruned models: perplexity, KL to the dense model, latency, size, lm-eval-harness.

The perplexity protocol is the project's (see ``../shared/data/README.md``): read the whole text as one
string, tokenize it once, cut non-overlapping windows of 512 tokens from the start, and report the exp of
the mean token NLL over the first 40 windows (each window predicts its own 511 next tokens).

Every function taking ``device`` runs where the model already is by default; a given ``device`` moves the
model there (in place). Models are run in eval mode under ``torch.no_grad`` and their training flag restored.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import inspect
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..text import DATASETS, DatasetUnavailableError, read_text, tokenize_text  # noqa: F401 (public API)

logger = logging.get_logger(__name__)

# Largest logits block (positions x vocabulary) materialized in fp32 at once.
_CHUNK_ELEMENTS = 2**24
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.gguf")


# ----------------------------------------------------------------------------------------- results


@dataclass
class PerplexityResult:
    """Perplexity of a causal LM on non-overlapping windows, with what it was computed on."""

    perplexity: float
    mean_nll: float
    num_tokens: int
    """Predicted tokens: ``num_windows * (seq_len - 1)``."""
    num_windows: int
    seq_len: int


@dataclass
class LatencyResult:
    """Wall-clock time of one prefill forward pass (no KV cache), over ``repeats`` runs after warm-up."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    warmup: int
    threads: int
    batch_size: int
    seq_len: int
    device: str
    dtype: str


@dataclass
class SizeResult:
    """Parameter count and bytes of weights (on disk for a checkpoint, in memory for a model object)."""

    parameters: int
    file_bytes: int
    source: str
    """"memory" (a model object), "safetensors", "pytorch" (``.bin``) or "gguf"."""


@dataclass
class ReferenceLogprobs:
    """The reference (dense) model's next-token log-probs on ``input_ids``, computed once.

    With ``top_k`` only the reference's top-k tokens and one "rest" bucket are kept, so memory is
    ``n * seq_len * (top_k + 1)`` numbers instead of ``n * seq_len * vocab``.
    """

    input_ids: torch.Tensor
    """[n, seq_len] token ids the log-probs were computed on."""
    logprobs: torch.Tensor
    """[n, seq_len, top_k] (or [n, seq_len, vocab] without top_k), fp32."""
    indices: torch.Tensor | None
    """[n, seq_len, top_k] token ids of ``logprobs``; None for the full vocabulary."""
    rest_logprob: torch.Tensor | None
    """[n, seq_len] log of the probability mass outside the top-k; None for the full vocabulary."""
    top_k: int | None

    def subset(self, rows: list[int]) -> "ReferenceLogprobs":
        """The same log-probs for a subset of the windows (to score on a fresh minibatch)."""
        index = torch.as_tensor(rows, dtype=torch.long)
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return ReferenceLogprobs(self.input_ids[index], self.logprobs[index], pick(self.indices),
                                 pick(self.rest_logprob), self.top_k)


@dataclass
class EvaluationReport:
    """Everything ``evaluate`` measured; missing measurements are None."""

    model: str | None = None
    perplexity: PerplexityResult | None = None
    kl_divergence: float | None = None
    kl_top_k: int | None = None
    latency: LatencyResult | None = None
    size: SizeResult | None = None
    lm_eval: dict[str, Any] | None = field(default=None)
    """``results`` section of an lm-eval-harness run: {task: {metric: value}}."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (nested dataclasses become dicts)."""
        return asdict(self)

    def to_markdown(self) -> str:
        """A two-column Markdown table of the measurements."""
        rows: list[tuple[str, str]] = []
        if self.model:
            rows.append(("model", f"`{self.model}`"))
        if self.perplexity is not None:
            p = self.perplexity
            rows.append((f"perplexity ({p.num_windows} x {p.seq_len} tokens)", f"{p.perplexity:.3f}"))
            rows.append(("mean token NLL", f"{p.mean_nll:.4f}"))
        if self.kl_divergence is not None:
            label = f"KL to reference (top-{self.kl_top_k})" if self.kl_top_k else "KL to reference"
            rows.append((label, f"{self.kl_divergence:.4f}"))
        if self.latency is not None:
            lat = self.latency
            rows.append((f"prefill latency ({lat.batch_size} x {lat.seq_len}, {lat.device}, {lat.threads} threads)",
                         f"{lat.median_ms:.1f} ms (p10 {lat.p10_ms:.1f}, p90 {lat.p90_ms:.1f})"))
        if self.size is not None:
            rows.append(("parameters", f"{self.size.parameters:,}"))
            where = "in memory" if self.size.source == "memory" else f"on disk, {self.size.source}"
            rows.append((f"weights ({where})", f"{self.size.file_bytes / 2**20:,.1f} MiB"))
        for task, metrics in (self.lm_eval or {}).items():
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in name:
                    rows.append((f"{task} {name}", f"{value:.4f}"))
        lines = ["| metric | value |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


# ------------------------------------------------------------------------------------------ text


def text_windows(ids: torch.Tensor, seq_len: int = 512, max_windows: int | None = 40) -> torch.Tensor:
    """[n, seq_len] non-overlapping windows from the start of ``ids`` (the tail shorter than a window is dropped)."""
    ids = torch.as_tensor(ids).reshape(-1).long()
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one token to predict), got {seq_len}")
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}; "
                         "use a longer text or a smaller seq_len")
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be positive, got {max_windows}")
        if n < max_windows:
            logger.warning("the text has only %d windows of %d tokens (%d asked for)", n, seq_len, max_windows)
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)


# ------------------------------------------------------------------------------- model plumbing


def _causal_lm_class_names() -> set[str]:
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for value in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return names


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a causal language model (its class or a parent is a ``...ForCausalLM``)."""
    names = _causal_lm_class_names()
    return any(c.__name__ in names for c in type(model).__mro__)


def _require_causal_lm(model: nn.Module, what: str) -> None:
    if is_causal_lm(model):
        return
    from ..loading import task_of_model

    try:
        task = task_of_model(model)
    except Exception:
        task = "non-causal"
    raise ValueError(
        f"{what} is defined for causal language models (next-token prediction); {type(model).__name__} is a "
        f"{task} model. Load it with AutoModelForCausalLM, or evaluate encoders on a downstream task instead."
    )


def _model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _place(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """The device to run on: ``device`` (moving the model there) or the model's own."""
    if device is None:
        return _model_device(model)
    device = torch.device(device)
    if _model_device(model) != device:
        logger.info("moving %s to %s", type(model).__name__, device)
        model.to(device)
    return device


@contextlib.contextmanager
def _eval_no_grad(*models: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the block; the models' training flags are restored afterwards."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _call(module: nn.Module, input_ids: torch.Tensor) -> Any:
    kwargs = {"use_cache": False} if _accepts(module, "use_cache") else {}
    return module(input_ids=input_ids, **kwargs)


@dataclass
class _LogitsSource:
    """How to get fp32 next-token logits of a causal LM in position chunks.

    With ``head`` set, the model's forward is ``head(backbone(ids).last_hidden_state)``: the backbone runs
    once per batch and the vocabulary projection runs per chunk, so the [batch, seq, vocab] logits are never
    materialized. Otherwise the full logits come from the model and only the fp32 work is chunked.
    """

    model: nn.Module
    backbone: nn.Module | None = None
    head: nn.Module | None = None

    @classmethod
    def of(cls, model: nn.Module, probe: torch.Tensor) -> _LogitsSource:
        """Split ``model`` into backbone + head if that reproduces its logits on ``probe``."""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        prefix = getattr(model, "base_model_prefix", "")
        backbone = getattr(model, prefix, None) if prefix else None
        config = getattr(model, "config", None)
        scaled = any(getattr(config, k, None) not in (None, 1, 1.0)
                     for k in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"))
        if not isinstance(head, nn.Linear) or not isinstance(backbone, nn.Module) or backbone is model or scaled:
            return cls(model)
        try:
            want = _call(model, probe).logits.float()
            got = head(_call(backbone, probe).last_hidden_state).float()
        except Exception as err:  # an unusual backbone signature: use the plain forward
            logger.debug("cannot split %s into backbone + head: %s", type(model).__name__, err)
            return cls(model)
        tol = 1e-5 * max(1.0, want.abs().max().item())
        if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=tol):
            logger.debug("%s's logits are not head(backbone(x)); using full logits", type(model).__name__)
            return cls(model)
        return cls(model, backbone, head)

    def states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch * seq, d] hidden states (or logits) for ``chunks``."""
        if self.head is not None:
            out = _call(self.backbone, input_ids).last_hidden_state
        else:
            out = _call(self.model, input_ids).logits
        return out.reshape(-1, out.shape[-1])

    def vocab_size(self, states: torch.Tensor) -> int:
        return self.head.out_features if self.head is not None else states.shape[-1]

    def logprobs(self, states: torch.Tensor) -> torch.Tensor:
        """fp32 log-softmax over the vocabulary of a chunk of ``states`` rows."""
        logits = self.head(states) if self.head is not None else states
        return torch.log_softmax(logits.float(), dim=-1)


def _chunk_rows(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, vocab))


def _as_windows(input_ids: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(input_ids).long()
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [n, seq_len] with seq_len >= 2, got shape {tuple(ids.shape)}")
    return ids


def _batches(n: int, batch_size: int, desc: str, progress: bool) -> Iterator[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress):
        yield slice(start, min(n, start + batch_size))


# ------------------------------------------------------------------------------------ perplexity


def perplexity(
    model: nn.Module,
    tokenizer: Any = None,
    text: Any = None,
    *,
    input_ids: torch.Tensor | None = None,
    seq_len: int = 512,
    max_windows: int | None = 40,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of a causal LM with the project protocol: exp of the mean NLL of all predicted tokens.

    Give ``tokenizer`` + ``text`` (the text itself, or a file path / list / Dataset for ``read_text``), or
    ``input_ids``: 1-D token ids (cut into windows here) or [n, seq_len] windows (used as they are). Each window
    predicts its own tokens 1..seq_len-1.
    """
    _require_causal_lm(model, "perplexity")
    windows = _windows_from(tokenizer, text, input_ids, seq_len, max_windows)
    run_device = _place(model, device)
    n, length = windows.shape
    targets = torch.full_like(windows, -100)
    targets[:, :-1] = windows[:, 1:]
    nll_sum, count = 0.0, 0
    with _eval_no_grad(model):
        source = _LogitsSource.of(model, windows[:1, : min(16, length)].to(run_device))
        for rows in _batches(n, batch_size, "perplexity", progress):
            states = source.states(windows[rows].to(run_device))
            tgt = targets[rows].reshape(-1).to(run_device)
            step = _chunk_rows(source.vocab_size(states))
            for start in range(0, states.shape[0], step):
                t = tgt[start:start + step]
                keep = t >= 0
                if not keep.any():
                    continue
                logp = source.logprobs(states[start:start + step][keep])
                nll_sum -= logp.gather(1, t[keep][:, None]).double().sum().item()
                count += int(keep.sum())
    mean_nll = nll_sum / count
    return PerplexityResult(perplexity=math.exp(mean_nll), mean_nll=mean_nll, num_tokens=count,
                            num_windows=n, seq_len=length)


def _windows_from(tokenizer: Any, text: Any, input_ids: torch.Tensor | None, seq_len: int,
                  max_windows: int | None) -> torch.Tensor:
    if input_ids is not None:
        if text is not None:
            raise ValueError("give either text or input_ids, not both")
        ids = torch.as_tensor(input_ids).long()
        return _as_windows(ids) if ids.dim() == 2 else text_windows(ids, seq_len, max_windows)
    if text is None:
        raise ValueError("give text (with a tokenizer) or input_ids")
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to evaluate on text; pass one, or pass input_ids")
    return text_windows(tokenize_text(tokenizer, _as_text(text)), seq_len, max_windows)


def _as_text(text: Any) -> str:
    """A string is the text itself unless it names an existing file; other sources go through ``read_text``."""
    if isinstance(text, str) and not (len(text) < 4096 and "\n" not in text and os.path.isfile(text)):
        return text
    return read_text(text)


# --------------------------------------------------------------------------------- KL divergence


def _top_k_split(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k log-probs, their indices, log of the remaining mass) for rows of log-probs."""
    top, idx = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, idx, float("-inf")).logsumexp(-1)
    return top, idx, rest


def _kl_rows(logq: torch.Tensor, logp: torch.Tensor, idx: torch.Tensor | None = None,
             rest: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p || q) per row; with ``idx`` the distributions are p's top-k tokens plus one "rest" bucket."""
    if idx is None:
        p = logp.exp()
        return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)
    q_top = logq.gather(-1, idx)
    q_rest = logq.scatter(-1, idx, float("-inf")).logsumexp(-1)
    p = logp.exp()
    kl = torch.where(p > 0, p * (logp - q_top), torch.zeros_like(p)).sum(-1)
    p_rest = rest.exp()
    return kl + torch.where(p_rest > 0, p_rest * (rest - q_rest), torch.zeros_like(p_rest))


def _check_vocab(model_vocab: int, ref_vocab: int) -> None:
    if model_vocab != ref_vocab:
        raise ValueError(f"the model's vocabulary ({model_vocab}) differs from the reference's ({ref_vocab})")


def kl_divergence(
    model: nn.Module,
    reference: nn.Module,
    input_ids: torch.Tensor,
    *,
    top_k: int | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> float:
    """Mean over all positions of KL(reference || model) of the next-token distributions on ``input_ids``.

    ``reference`` is the dense model. With ``top_k``, both distributions are reduced to the reference's top-k
    tokens plus a "rest" bucket (EvoPress's Top-K KL): a lower bound of the full KL, in bounded memory.
    """
    _require_causal_lm(model, "KL divergence")
    _require_causal_lm(reference, "KL divergence")
    windows = _as_windows(input_ids)
    run_device = _place(model, device)
    _place(reference, run_device)
    total, count = 0.0, 0
    with _eval_no_grad(model, reference):
        probe = windows[:1, : min(16, windows.shape[1])].to(run_device)
        src, ref_src = _LogitsSource.of(model, probe), _LogitsSource.of(reference, probe)
        for rows in _batches(windows.shape[0], batch_size, "KL divergence", progress):
            ids = windows[rows].to(run_device)
            states, ref_states = src.states(ids), ref_src.states(ids)
            vocab = src.vocab_size(states)
            _check_vocab(vocab, ref_src.vocab_size(ref_states))
            k = min(top_k, vocab) if top_k else None
            step = _chunk_rows(vocab)
            for start in range(0, states.shape[0], step):
                logq = src.logprobs(states[start:start + step])
                logp = ref_src.logprobs(ref_states[start:start + step])
                kl = _kl_rows(logq, *_top_k_split(logp, k)) if k else _kl_rows(logq, logp)
                total += kl.double().sum().item()
                count += kl.numel()
    return total / count


def reference_logprobs(
    reference: nn.Module,
    input_ids: torch.Tensor,
    top_k: int | None = 100,
    *,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> ReferenceLogprobs:
    """The reference's next-token log-probs on ``input_ids``, once, for scoring many candidates (on CPU).

    With ``top_k`` it keeps the top-k tokens and the rest mass per position; ``top_k=None`` keeps the full
    vocabulary (n * seq_len * vocab * 4 bytes: large for real models).
    """
    _require_causal_lm(reference, "KL divergence")
    windows = _as_windows(input_ids)
    run_device = _place(reference, device)
    logps, indices, rests = [], [], []
    with _eval_no_grad(reference):
        src = _LogitsSource.of(reference, windows[:1, : min(16, windows.shape[1])].to(run_device))
        for rows in _batches(windows.shape[0], batch_size, "reference log-probs", progress):
            ids = windows[rows].to(run_device)
            states = src.states(ids)
            vocab = src.vocab_size(states)
            if top_k is None and not logps:
                gib = windows.numel() * vocab * 4 / 2**30
                if gib > 2:
                    logger.warning("keeping the full reference log-probs needs %.1f GiB; consider top_k", gib)
            k = min(top_k, vocab) if top_k else None
            step = _chunk_rows(vocab)
            for start in range(0, states.shape[0], step):
                logp = src.logprobs(states[start:start + step])
                if k:
                    top, idx, rest = _top_k_split(logp, k)
                    logps.append(top.cpu())
                    indices.append(idx.cpu())
                    rests.append(rest.cpu())
                else:
                    logps.append(logp.cpu())
    n, length = windows.shape
    return ReferenceLogprobs(
        input_ids=windows.clone(),
        logprobs=torch.cat(logps).view(n, length, -1),
        indices=torch.cat(indices).view(n, length, -1) if indices else None,
        rest_logprob=torch.cat(rests).view(n, length) if rests else None,
        top_k=top_k,
    )


def kl_to_reference(
    model: nn.Module,
    cached: ReferenceLogprobs,
    input_ids: torch.Tensor | None = None,
    *,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> float:
    """``kl_divergence`` of ``model`` against precomputed ``reference_logprobs`` (one forward of the model only)."""
    _require_causal_lm(model, "KL divergence")
    windows = cached.input_ids
    if input_ids is not None and not torch.equal(_as_windows(input_ids).cpu(), windows.cpu()):
        raise ValueError("input_ids differ from those the reference log-probs were computed on")
    run_device = _place(model, device)
    total, count = 0.0, 0
    n, length = windows.shape
    flat_logp = cached.logprobs.reshape(n * length, -1)
    flat_idx = cached.indices.reshape(n * length, -1) if cached.indices is not None else None
    flat_rest = cached.rest_logprob.reshape(-1) if cached.rest_logprob is not None else None
    with _eval_no_grad(model):
        src = _LogitsSource.of(model, windows[:1, : min(16, length)].to(run_device))
        for rows in _batches(n, batch_size, "KL to reference", progress):
            states = src.states(windows[rows].to(run_device))
            vocab = src.vocab_size(states)
            if flat_idx is None:
                _check_vocab(vocab, flat_logp.shape[-1])
            offset = rows.start * length
            step = _chunk_rows(vocab)
            for start in range(0, states.shape[0], step):
                logq = src.logprobs(states[start:start + step])
                sel = slice(offset + start, offset + start + logq.shape[0])
                logp = flat_logp[sel].to(run_device)
                if flat_idx is None:
                    kl = _kl_rows(logq, logp)
                else:
                    kl = _kl_rows(logq, logp, flat_idx[sel].to(run_device), flat_rest[sel].to(run_device))
                total += kl.double().sum().item()
                count += kl.numel()
    return total / count


# --------------------------------------------------------------------------------------- latency


def _max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def measure_latency(
    model: nn.Module,
    inputs: dict[str, torch.Tensor] | None = None,
    *,
    batch_size: int = 1,
    seq_len: int = 512,
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    device: str | torch.device | None = None,
) -> LatencyResult:
    """Median wall-clock time of a prefill forward pass (``use_cache=False``), the cost pruning reduces.

    Without ``inputs``, random tokens from a seeded generator ([batch_size, seq_len]). ``threads`` sets
    ``torch.set_num_threads`` during the measurement only.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    run_device = _place(model, device)
    if inputs is None:
        limit = _max_positions(model)
        if limit is not None and seq_len > limit:
            logger.warning("seq_len %d is beyond the model's max_position_embeddings (%d)", seq_len, limit)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        generator = torch.Generator().manual_seed(0)
        inputs = {"input_ids": torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator),
                  "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long)}
    inputs = {k: v.to(run_device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if "use_cache" not in inputs and _accepts(model, "use_cache"):
        inputs["use_cache"] = False
    shape = next((v.shape for k, v in inputs.items() if k in ("input_ids", "inputs_embeds")), None)
    batch, length = (int(shape[0]), int(shape[1])) if shape is not None else (batch_size, seq_len)
    cuda = run_device.type == "cuda"
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        used_threads = torch.get_num_threads()
        times = []
        with _eval_no_grad(model):
            for i in range(warmup + repeats):
                if cuda:
                    torch.cuda.synchronize(run_device)
                start = time.perf_counter()
                model(**inputs)
                if cuda:
                    torch.cuda.synchronize(run_device)
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(old_threads)
    deciles = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    return LatencyResult(median_ms=statistics.median(times), p10_ms=deciles[0], p90_ms=deciles[-1],
                         repeats=repeats, warmup=warmup, threads=used_threads, batch_size=batch, seq_len=length,
                         device=str(run_device), dtype=str(dtype).replace("torch.", ""))


# ------------------------------------------------------------------------------------------ size


def model_size(model_or_dir: nn.Module | str | os.PathLike) -> SizeResult:
    """Parameters and weight bytes of a model object, a checkpoint directory or a GGUF file.

    On disk only tensor headers are read (no weights loaded) and bytes are the weight files' sizes. In
    memory, parameters are unique ``nn.Parameter`` elements and bytes those of parameters and persistent
    buffers in their own dtypes (so packed int32 quantized weights count their real bytes).
    """
    if isinstance(model_or_dir, nn.Module):
        return _memory_size(model_or_dir)
    path = os.fspath(model_or_dir)
    if not os.path.exists(path):
        from ..loading import resolve_embedded

        embedded = resolve_embedded(path)
        if embedded is None:
            raise FileNotFoundError(f"no checkpoint directory or file at {path!r}")
        directory, gguf_file, _ = embedded
        path = os.path.join(directory, gguf_file) if gguf_file else directory
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return _gguf_size(path)
        if path.endswith(".safetensors"):
            return _safetensors_size([path])
        raise ValueError(f"{path!r} is not a .safetensors or .gguf file")
    found = {pattern: sorted(glob.glob(os.path.join(path, pattern))) for pattern in _WEIGHT_PATTERNS}
    if found["*.safetensors"]:
        return _safetensors_size(found["*.safetensors"])
    if found["pytorch_model*.bin"]:
        return _torch_bin_size(found["pytorch_model*.bin"])
    if len(found["*.gguf"]) == 1:
        return _gguf_size(found["*.gguf"][0])
    raise FileNotFoundError(f"no weight files (*.safetensors, pytorch_model*.bin, one *.gguf) in {path!r}")


def _memory_size(model: nn.Module) -> SizeResult:
    seen: set[int] = set()
    params = nbytes = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
            nbytes += p.numel() * p.element_size()
    for module in model.modules():
        skip = getattr(module, "_non_persistent_buffers_set", set())
        for name, b in module.named_buffers(recurse=False):
            if b is not None and name not in skip and id(b) not in seen:
                seen.add(id(b))
                nbytes += b.numel() * b.element_size()
    return SizeResult(parameters=params, file_bytes=nbytes, source="memory")


def _safetensors_size(files: Sequence[str]) -> SizeResult:
    from safetensors import safe_open

    params = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                params += math.prod(f.get_slice(key).get_shape())
    return SizeResult(parameters=params, file_bytes=sum(os.path.getsize(f) for f in files), source="safetensors")


def _torch_bin_size(files: Sequence[str]) -> SizeResult:
    params = 0
    for file in files:
        state = torch.load(file, map_location="meta", weights_only=True)
        params += sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
    return SizeResult(parameters=params, file_bytes=sum(os.path.getsize(f) for f in files), source="pytorch")


def _gguf_size(file: str) -> SizeResult:
    try:
        from gguf import GGUFReader
    except ImportError as err:
        raise ImportError('reading GGUF files needs the gguf package: pip install "optimum-prune[gguf]"') from err
    reader = GGUFReader(file)
    params = sum(int(t.n_elements) for t in reader.tensors)
    return SizeResult(parameters=params, file_bytes=os.path.getsize(file), source="gguf")


# -------------------------------------------------------------------------------------- evaluate


def evaluate(
    model: nn.Module,
    tokenizer: Any = None,
    text: Any = None,
    *,
    input_ids: torch.Tensor | None = None,
    reference: nn.Module | None = None,
    top_k: int | None = None,
    latency: bool | dict[str, Any] = True,
    weights_path: str | os.PathLike | None = None,
    seq_len: int = 512,
    max_windows: int | None = 40,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: bool = True,
    name: str | None = None,
) -> EvaluationReport:
    """Perplexity (causal LMs, given text or input_ids), KL to ``reference``, latency and size in one report.

    ``latency`` may be a dict of ``measure_latency`` arguments. Size is read from ``weights_path`` (a
    checkpoint directory) when given, else from the model in memory. KL uses the perplexity windows.
    """
    report = EvaluationReport(model=name or getattr(model, "name_or_path", None) or type(model).__name__)
    causal = is_causal_lm(model)
    has_text = text is not None or input_ids is not None
    windows = None
    if has_text and causal:
        windows = _windows_from(tokenizer, text, input_ids, seq_len, max_windows)
        report.perplexity = perplexity(model, input_ids=windows, batch_size=batch_size, device=device,
                                       progress=progress)
    elif has_text:
        logger.warning("%s is not a causal LM: skipping perplexity", type(model).__name__)
    if reference is not None:
        if windows is None:
            raise ValueError("KL to a reference needs text (or input_ids) and a causal LM")
        report.kl_divergence = kl_divergence(model, reference, windows, top_k=top_k, batch_size=batch_size,
                                             device=device, progress=progress)
        report.kl_top_k = top_k
    if latency:
        kwargs = dict(latency) if isinstance(latency, dict) else {}
        limit = _max_positions(model)
        kwargs.setdefault("seq_len", min(seq_len, limit) if limit else seq_len)
        kwargs.setdefault("device", device)
        report.latency = measure_latency(model, **kwargs)
    report.size = model_size(weights_path if weights_path is not None else model)
    return report


def lm_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str],
    *,
    batch_size: int = 8,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
) -> dict[str, Any]:
    """Run EleutherAI's lm-eval-harness tasks on an in-memory model; returns ``simple_evaluate``'s dict.

    Needs the optional extra: ``pip install "optimum-prune[lm-eval]"``.
    """
    try:
        import lm_eval as harness
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ImportError(
            'lm-eval-harness is not installed; install it with: pip install "optimum-prune[lm-eval]"') from err
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return harness.simple_evaluate(model=lm, tasks=list(tasks), batch_size=batch_size, limit=limit,
                                   num_fewshot=num_fewshot)


# ------------------------------------------------------------------------------------------- CLI


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``eval`` subcommand on an ``argparse`` subparsers object; returns its parser."""
    from ..loading import DEFAULT_MODEL, EMBEDDED_MODELS

    p = subparsers.add_parser("eval", help="perplexity, KL to the dense model, latency and size of a model",
                              description="Evaluate a model with the project protocol (perplexity over the first "
                                          "--max-windows windows of --seq-len tokens) and print a Markdown table.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"directory, Hub id, .gguf file or embedded model ({', '.join(EMBEDDED_MODELS)})")
    p.add_argument("--gguf-file", help="GGUF file inside --model's directory or repo")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", help="a text file to compute perplexity on (e.g. ../shared/data/wikitext-2/test.txt)")
    source.add_argument("--dataset", choices=list(DATASETS), help="a dataset from the Hub (needs internet)")
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--reference", help="the dense model to compute KL(reference || model) against")
    p.add_argument("--top-k", type=int, default=None, help="Top-K KL: reference's top-k tokens + a rest bucket")
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True,
                   help="measure prefill latency (default: on)")
    p.add_argument("--latency-seq-len", type=int, default=None, help="tokens of the latency input (default: --seq-len)")
    p.add_argument("--repeats", type=int, default=20, help="timed latency runs")
    p.add_argument("--threads", type=int, default=None, help="torch threads during the latency measurement")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (default: where the model loads)")
    p.add_argument("--json", dest="json_path", metavar="OUT.json", help="also write the results as JSON")
    p.add_argument("--lm-eval-tasks", nargs="+", default=None, metavar="TASK", help="lm-eval-harness tasks")
    p.add_argument("--lm-eval-limit", type=float, default=None, help="examples per lm-eval task")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(command="eval")
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run ``optimum-prune eval``: load, evaluate, print the table, write JSON; 0 on success, 2 on bad input."""
    from ..loading import load_model

    try:
        text = None
        if args.text or args.dataset:
            text = read_text(args.text or args.dataset, split=args.split)
        model, tokenizer, _ = load_model(args.model, gguf_file=args.gguf_file)
        if text is not None and tokenizer is None:
            raise ValueError(f"no tokenizer found for {args.model}; cannot tokenize the text")
        reference = load_model(args.reference, tokenizer=False)[0] if args.reference else None
        latency: bool | dict[str, Any] = False
        if args.latency:
            latency = {"repeats": args.repeats, "threads": args.threads}
            if args.latency_seq_len:
                latency["seq_len"] = args.latency_seq_len
        weights = args.model if os.path.isdir(args.model) else None
        report = evaluate(model, tokenizer, text, reference=reference, top_k=args.top_k, latency=latency,
                          weights_path=weights, seq_len=args.seq_len, max_windows=args.max_windows,
                          batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
                          name=args.model)
        if args.lm_eval_tasks:
            limit = args.lm_eval_limit
            limit = int(limit) if limit is not None and limit >= 1 else limit
            results = lm_eval(model, tokenizer, args.lm_eval_tasks, batch_size=args.batch_size, limit=limit)
            report.lm_eval = results.get("results", {})
    except (ValueError, FileNotFoundError, ImportError, DatasetUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.to_markdown())
    if args.json_path:
        directory = os.path.dirname(os.path.abspath(args.json_path))
        os.makedirs(directory, exist_ok=True)
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2, default=str)
        print(f"\nwrote {args.json_path}")
    return 0


__all__ = [
    "DATASETS",
    "DatasetUnavailableError",
    "EvaluationReport",
    "LatencyResult",
    "PerplexityResult",
    "ReferenceLogprobs",
    "SizeResult",
    "add_cli",
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
