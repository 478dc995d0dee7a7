"""CLI flags derived from config fields, so the command line and the Python API cannot drift.

Every field of a method config (and of ``RunConfig``) becomes ``--field-name`` with the field's help;
a nested settings field (``latency``, ``finetune``, ``evopress``) spreads its own fields as flags.
Flags store the raw text: the chosen method's field type turns it into a value, so methods that share
a flag name (``--sparsity``) each read it their own way.
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, Field, dataclass, fields
from typing import Any

from ..methods.base import ConfigBase, ConfigError, type_hints
from ..methods.registry import _load


@dataclass
class Flag:
    """One flag: where its value goes (``path``: field, or field then nested field) in which classes."""

    flag: str
    dest: str
    path: tuple[str, ...]
    owners: list[type]
    many: bool = False


def _kind(hint: Any) -> Any:
    """The plain type of a hint (``int | None`` -> int, ``list[int]`` -> list); ``Any`` for the rest."""
    origin = typing.get_origin(hint)
    if origin in (list, tuple) or hint in (list, tuple):
        return list
    if origin is dict or hint is dict:
        return dict
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _kind(args[0]) if len(args) == 1 else Any
    return hint if hint in (bool, int, float, str) else Any


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


class FlagSet:
    """The flags of several config classes on one parser (shared names registered once)."""

    def __init__(self, parser: argparse.ArgumentParser, reserved: set[str] | None = None) -> None:
        self.parser = parser
        self.flags: dict[str, Flag] = {}
        self.reserved = set(reserved or ())

    def add(self, cls: type, *, title: str | None = None) -> None:
        group = self.parser.add_argument_group(title) if title else self.parser
        hints = type_hints(cls)
        for f in fields(cls):
            meta = f.metadata or {}
            if not f.init or not meta.get("cli", True):
                continue
            if meta.get("nested"):
                inner = _load(meta["nested"])
                inner_hints = type_hints(inner)
                for g in fields(inner):
                    name = f"--{meta.get('prefix', '')}{g.name.replace('_', '-')}"
                    if name in self.reserved or (name in self.flags and self.flags[name].path != (f.name, g.name)):
                        name = f"--{f.name}-{g.name.replace('_', '-')}"
                    gmeta = dict(g.metadata or {})
                    help_text = meta.get("nested_help", {}).get(g.name) or gmeta.get("help") or f"{f.name}: {g.name}"
                    gmeta["aliases"] = tuple(gmeta.get("aliases", ())) + tuple(
                        meta.get("nested_aliases", {}).get(g.name, ()))
                    gmeta["show_default"] = bool(gmeta.get("help"))  # a plain dataclass's defaults may be resolved later
                    self._register(group, name, (f.name, g.name), cls, inner_hints[g.name], g, help_text, gmeta)
                continue
            name = meta.get("flag") or f"--{f.name.replace('_', '-')}"
            if name in self.reserved and cls.__name__ != "RunConfig":
                raise ValueError(f"{cls.__name__}.{f.name}: flag {name} is taken; give the field flag=...")
            self._register(group, name, (f.name,), cls, hints[f.name], f, meta.get("help", ""), meta)

    def _register(self, group, name: str, path: tuple[str, ...], cls: type, hint: Any, f: Field, help_text: str,
                  meta: dict) -> None:
        if name in self.flags:
            flag = self.flags[name]
            if flag.path != path:
                raise ValueError(f"flag {name} means {'.'.join(flag.path)} and {'.'.join(path)}")
            flag.owners.append(cls)
            return
        kind = _kind(hint)
        default = _default(f)
        dest = "cfg__" + "__".join(path)
        names = [name, *meta.get("aliases", ())]
        shown = f" (default: {default})" if default not in (None, {}, []) and meta.get("show_default", True) else ""
        choices = meta.get("choices")
        if choices:
            shown += f"; one of: {', '.join(map(str, choices))}"
        kwargs: dict[str, Any] = dict(dest=dest, default=argparse.SUPPRESS, help=(help_text or "") + shown)
        many = False
        if meta.get("const") is not None:
            kwargs.update(action="store_const", const=meta["const"])
        elif kind is bool:
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif kind is list or (path[-1] == "target_speedup" and cls.__name__ == "ZipLMConfig"):
            kwargs.update(nargs="+", metavar="X")
            many = True
        else:
            kwargs.update(metavar=path[-1].upper())
        group.add_argument(*names, **kwargs)
        self.flags[name] = Flag(name, dest, path, [cls], many)

    # ------------------------------------------------------------------ values
    def given(self, args: argparse.Namespace) -> dict[str, Flag]:
        """The flags the user typed."""
        return {name: flag for name, flag in self.flags.items() if hasattr(args, flag.dest)}

    def build(self, cls: type, args: argparse.Namespace) -> Any:
        """An instance of ``cls`` from the flags given (defaults for the rest); a flag of another method fails."""
        values: dict[str, Any] = {}
        hints = type_hints(cls)
        for name, flag in self.given(args).items():
            if cls not in flag.owners:
                continue
            raw = getattr(args, flag.dest)
            field = cls.__dataclass_fields__[flag.path[0]]
            if len(flag.path) == 1:
                values[flag.path[0]] = _convert(name, raw, hints[flag.path[0]], field)
            else:
                inner = _load(field.metadata["nested"])
                g = inner.__dataclass_fields__[flag.path[1]]
                values.setdefault(flag.path[0], {})[flag.path[1]] = _convert(name, raw, type_hints(inner)[g.name], g)
        return cls(**values)

    def foreign(self, cls: type, args: argparse.Namespace, *others: type) -> list[str]:
        """Flags given that neither ``cls`` nor ``others`` read."""
        return [name for name, flag in self.given(args).items()
                if cls not in flag.owners and not any(o in flag.owners for o in others)]


def _convert(name: str, raw: Any, hint: Any, f: Field) -> Any:
    """The flag's text as the field's value (its ``parse``, else its type)."""
    meta = f.metadata or {}
    if meta.get("const") is not None or isinstance(raw, bool):
        return raw
    kind = _kind(hint)
    parse = meta.get("parse") or (kind if kind in (int, float, str) else None)
    if isinstance(raw, list) and kind is not list:
        if len(raw) != 1 and not (f.name == "target_speedup"):
            raise ConfigError(f"{name} takes one value, got {len(raw)}")
        values = [_one(name, r, parse or float) for r in raw] if f.name == "target_speedup" else None
        if values is not None:
            return values[0] if len(values) == 1 else values
        raw = raw[0]
    if isinstance(raw, list):
        return [_one(name, r, parse) if parse else r for r in raw]
    if kind is dict and parse is None:
        from ..methods.common import json_object

        parse = json_object
    if raw.lower() in ("none", "null") and kind is not str:
        return None
    return _one(name, raw, parse) if parse else raw


def _one(name: str, text: str, parse: Any) -> Any:
    try:
        return parse(text)
    except (ValueError, argparse.ArgumentTypeError) as err:
        raise ConfigError(f"{name}: {err}") from None


def config_flag_names(cls: type) -> list[str]:
    """Every flag a config class contributes (for tests and docs)."""
    parser = argparse.ArgumentParser(add_help=False)
    flags = FlagSet(parser)
    flags.add(cls)
    return sorted(flags.flags)


__all__ = ["ConfigBase", "Flag", "FlagSet", "config_flag_names"]
