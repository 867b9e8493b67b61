"""Train/val/test splits drawn by group, seeded, so a group never straddles splits and the same seed gives the same
splits; and the groups themselves (a file stem minus generator tags)."""
from __future__ import annotations

import collections
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

from pipelines.data.config import fractions_problem
from pipelines.infra.storage import basename

from .schema import SPLITS, ManifestError


def check_fractions(fractions: Sequence[float]) -> None:
    """Train, val and test fractions must be three non-negative numbers summing to 1."""
    if problem := fractions_problem(fractions):
        raise ManifestError(problem)


def assign_splits(groups: Sequence[str], fractions: Sequence[float], seed: int = 0) -> list[str]:
    """Seeded train/val/test assignment where every group lands in exactly one split.

    Groups are shuffled with ``seed``, then laid end to end by row count; a group goes to the split whose share of
    rows its middle falls in, so split sizes track ``fractions`` by rows, not by number of groups.
    """
    check_fractions(fractions)
    sizes = collections.Counter(groups)
    order = sorted(sizes)
    np.random.default_rng(seed).shuffle(order)
    bounds = np.cumsum(fractions) * len(groups)
    last = max(i for i, f in enumerate(fractions) if f > 0)
    split_of, done = {}, 0
    for group in order:
        middle = done + sizes[group] / 2
        split_of[group] = SPLITS[min(int(np.searchsorted(bounds, middle, side="right")), last)]
        done += sizes[group]
    return [split_of[g] for g in groups]


def file_stem(uri: str) -> str:
    return os.path.splitext(basename(uri))[0]


def stem_group(uri: str, tags: Iterable[str]) -> str:
    """A file's stem with trailing generator tags stripped: ``beach_waifu2x.png`` -> ``beach`` when ``waifu2x`` is a
    tag, so a generated copy and its source photo share a group. Separators are ``_``, ``-``, ``.`` and spaces."""
    stem = file_stem(uri)
    pattern = re.compile(r"[_\-. ]+(" + "|".join(re.escape(t) for t in sorted(tags, key=len, reverse=True)) + r")$",
                         re.IGNORECASE)
    while True:
        stripped = pattern.sub("", stem)
        if stripped == stem or not stripped:
            return stem
        stem = stripped
