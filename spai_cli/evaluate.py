"""`spai evaluate`: its flags (derived from the evaluation config), and the call into the library."""
from __future__ import annotations

import argparse
import logging

from spai_cli.options import add_config_options, config_from_args

logger = logging.getLogger(__name__)

DESCRIPTION = ("Metrics per generator from score tables: AUC and AP with seeded bootstrap 95% intervals, EER, TPR at "
               "1%/5% FPR, accuracy and balanced accuracy at --threshold (and at the checkpoint's calibrated "
               "threshold when the weights carried one), accuracy at the oracle threshold, log-loss and ECE. "
               "--protocol paired (the SPAI paper's: each generator's fakes against each real source apart, then "
               "the mean over sources; the default with two or more real sources) or pooled (against all reals). "
               "Tables of `spai score --perturb` give one run per setting, a table per metric with a column per "
               "setting and plots against strength. The report folder holds metrics.csv, metrics.md, a "
               "self-contained report.html and the plots, and keeps the config as config.yaml: --config of that "
               "file makes the same report again.")


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
