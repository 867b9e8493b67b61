"""Resuming a job: the settings it was started with (as recorded next to its output) against those asked for now.

A resumed job must be the job that was started (same data, same recipe), or its outputs would mix two jobs; only
what a command says it may change (a run's length, its resources) can differ. ``spai train`` and ``spai score``
both check that here.
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

from spai_core.config import ConfigError


class ResumeError(ConfigError):
    """A resume asks for other settings than the job it would continue was started with."""


def flat_settings(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``{"optim.lr": 0.0005, ...}``, values as JSON gives them back (tuples become lists), so a
    recorded copy and the live one compare equal."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.loads(json.dumps(value))
    return flat


def check_resumable(recorded: Mapping[str, Any], current: Mapping[str, Any], ignore: Iterable[str] = (),
                    what: str = "the job", hint: str = "") -> None:
    """Refuse a resume whose ``current`` settings differ from the ``recorded`` ones outside ``ignore`` (dotted keys,
    or a section's name for all of it); the error lists each difference, then ``hint`` (what to do)."""
    ignored = tuple(ignore)
    before, now = flat_settings(recorded), flat_settings(current)
    changed = [f"{key}: {before.get(key)!r} before, {now.get(key)!r} now" for key in sorted(set(before) | set(now))
               if before.get(key) != now.get(key) and not _ignored(key, ignored)]
    if changed:
        raise ResumeError(f"{what} was started with other settings than this command asks for: "
                          + "; ".join(changed) + (f". {hint}" if hint else ""))


def _ignored(key: str, ignore: tuple[str, ...]) -> bool:
    return any(key == name or key.startswith(name + ".") for name in ignore)
