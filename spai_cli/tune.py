"""`spai tune`: its flags, and the call into the library."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("tune", help="search hyperparameters with Ray Tune + ASHA; every trial is a real train run",
                       description="Hyperparameter search over the training config with Ray Tune and ASHA. "
                       "configs/search_space.yaml is the default space (lr, mask radius, weight decay and batch "
                       "size; epochs are ASHA's max_t).")
    p.add_argument("--config", "-c", default=None, help="base training config YAML")
    p.add_argument("--manifest", "-m", required=True, help="manifest path or s3:// URI with train and val rows")
    p.add_argument("--space", default=None, help="search space YAML (default: configs/search_space.yaml)")
    p.add_argument("--trials", type=int, default=8, help="number of trials to sample (default: 8)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials running at once (default: as many as the cluster's CPUs/GPUs hold)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial, split over its workers "
                   "(default: 0, CPU)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers (DDP ranks) per trial "
                   "(default: 1)")
    p.add_argument("--output", "-o", default=None, help="search directory or s3:// URI (default: runs/tune)")
    p.add_argument("--name", default=None, help="search name, its folder under --output (default: generated)")
    p.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    p.add_argument("--experiment", default="spai-tune", help="MLflow experiment name (default: spai-tune)")
    p.add_argument("--init", default=None, help="every trial starts from these weights: official spai.pth or our "
                   "checkpoint")
    p.add_argument("--backbone", default=None, help="MFM ViT-B/16 backbone weights (mfm_pretrain_vit_base.pth) of "
                   "every trial; the official recipe needs them")
    p.add_argument("--resume", action="store_true", help="resume an interrupted search without re-running trials")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the base training config")
    return p


def run(args: argparse.Namespace) -> int:
    from tune.search import main

    return int(main(args) or 0)
