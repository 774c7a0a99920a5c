"""Typed configuration: dataclasses built from plain dicts (parsed YAML, TOML or JSON) with every
value checked against its field's type annotation, so a bad value is one clear error naming the
field (``TrainConfig.lr: expected a number, got 'fast'``) instead of a crash later."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
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
        raise ConfigError(f"{name}: expected a mapping of fields, got {show_value(data)}")
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


def show_value(value: Any) -> str:
    """A value as error messages quote it: its repr, cut to 60 characters."""
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
    raise ConfigError(f"{path}: expected {expected}, got {show_value(value)}{hint}")


# ---- reading config text, bounded ------------------------------------------------------------
# Configs, model indexes and notes are small: the largest real one is a few kB. The limits keep
# a hostile file from costing more than about a second and a few hundred MB whatever it holds:
MAX_CONFIG_BYTES = 4 << 20  # 4 MiB of text
MAX_DEPTH = 32  # nesting of lists and mappings (real configs: 5)
MAX_NODES = 200_000  # values after YAML aliases are expanded (real configs: a few hundred)
FORMATS = {".json": "JSON", ".toml": "TOML", ".yaml": "YAML", ".yml": "YAML"}


def read_config_text(
    path: str | Path, what: str = "config", max_bytes: int = MAX_CONFIG_BYTES
) -> str:
    """The UTF-8 text of a config file (a leading BOM dropped), or a ConfigError if it is
    larger than ``max_bytes`` (:data:`MAX_CONFIG_BYTES`) or not UTF-8; checked before it is
    read whole."""
    p = Path(path)
    size = p.stat().st_size
    if size > max_bytes:
        raise ConfigError(
            f"{p}: {size / 2**20:.1f} MiB is too large for a {what} "
            f"(the limit is {max_bytes >> 20} MiB)"
        )
    with open(p, "rb") as f:
        data = f.read(max_bytes + 1)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None


def parse_config_text(
    text: str,
    kind: str,
    source: str,
    max_bytes: int = MAX_CONFIG_BYTES,
    max_nodes: int = MAX_NODES,
) -> Any:
    """Parse ``text`` as ``kind`` (JSON, TOML or YAML) within the limits above: too deep, too
    many values (YAML aliases counted as expanded) or a syntax error is a one-line
    ConfigError naming ``source`` (and the line, where the parser knows it)."""
    if len(text) > max_bytes:
        raise ConfigError(f"{source}: too large (the limit is {max_bytes >> 20} MiB)")
    try:
        if kind == "JSON":
            data = _parse_json(text, source)
        elif kind == "TOML":
            data = _parse_toml(text, source)
        else:
            data = _parse_yaml(text, source)
    except RecursionError:
        raise ConfigError(f"{source}: nested more than {MAX_DEPTH} levels deep") from None
    check_bounds(data, source, max_nodes)
    return data


def _parse_json(text: str, source: str) -> Any:
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source}: line {e.lineno}: invalid JSON: {e.msg}") from None


def _parse_toml(text: str, source: str) -> Any:
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from None


def _parse_yaml(text: str, source: str) -> Any:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where present
    try:
        _check_yaml_events(yaml.parse(text, Loader=loader), source)
        return yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}: {where}invalid YAML: {problem}") from None


def _check_yaml_events(events: Any, source: str) -> None:
    """Refuse a YAML stream before it is built: its nesting and its size with every alias
    expanded (what a "billion laughs" file hides), from the parser's events alone."""
    import yaml

    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (values, depth) of its node
    stack: list[list[Any]] = []  # open collections: [anchor, values, depth below]

    def add(values: int, depth: int) -> None:
        if not stack:
            return
        top = stack[-1]
        top[1] += values
        top[2] = max(top[2], depth)
        if len(stack) + depth > MAX_DEPTH:
            raise ConfigError(f"{source}: nested more than {MAX_DEPTH} levels deep")
        if top[1] > MAX_NODES:
            raise ConfigError(
                f"{source}: more than {MAX_NODES} values (YAML aliases counted as expanded)"
            )

    for ev in events:
        if isinstance(ev, yaml.AliasEvent):
            add(*anchors.get(ev.anchor, (1, 0)))
        elif isinstance(ev, yaml.ScalarEvent):
            if ev.anchor:
                anchors[ev.anchor] = (1, 0)
            add(1, 0)
        elif isinstance(ev, yaml.CollectionStartEvent):
            stack.append([ev.anchor, 1, 0])
            if len(stack) > MAX_DEPTH:
                raise ConfigError(f"{source}: nested more than {MAX_DEPTH} levels deep")
        elif isinstance(ev, yaml.CollectionEndEvent):
            anchor, values, depth = stack.pop()
            if anchor:
                anchors[anchor] = (values, depth + 1)
            add(values, depth + 1)


def check_bounds(data: Any, source: str, max_nodes: int = MAX_NODES) -> None:
    """Raise a ConfigError if parsed ``data`` nests deeper than :data:`MAX_DEPTH` or holds more
    than ``max_nodes`` (:data:`MAX_NODES`) values (walked without recursion)."""
    todo: list[tuple[Any, int]] = [(data, 0)]
    count = 0
    while todo:
        value, depth = todo.pop()
        count += 1
        if count > max_nodes:
            raise ConfigError(f"{source}: more than {max_nodes} values")
        if isinstance(value, dict | list | tuple):
            if depth >= MAX_DEPTH:
                raise ConfigError(f"{source}: nested more than {MAX_DEPTH} levels deep")
            items = value.values() if isinstance(value, dict) else value
            todo.extend((v, depth + 1) for v in items)


def load_config_file(path: str | Path, what: str = "config") -> Any:
    """Read and parse a .json, .toml, .yaml or .yml file within the limits above."""
    p = Path(path)
    kind = FORMATS.get(p.suffix.lower())
    if kind is None:
        raise ConfigError(f"{what} must be .yaml, .yml, .toml or .json, got {p.name}")
    return parse_config_text(read_config_text(p, what), kind, str(p))


def load_json_file(
    path: str | Path,
    what: str = "JSON file",
    max_bytes: int = MAX_CONFIG_BYTES,
    max_nodes: int = MAX_NODES,
) -> Any:
    """Read and parse a JSON file within the limits above, or larger ones given (model
    indexes, stage configs, notes; a tokenizer's vocabulary); every error is a one-line
    ConfigError naming the file."""
    p = Path(path)
    text = read_config_text(p, what, max_bytes)
    return parse_config_text(text, "JSON", str(p), max_bytes, max_nodes)
