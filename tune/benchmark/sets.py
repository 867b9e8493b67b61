"""The rows of a cross-generator matrix: each training set's generators, and the manifest its model trains on.

A training set is one generator's AI-generated images (``--leave-one-out``: every chosen generator's but one) with
every real image, from the train and val splits of the benchmark's manifest; so validation, which picks each model's
best epoch, sees only what the model trains on. The test split, with every generator, is left to the matrix.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.data.manifest import split_rows
from spai_core.config import ConfigError

TRAIN_SPLITS = ("train", "val")


@dataclass(frozen=True)
class TrainingSet:
    """One row of the matrix: the generators its model trains on."""

    name: str  # the row's label: the generator, or "all but <generator>"
    slug: str  # its folder and MLflow run name
    generators: tuple[str, ...]

    def rows(self, manifest: pa.Table) -> pa.Table:
        """The manifest its model trains on: the train and val rows that are real or of its generators."""
        rows = manifest.filter(pc.is_in(manifest.column("split"), pa.array(TRAIN_SPLITS)))
        keep = pc.or_(pc.equal(rows.column("label"), 0), pc.is_in(rows.column("generator"),
                                                                   pa.array(self.generators)))
        return rows.filter(keep)


def slug(text: str) -> str:
    """``text`` fit for a folder and an MLflow run or metric name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


def fake_generators(manifest: pa.Table, split: str) -> list[str]:
    """The generators of the AI-generated rows of ``split``, sorted."""
    rows = split_rows(manifest, split)
    return sorted(set(rows.filter(pc.equal(rows.column("label"), 1)).column("generator").to_pylist()))


def training_sets(available: list[str], chosen: list[str] | None, leave_one_out: bool) -> list[TrainingSet]:
    """The matrix's rows: each of the ``chosen`` generators (default: all ``available``) alone, or left out."""
    universe = list(chosen) if chosen is not None else list(available)
    unknown = sorted(set(universe) - set(available))
    if unknown:
        raise ConfigError(f"generator(s) {unknown} have no AI-generated images in the manifest's train split; it has "
                          f"{', '.join(available) or 'none'}", "generators")
    if leave_one_out and len(universe) < 2:
        raise ConfigError(f"--leave-one-out needs two or more training generators, the train split has "
                          f"{universe or 'none'}", "generators")
    sets = [TrainingSet(f"all but {g}", slug(f"without_{g}"), tuple(o for o in universe if o != g)) if leave_one_out
            else TrainingSet(g, slug(g), (g,)) for g in universe]
    if len({s.slug for s in sets}) < len(sets):
        raise ConfigError(f"generators {universe} do not give distinct folder names; rename them in the manifest",
                          "generators")
    return sets


def tested_generators(manifest: pa.Table) -> list[str]:
    """The matrix's columns: the generators of the test split, which must hold real images too."""
    test = split_rows(manifest, "test")
    generators = fake_generators(manifest, "test")
    if not generators or not pc.any(pc.equal(test.column("label"), 0)).as_py():
        raise ConfigError(f"the manifest's test split has {test.num_rows} row(s) but needs real and AI-generated "
                          "images: every model is tested on each generator's against the reals", "manifest")
    return generators
