"""`spai train`: its flags, and the call into the library."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train or fine-tune SPAI with Ray Train (DDP), tracked in MLflow",
                       description="Train SPAI on a manifest with Ray Train. The YAML config holds the recipe "
                       "(configs/spai.yaml is the official one, configs/tiny.yaml a CPU-sized one); key=value "
                       "overrides change any field, e.g. optim.lr=1e-4 model.mask_radius=24.")
    p.add_argument("--config", "-c", default=None, help="training config YAML (default: the official recipe)")
    p.add_argument("--manifest", "-m", required=True, help="manifest path or s3:// URI with train and val rows")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (DDP ranks; default: the config's "
                   "`workers`, 1 in the official recipe)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker (0 = CPU, gloo; default: the "
                   "config's `gpus_per_worker`)")
    p.add_argument("--output", "-o", default=None, help="run directory or s3:// URI (default: runs/)")
    p.add_argument("--name", default=None, help="run name (default: generated)")
    p.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns; "
                   "a --resume continues in the store the run started in)")
    p.add_argument("--experiment", default="spai-train", help="MLflow experiment name (default: spai-train)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run with this --name/--output")
    p.add_argument("--init", default=None, help="start from weights: official spai.pth or our checkpoint")
    p.add_argument("--backbone", default=None, help="MFM ViT-B/16 backbone weights (mfm_pretrain_vit_base.pth)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return p


def run(args: argparse.Namespace) -> int:
    from pipelines.train.job import main

    return int(main(args) or 0)
