"""`spai demo`: its flags, derived from the demo's config, and the call into the library."""
from __future__ import annotations

import argparse

from pipelines.demo.config import DemoConfig
from spai_cli.options import add_config_options, config_from_args

DESCRIPTION = ("Builds (or reuses) the offline demo corpus from committed photos and CPU "
               "generators, trains the tiny config with Ray Train, scores the held-out set with Ray Data "
               "and prints a per-generator table with a ROC report. Its config is saved as "
               "<output>/config.yaml (--config reruns it).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_options(p, DemoConfig)


def run(args: argparse.Namespace) -> int:
    from pipelines.demo.run import run_demo

    run_demo(config_from_args(DemoConfig, args))
    return 0
