"""Calibration scorers: the fitness ZipLM's refinement and EvoPress's search minimise on calibration windows."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .kl import kl_to_reference, reference_logprobs
from .models import is_causal_lm
from .ppl import perplexity


class CalibrationScorer:
    """Calibration score of a candidate: Top-K KL to the dense model (LMs) or relative output error (encoders);
    ``metric="perplexity"``: the candidate's own mean NLL on the windows (log-perplexity, no dense reference)."""

    METRICS = ("kl", "perplexity")

    def __init__(self, dense: nn.Module, ids: torch.Tensor, top_k: int, batch_size: int, metric: str = "kl") -> None:
        if metric not in self.METRICS:
            raise ValueError(f"unknown fitness {metric!r}; choose one of {', '.join(self.METRICS)}")
        self.ids = ids
        self.batch_size = batch_size
        self.metric = metric
        self.stop_above: float | None = None
        self.causal = is_causal_lm(dense)
        if metric == "perplexity" and not self.causal:
            raise ValueError(f"fitness='perplexity' needs a causal LM; {type(dense).__name__} is an encoder: use the "
                             "default fitness='kl' (relative output error to the dense encoder)")
        self.reference = None  # perplexity needs none
        if metric == "kl":
            self.reference = (reference_logprobs(dense, ids, top_k, batch_size=batch_size, progress=False)
                              if self.causal else self._hidden(dense))
        self.name = ("calibration log-perplexity (mean NLL)" if metric == "perplexity" else
                     f"top-{top_k} KL" if self.causal else "relative output error")

    @torch.no_grad()
    def _hidden(self, model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
        device = next(model.parameters()).device
        outs = []
        for batch in (self.ids if ids is None else ids).split(self.batch_size):
            batch = batch.to(device)
            out = model(input_ids=batch, attention_mask=torch.ones_like(batch))
            outs.append(out.last_hidden_state.float().cpu() if hasattr(out, "last_hidden_state") else out[0].cpu())
        return torch.cat(outs)

    @property
    def stops_early(self) -> bool:
        """Whether ``stop_above`` can cut an evaluation short (the KL of causal LMs: a sum of non-negative terms)."""
        return self.metric == "kl" and self.causal

    @contextlib.contextmanager
    def stopping_above(self, threshold: float | None) -> Iterator[None]:
        """Inside, a KL evaluation that can no longer end below ``threshold`` stops and returns a lower bound of
        its score that is at least ``threshold`` (a search that only keeps scores below it loses nothing)."""
        previous, self.stop_above = self.stop_above, threshold if self.stops_early else None
        try:
            yield
        finally:
            self.stop_above = previous

    def __call__(self, model: nn.Module, rows: list[int] | None = None) -> float:
        """Score on all windows, or on the windows ``rows`` (a minibatch of them)."""
        if self.metric == "perplexity":
            ids = self.ids if rows is None else self.ids[torch.as_tensor(rows, dtype=torch.long)]
            return perplexity(model, input_ids=ids, batch_size=self.batch_size, progress=False).mean_nll
        if self.causal:
            reference = self.reference if rows is None else self.reference.subset(rows)
            return kl_to_reference(model, reference, batch_size=self.batch_size, progress=False,
                                   stop_above=self.stop_above)
        index = None if rows is None else torch.as_tensor(rows, dtype=torch.long)
        hidden = self._hidden(model, None if index is None else self.ids[index])
        reference = self.reference if index is None else self.reference[index]
        return float((hidden - reference).pow(2).sum() / reference.pow(2).sum())
