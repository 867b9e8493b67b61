"""The registry of named perturbations (timm-style: a decorator registers a function under a name) and the
:class:`Variant`, one perturbation at one strength, that a sweep scores and a training augment draws.

A perturbation is a pure function ``fn(image, rng, strength) -> image`` of an ``H x W x 3`` uint8 RGB array: all its
randomness comes from the ``numpy.random.Generator`` passed in, so a seeded generator reproduces it exactly. Its
strength is a number (JPEG quality, blur sigma...), a name (which filter), or nothing (a meme caption).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

PerturbFn = Callable[[np.ndarray, np.random.Generator, Any], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """A registered perturbation and what its strength means.

    ``unit`` says what the number is ("" when the perturbation takes none); ``bounds`` is its valid closed range;
    ``choices`` the names it takes instead of a number; ``default`` the strengths a bare name (``jpeg``) stands for;
    ``identity`` the strength that returns the image unchanged, where there is one.
    """

    name: str
    fn: PerturbFn
    unit: str = ""
    bounds: tuple[float, float] | None = None
    integer: bool = False
    choices: tuple[str, ...] = ()
    default: tuple[Any, ...] = (None,)
    identity: float | None = None

    @property
    def doc(self) -> str:
        """The first line of the function's docstring: what ``spai perturb``-style listings show."""
        return (self.fn.__doc__ or "").strip().split("\n", 1)[0]

    @property
    def takes_strength(self) -> bool:
        return bool(self.unit or self.choices)


_REGISTRY: dict[str, Perturbation] = {}


def register(name: str, **spec: Any) -> Callable[[PerturbFn], PerturbFn]:
    """Register ``fn`` under ``name`` with the :class:`Perturbation` fields in ``spec``; returns ``fn`` unchanged."""
    def wrap(fn: PerturbFn) -> PerturbFn:
        if name in _REGISTRY:
            raise ValueError(f"perturbation {name!r} is registered twice")
        _REGISTRY[name] = Perturbation(name, fn, **spec)
        return fn
    return wrap


def perturbations() -> dict[str, Perturbation]:
    """Every registered perturbation by name, in registration order (importing :mod:`pipelines.perturb` fills it)."""
    return dict(_REGISTRY)


def get(name: str) -> Perturbation:
    """The perturbation registered as ``name``; KeyError names the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown perturbation {name!r}; known: {', '.join(_REGISTRY)}") from None


def _number(value: float) -> str:
    return f"{value:g}"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One perturbation at one strength: ``jpeg=75``, ``filter=clarendon``, ``meme`` or ``none`` (the original).

    ``strength`` is a float for numeric perturbations, the chosen name for named ones, None for the others.
    """

    perturbation: str
    strength: float | str | None = None

    @property
    def label(self) -> str:
        """The canonical display label, which also identifies the variant of an image in a sweep's output."""
        if self.strength is None:
            return self.perturbation
        value = self.strength if isinstance(self.strength, str) else _number(self.strength)
        return f"{self.perturbation}={value}"

    @property
    def numeric_strength(self) -> float | None:
        """The strength as a number (the ``strength`` column of a sweep), None for named or parameterless kinds."""
        return None if self.strength is None or isinstance(self.strength, str) else float(self.strength)

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The perturbed image (``image`` itself for ``none``)."""
        out = get(self.perturbation).fn(image, rng, self.strength)
        return np.ascontiguousarray(out)


@register("none")
def original(image: np.ndarray, rng: np.random.Generator, strength: None) -> np.ndarray:
    """The image as it is (the reference row of every sweep)."""
    return image


NONE = Variant("none")
