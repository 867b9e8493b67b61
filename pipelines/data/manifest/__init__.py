"""Manifests: one Parquet table of images (uri, label, split, generator, source, group) from any dataset layout.

Every job (validate, train, tune, score, evaluate) reads a manifest, never a folder layout, so layouts are handled
once here: GenImage (all eight generator folders, and subsets such as the ``mini_gen`` fork), official SPAI CSVs,
and plain real/fake folders. Each builder works on local folders and ``s3://`` prefixes alike.

On storage a manifest is a directory: one Parquet file per split and generator under ``<split>/`` (so Ray Data reads
it in parallel and a job that needs one split reads only its files), plus ``_manifest.json`` with the schema version,
row counts, the file list and how it was built, and ``_config.yaml``, the config of the command that built it. The
folder is also a plain Parquet dataset: pyarrow, pandas, Spark and DuckDB read it directly, skipping the sidecar by
its leading underscore.

``group`` is what must never straddle splits (a source photo, a prompt, an ImageNet class): every builder that
assigns splits does it per group, seeded, so the same inputs and seed give the same splits.

Modules: :mod:`.schema` (columns, typing, checks, summaries, the split filter), :mod:`.io` (reading and writing),
:mod:`.splits` (split assignment and groups), :mod:`.layouts` (the dataset layouts), :mod:`.inputs` (what a scoring
job points at) and :mod:`.build` (the ``spai manifest`` build; its configs are in :mod:`pipelines.data.config`).
"""
from .build import build_manifest
from .inputs import resolve_input
from .io import (CONFIG_FILE, LEGACY_SIDECAR, ROWS_PER_FILE, SCHEMA_VERSION, SIDECAR, check_output, manifest_files,
                 parquet_bytes, read_manifest, read_sidecar, sidecar_uri, table_from_parquet, write_manifest)
from .layouts import (IMAGE_SUFFIXES, from_folders, from_genimage, from_spai_csv, genimage_generator, genimage_group,
                      parse_fakes)
from .schema import (CORE_COLUMNS, MANIFEST_SCHEMA, NOTES_KEY, REAL, SPLITS, ManifestError, check_values, conform,
                     count_summary, format_summary, present_splits, rows_to_table, split_rows)
from .splits import assign_splits, check_fractions, file_stem, stem_group

__all__ = [
    "CONFIG_FILE", "CORE_COLUMNS", "IMAGE_SUFFIXES", "LEGACY_SIDECAR", "MANIFEST_SCHEMA", "NOTES_KEY", "REAL",
    "ROWS_PER_FILE", "SCHEMA_VERSION", "SIDECAR", "SPLITS", "ManifestError", "assign_splits", "build_manifest",
    "check_fractions", "check_output", "check_values", "conform", "count_summary", "file_stem", "format_summary",
    "from_folders", "from_genimage", "from_spai_csv", "genimage_generator", "genimage_group", "manifest_files",
    "parquet_bytes", "parse_fakes", "present_splits", "read_manifest", "read_sidecar", "resolve_input",
    "rows_to_table", "sidecar_uri", "split_rows", "stem_group", "table_from_parquet", "write_manifest",
]
