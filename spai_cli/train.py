"""`spai train`: its flags (derived from the training config), and the call into the library."""
from __future__ import annotations

import argparse
import logging

from spai_cli.options import add_config_options, config_from_args, flag_values

logger = logging.getLogger(__name__)

DESCRIPTION = ("Train SPAI on a manifest with Ray Train. The YAML config holds the recipe "
               "(configs/spai.yaml is the official one, configs/tiny.yaml a CPU-sized one); key=value "
               "overrides change any field, e.g. optim.lr=1e-4 model.mask_radius=24. Every run saves its "
               "config as <output>/<name>/config.yaml: --config of that file reruns the job.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipelines.train.config import TrainConfig

    add_config_options(p, TrainConfig, config_help="training config YAML, e.g. a run's saved config.yaml (default: "
                       "the official recipe; with --resume, the run's own config)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run with this --name/--output "
                   "(from its last checkpoint, in the MLflow store it started in unless --mlflow-uri says otherwise)")


def run(args: argparse.Namespace) -> int:
    from pipelines.train.config import OFFICIAL_RECIPE, TrainConfig
    from pipelines.train.run import run_training, saved_config
    from pipelines.infra import tracking
    from spai_core.config import ConfigError

    base = OFFICIAL_RECIPE
    if args.resume:
        flags = flag_values(args)
        if not flags.get("name"):
            raise ConfigError("--resume needs the --name of the run to continue (its folder under --output)")
        base = saved_config(flags.get("output", TrainConfig().output), flags["name"])
    result = run_training(config_from_args(TrainConfig, args, base=base), resume=args.resume)
    logger.info(f"[spai train] run directory: {result.run_dir}")
    if result.best_checkpoint:
        logger.info(f"[spai train] best checkpoint (epoch {int(result.best_metrics['epoch'])}, val AUC "
                    f"{result.best_metrics.get('val_auc', float('nan')):.4f}): {result.best_checkpoint}")
    if result.last_checkpoint:
        logger.info(f"[spai train] last epoch's weights: {result.last_checkpoint}")
    if result.tracking_uri:
        logger.info(tracking.ui_hint(result.tracking_uri))
    return 0
