"""``spai manifest LAYOUT``: the build that lists, splits and writes a manifest for a layout's config.

Each config is the whole job: ``spai manifest LAYOUT --config <manifest>/_config.yaml`` (the copy every build saves
beside its sidecar) rebuilds the same manifest.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import pyarrow as pa

from pipelines.data.config import CsvConfig, FoldersConfig, GenImageConfig, ManifestConfig
from pipelines.infra.storage import StorageOptions
from spai_core.config import dump_config, to_dict

from .io import check_output, write_manifest
from .layouts import from_folders, from_genimage, from_spai_csv, parse_fakes
from .schema import format_summary

logger = logging.getLogger(__name__)

_ROWS: dict[type[ManifestConfig], Callable[..., pa.Table]] = {
    GenImageConfig: lambda c, options: from_genimage(c.root, c.generators, c.val_fraction, c.seed, options, c.source),
    CsvConfig: lambda c, options: from_spai_csv(c.csv, c.root, c.generator, options, c.source),
    FoldersConfig: lambda c, options: from_folders(c.real, parse_fakes(c.fake), c.balance, c.fractions, c.seed,
                                                   options, c.source, c.group_by),
}


def build_manifest(cfg: ManifestConfig, options: StorageOptions | None = None) -> tuple[pa.Table, str]:
    """List, split and write the manifest ``cfg`` asks for (its config saved beside it); return the table and URI."""
    options = options or StorageOptions.from_env()
    check_output(cfg.output, cfg.overwrite, options)  # before listing, which can take minutes on S3
    table = _ROWS[type(cfg)](cfg, options)
    uri = write_manifest(table, cfg.output, {"builder": cfg.layout, "config": to_dict(cfg)}, options,
                         overwrite=cfg.overwrite, config_yaml=dump_config(cfg))
    logger.info("wrote %d rows to %s\n%s", table.num_rows, uri, format_summary(table, cfg.splits_by_group))
    logger.info("next: spai validate %s", uri)
    return table, uri
