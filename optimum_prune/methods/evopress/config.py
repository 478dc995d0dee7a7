"""Settings of EvoPress (arXiv 2410.14649): the search itself, and the targets it searches for."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

from ..base import ConfigBase, ConfigError, MethodConfig, option
from ..common import is_number
from ..ziplm.config import ENVIRONMENT, ENVIRONMENT_HELP

FITNESS = ("kl", "perplexity")
TARGETS = ("depth", "structure", "sparsity")


@dataclass
class EvoPressSettings(ConfigBase):
    """Search settings; ``None`` fields are scaled from the paper's to the problem (see ``resolved``)."""

    generations: int = option(None, "generations (default scaled to the problem, at most 200)")
    offspring: int = option(None, "candidates per generation (default 16)")
    survivors: list = option(None, "candidates kept after each selection step but the last (the last keeps one)",
                          parse=int)
    windows: list = option(None, "calibration windows scored at each selection step (growing); the parent "
                                 "re-enters at the last", parse=int)
    max_swaps: int = option(3, "level switches per mutation, at most")
    fitness: str = option("kl", "kl: Top-K KL to the dense model (relative output error for encoders; the paper's "
                                "choice); perplexity: the candidate's own log-perplexity on the calibration windows "
                                "(causal LMs)", choices=FITNESS)
    top_k: int = option(100, "Top-K of the KL fitness (bounds memory for large vocabularies)")
    seed: int = option(0, "seed of the search (mutations and minibatches)")
    state_file: Any = option(None, "search state (JSON, rewritten every generation): an interrupted search "
                                   "resumes from it")
    cache_mib: float = option(512, "memory for the parent's activations at block boundaries on the scoring "
                                   "windows (plus at most a quarter of it for last-step candidates' own, handed "
                                   "over if one becomes the parent): a candidate starts at its first changed block, evaluations that cannot "
                                   "be selected stop early, identical candidates are scored once (same scores, same "
                                   "search); 0: off, every candidate a full forward")
    fresh_windows: bool = option(True, "draw each selection step's windows afresh from the calibration set (the "
                                       "paper's minibatches); False: the first windows every time")
    level_store: Any = option(None, "sparsity / bit-width targets: directory of the per-Linear level store (built "
                                    "once, then reused); default: under the optimum-prune cache")
    levels: list = option(None, "sparsity / bit-width targets: the levels to store (default: evenly spaced around "
                                "the target)", parse=float)
    recalibrate: bool = option(True, "sparsity / bit-width targets: after the search, apply the chosen levels once "
                                     "more block by block from the dense weights and keep that model if its "
                                     "fitness beats the one stitched from the store")

    def validate(self) -> None:
        if self.fitness not in FITNESS:
            raise ConfigError(f"unknown fitness {self.fitness!r}; choose one of {', '.join(FITNESS)}")

    def search_key(self) -> dict[str, Any]:
        """The fields that define a search's trajectory (a state file resumes only a search with equal ones)."""
        key = asdict(self)
        key.pop("recalibrate")
        key.pop("cache_mib")  # how fast, not which search
        if key["fitness"] == "kl":  # added later: at its default, state files written before still resume
            key.pop("fitness")
        key.update(generations=None, state_file=None, level_store=None)  # where and how long, not which search
        return key

    @classmethod
    def of(cls, value: "EvoPressSettings | dict[str, Any] | None") -> "EvoPressSettings":
        """Settings from an ``EvoPressSettings``, a dict of its fields, or None (the defaults)."""
        if value is None:
            return cls()
        return cls.from_dict(value) if isinstance(value, dict) else value

    def resolved(self, kept: int, dropped: int, available_windows: int) -> "EvoPressSettings":
        """Defaults: the paper's depth settings (k(n−k)/1.5 generations × 32 offspring, survivors 2→1 on
        growing tokens) cut to what a CPU run affords: at most 200 generations and 16 offspring."""
        generations = self.generations if self.generations is not None else \
            int(min(200, max(10, kept * dropped / 1.5)))
        offspring = self.offspring if self.offspring is not None else 16
        windows = self.windows or [max(1, available_windows // 8), max(1, available_windows // 2), available_windows]
        windows = [min(w, available_windows) for w in windows]
        survivors = self.survivors or [max(2, offspring // 4), 2][: len(windows) - 1]
        if len(survivors) != len(windows) - 1:
            raise ValueError(f"need one survivors count per selection step but the last: {len(windows) - 1} "
                             f"for windows={windows}, got {survivors}")
        return replace(self, generations=generations, offspring=offspring, survivors=list(survivors),
                       windows=list(windows))


SETTINGS = "optimum_prune.methods.evopress.config:EvoPressSettings"


@dataclass
class EvoPressConfig(MethodConfig):
    """EvoPress over depth (sublayers dropped), structure (ZipLM levels) or per-Linear SparseGPT sparsity."""

    name: ClassVar[str] = "evopress"

    target: str = option("depth", "what to search: depth (attention and MLP sublayers dropped independently), "
                                  "structure (ZipLM's head / neuron levels under a measured latency budget) or "
                                  "sparsity (a SparseGPT level per Linear at an exact average)", choices=TARGETS)
    drop_ratio: float = option(None, "depth: fraction of blocks' worth of sublayers to drop")
    num_layers: int = option(None, "depth: blocks' worth of sublayers to drop (instead of drop_ratio)")
    target_speedup: float = option(None, "structure: the speedup to meet")
    sparsity: float = option(None, "sparsity: the exact average sparsity, e.g. 0.7")
    latency: Any = option(None, "structure: the inference environment (as for ZipLM)", nested=ENVIRONMENT,
                          prefix="latency-", nested_help=ENVIRONMENT_HELP)
    latency_table: Any = option(None, "structure: a latency table or its JSON file")
    remeasure_latency: bool = option(False, "structure: measure the latency table again even when one is cached")
    measure_speedup: bool = option(True, "structure: time the pruned model against the dense one")
    dampening: float = option(0.01, "Hessian dampening (level database / level store)")
    blocksize: int = option(128, "sparsity: columns per lazy OBS update block")
    evopress: Any = option(None, "the search settings: an EvoPressSettings or its fields", nested=SETTINGS)

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(f"EvoPress target {self.target!r} is not available; choose target='depth' (attention "
                              "and MLP sublayers dropped independently, with drop_ratio= or num_layers=), "
                              "target='sparsity' (per-Linear SparseGPT levels, with sparsity=) or target='structure' "
                              "(ZipLM levels under a measured latency budget, with target_speedup=); per-Linear "
                              "bit-widths are Quantizer.quantize(method='evopress', average_bits=...)")
        if self.target == "depth" and (self.num_layers is None) == (self.drop_ratio is None):
            raise ConfigError("EvoPress depth needs exactly one of drop_ratio= (e.g. 0.25) and num_layers= (blocks' "
                              "worth of sublayers, e.g. 8)")
        if self.target == "sparsity" and (not is_number(self.sparsity) or not 0 < self.sparsity < 1):
            raise ConfigError("EvoPress target='sparsity' needs one average sparsity in (0, 1), e.g. sparsity=0.7; "
                              f"got {self.sparsity!r}")
        if self.target == "structure" and (not is_number(self.target_speedup) or not self.target_speedup > 0):
            raise ConfigError("EvoPress target='structure' needs one target_speedup (e.g. 2.0)")
        self.evopress = EvoPressSettings.of(self.evopress)


@dataclass
class EvoPressBitsConfig(MethodConfig):
    """EvoPress over per-Linear GPTQ bit-widths at an exact average (``Quantizer.quantize(method="evopress")``)."""

    name: ClassVar[str] = "evopress-bits"
    kind: ClassVar[str] = "quantize"

    average_bits: float = option(None, "the exact average bit-width, e.g. 3")
    group_size: Any = option(128, "columns per scale; None or -1: one scale per output channel", parse=int)
    symmetric: bool = option(True, "symmetric grid")
    act_order: bool = option(False, "process columns by decreasing Hessian diagonal (static groups)")
    dampening: float = option(0.01, "Hessian dampening")
    blocksize: int = option(128, "columns per lazy update block")
    evopress: Any = option(None, "the search settings: an EvoPressSettings or its fields", nested=SETTINGS)

    def validate(self) -> None:
        if not is_number(self.average_bits):
            raise ConfigError("EvoPress bit-width search needs average_bits= (e.g. 3.0) and no sparsity=")
        self.average_bits = float(self.average_bits)
        if self.group_size == -1:
            self.group_size = None
        self.evopress = EvoPressSettings.of(self.evopress)

