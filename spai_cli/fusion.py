"""`spai fusion`: Sem-SPAI, a fusion head on frozen SPAI and a frozen semantic encoder. `extract` writes both models'
features of every image to a Parquet table (Ray Data); `train` trains the head on it (Ray Train, MLflow) into one
fused checkpoint that `spai score --weights` runs end to end."""
from __future__ import annotations

import argparse
import logging

from spai_cli.common import Parser
from spai_cli.options import add_config_options, config_from_args

logger = logging.getLogger(__name__)

DESCRIPTION = ("Sem-SPAI (semantic late fusion, or logit fusion): `spai fusion extract MANIFEST -w spai.safetensors "
               "-o FEATURES semantic.encoder=clip_vit_b16 semantic.weights=clip.safetensors` extracts SPAI's "
               "spectral feature and logit (native resolution) and the semantic feature (224 px) of every image "
               "once, resumable; `spai fusion train FEATURES head.kind=late|logit` trains the head on the table's "
               "train split, picks the epoch by val AUC and writes <output>/<name>/best.safetensors, a fused "
               "detector for spai score / spai evaluate. Both save their config (config.yaml) for --config.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipelines.features.config import FeaturesConfig
    from pipelines.fusion.config import FusionTrainConfig

    sub = p.add_subparsers(dest="fusion_command", required=True, metavar="STEP", parser_class=Parser)
    extract = sub.add_parser("extract", help="features of every manifest row into a Parquet table (Ray Data)",
                             description="Extract the frozen models' features once per image into "
                             "FEATURES/features.parquet, keyed by row id with the manifest's label, generator and "
                             "split; re-run the same command to continue an interrupted job. Images that fail are "
                             "rows with their error. Semantic encoder: semantic.encoder=NAME (a registry backbone "
                             "or timm:<model>), semantic.weights=FILE (default: random init, for tests only).")
    add_config_options(extract, FeaturesConfig, config_help="extraction config YAML, e.g. FEATURES/config.yaml")
    train = sub.add_parser("train", help="train a fusion head on a feature table (Ray Train, MLflow)",
                           description="Train the fusion head (head.kind=late: the Sem-SPAI seed's projection, "
                           "fusion and residual classifier; head.kind=logit: a learned combination of SPAI's and a "
                           "semantic probe's logits) on FEATURES' train split, early-stopped on val AUC, and write "
                           "<output>/<name>/best.safetensors with both frozen models embedded.")
    add_config_options(train, FusionTrainConfig, config_help="head training config YAML (default: configs/"
                       "fusion.yaml; configs/fusion_logit.yaml for logit fusion), e.g. a run's saved config.yaml")


def run(args: argparse.Namespace) -> int:
    if args.fusion_command == "extract":
        return _extract(args)
    return _train(args)


def _extract(args: argparse.Namespace) -> int:
    from pipelines.features.config import FeaturesConfig
    from pipelines.features.job import run_extraction

    result = run_extraction(config_from_args(FeaturesConfig, args))
    logger.info(f"[spai fusion] {result.table}: {result.rows} row(s), {result.failed} without features (their "
                "error column says why)")
    return 1 if result.rows and result.failed == result.rows else 0


def _train(args: argparse.Namespace) -> int:
    from pipelines.fusion.config import FUSION_RECIPE, FusionTrainConfig
    from pipelines.fusion.run import run_fusion
    from pipelines.infra import tracking

    result = run_fusion(config_from_args(FusionTrainConfig, args, base=FUSION_RECIPE))
    if result.best_checkpoint:
        logger.info(f"[spai fusion] fused detector (epoch {int(result.best_metrics['epoch'])}, val AUC "
                    f"{result.best_metrics.get('val_auc', float('nan')):.4f}): {result.best_checkpoint}")
    if result.tracking_uri:
        logger.info(tracking.ui_hint(result.tracking_uri))
    return 0 if result.best_checkpoint else 1
