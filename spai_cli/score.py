"""`spai score`: its flags (derived from the scoring config), and the call into the library."""
from __future__ import annotations

import argparse
import logging

from spai_cli.options import add_config_options, config_from_args

logger = logging.getLogger(__name__)

DESCRIPTION = ("Batch scoring: read -> decode on CPU workers -> score on an actor pool -> "
               "write, streaming and resumable (re-run the same command to continue). Rows that fail keep "
               "their reason in the output; the exit status is 1 when none could be scored. Every job saves "
               "its config as <output>.config.yaml: --config of that file reruns it.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipelines.score.config import ScoreConfig

    add_config_options(p, ScoreConfig, config_help="scoring config YAML, e.g. the <output>.config.yaml of an "
                       "earlier job (flags and KEY=VALUE overrides given beside it win)")


def run(args: argparse.Namespace) -> int:
    from pipelines.infra import tracking
    from pipelines.score.config import ScoreConfig
    from pipelines.score.job import score

    cfg = config_from_args(ScoreConfig, args)
    result = score(cfg)
    logger.info(result.summary())
    if result.run_id:
        logger.info(f"tracked as MLflow run {result.run_id} (experiment {cfg.tracking.experiment})")
        logger.info(tracking.ui_hint(result.tracking_uri))
    return 1 if result.all_failed else 0
