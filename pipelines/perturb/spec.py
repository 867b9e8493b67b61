"""The text forms of perturbations: a sweep's ``NAME[=S1,S2,...]`` (``spai score --perturb``) and a training augment's
``NAME[=S1,S2,...|=LOW:HIGH][@P]`` (``augment.perturb``), parsed into :class:`~pipelines.perturb.registry.Variant`\\ s
and :class:`RandomPerturb`\\ s. Every mistake is a :class:`~spai_core.config.ConfigError` of field ``perturb``."""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipelines.perturb.registry import NONE, Perturbation, Variant, perturbations
from spai_core.config import ConfigError

FIELD = "perturb"


def lookup(name: str) -> Perturbation:
    """The perturbation called ``name``, or an error naming the closest ones."""
    known = perturbations()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"unknown perturbation {name!r}; {hint}known: {', '.join(known)}", FIELD)
    return known[name]


def strength(kind: Perturbation, text: str) -> float | str:
    """One strength of ``kind`` from text, checked against its bounds or choices."""
    if kind.choices:
        if text not in kind.choices:
            raise ConfigError(f"{kind.name}={text}: choose from all, {', '.join(kind.choices)}", FIELD)
        return text
    if not kind.unit:
        raise ConfigError(f"{kind.name} takes no strength; write just {kind.name!r}", FIELD)
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{kind.name}={text}: the strength ({kind.unit}) must be a number", FIELD) from None
    low, high = kind.bounds or (-np.inf, np.inf)
    if not low <= value <= high or (kind.integer and not value.is_integer()):
        what = "a whole number" if kind.integer else "a number"
        raise ConfigError(f"{kind.name}={text}: the {kind.unit} must be {what} in [{low:g}, {high:g}]", FIELD)
    return value


def strengths(kind: Perturbation, text: str | None) -> tuple[Any, ...]:
    """The strengths of ``NAME=text``: comma-separated, ``all`` for every choice, the defaults when bare."""
    if text is None:
        return kind.default
    if kind.choices and text == "all":
        return kind.choices
    return tuple(strength(kind, part.strip()) for part in text.split(","))


def parse_variants(specs: Sequence[str], original: bool = True) -> list[Variant]:
    """The variants a sweep scores: ``none`` first if ``original``, then each spec's, in order, without repeats.

    ``["jpeg=95,75", "blur", "filter=all", "meme"]`` -> none, jpeg=95, jpeg=75, blur=1, blur=3, filter=clarendon, ...
    """
    variants = [NONE] if original else []
    for spec in specs:
        name, sep, text = spec.strip().partition("=")
        kind = lookup(name)
        for value in strengths(kind, text if sep else None):
            variant = Variant(kind.name, value)
            if variant not in variants:
                variants.append(variant)
    if not variants:
        raise ConfigError("nothing to score: give --perturb variants, or keep the original (--original)", FIELD)
    return variants


@dataclasses.dataclass(frozen=True)
class RandomPerturb:
    """A training augment: with probability ``p``, ``perturbation`` at a strength drawn uniformly from ``values``, or
    from the range ``span`` when given (whole numbers for integer kinds)."""

    perturbation: str
    values: tuple[Any, ...] = (None,)
    span: tuple[float, float] | None = None
    p: float = 0.5
    integer: bool = False  # draw whole numbers from ``span``

    def draw(self, rng: np.random.Generator) -> Variant | None:
        """The variant to apply, or None when the coin says no. The coin and the strength are always drawn, so the
        random stream after it is the same either way."""
        apply = rng.random() < self.p
        if self.span is not None:
            low, high = self.span
            value = float(rng.integers(low, high + 1)) if self.integer else rng.uniform(low, high)
        else:
            value = self.values[int(rng.integers(len(self.values)))]
        return Variant(self.perturbation, value) if apply else None


def parse_augment(spec: str, p: float) -> RandomPerturb:
    """``NAME[=S1,S2,...|=LOW:HIGH][@P]``, e.g. ``jpeg=30:95@0.3``, ``filter=all@0.2``, ``meme@0.1``; probability
    ``p`` where there is no ``@P``."""
    body, at, prob = spec.strip().partition("@")
    if at:
        try:
            p = float(prob)
        except ValueError:
            raise ConfigError(f"{spec}: the probability after @ must be a number", FIELD) from None
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"{spec}: the probability must be in [0, 1], got {p:g}", FIELD)
    name, sep, text = body.partition("=")
    kind = lookup(name)
    if sep and ":" in text and not kind.choices:
        low, high = (strength(kind, part.strip()) for part in text.split(":", 1))
        if low > high:
            raise ConfigError(f"{spec}: the range {low:g}:{high:g} is empty; write LOW:HIGH", FIELD)
        return RandomPerturb(kind.name, span=(low, high), p=p, integer=kind.integer)
    return RandomPerturb(kind.name, strengths(kind, text if sep else None), p=p)
