"""Recipes: an ordered list of stage configs (e.g. ZipLM 1.5x → heal → GPTQ 4-bit) run on one model.

A recipe is written as YAML or JSON::

    run: {calibration: data/valid.txt, num_samples: 64, seq_len: 256}   # shared by the calibrated stages
    stages:
      - {method: ziplm, target_speedup: 1.5}
      - {method: heal, train_dataset: data/valid.txt, max_steps: 100}
      - {method: gptq, bits: 4}

Every stage that runs is recorded in the checkpoint's ``pruning_config.recipe`` with every default
resolved (and its own ``run`` settings), so ``Recipe.from_checkpoint(dir)`` re-runs exactly what made it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .methods.base import ConfigError, MethodConfig, RunConfig


@dataclass
class Stage:
    """One step of a recipe: a method config, and the run settings it uses (None: the recipe's)."""

    config: MethodConfig
    run: RunConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        out = self.config.to_dict()
        if self.run is not None:
            out["run"] = self.run.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Stage":
        if isinstance(data, MethodConfig):
            return cls(data)
        if not isinstance(data, dict) or "method" not in data:
            raise ConfigError(f"a recipe stage is a mapping with a 'method' key (e.g. {{method: gptq, bits: 4}}), "
                              f"got {data!r}")
        data = dict(data)
        run = data.pop("run", None)
        return cls(MethodConfig.from_dict(data), RunConfig.from_dict(run) if run is not None else None)


@dataclass
class Recipe:
    """Stages run in order on one model; ``run`` holds the calibration settings the stages share."""

    stages: list[Stage] = field(default_factory=list)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        self.stages = [s if isinstance(s, Stage) else Stage.from_dict(s) if isinstance(s, dict) else Stage(s)
                       for s in self.stages]
        if not self.stages:
            raise ConfigError("a recipe needs at least one stage")
        kinds = [s.config.kind for s in self.stages]
        if "quantize" in kinds and kinds.index("quantize") != len(kinds) - 1:
            raise ConfigError("quantization must be the last stage of a recipe (pruning or healing a quantized "
                              f"model is not supported); stages: {', '.join(s.config.name for s in self.stages)}")

    # ------------------------------------------------------------------ round trips
    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run.to_dict(), "stages": [s.to_dict() for s in self.stages]}

    @classmethod
    def from_dict(cls, data: Any) -> "Recipe":
        """From ``{"run": {...}, "stages": [...]}`` or a bare list of stages."""
        if isinstance(data, list):
            data = {"stages": data}
        if not isinstance(data, dict):
            raise ConfigError(f"a recipe is a mapping with 'stages' (and optionally 'run'), got {type(data).__name__}")
        unknown = sorted(set(data) - {"run", "stages"})
        if unknown:
            raise ConfigError(f"a recipe has the keys 'run' and 'stages'; unknown: {', '.join(unknown)}")
        run = data.get("run")
        return cls([Stage.from_dict(s) for s in data.get("stages") or []],
                   RunConfig.from_dict(run) if run is not None else RunConfig())

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | os.PathLike) -> Path:
        """Write as YAML (``.yaml`` / ``.yml``) or JSON (anything else), atomically."""
        from .saving import atomic_write_text

        path = Path(path)
        return atomic_write_text(path, self.to_yaml() if path.suffix in (".yaml", ".yml") else self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recipe":
        """Read a YAML or JSON recipe file (JSON is YAML too)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no recipe file at {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML or JSON: {err}") from None
        return cls.from_dict(data)

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike) -> "Recipe":
        """The recipe recorded in a saved checkpoint's ``config.json`` (every stage that made it)."""
        config_file = Path(directory) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{directory} has no config.json; pass the directory of a checkpoint saved by "
                                    "optimum-prune")
        record = (json.loads(config_file.read_text()).get("pruning_config") or {}).get("recipe")
        if not record:
            raise ConfigError(f"{directory} records no recipe (it was saved before recipes were recorded, or "
                              "without optimum-prune); write the stages in a recipe file instead")
        return cls.from_dict(record)

    @classmethod
    def of(cls, value: "Recipe | dict | list | str | os.PathLike") -> "Recipe":
        """A recipe from itself, its dict / list of stages, or a file path."""
        if isinstance(value, Recipe):
            return value
        if isinstance(value, (str, os.PathLike)):
            return cls.load(value)
        return cls.from_dict(value)

    def stage_run(self, stage: Stage) -> RunConfig:
        """The stage's run settings; stages sharing one checkpoint_dir each get a subdirectory of it (resumable)."""
        run = stage.run if stage.run is not None else self.run
        sharing = [s for s in self.stages if (s.run or self.run).checkpoint_dir == run.checkpoint_dir]
        if run.checkpoint_dir is None or len(sharing) < 2:
            return run
        index = next(i for i, s in enumerate(self.stages) if s is stage)
        own = os.path.join(str(run.checkpoint_dir), f"stage-{index + 1}-{stage.config.name}")
        return replace(run, checkpoint_dir=own)
