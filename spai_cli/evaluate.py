"""`spai evaluate`: its flags (derived from the evaluation config), and the call into the library."""
from __future__ import annotations

import argparse
import logging

from spai_cli.options import add_config_options, config_from_args

logger = logging.getLogger(__name__)

DESCRIPTION = ("AUC, AP, accuracy, TPR at 1%/5% FPR and ECE per generator, each fake "
               "generator paired with all real rows; writes a table and ROC plots. The report folder keeps "
               "the config as config.yaml: --config of that file makes the same report again.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipelines.evaluate.config import EvaluateConfig

    # No KEY=VALUE overrides: they would be taken for score tables; every field has its flag.
    add_config_options(p, EvaluateConfig, overrides=False, config_help="evaluation config YAML, e.g. the "
                       "config.yaml of an earlier report folder (flags given beside it win)")


def run(args: argparse.Namespace) -> int:
    from pipelines.evaluate.config import EvaluateConfig
    from pipelines.evaluate.job import run_evaluation

    cfg = config_from_args(EvaluateConfig, args)
    result = run_evaluation(cfg)
    logger.info(result.report.markdown())
    if cfg.output:
        logger.info(f"wrote {len(result.written)} report file(s) to {cfg.output}")
    if result.run_id:
        logger.info(f"logged to MLflow run {result.run_id}")
    return 0
