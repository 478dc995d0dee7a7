"""What every method's config shares: validation on construction, dict / JSON / YAML round trips, field docs.

A method config is a dataclass whose fields are the method's settings. Each field is declared with
``option(default, "help")``: the help text is the field's documentation, the CLI flag's help and what
``describe()`` prints, so the Python API, the CLI and the docs read the same words. ``RunConfig`` holds
the calibration and run settings every calibrated method shares.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

IN_MEMORY = "<in-memory>"
"""How an object that has no text form (a tensor, a Dataset, a model) is written in a saved config."""


class ConfigError(ValueError):
    """A config that cannot be built: unknown fields, wrong types or values (the message names the fix)."""


def option(default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
           flag: str | None = None, aliases: tuple[str, ...] = (), parse: Callable[[str], Any] | None = None,
           choices: tuple[Any, ...] | None = None, cli: bool = True, nested: str | None = None, prefix: str = "",
           nested_help: dict[str, str] | None = None, nested_aliases: dict[str, tuple[str, ...]] | None = None,
           const: Any = None) -> Any:
    """A config field with its documentation (``help``) and how the CLI spells it.

    ``flag`` overrides the flag name (default ``--field-name``), ``aliases`` adds older spellings,
    ``parse`` turns the flag's text into a value, ``choices`` limits it; ``cli=False`` keeps a field
    out of the CLI (only for objects that have no text form). ``nested`` ("module:Class") makes each field
    of that dataclass a flag (named ``--<prefix><field>``; the field then holds a dict of the flags given;
    ``nested_help`` / ``nested_aliases`` document them and add older spellings, by inner field name);
    ``const`` makes the flag a switch that stores that value.
    """
    metadata = {"help": help, "flag": flag, "aliases": tuple(aliases), "parse": parse, "choices": choices, "cli": cli,
                "nested": nested, "prefix": prefix, "nested_help": dict(nested_help or {}),
                "nested_aliases": dict(nested_aliases or {}), "const": const}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "") if f.metadata else ""


def type_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass (fields are declared with ``from __future__ import annotations``)."""
    import sys

    module = sys.modules[cls.__module__]
    return typing.get_type_hints(cls, vars(module))


def nested_class(hint: Any) -> type | None:
    """The dataclass a field holds (``X`` or ``X | dict | None``), if any."""
    if isinstance(hint, type) and is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if isinstance(arg, type) and is_dataclass(arg):
            return arg
    return None


def to_plain(value: Any) -> Any:
    """A JSON-ready copy: dataclasses become dicts, tuples lists, paths strings, objects ``IN_MEMORY``."""
    if isinstance(value, ConfigBase):
        return value.to_dict()
    if is_dataclass(value) and not isinstance(value, type):
        if hasattr(value, "to_dict"):
            return value.to_dict()
        return {f.name: to_plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, (int, float)) else k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return IN_MEMORY


@dataclass
class ConfigBase:
    """Validated on construction; round-trips through dict, JSON and YAML."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` with the fix for a bad value (runs on construction, before any work)."""

    # ------------------------------------------------------------------ round trips
    def to_dict(self) -> dict[str, Any]:
        """Every field, defaults resolved, JSON-ready."""
        return {f.name: to_plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build from a dict of field values (nested configs as dicts); unknown keys fail with the valid ones."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__} needs a mapping of its fields, got {type(data).__name__}")
        names = {f.name: f for f in fields(cls) if f.init}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                              f"its fields are: {', '.join(names)}")
        hints = type_hints(cls)
        kwargs = {}
        for name, value in data.items():
            inner = nested_class(hints[name])
            if isinstance(value, str) and hints[name] in (float, int):  # YAML 1.1 reads 2e-05 as text
                try:
                    value = hints[name](value)
                except ValueError:
                    pass  # validate() names the field
            if inner is not None and isinstance(value, dict):
                value = inner.from_dict(value) if hasattr(inner, "from_dict") and issubclass(inner, ConfigBase) \
                    else inner(**value)
            kwargs[name] = value
        return cls(**kwargs)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            from ..saving import atomic_write_text

            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike):
        return cls.from_dict(json.loads(_read(text_or_path)))

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            from ..saving import atomic_write_text

            atomic_write_text(path, text)
        return text

    @classmethod
    def from_yaml(cls, text_or_path: str | os.PathLike):
        import yaml

        return cls.from_dict(yaml.safe_load(_read(text_or_path)))

    @classmethod
    def describe(cls) -> str:
        """One line per field: name, default and documentation."""
        rows = []
        for f in fields(cls):
            default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory
                                                                  is not MISSING else "required")
            rows.append(f"{f.name} = {default!r}: {field_help(f)}")
        return "\n".join(rows)


def _read(text_or_path: str | os.PathLike) -> str:
    """The text itself, or the content of the file it names."""
    if isinstance(text_or_path, os.PathLike) or (isinstance(text_or_path, str) and "\n" not in text_or_path
                                                  and text_or_path.strip()[:1] not in "{[" and
                                                  os.path.exists(text_or_path)):
        return Path(text_or_path).read_text()
    return str(text_or_path)


@dataclass
class MethodConfig(ConfigBase):
    """A method's settings. ``name`` is its registry key; ``kind`` says which session step runs it."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "prune"  # "prune" | "quantize" | "heal"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, **super().to_dict()}

    def run_settings(self, run: "RunConfig") -> "RunConfig":
        """The run settings this method runs with (a preset may size the defaults); the session records these."""
        return run

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """From ``{"method": name, ...fields}``; on ``MethodConfig`` itself the registry picks the class."""
        data = dict(data)
        name = data.pop("method", None)
        if cls is MethodConfig or not cls.name:
            from .registry import REGISTRY

            if name is None:
                raise ConfigError(f"a method config needs a 'method' key: one of {', '.join(REGISTRY.names())}")
            return REGISTRY.get(name).config_class.from_dict(data)
        if name is not None and name != cls.name:
            raise ConfigError(f"this is a {cls.name!r} config, not {name!r}")
        return super(MethodConfig, cls).from_dict(data)


@dataclass
class RunConfig(ConfigBase):
    """Calibration and execution settings shared by every calibrated method."""

    calibration: Any = option(None, "calibration data: a text file, a dataset name (wikitext2, c4, fineweb-edu), "
                                    "'generated' (text the model samples itself, cached), strings, a "
                                    "datasets.Dataset or token ids; default: wikitext2, or text sampled from the "
                                    "model when offline")
    num_samples: int = option(128, "calibration windows")
    seq_len: int = option(512, "tokens per calibration window")
    seed: int = option(0, "seed of the window sampling and of every random choice of the method")
    batch_size: int = option(8, "windows per forward pass")
    device: Any = option(None, "compute device for the current block (default: cuda if available)")
    checkpoint_dir: Any = option(None, "resume state; an interrupted run started again continues from it")
    progress: bool = option(True, "show progress bars")

    def validate(self) -> None:
        check_positive(self, "num_samples", "seq_len", "batch_size")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")

    def sequential(self, description: str):
        """The block loop's options for these settings."""
        from ..engine.sequential import SequentialOptions

        return SequentialOptions(batch_size=self.batch_size, device=self.device, checkpoint_dir=self.checkpoint_dir,
                                 progress=self.progress, description=description)


def check_positive(config: Any, *names: str, integer: bool = True, label: str = "") -> None:
    """Each named field of ``config`` must be a positive integer (or, ``integer=False``, a positive number)."""
    for name in names:
        value = getattr(config, name)
        ok = (isinstance(value, int) if integer else isinstance(value, (int, float))) and not isinstance(value, bool)
        if not ok or not value > 0:
            raise ConfigError(f"{label}{name} must be a positive {'integer' if integer else 'number'}, got {value!r}")


def with_training_args(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` for ``cls`` with the keys it has no field for moved into its ``training_args`` (Trainer
    arguments passed as plain keywords, as ``heal(..., warmup_steps=10)`` does)."""
    known = {f.name for f in fields(cls)}
    values = dict(values)
    extra = {k: values.pop(k) for k in list(values) if k not in known}
    if extra:
        values["training_args"] = {**extra, **dict(values.get("training_args") or {})}
    return values
