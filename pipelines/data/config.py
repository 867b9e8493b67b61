"""The configs of the data commands (``spai manifest LAYOUT``, ``spai validate``): light to import, since the CLI
derives its flags from them."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from spai_core.config import ConfigError, option

# Generous for camera photos (a 100 MP medium-format frame fits), small enough to refuse decompression bombs:
# the RGB array of an image this size is 384 MiB.
DEFAULT_MAX_PIXELS = 16384 * 16384 // 2


def fractions_problem(fractions: Sequence[float]) -> str | None:
    """What is wrong with train, val and test fractions (three non-negative numbers summing to 1), or None."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        return (f"split fractions must be three non-negative numbers (train,val,test) summing to 1, got "
                f"{tuple(fractions)}")
    return None


@dataclass
class ManifestConfig:
    """What every layout's build shares: where the manifest goes and what its rows' ``source`` is."""

    layout: ClassVar[str]
    splits_by_group: ClassVar[bool] = False  # whether the build draws splits by group (the summary notes it)

    output: str = option("", flag="--output", short="-o", help="manifest path (directory) or s3:// URI")
    source: str | None = option(None, flag="--source", help="dataset name for the `source` column")
    overwrite: bool = option(False, flag="--overwrite", help="replace a manifest already at --output")

    def validate(self) -> None:
        if not self.output:
            raise ConfigError("give the manifest's path (a directory or s3:// URI)", "output")


@dataclass
class GenImageConfig(ManifestConfig):
    """``<root>/<generator>/{train,val}/{ai,nature}`` (all 8 generators, or a subset)."""

    layout: ClassVar[str] = "genimage"

    root: str = option("", flag="ROOT", help="GenImage root directory or s3:// prefix")
    generators: list[str] | None = option(None, flag="--generators", help="generator folders to include, by folder "
                                          "or short name (sdv5, glide...; default: all)")
    val_fraction: float = option(0.0, flag="--val-fraction", help="move this fraction of each generator's train "
                                 "groups to val (GenImage's val is used as test)")
    seed: int = option(0, flag="--seed", help="seed of the --val-fraction split")

    def validate(self) -> None:
        super().validate()
        if not self.root:
            raise ConfigError("give the GenImage root (a directory or s3:// prefix)", "root")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"must be at least 0 and below 1, got {self.val_fraction}", "val_fraction")



@dataclass
class CsvConfig(ManifestConfig):
    """An official SPAI CSV (``image,class,split``; extra columns kept)."""

    layout: ClassVar[str] = "csv"

    csv: str = option("", flag="CSV", help="CSV file (local or s3://)")
    root: str | None = option(None, flag="--root", help="root dir for relative image paths (default: the CSV's "
                              "folder)")
    generator: str | None = option(None, flag="--generator", help="generator name for all rows (default: a "
                                   "`generator` column if present, else 'real' for class 0 and 'unknown' for class 1)")

    def validate(self) -> None:
        super().validate()
        if not self.csv:
            raise ConfigError("give the CSV file (local or s3://)", "csv")



@dataclass
class FoldersConfig(ManifestConfig):
    """Folders of real and of generated images, searched recursively, split by group."""

    layout: ClassVar[str] = "folders"
    splits_by_group: ClassVar[bool] = True

    real: list[str] = option(default_factory=list, flag="--real", help="folder(s) or s3:// prefixes of real images")
    fake: list[str] = option(default_factory=list, flag="--fake", help="folder(s) of generated images; NAME=PATH "
                             "names the generator (default: folder name), and folders given one name are one "
                             "generator")
    balance: bool = option(False, flag="--balance", help="subsample reals to the number of fakes")
    split: str = option("0.8,0.1,0.1", flag="--split", help="train,val,test fractions, split by group (seeded)")
    seed: int = option(0, flag="--seed", help="seed of the split (and of --balance)")
    group_by: str = option("stem", flag="--group-by", choices=("stem", "folder"),
                           help="what never straddles splits: the file stem minus generator tags (beach_sdxl.png -> "
                           "beach), or the parent folder")

    @property
    def fractions(self) -> tuple[float, ...]:
        """``split`` as (train, val, test) fractions; a ConfigError naming --split when they are not."""
        try:
            values = tuple(float(v) for v in self.split.split(","))
        except ValueError:
            raise ConfigError(f"must be three comma-separated numbers like 0.8,0.1,0.1, got {self.split!r}",
                              "split") from None
        if problem := fractions_problem(values):
            raise ConfigError(problem, "split")
        return values

    def validate(self) -> None:
        super().validate()
        for name in ("real", "fake"):
            if not getattr(self, name):
                raise ConfigError("give at least one folder (or s3:// prefix)", name)
        self.fractions  # parses, or names --split


LAYOUTS: dict[str, type[ManifestConfig]] = {c.layout: c for c in (GenImageConfig, CsvConfig, FoldersConfig)}


@dataclass
class ValidateConfig:
    """``spai validate``: which manifest, where the validated one goes, and the decompression-bomb limit."""

    manifest: str = option("", flag="MANIFEST", help="manifest path or s3:// URI")
    output: str | None = option(None, flag="--output", short="-o", help="where to write the validated manifest "
                                "(default: <manifest>.validated)")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, flag="--max-pixels", help="decompression-bomb limit in pixels "
                             "(16384 x 8192)")

    def validate(self) -> None:
        if not self.manifest:
            raise ConfigError("give the manifest to validate (a path or s3:// URI)", "manifest")
        if self.max_pixels < 1:
            raise ConfigError(f"must be a positive number of pixels, got {self.max_pixels}", "max_pixels")
