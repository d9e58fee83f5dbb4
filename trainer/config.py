"""Strict dataclass configs: YAML + ``key=value`` overrides -> a validated object, and back.

Every component declares a nested ``Config`` dataclass; a run's config is a
tree of them. Unknown keys and wrongly typed values are errors that name the
dotted key, raised before any process or process group is started.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config; the message names the file and/or dotted key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner, *_rest) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


_noted: set[str] = set()


def migrate_keys(cls: type, data: dict[str, Any], aliases_only: bool = False) -> dict[str, Any]:
    """``data`` (a copy when anything changes) with the keys ``cls.MOVED_KEYS`` lists moved to their new place
    (or dropped, where the new place is None), and one note on stderr per old key and process; the keys
    ``cls.ALIASES`` lists (documented second names) moved to theirs without a note (``aliases_only``: those
    alone)."""
    aliases: dict[str, str] = getattr(cls, "ALIASES", {})
    moved: dict[str, str | None] = {**({} if aliases_only else getattr(cls, "MOVED_KEYS", {})), **aliases}
    present = [old for old in moved if _parent(data, old) is not None]
    if not present:
        return data
    data = copy.deepcopy(data)
    for old in present:
        new, value = moved[old], _pop(data, old)
        if new is not None:
            section, _, leaf = new.rpartition(".")
            node = data
            for part in section.split(".") if section else []:
                node = node.setdefault(part, {})
            if leaf in node and node[leaf] != value:
                what = f"an alias of {new}, which" if old in aliases else f"deprecated, and {new}"
                raise ConfigError(
                    f"{old}: {what} is set to something else ({node[leaf]!r} vs {value!r}); keep only {new}"
                )
            node[leaf] = value
        if old in aliases:
            continue
        if old not in _noted:
            _noted.add(old)
            what = f"use {new}" if new else "it is no longer used and is ignored"
            print(f"argus: note: config key {old} is deprecated: {what}", file=sys.stderr)
    return data


def _parent(data: dict[str, Any], dotted: str) -> dict[str, Any] | None:
    """The mapping holding ``dotted``'s last part, if the key is present."""
    node: Any = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) and leaf in node else None


def _pop(data: dict[str, Any], dotted: str) -> Any:
    parent = _parent(data, dotted)
    return parent.pop(dotted.rsplit(".", 1)[-1]) if parent is not None else None


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys and bad types raise ConfigError."""
    data = migrate_keys(cls, data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known keys here: {', '.join(sorted(fields))})")
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}" if where else name) for name, value in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict/list/scalars (YAML/JSON safe)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (values parsed as YAML scalars) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        value = yaml.safe_load(raw) if raw != "" else ""
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def _first_name(override: str, aliases: dict[str, str]) -> str:
    """``key=value`` with ``key`` by its first name when it is an alias."""
    key, eq, value = override.partition("=")
    return f"{aliases[key]}={value}" if eq and key in aliases else override


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = (), validate: bool = True) -> T:
    """YAML file (optional) + overrides -> ``cls``; errors name the file and the dotted key.

    ``validate=False`` leaves ``cls.validate`` to the caller (the planner validates for its own world size)."""
    # a key by its second name, in the file or an override, is its first name: an override wins like any other
    data = migrate_keys(cls, load_yaml(path), aliases_only=True) if path else {}
    apply_overrides(data, [_first_name(o, getattr(cls, "ALIASES", {})) for o in overrides])
    try:
        cfg = from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    check = getattr(cfg, "validate", None)
    if validate and callable(check):
        check()
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    """``cfg`` as YAML; credentials a URL value carries (``s3://KEY:SECRET@bucket``, signed query strings) are
    redacted: a saved config never holds a secret (they come from the environment: trainer/data/storage.py)."""
    from trainer.data.storage import redact

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return redact(v) if isinstance(v, str) and "://" in v else v

    Path(path).write_text(yaml.safe_dump(clean(to_dict(cfg)), sort_keys=False))
