"""Training throughput of ``spai train`` (Ray Train DDP) for 1 and 2 workers, on CPU and on GPU when there is one.

    python benchmarks/bench_train.py --manifest corpus/manifest [--epochs 2] [key=value ...]

Each setting is one real ``run_training`` call with its own throw-away SQLite MLflow store; the throughput is the
last epoch's ``train_images_per_s`` (the first epoch also pays for worker and Ray Data start-up). A sample is one
training image; each image gives ``augment.views`` views, so views/s = images/s x views. Scaling efficiency is
``throughput(n workers) / (n x throughput(1 worker))`` for the same device.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass

import torch
from mlflow.tracking import MlflowClient

from pipelines.train.config import CONFIG_DIR, TrainConfig
from pipelines.train.run import run_training
from spai_core.config import load_config


@dataclass
class Measurement:
    device: str
    workers: int
    images_per_s: float
    views_per_s: float
    efficiency: float


def throughput(manifest: str, workers: int, gpus_per_worker: float, overrides: list[str], epochs: int) -> float:
    """Last-epoch training images/s of one run."""
    with tempfile.TemporaryDirectory() as tmp:
        job = {"manifest": manifest, "output": tmp, "name": f"bench-{workers}", "workers": workers,
               "gpus_per_worker": gpus_per_worker, "tracking.uri": f"sqlite:///{tmp}/db",
               "tracking.experiment": "bench-train"}
        cfg = load_config(TrainConfig, CONFIG_DIR / "tiny.yaml", [*overrides, f"epochs={epochs}", "patience=null"], job)
        result = run_training(cfg)
        history = MlflowClient(result.tracking_uri).get_metric_history(result.mlflow_run_id, "train_images_per_s")
    return max(history, key=lambda m: m.step).value


def measure(manifest: str, overrides: list[str], epochs: int) -> list[Measurement]:
    views = load_config(TrainConfig, CONFIG_DIR / "tiny.yaml", overrides).augment.views
    devices = [("cpu", 0.0)] + ([("cuda", 1.0)] if torch.cuda.is_available() else [])
    rows = []
    for device, gpus in devices:
        counts = [2, 1] if device == "cpu" or torch.cuda.device_count() >= 2 else [1]
        # Most workers first: the local Ray started by the first run sizes its CPU slots for that run's workers.
        rates = {workers: throughput(manifest, workers, gpus, overrides, epochs) for workers in counts}
        rows += [Measurement(device, n, rates[n], rates[n] * views, rates[n] / (n * rates[1])) for n in sorted(rates)]
    return rows


def table(rows: list[Measurement]) -> str:
    lines = [f"{'device':<6} {'workers':>7} {'images/s':>9} {'views/s':>8} {'efficiency':>10}"]
    lines += [f"{r.device:<6} {r.workers:>7} {r.images_per_s:>9.2f} {r.views_per_s:>8.2f} {r.efficiency:>10.0%}"
              for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="manifest with train and val rows (e.g. spai demo-data)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per setting; the last one is measured")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of configs/tiny.yaml")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a fresh local cluster per run; token auth gets in the way
    print(table(measure(args.manifest, args.overrides, args.epochs)))


if __name__ == "__main__":
    main()
