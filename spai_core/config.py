"""Typed configs: dataclasses built from defaults, a YAML file, flag values and ``key=value`` overrides.

One mechanism serves every command. A command's config is a dataclass whose fields may be declared with
:func:`option`, which records the help text and the command-line flag that sets the field (``spai_cli`` derives
its flags from that, the way Ray's benchmarks derive theirs from a config class). :func:`load_config` applies, in
order, the dataclass defaults, a YAML file, flag values and ``key=value`` overrides, then :func:`check_config` runs
every ``validate()`` method of the (nested) config; a :class:`ConfigError` raised there with a ``field`` names the
flag that sets it. :func:`dump_config` writes YAML that :func:`load_config` reads back to an equal config, so a
saved run config reruns the same job.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from .errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config file, flag or override that does not fit the dataclass it is meant for.

    ``field`` is the offending field's name (dotted below the config that validates it); :func:`check_config`
    rewrites it into the flag (and key) a user sets it with.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def option(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None, short: str | None = None,
           choices: Sequence[Any] | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its help text and, if ``flag`` is given, the command-line flag that sets it (a flag
    without a leading ``-``, such as ``MANIFEST``, is a positional argument)."""
    metadata = {"help": help, "flag": flag, "short": short, "choices": tuple(choices) if choices else None}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def field_flag(cls: type, path: str) -> str | None:
    """The flag that sets dotted field ``path`` of config class ``cls`` (None if it has none)."""
    head, _, rest = path.partition(".")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if head not in fields:
        return None
    if rest:
        inner = typing.get_type_hints(cls)[head]
        return field_flag(inner, rest) if dataclasses.is_dataclass(inner) and has_flags(fields[head]) else None
    return fields[head].metadata.get("flag")


def section(default_factory: Any, *, flags: bool = True) -> Any:
    """A nested config field; ``flags=False`` keeps its fields' flags off the command line of the config holding it
    (a search's base training config is set by file and ``key=value``, not by the flags of ``spai train``)."""
    return dataclasses.field(default_factory=default_factory, metadata={"flags": flags})


def has_flags(f: dataclasses.Field) -> bool:
    """Whether the flags of nested config field ``f`` belong to the command line (see :func:`section`)."""
    return f.metadata.get("flags", True)


def check_config(cfg: T) -> T:
    """Run ``validate()`` of ``cfg`` and of every nested config (innermost first); return ``cfg``.

    A :class:`ConfigError` with a ``field`` comes out naming the flag and the key: ``--workers (workers): ...``.
    """
    _check(cfg, type(cfg), "")
    return cfg


def _check(cfg: Any, root: type, prefix: str) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _check(value, root, f"{prefix}{f.name}.")
    try:
        _check_choices(cfg)
        validate = getattr(cfg, "validate", None)
        if validate is not None:
            validate()
    except ConfigError as exc:
        if exc.field is None:
            raise
        key = prefix + exc.field
        flag = field_flag(root, key)
        raise ConfigError(f"{flag} ({key}): {exc}" if flag else f"{key}: {exc}", key) from None


def _check_choices(cfg: Any) -> None:
    """Fields declared with ``choices`` hold one of them (or None where that is their default), however they were set:
    the command line checks its flags, but a YAML file or a ``key=value`` override could hold anything."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices and not (value is None and f.default is None):
            raise ConfigError(f"must be one of {', '.join(map(str, choices))}, got {value!r}", f.name)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of a (nested) config dataclass, ready for YAML, JSON or MLflow params."""
    return dataclasses.asdict(cfg)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {annotation.__name__}, got {value!r}")
        return from_dict(annotation, value, where)
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        item_type = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, item_type, f"{where}.{k}") for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from exc
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from exc
    if annotation is str:
        return str(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, type-checking each field and rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what a YAML error is, on one line."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + str(getattr(exc, "problem", None) or exc).replace("\n", " ")


def read_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """The mapping in a YAML file; a missing file, bad YAML or another top level is a :class:`ConfigError`."""
    if not Path(path).is_file():
        raise ConfigError(f"{what} {path} does not exist; check the path")
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML ({_yaml_problem(exc)})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def _parse_scalar(text: str) -> Any:
    """Parse an override value the way YAML would (``1e-4`` -> float, ``null`` -> None, ``[1,2]`` -> list)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override value {text!r} is not valid YAML ({_yaml_problem(exc)}); quote it or fix the "
                          "brackets") from None
    if isinstance(value, str):
        try:  # YAML 1.1 reads "5e-4" as a string; users mean a number
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-4)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section of the config")
            node = child
        if parts[-1] not in node:
            raise ConfigError(f"override {item!r}: unknown key {parts[-1]!r}; known keys here are {sorted(node)}")
        node[parts[-1]] = _parse_scalar(text)
    return data


def load_config(cls: type[T], path: str | Path | Mapping[str, Any] | None = None, overrides: Sequence[str] = (),
                flags: Mapping[str, Any] | None = None) -> T:
    """Build and check ``cls``: defaults <- YAML file (a path, or its mapping) <- ``flags`` <- ``key=value`` overrides.

    ``flags`` maps dotted field names to values already parsed (what ``spai_cli`` collects from the command line).
    A nested config class with a ``preset(name)`` classmethod takes its defaults from the preset its ``name`` key
    names (a model config named ``spai_tiny`` starts from the tiny model's values, not the official ones).
    """
    data = to_dict(cls())
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if path is not None:
        layers.append((str(path), path if isinstance(path, Mapping) else read_yaml(path)))
    if flags:
        layers.append(("flags", _nest(flags)))
    layers.append(("overrides", apply_overrides(_skeleton(cls, data), overrides)))
    _apply_presets(cls, data, [layer for _, layer in layers])
    for where, layer in layers:
        _deep_update(cls, data, layer, where)
    return check_config(from_dict(cls, data))


def _skeleton(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """Empty sections shaped like ``data`` (of config class ``cls``), so overrides know which keys exist without
    copying values."""
    hints = typing.get_type_hints(cls)
    return {k: _skeleton(hints[k], v) if dataclasses.is_dataclass(hints[k]) else _Unset for k, v in data.items()}


class _Unset:
    """Marks a key an override layer leaves alone."""


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return nested


def _apply_presets(cls: type, data: dict[str, Any], layers: list[Mapping[str, Any]]) -> None:
    """Start a section that has presets from the one the last layer naming it asks for."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        inner = hints[f.name]
        if not dataclasses.is_dataclass(inner):
            continue
        sections = [layer[f.name] for layer in layers if isinstance(layer.get(f.name), Mapping)]
        names = [s["name"] for s in sections if s.get("name", _Unset) is not _Unset]
        if names and hasattr(inner, "preset"):
            data[f.name] = to_dict(inner.preset(names[-1]))
        _apply_presets(inner, data[f.name], sections)


def _deep_update(cls: type, base: dict[str, Any], update: Mapping[str, Any], where: str) -> None:
    """Merge ``update`` into ``base``, the dict of config class ``cls``: sections key by key, any other value (a
    mapping-valued field too) replaced whole."""
    hints = typing.get_type_hints(cls)
    for key, value in update.items():
        if value is _Unset:
            continue
        if key not in base:
            raise ConfigError(f"{where}: unknown key {key!r}; known keys are {sorted(base)}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, Mapping):
            _deep_update(hints[key], base[key], value, f"{where}.{key}")
        else:
            base[key] = value


def dump_config(cfg: Any) -> str:
    """A config dataclass as YAML text that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
