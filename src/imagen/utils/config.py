"""Typed configuration: dataclasses built from plain dicts (parsed YAML, TOML or JSON) with every
value checked against its field's type annotation, so a bad value is one clear error naming the
field (``TrainConfig.lr: expected a number, got 'fast'``) instead of a crash later."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value that does not fit its field."""


def config_from_dict(cls: type[T], data: Any, where: str | None = None) -> T:
    """Build dataclass ``cls`` from the mapping ``data``.

    Unknown keys are refused (no silent typos) and each value is checked against its field's
    annotation: int, float (finite; ints accepted), bool, str, Literal, Any, tuples, lists and
    dicts of those, ``X | None`` and nested dataclasses (built from mappings, recursively).
    Lists become tuples where a tuple is annotated. ``where`` names the config in messages
    (default: the class name); nested fields are named by their path, e.g.
    ``StageConfig.sampling.guidance``. Errors raised by the dataclass's own validation are
    prefixed with the path of a nested config."""
    name = where or cls.__name__
    prefix = "" if where is None else f"{where}: "
    if not isinstance(data, Mapping):
        raise ConfigError(f"{name}: expected a mapping of fields, got {_show(data)}")
    init_fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in set(data) - set(init_fields))
    if unknown:
        raise ConfigError(f"{prefix}unknown {cls.__name__} field(s): {', '.join(unknown)}")
    missing = [
        n
        for n, f in init_fields.items()
        if n not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix}missing {cls.__name__} field(s): {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    values = {k: check_value(v, hints[k], f"{name}.{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        if where is None and isinstance(e, ValueError):
            raise
        raise ConfigError(f"{name}: {e}") from e


def check_value(value: Any, tp: Any, path: str) -> Any:
    """``value`` checked against the annotation ``tp`` (and converted where a list stands for
    a tuple, an int for a float, or a mapping for a dataclass); ConfigError otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _check_union(value, args, path)
    if origin is Literal:
        if value in args and any(type(value) is type(a) for a in args):
            return value
        return _fail(path, "one of " + ", ".join(repr(a) for a in args), value)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        return config_from_dict(tp, value, path)
    if origin in (tuple, list) or tp in (tuple, list):
        return _check_sequence(value, origin or tp, args, path)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            return _fail(path, "a mapping", value)
        kt, vt = args or (Any, Any)
        return {
            check_value(k, kt, path): check_value(v, vt, f"{path}.{k}") for k, v in value.items()
        }
    return _check_scalar(value, tp, path)


def _check_scalar(value: Any, tp: Any, path: str) -> Any:
    if tp is bool:
        return value if isinstance(value, bool) else _fail(path, "true or false", value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        return _fail(path, "an integer", value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _fail(path, "a number", value)
        if not math.isfinite(value):
            return _fail(path, "a finite number", value)
        return float(value)
    if tp is str:
        return value if isinstance(value, str) else _fail(path, "text", value)
    return value  # a type this checker does not know: the dataclass validates it


def _check_union(value: Any, args: tuple[Any, ...], path: str) -> Any:
    if value is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    errors = []
    for a in options:
        try:
            return check_value(value, a, path)
        except ConfigError as e:
            errors.append(e)
    scalar = all(a in (int, float, bool, str) for a in options)
    if len(options) == 1 and not scalar:
        raise errors[0]  # the nested config's or the list's own message
    return _fail(path, " or ".join(_describe(a) for a in args), value)


def _check_sequence(value: Any, kind: type, args: tuple[Any, ...], path: str) -> Any:
    if not isinstance(value, (list, tuple)):
        return _fail(path, "a list", value)
    if kind is tuple and len(args) == 2 and args[1] is Ellipsis:
        types_ = [args[0]] * len(value)
    elif kind is tuple and args:
        if len(value) != len(args):
            return _fail(path, f"a list of {len(args)} values", value)
        types_ = list(args)
    else:
        types_ = [args[0] if args else Any] * len(value)
    items = [
        check_value(v, t, f"{path}[{i}]")
        for i, (v, t) in enumerate(zip(value, types_, strict=True))
    ]
    return tuple(items) if kind is tuple else items


def _describe(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "text"}
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) in (list, tuple):
        return "a list"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(path: str, expected: str, value: Any) -> typing.NoReturn:
    hint = ""
    if isinstance(value, str) and expected in ("a number", "a finite number"):
        try:
            float(value)
            hint = " (YAML reads 1e-4 as text: write 1.0e-4)"
        except ValueError:
            pass
    raise ConfigError(f"{path}: expected {expected}, got {_show(value)}{hint}")
