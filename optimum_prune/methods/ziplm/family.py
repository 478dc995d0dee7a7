"""A family of ZipLM models, one per target speedup, each a Pruner that saves / pushes like any other."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ...evaluation.size import count_parameters


class ZipLMFamily(dict):
    """{target speedup: Pruner holding that model}; ``family[2.0].save_pretrained("out-2x")``."""

    def __getitem__(self, target: float) -> Any:
        try:
            return super().__getitem__(target)
        except KeyError:
            for key in self:
                if abs(float(key) - float(target)) < 1e-9:
                    return super().__getitem__(key)
            raise KeyError(f"no model for target {target!r}; targets: {', '.join(f'{t:g}' for t in self)}") from None

    def save_pretrained(self, directory: str | os.PathLike) -> dict[float, Path]:
        """Save every model under ``directory/<target>x`` (e.g. ``out/1.5x``); returns the paths."""
        root = Path(directory)
        return {target: pruner.save_pretrained(root / f"{target:g}x") for target, pruner in self.items()}

    def to_markdown(self) -> str:
        """Target, predicted and measured speedup, parameters and calibration score per model."""
        rows = ["| target | predicted | measured | parameters | score |", "|---:|---:|---:|---:|---:|"]
        for target, pruner in self.items():
            config = pruner.pruning_config
            search = config.search or {}
            params = count_parameters(pruner.model)[0]
            measured = f"{config.measured_speedup:.3f}x" if config.measured_speedup else "–"
            if search.get("target_missed"):
                measured += f" (missed, {100 * search.get('miss', 0):+.1f}%)"
            score = search.get("score")
            rows.append(f"| {target:g}x | {search.get('predicted_speedup', float('nan')):.3f}x | {measured} | "
                        f"{params:,} | {score:.4g} |" if score is not None else
                        f"| {target:g}x | {search.get('predicted_speedup', float('nan')):.3f}x | {measured} | "
                        f"{params:,} | – |")
        return "\n".join(rows)

    def __repr__(self) -> str:
        return f"ZipLMFamily({', '.join(f'{t:g}x' for t in self)})"
