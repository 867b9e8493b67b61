"""`spai manifest`: one subcommand per dataset layout, its flags derived from the layout's config."""
from __future__ import annotations

import argparse

from pipelines.data.config import LAYOUTS
from spai_cli.options import add_config_options, config_from_args

LAYOUT_HELP = {
    "genimage": "<root>/<generator>/{train,val}/{ai,nature} (all 8 generators)",
    "csv": "official SPAI CSV (image,class,split; extra columns kept)",
    "folders": "real and fake folders, searched recursively",
}

DESCRIPTION = ("Build one Parquet manifest (uri, label, split, generator, source, group) from a dataset "
               "layout on disk or under an s3:// prefix, and write a JSON sidecar with counts and the config "
               "(_config.yaml: --config reruns the build). Run `spai validate` on it next to find corrupt or duplicated "
               "images.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    kinds = p.add_subparsers(dest="layout", required=True, metavar="LAYOUT")
    for layout, cls in LAYOUTS.items():
        add_config_options(kinds.add_parser(layout, help=LAYOUT_HELP[layout]), cls,
                           config_help="config YAML, e.g. the _config.yaml of a manifest built before (flags and "
                           "KEY=VALUE overrides given beside it win)")


def run(args: argparse.Namespace) -> int:
    from pipelines.data.manifest import build_manifest

    build_manifest(config_from_args(LAYOUTS[args.layout], args))
    return 0
