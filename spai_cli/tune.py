"""`spai tune`: its flags (derived from the search config), and the call into the library."""
from __future__ import annotations

import argparse
import logging

from spai_cli.options import CONFIG_DEST, add_config_options, trials_config

logger = logging.getLogger(__name__)

DESCRIPTION = ("Hyperparameter search over the training config with Ray Tune and ASHA. "
               "configs/search_space.yaml is the default space (lr, mask radius, weight decay and batch "
               "size; epochs are ASHA's max_t). Every search saves its config as <output>/<name>/config.yaml: "
               "--config of that file reruns the search. A `spai fusion train` recipe as --config (with --features) "
               "searches a Sem-SPAI head instead, over configs/fusion_search_space.yaml.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tune.config import TuneConfig

    add_config_options(p, TuneConfig, config_help="base training config YAML of every trial (default: the official "
                       "recipe), a fusion head recipe (configs/fusion.yaml), or a search's saved config.yaml")
    p.add_argument("--space", default=None, help="search space YAML (default: configs/search_space.yaml, or "
                   "configs/fusion_search_space.yaml for a fusion recipe)")
    p.add_argument("--resume", action="store_true", help="resume an interrupted search (its --name) without "
                   "re-running finished trials")
    # KEY=VALUE (added above) are overrides of the trials' base config, e.g. optim.warmup_epochs=1


def run(args: argparse.Namespace) -> int:
    from pipelines.infra import tracking
    from tune.config import TuneConfig, search_layers
    from tune.search import resume_search, run_search

    cfg = trials_config(TuneConfig, args, lambda: search_layers(getattr(args, CONFIG_DEST), args.space), "search")
    result = (resume_search if args.resume else run_search)(cfg)
    logger.info(f"[spai tune] search directory: {result.search_dir}")
    if result.best:
        logger.info(f"[spai tune] best trial {result.best.trial_id}: {result.best.best_value:.4f} at epoch "
                    f"{result.best.best_epoch} with {result.best.params}")
        logger.info(f"[spai tune] best config: {result.best_config}\n[spai tune] best checkpoint: "
                    f"{result.best_checkpoint}")
    if result.tracking_uri:
        logger.info(tracking.ui_hint(result.tracking_uri))
    return 0
