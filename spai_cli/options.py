"""Command-line flags derived from config dataclasses, and configs built back from the parsed flags.

Every command's config class declares its flags with :func:`spai_core.config.option`; :func:`add_config_options`
turns those into argparse options (with ``--config FILE.yaml`` and trailing ``key=value`` overrides), and
:func:`config_from_args` hands what the user gave to :func:`spai_core.config.load_config`, the one place where
values are merged and validated. Flags not given leave the YAML's (or the default) value alone, so
``spai CMD --config saved.yaml`` reruns a saved job and a flag beside it changes just that field.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable, Iterator

from spai_core.config import ConfigError, has_flags, load_config

CONFIG_DEST = "config"
OVERRIDES_DEST = "overrides"
_FLAG_PREFIX = "cfg:"  # argparse dests of config flags: "cfg:" + the dotted field name


def _flag_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted name, field, type) of every field with a flag, nested configs included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            if has_flags(f):
                yield from _flag_fields(annotation, f"{prefix}{f.name}.")
        elif f.metadata.get("flag"):
            yield prefix + f.name, f, annotation


def _plain(annotation: Any) -> tuple[Any, bool]:
    """The type inside ``X | None`` and whether None is allowed."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner[0], len(inner) < len(typing.get_args(annotation))
    return annotation, False


def _default_text(defaults: Any, name: str) -> str:
    """`` (default: X)`` for dotted field ``name`` of the default config ``defaults``; nothing for unset values."""
    value: Any = defaults
    for part in name.split("."):
        value = getattr(value, part)
    if value is None or value == "" or value == []:
        return ""
    if isinstance(value, bool):
        return ""
    if isinstance(value, (list, tuple)):
        value = " ".join(map(str, value))
    return f" (default: {value})"


def add_config_options(parser: argparse.ArgumentParser, cls: type, config_help: str | None = None,
                       overrides: bool = True) -> None:
    """Add ``--config``, one flag per flagged field of ``cls`` and (optionally) ``KEY=VALUE`` overrides."""
    parser.add_argument("--config", "-c", dest=CONFIG_DEST, default=None, metavar="FILE.yaml",
                        help=config_help or "config YAML, e.g. the config.yaml a previous run saved (flags and "
                        "KEY=VALUE overrides given beside it win)")
    defaults = cls()  # built once: the help of every flag states its default
    for name, f, annotation in _flag_fields(cls):
        meta = f.metadata
        kind, _ = _plain(annotation)
        names = [meta["flag"]] + ([meta["short"]] if meta.get("short") else [])
        kwargs: dict[str, Any] = {"dest": _FLAG_PREFIX + name, "default": argparse.SUPPRESS,
                                  "help": meta["help"] + _default_text(defaults, name)}
        if not meta["flag"].startswith("-"):  # a flag like "MANIFEST" is a positional argument, optional with --config
            listed = typing.get_origin(kind) in (list, tuple)  # SCORES...: any number of them
            parser.add_argument(_FLAG_PREFIX + name, metavar=meta["flag"], nargs="*" if listed else "?",
                                type=(typing.get_args(kind) or (str,))[0] if listed else kind,
                                default=argparse.SUPPRESS, help=kwargs["help"])
            continue
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if not meta["flag"].startswith("--no-") else "store_false"
        else:
            origin = typing.get_origin(kind)
            if origin in (list, tuple):
                kwargs["nargs"] = "+"
                kind = typing.get_args(kind)[0] if typing.get_args(kind) else str
            kwargs["type"] = kind if kind in (int, float, str) else str
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            kwargs["metavar"] = None if meta.get("choices") else name.rsplit(".", 1)[-1].upper()
        parser.add_argument(*names, **kwargs)
    if overrides:
        parser.add_argument(OVERRIDES_DEST, nargs="*", metavar="KEY=VALUE",
                            help="set any config field, e.g. optim.lr=1e-4 (dotted keys; YAML values)")


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the user set by flag, as dotted names."""
    return {dest[len(_FLAG_PREFIX):]: value for dest, value in vars(args).items() if dest.startswith(_FLAG_PREFIX)}


def config_from_args(cls: type, args: argparse.Namespace, base: Any = None) -> Any:
    """``cls`` from ``--config`` (or ``base``, a YAML path or mapping used when no ``--config`` is given), the flags
    given and the ``KEY=VALUE`` overrides, validated in one place."""
    path = getattr(args, CONFIG_DEST, None) or base
    return load_config(cls, path, getattr(args, OVERRIDES_DEST, None) or (), flag_values(args))


def trials_config(cls: type, args: argparse.Namespace, layers: Callable[[], Any], job: str) -> Any:
    """The config of a job whose trials are training runs (``spai tune``, ``spai benchmark``): ``KEY=VALUE`` set its
    trials' base config (``cls.base_section``); with ``--resume`` it starts from the saved config of the job ``--name``
    names, else from ``layers()`` (what ``--config`` gave)."""
    from tune.search import saved_search  # the library a command uses is imported when it runs

    flags = flag_values(args)
    if args.resume and not flags.get("name"):
        raise ConfigError(f"--resume needs the --name of the {job} to continue (its folder under --output)")
    data = saved_search(flags.get("output", cls().output), flags["name"]) if args.resume else layers()
    overrides = [f"{cls.base_section(data)}.{item}" for item in getattr(args, OVERRIDES_DEST) or ()]
    return load_config(cls, data, overrides, flags)
