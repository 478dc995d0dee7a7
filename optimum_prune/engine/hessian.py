"""Input Hessians H = 2/n Σ x xᵀ of Linears, accumulated in fp32 by forward hooks whatever the model dtype."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..modeling.adapters import get_adapter
from .experts import routing_hook
from .layers import LinearGroup, original_layer_indices


class HessianAccumulator:
    """Running Σ x xᵀ (fp32) and token count for one input; ``diagonal_only`` keeps just Σ x² (Wanda)."""

    def __init__(self, columns: int, device: torch.device | str, diagonal_only: bool = False) -> None:
        self.diagonal_only = diagonal_only
        shape = (columns,) if diagonal_only else (columns, columns)
        self.sum = torch.zeros(shape, dtype=torch.float32, device=device)
        self.tokens = 0
        self.columns = columns
        self.nonfinite = torch.zeros((), dtype=torch.long, device=device)
        """NaN/inf input values seen (counted on the device, read once per block by ``finite.finite_hessians``)."""

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(device=self.sum.device, dtype=torch.float32)
        self.nonfinite += (~torch.isfinite(x)).sum()
        if self.diagonal_only:
            self.sum += (x * x).sum(0)
        else:
            self.sum.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """2/n Σ x xᵀ (the diagonal alone for ``diagonal_only``)."""
        if self.tokens == 0:
            raise RuntimeError("no calibration tokens reached this layer")
        return self.sum * (2.0 / self.tokens)


@contextmanager
def capture_hessians(groups: list[LinearGroup], device: torch.device | str,
                     diagonal_only: bool = False) -> Iterator[dict[str, HessianAccumulator]]:
    """While active, every forward through a group's first Linear adds its input to that group's Hessian.

    Yields {group kind: accumulator}; the Linears of a group share the one accumulator. An expert's groups
    see only the tokens routed to that expert: its gate/up matrix their inputs, its down matrix their
    intermediate activations (an expert that gets no token ends with an empty accumulator).
    """
    accumulators: dict[str, HessianAccumulator] = {}
    handles = []
    routed: dict[int, tuple[nn.Module, dict[tuple[int, str], HessianAccumulator]]] = {}
    for group in groups:
        acc = HessianAccumulator(group.in_features, device, diagonal_only)
        accumulators[group.kind] = acc
        if group.expert is not None:
            matrix = group.modules[0]
            table = routed.setdefault(id(matrix.experts), (matrix, {}))[1]
            table[(group.expert, group.kind.partition(".")[0])] = acc
            continue

        def hook(module: nn.Module, args: tuple, acc: HessianAccumulator = acc) -> None:
            acc.add(args[0])

        handles.append(group.modules[0].register_forward_pre_hook(hook))
    for matrix, table in routed.values():
        layout = matrix.layout
        handles.append(routing_hook(matrix.experts, lambda experts, r, table=table, layout=layout:
                                    _add_routed(layout, experts, r, table),
                                    count=lambda experts, layout=layout: getattr(experts, layout.gate_up).shape[0]))
    try:
        yield accumulators
    finally:
        for handle in handles:
            handle.remove()


def _add_routed(layout, experts: nn.Module, routed, table: dict) -> None:
    """One expert's routed tokens into its two accumulators (inputs; intermediate activations)."""
    acc_in, acc_out = table.get((routed.position, "expert_in")), table.get((routed.position, "expert_out"))
    if acc_in is not None:
        acc_in.add(routed.tokens)
    if acc_out is not None:
        acc_out.add(layout.expert_hidden(experts, routed.position, routed.tokens))


class ResidualNorms:
    """Per block, the squared norms of the tokens' residual stream entering it (forward pre-hooks).

    The median, not the mean: a few "attention sink" tokens carry norms orders of magnitude larger
    than the rest and would otherwise set the scale of every later block.
    """

    def __init__(self, model: nn.Module) -> None:
        self.norms: dict[int, list[torch.Tensor]] = {}
        self.handles = []
        for block, layer in zip(get_adapter(model).layers(model), original_layer_indices(model)):
            self.handles.append(block.register_forward_pre_hook(self._hook(layer), with_kwargs=True))

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            norms = hidden.detach().float().pow(2).sum(-1).flatten().cpu()
            self.norms.setdefault(layer, []).append(norms)
        return hook

    def medians(self) -> dict[int, float]:
        return {layer: float(torch.cat(parts).median()) for layer, parts in self.norms.items()}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class PostNormGains:
    """Per block and sublayer with a post-norm (``ArchitectureAdapter.post_norms``): the norm's gain per channel.

    A post-norm (Gemma 2/3, OLMo 2) normalizes the output projection's output y before the residual add, so
    what reaches the residual stream is z = norm(y), not y: a sublayer whose y is tiny may still write a large
    z. The gain of channel c is sqrt(Σ_t z_tc² / Σ_t y_tc²) over the calibration tokens (for an RMSNorm, its
    weight over a y²-weighted mean of the tokens' rms), measured by forward hooks on the norms. Weighting the
    output projection's rows by it puts structured-OBS losses in residual-stream units; the loss of removing
    the whole sublayer is then the energy of z itself (a linearization: exact for that level, first-order for
    partial ones). Rows are independent in OBS, so the removal order and losses change, not the weight update.
    """

    def __init__(self, model: nn.Module) -> None:
        self.sums: dict[tuple[int, str], list[torch.Tensor]] = {}
        self.handles = []
        adapter = get_adapter(model)
        for block, layer in zip(adapter.layers(model), original_layer_indices(model)):
            for sublayer, norm in adapter.post_norms(block, model.config).items():
                self.handles.append(norm.register_forward_hook(self._hook((layer, sublayer))))

    def _hook(self, key: tuple[int, str]):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            y = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            z = output.detach().reshape(-1, output.shape[-1]).double()
            sums = self.sums.setdefault(key, [torch.zeros(y.shape[-1], dtype=torch.float64),
                                              torch.zeros(y.shape[-1], dtype=torch.float64)])
            sums[0] += z.pow(2).sum(0).cpu()
            sums[1] += y.pow(2).sum(0).cpu()
        return hook

    def gain(self, layer: int, sublayer: str) -> torch.Tensor | None:
        """Per-channel gain (fp32) of the sublayer's post-norm, or None when it has none (or saw no token)."""
        sums = self.sums.get((layer, sublayer))
        if sums is None:
            return None
        z2, y2 = sums
        return torch.where(y2 > 0, (z2 / y2.clamp_min(1e-300)).sqrt(), torch.zeros_like(y2)).float()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
