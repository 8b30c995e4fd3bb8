"""Typed configs: dataclasses loaded from YAML (or dicts) with validation.

Every config in the project is a dataclass. :func:`from_dict` builds one from plain data, checks
each value against its annotation (nested dataclasses, ``Literal``, ``Optional``, lists, numbers)
and names the offending key path in the error: ``model.n_head: expected int, got 'twelve'``.
Range checks live in each dataclass's ``__post_init__`` and raise :class:`ConfigError` too.

A config class that renamed keys reads its older configs through a classmethod
``upgrade_keys(data) -> (data under today's keys, a deprecation note or None)``: :func:`from_dict`
applies it (logging the note once), and so does a resume to the config an older checkpoint recorded
(:func:`upgrade`).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import logging
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from mutor_vision.errors import ConfigError

__all__ = [
    "ConfigError",
    "check",
    "config_changes",
    "default_values",
    "from_dict",
    "load_yaml",
    "reference",
    "to_dict",
    "upgrade",
]
T = TypeVar("T")
log = logging.getLogger(__name__)


def from_dict(cls: type[T], data: dict[str, Any] | None, path: str = "", where: str | None = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise :class:`ConfigError`.

    Keys an older version of ``cls`` used are read under today's names (``upgrade_keys``), with one
    deprecation line that names ``where`` the data came from (None: quietly).
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    data = _upgrade_here(cls, data, where, path)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = ", ".join(_join(path, k) for k in unknown)
        raise ConfigError(f"unknown config key(s): {where} (allowed: {', '.join(sorted(fields))})")
    values = {name: _convert(hints[name], value, _join(path, name)) for name, value in data.items()}
    try:
        return cls(**values)
    except ConfigError as error:
        raise ConfigError(f"{path + ': ' if path else ''}{error}") from None
    except TypeError as error:  # a required field without a value
        raise ConfigError(f"{path or cls.__name__}: {error}") from None


def load_yaml(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML file, then apply ``key.sub=value`` overrides (values parsed as YAML)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path}: a directory, not a YAML file") from None
    except OSError as error:
        raise ConfigError(f"--config {path}: cannot read it ({error.strerror or error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    merged = copy.deepcopy(data)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"command-line override {item!r} is not of the form key=value")
        _set_path(merged, key.split("."), yaml.safe_load(raw))
    try:
        return from_dict(cls, merged, where=str(path))
    except ConfigError as error:
        raise ConfigError(f"{_blame(cls, data, path, overrides)}: {error}") from None


def _blame(cls: type, file_data: dict[str, Any], path: Path, overrides: list[str] | None) -> str:
    """Where a config error comes from: the file, or the command line when the file alone is valid."""
    if not overrides:
        return str(path)
    try:
        from_dict(cls, file_data, where=None)
    except ConfigError:
        return f"{path} with command-line overrides"
    return f"command line ({' '.join(overrides)})"


def upgrade(cls: type, data: Any, where: str | None = None) -> Any:
    """Plain config data of ``cls`` (a recorded config, say) with every older key read under today's name.

    Nested configs are upgraded too; a deprecation line naming ``where`` is logged per upgraded
    section (None: quietly). Data that is not a mapping is returned as it is (:func:`from_dict` says why).
    """
    return _upgrade(cls, data, where, "")


def _upgrade(cls: type, data: Any, where: str | None, path: str) -> Any:
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return data
    data = _upgrade_here(cls, data, where, path)
    hints = get_type_hints(cls)
    nested = {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}
    return {k: _upgrade(nested[k], v, where, _join(path, k)) if k in nested else v for k, v in data.items()}


def _upgrade_here(cls: type, data: dict[str, Any], where: str | None, path: str) -> dict[str, Any]:
    """``data`` through ``cls.upgrade_keys`` when it has one (this level only); its note logged."""
    hook = getattr(cls, "upgrade_keys", None)
    if hook is None:
        return data
    data, note = hook(data)
    if note and where is not None:
        log.warning("%s: %s%s", where, f"{path}: " if path else "", note)
    return data


def to_dict(config: Any) -> dict[str, Any]:
    """Plain data (for YAML/JSON) from a config dataclass."""
    return dataclasses.asdict(config)


def config_changes(
    old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any] | None = None
) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two plain-data configs (a missing key shows as None).

    ``defaults`` (:func:`default_values`): a key the old config lacks is unchanged when the new value
    is its default — a key added to the code after the old config was recorded, whose default keeps
    the old behaviour (the rule for new keys, docs/architecture.md).
    """
    flat_old, flat_new = _flatten(json.loads(json.dumps(old))), _flatten(json.loads(json.dumps(new)))
    for key, value in (defaults or {}).items():
        if key not in flat_old and flat_new.get(key) == value:
            flat_old[key] = value
    keys = sorted(set(flat_old) | set(flat_new))
    return {k: (flat_old.get(k), flat_new.get(k)) for k in keys if flat_old.get(k) != flat_new.get(k)}


def default_values(cls: type) -> dict[str, Any]:
    """Dotted key -> default (in JSON form) of every leaf key of config dataclass ``cls`` that has one."""
    return {key: json.loads(shown) for key, _, shown, _ in reference(cls) if shown != "(required)"}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _set_path(data: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        data = data.setdefault(key, {})
        if not isinstance(data, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {key} is not a mapping")
    data[keys[-1]] = value


def _convert(annotation: Any, value: Any, path: str) -> Any:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, path)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: no type of {annotation} accepts {value!r}")
    if origin is Literal:
        if isinstance(value, bool):  # YAML reads an unquoted no/off/yes/on as a boolean: take the word back
            words = [a for a in args if isinstance(a, str) and yaml.safe_load(a) is value]
            value = words[0] if len(words) == 1 else value
        if value not in args:
            raise ConfigError(f"{path}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_convert(item_type, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        return from_dict(annotation, value, path)
    if annotation is Any or annotation is typing.Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # PyYAML reads 3e-3 (no dot) as a string: accept numeric text
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if annotation is dict or get_origin(annotation) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported annotation {annotation!r}")


def check(condition: bool, key: str, message: str) -> None:
    """Range check for ``__post_init__``: raise :class:`ConfigError` naming ``key`` when false."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


# ------------------------------------------------ the config reference (configdocs.py writes docs/configs.md)


def reference(cls: type, prefix: str = "", instance: Any = None) -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, comment) of every leaf key of config dataclass ``cls``.

    Defaults are those of ``instance`` (the parent's default for a nested config) when given, else
    the class's; comments are the field's trailing comment in the source.
    """
    hints = get_type_hints(cls)
    comments = _field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, hint = _join(prefix, f.name), hints[f.name]
        value = getattr(instance, f.name) if instance is not None else _class_default(f)
        if _class_default(f) is None:  # a null default is filled in __post_init__ (model.n_layer from size): show null
            value = None
        if dataclasses.is_dataclass(hint):
            rows += reference(hint, key, value if dataclasses.is_dataclass(value) else None)
            continue
        shown = "(required)" if value is dataclasses.MISSING else json.dumps(value)
        rows.append((key, _type_name(hint), shown, comments.get(f.name, "")))
    return rows


def _class_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        try:
            return f.default_factory()
        except ConfigError:  # a nested config with required keys: list the class's own defaults
            return None
    return dataclasses.MISSING


def _field_comments(cls: type) -> dict[str, str]:
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        for line in inspect.getsource(klass).splitlines():
            match = re.match(r"^\s{4}(\w+):[^#]*#\s*(.+)$", line)
            if match:
                comments[match.group(1)] = match.group(2).strip()
    return comments


def _type_name(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " \\| ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list[{_type_name(args[0]) if args else 'any'}]"
    return getattr(hint, "__name__", str(hint))
