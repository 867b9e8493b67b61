"""`spai validate`: its flags, derived from the library's config, and the call into the library."""
from __future__ import annotations

import argparse

from pipelines.data.config import ValidateConfig
from spai_cli.options import add_config_options, config_from_args

DESCRIPTION = ("A Ray Data job that decodes every image of a manifest, records width, height, "
               "format, bytes and a content hash, writes rejects (missing, zero-byte, truncated, not an "
               "image, decompression bomb, unreadable) with their reason, and reports content duplicated "
               "across splits (leakage). The validated manifest keeps the job's _config.yaml: --config "
               "reruns it.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_options(p, ValidateConfig)


def run(args: argparse.Namespace) -> int:
    from pipelines.data.validate import run_validation

    run_validation(config_from_args(ValidateConfig, args))
    return 0
