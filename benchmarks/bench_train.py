"""Training throughput of ``spai train`` (Ray Train DDP) for 1 and 2 workers, on CPU and on GPU when there is one.

    python benchmarks/bench_train.py --manifest corpus/manifest [--epochs 2] [key=value ...]

Each setting is one real ``run_training`` call with its own throw-away SQLite MLflow store; the throughput is the
last epoch's ``train_images_per_s`` (the first epoch also pays for worker and Ray Data start-up). A sample is one
training image; each image gives ``augment.views`` views, so views/s = images/s x views. Scaling efficiency is
``throughput(n workers) / (n x throughput(1 worker))`` for the same device.

    python benchmarks/bench_train.py --manifest corpus/manifest --feeds [--epochs 3]

compares the two ways training data reach the workers (``data_feed``, issue #28), each run twice with the same seed,
each run in its own process with its own local Ray: ``worker`` (each rank streams its ``(seed, epoch)`` shard through
Ray Data) and ``trainer`` (one dataset given to ``TorchTrainer(datasets=)``, read with ``get_dataset_shard``). It
prints the mean epoch train time, the time from ``run_training`` to rank 0's first step (as its forwarded log line
arrives), the driver's peak RSS, the largest train worker's peak RSS, and whether the second run reproduced the
first one's per-epoch train loss and weights.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
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


def peak_rss_mb(pid: int) -> tuple[str, float] | None:
    """(command line, peak RSS in MB) of a live process, from /proc."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{pid}/status") as f:
            hwm = next(line for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return cmdline, int(hwm.split()[1]) / 1024


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (Ray's local cluster and its workers are children of the driver)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    found, todo = [], [root]
    while todo:
        found += (kids := children.get(todo.pop(), []))
        todo += kids
    return found


def watch_train_workers(peaks: dict[int, float], stop: threading.Event) -> None:
    """Keep the peak RSS of every Ray Train worker process seen until ``stop``."""
    while not stop.wait(0.5):
        for pid in descendants(os.getpid()):
            seen = peak_rss_mb(pid)
            if seen and "RayTrainWorker" in seen[0]:
                peaks[pid] = max(peaks.get(pid, 0.0), seen[1])


def one_run(manifest: str, feed: str, overrides: list[str], epochs: int) -> dict:
    """One 2-worker CPU run with ``data_feed=feed`` in this process; what :func:`feed_table` needs."""
    peaks: dict[int, float] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=watch_train_workers, args=(peaks, stop), daemon=True)
    watcher.start()
    with tempfile.TemporaryDirectory() as tmp:
        job = {"manifest": manifest, "output": tmp, "name": f"bench-{feed}", "workers": 2,
               "tracking.uri": f"sqlite:///{tmp}/db", "tracking.experiment": "bench-train"}
        cfg = load_config(TrainConfig, CONFIG_DIR / "tiny.yaml",
                          [*overrides, f"epochs={epochs}", "patience=null", f"data_feed={feed}", "progress_every_s=0"],
                          job)
        print("BENCH_START", flush=True)
        result = run_training(cfg)
        client = MlflowClient(result.tracking_uri)
        history = {name: sorted(client.get_metric_history(result.mlflow_run_id, name), key=lambda m: m.step)
                   for name in ("train_loss", "train_images", "train_images_per_s")}
        with open(result.last_checkpoint, "rb") as f:
            weights = hashlib.sha256(f.read()).hexdigest()
    stop.set()
    watcher.join()
    epoch_s = [n.value / r.value for n, r in zip(history["train_images"], history["train_images_per_s"])]
    return {"epoch_s": epoch_s, "loss": [m.value for m in history["train_loss"]], "weights": weights,
            "driver_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_rss_mb": max(peaks.values(), default=float("nan"))}


def run_child(manifest: str, feed: str, overrides: list[str], epochs: int) -> dict:
    """:func:`one_run` in a fresh process (its own peak RSS and local Ray), timing rank 0's first step line."""
    command = [sys.executable, __file__, "--manifest", manifest, "--epochs", str(epochs), "--one", feed, *overrides]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = first_step = None
    lines = []
    for line in child.stdout:
        lines.append(line)
        if line.startswith("BENCH_START"):
            started = time.time()
        elif first_step is None and started and re.search(r"epoch 0 step 1/", line):
            first_step = time.time() - started
    if child.wait():
        raise RuntimeError(f"data_feed={feed} run failed:\n{''.join(lines[-30:])}")
    result = next(line for line in reversed(lines) if line.startswith("BENCH_RESULT "))
    return {**json.loads(result.split(" ", 1)[1]), "first_step_s": first_step}


def feed_table(manifest: str, overrides: list[str], epochs: int) -> str:
    """Both data feeds, twice each (the second run checks reproducibility), as one table."""
    lines = [f"{'data_feed':<9} {'epoch s':>8} {'1st step s':>10} {'driver MB':>9} {'worker MB':>9} "
             f"{'same loss':>9} {'same weights':>12}  loss per epoch (run 1 | run 2)"]
    for feed in ("worker", "trainer"):
        first, second = (run_child(manifest, feed, overrides, epochs) for _ in range(2))
        steady = [s for run in (first, second) for s in run["epoch_s"][1:]] or first["epoch_s"]
        lines.append(
            f"{feed:<9} {sum(steady) / len(steady):>8.2f} {(first['first_step_s'] + second['first_step_s']) / 2:>10.1f} "
            f"{max(first['driver_rss_mb'], second['driver_rss_mb']):>9.0f} "
            f"{max(first['worker_rss_mb'], second['worker_rss_mb']):>9.0f} "
            f"{str(first['loss'] == second['loss']):>9} {str(first['weights'] == second['weights']):>12}  "
            f"{' '.join(f'{x:.4f}' for x in first['loss'])} | {' '.join(f'{x:.4f}' for x in second['loss'])}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="manifest with train and val rows (e.g. spai demo-data)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per setting; the last one is measured")
    parser.add_argument("--feeds", action="store_true", help="compare the data feeds (worker, trainer) instead")
    parser.add_argument("--one", choices=["worker", "trainer"], help=argparse.SUPPRESS)  # one --feeds run, internal
    parser.add_argument("overrides", nargs="*", help="key=value overrides of configs/tiny.yaml")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a fresh local cluster per run; token auth gets in the way
    if args.one:
        print("BENCH_RESULT", json.dumps(one_run(args.manifest, args.one, args.overrides, args.epochs)), flush=True)
    elif args.feeds:
        print(feed_table(args.manifest, args.overrides, args.epochs))
    else:
        print(table(measure(args.manifest, args.overrides, args.epochs)))


if __name__ == "__main__":
    main()
