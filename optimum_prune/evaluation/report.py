"""One evaluation of a model: perplexity, KL to the dense model, latency and size, as a report and a table."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .kl import kl_divergence
from .models import is_causal_lm, max_positions
from .ppl import PerplexityResult, perplexity
from .size import SizeResult, model_size
from .timing import LatencyResult, measure_latency
from .windows import windows_from

logger = logging.get_logger(__name__)


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
        windows = windows_from(tokenizer, text, input_ids, seq_len, max_windows)
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
        limit = max_positions(model)
        kwargs.setdefault("seq_len", min(seq_len, limit) if limit else seq_len)
        kwargs.setdefault("device", device)
        report.latency = measure_latency(model, **kwargs)
    report.size = model_size(weights_path if weights_path is not None else model)
    return report
