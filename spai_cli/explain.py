"""`spai explain`: its flags (derived from the explain config), and the call into the library."""
from __future__ import annotations

import argparse

from spai_cli.options import add_config_options, config_from_args

DESCRIPTION = ("Score images one by one and draw, for each, where the score comes from: the attention the model's "
               "pooling gives each 224-px tile, as a colour map on the image with the tile grid and each tile's "
               "weight (the weights sum to 1). Writes DIR/overlays/*.png, DIR/explain.csv and DIR/index.md (the "
               "images ranked by score with their overlays). Unreadable images are rows with their error; the exit "
               "status is 1 when none could be explained.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipelines.explain.job import ExplainConfig

    add_config_options(p, ExplainConfig, overrides=False)


def run(args: argparse.Namespace) -> int:
    from pipelines.explain.job import ExplainConfig, explain

    rows = explain(config_from_args(ExplainConfig, args))
    return 0 if any(not r["error"] for r in rows) else 1
