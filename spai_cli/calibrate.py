"""`spai calibrate`: its flags (derived from the calibration config), and the call into the library."""
from __future__ import annotations

import argparse
import logging

from spai_cli.options import add_config_options, config_from_args

logger = logging.getLogger(__name__)

DESCRIPTION = ("Chooses a decision threshold on a calibration split (e.g. val) for a target "
               "false-positive rate on real images (--target-fpr 0.05) or the best balanced accuracy "
               "(--balanced), from the table `spai score` wrote for those images with these very weights, "
               "and stores it in the checkpoint's metadata (--output for a new file, else in place). "
               "`spai score` with the calibrated weights then adds threshold and predicted columns. The "
               "config is saved as <weights>.calibrate.yaml: --config of that file calibrates again.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipelines.calibrate.config import CalibrateConfig

    add_config_options(p, CalibrateConfig, config_help="calibration config YAML, e.g. the <weights>.calibrate.yaml "
                       "of an earlier calibration (flags and KEY=VALUE overrides given beside it win)")


def run(args: argparse.Namespace) -> int:
    from pipelines.calibrate.config import CalibrateConfig
    from pipelines.calibrate.job import calibrate

    logger.info(calibrate(config_from_args(CalibrateConfig, args)).summary())
    return 0
