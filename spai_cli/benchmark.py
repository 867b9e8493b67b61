"""`spai benchmark`: benchmarks whose models are `spai train` runs; one subcommand per benchmark, each with its flags
derived from its config, and the call into the library."""
from __future__ import annotations

import argparse
import logging
import time

from spai_cli.common import Parser
from spai_cli.options import CONFIG_DEST, add_config_options, trials_config

logger = logging.getLogger(__name__)

DESCRIPTION = ("Benchmarks of the detector that train several models as parallel Ray Tune trials (each a real "
               "`spai train` run, tracked in MLflow under one parent run) and compare them.")
CROSS_GENERATOR = (
    "GenImage's cross-generator benchmark (its Table 4): one model per training generator (its AI-generated images "
    "with every real image of the train and val splits), or with --leave-one-out one per generator left out, each "
    "tested on every generator of the test split. Writes the matrix of AUC and accuracy, with row and column "
    "means, as <output>/<name>/auc.csv and accuracy.csv, cross_generator.md and a heat map cross_generator.png. "
    "--config takes the training config of every model (default: the official recipe) or a benchmark's saved "
    "<output>/<name>/config.yaml, which reruns it; KEY=VALUE overrides the training config (e.g. epochs=5).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tune.benchmark.config import CrossGeneratorConfig

    sub = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK", parser_class=Parser)
    cross = sub.add_parser("cross-generator", help="train one model per generator, test each on every generator",
                           description=CROSS_GENERATOR)
    add_config_options(cross, CrossGeneratorConfig, config_help="training config YAML of every model (default: the "
                       "official recipe), or a benchmark's saved config.yaml")
    cross.add_argument("--resume", action="store_true", help="resume an interrupted benchmark (its --name) without "
                       "re-running finished models")


def run(args: argparse.Namespace) -> int:
    from pipelines.infra import tracking
    from tune.benchmark.config import CrossGeneratorConfig
    from tune.benchmark.cross_generator import resume_benchmark, run_benchmark
    from tune.config import trial_layers

    started = time.monotonic()
    cfg = trials_config(CrossGeneratorConfig, args, lambda: trial_layers(getattr(args, CONFIG_DEST)), "benchmark")
    result = (resume_benchmark if args.resume else run_benchmark)(cfg)
    matrix = result.matrix
    logger.info(f"[spai benchmark] AUC (bold: seen in training):\n{matrix.markdown_table('auc')}")
    logger.info(f"[spai benchmark] AUC mean over seen cells {matrix.mean('auc', True):.4f}, over unseen cells "
                f"{matrix.mean('auc', False):.4f}; {time.monotonic() - started:.0f} s")
    logger.info("[spai benchmark] " + "\n[spai benchmark] ".join([*matrix.notes, *result.files]))
    if result.tracking_uri:
        logger.info(tracking.ui_hint(result.tracking_uri))
    return 0
