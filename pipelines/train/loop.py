"""The Ray Train side of a run: each worker restores, then per epoch trains on its shard, validates its share of the
val split, and reports (rank 0 with the checkpoint and the console lines).

Each worker streams its own shard of the manifest through the Ray Data image pipeline every epoch: the manifest is
shuffled with ``(seed, epoch)``, dealt round-robin to the ranks and cut to equal length (DDP needs every rank to
take the same number of steps), then decoded and augmented by Ray Data tasks with per-row generators seeded by
``(seed + epoch, uri)``. So augmentations differ per epoch, are reproducible, and a run resumed at epoch k sees the
same data order and views as an uninterrupted run (weights may differ in the last bits: dropout and float reduction
order are not replayed).

Handing the split to ``TorchTrainer(datasets=)`` instead was built and measured (issue #28, commit 63fd38a): 21%
slower epochs and 35% later first step on the tiny model, same driver memory; and by design it cannot replay an epoch
on resume (Ray reseeds its shuffle by an execution count that restarts at 0) nor vary augmentations per epoch.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipelines.data.manifest import CORE_COLUMNS, read_manifest, split_rows
from pipelines.data.transforms import ScoreTransformConfig, make_score_transform, make_train_transform
from pipelines.infra import storage, tracking
from pipelines.infra.console import log_to_console
from pipelines.train import files
from pipelines.train.config import TrainConfig
from pipelines.train.data import epoch_shard, first_failure, iter_image_batches, to_image_tensors, to_views_tensor
from pipelines.train.epochs import epoch_line, epoch_metrics, no_training_data_message, progress_line, track_best
from pipelines.train.model import autocast_dtype, configure_finetune, export_model, initial_model, lr_at, make_optimizer
from spai_core.checkpoint import save_checkpoint
from spai_core.config import from_dict, to_dict
from spai_core.spai import SPAI

logger = logging.getLogger(__name__)


@dataclass
class LoopInputs:
    """What the driver hands every worker (Ray Train's ``train_loop_config``)."""

    config: dict[str, Any]  # the TrainConfig, as a dict
    storage: dict[str, Any]  # StorageOptions, as a dict
    mlflow_run_id: str | None  # None: the run is not tracked
    tracking_uri: str | None
    data_error_uri: str  # where rank 0 says why an epoch had nothing to train on


@dataclass
class EpochState:
    """What a checkpoint restores besides the weights: where the run is and how early stopping stands."""

    epoch: int = 0  # the next epoch to train
    best_auc: float = float("nan")  # NaN until an epoch has a val AUC; MLflow skips NaN
    stale: int = 0


def train_loop(loop: dict[str, Any]) -> None:
    """Ray Train worker entry point."""
    log_to_console()  # rank 0's lines reach the driver through this worker's stdout
    WorkerRun(LoopInputs(**loop)).run()


class WorkerRun:
    """One rank's share of a run: its model (DDP-wrapped), optimizer, data and schedule."""

    def __init__(self, inputs: LoopInputs):
        import ray.train
        import ray.train.torch

        self.inputs = inputs
        self.cfg = cfg = from_dict(TrainConfig, inputs.config)
        self.options = storage.StorageOptions(**inputs.storage)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.manual_seed(cfg.seed + self.rank)
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        model = initial_model(cfg)
        self.counts = configure_finetune(model, cfg)
        self.optimizer = make_optimizer(model, cfg.optim)
        self.state = self._restore(model)
        with warnings.catch_warnings():  # torch 2.13 deprecates it for an argument that torch >= 2.4 (ours) may lack
            warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
            self.model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})
        self.core: SPAI = self.model.module if hasattr(self.model, "module") else self.model
        self.dtype = autocast_dtype(cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

        manifest = read_manifest(cfg.manifest, self.options).select(list(CORE_COLUMNS))  # extras may clash
        self.train_rows, self.val_rows = split_rows(manifest, "train"), split_rows(manifest, "val")
        self.steps_per_epoch = max(1, (self.train_rows.num_rows // self.world) // cfg.per_worker_batch)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = int(cfg.optim.warmup_epochs * self.steps_per_epoch)
        self.train_transform = make_train_transform(cfg.augment)
        self.val_transform = make_score_transform(ScoreTransformConfig(resize_to=cfg.val_resize_to))

    def _restore(self, model: SPAI) -> EpochState:
        """Weights, optimizer and epoch state of the last checkpoint (a restarted worker group, or a resume)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return EpochState()
        with checkpoint.as_directory() as directory:
            saved = torch.load(os.path.join(directory, files.TRAIN_STATE), map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        return EpochState(saved["epoch"] + 1, saved["best_auc"], saved["stale"])

    def run(self) -> None:
        self._log_header()
        for epoch in range(self.state.epoch, self.cfg.epochs):
            local, train_time = self.train_epoch(epoch)
            local["val"] = self.validate()
            metrics = epoch_metrics(self._gather(local), epoch, train_time, self.optimizer.param_groups[0]["lr"])
            self.state = EpochState(epoch + 1, *track_best(metrics["val_auc"], self.state.best_auc, self.state.stale))
            metrics.update(best_val_auc=self.state.best_auc, stale_epochs=self.state.stale, **self.counts)
            stop = self.cfg.patience is not None and self.state.stale > self.cfg.patience
            self._log_metrics(metrics)
            if metrics["train_images"] == 0:  # nothing to learn from: no checkpoint, and the driver fails the run
                self._no_training_data(metrics)
                return
            self._report(metrics)
            if self.rank == 0:
                logger.info(epoch_line(metrics, stop))
            if stop:
                return

    def _log_header(self) -> None:
        if self.rank != 0:
            return
        cfg, rows = self.cfg, self.train_rows.num_rows
        per_epoch = self.steps_per_epoch * cfg.batch_size
        left_out = (f" of {per_epoch} images (full batches; the other {rows - per_epoch} change every epoch)"
                    if per_epoch < rows else "")
        logger.info(f"[spai train] {rows} train / {self.val_rows.num_rows} val images, {self.world} worker(s), "
                    f"{self.steps_per_epoch} steps/epoch{left_out}, trainable params "
                    f"{self.counts['params_trainable']:,}")

    def train_epoch(self, epoch: int) -> tuple[dict[str, Any], float]:
        """One pass over this rank's shard: its sums for :func:`epoch_metrics`, and the seconds it took."""
        cfg = self.cfg
        self.model.train()
        started = last_progress = time.time()
        local = {"seen": 0, "loss": 0.0, "failed": 0, "failure": None, "grad_norm_max": 0.0}
        shard = epoch_shard(self.train_rows, epoch, cfg.seed, self.rank, self.world, equal=True)
        batches = iter_image_batches(shard, self.train_transform, cfg.seed + epoch, cfg.per_worker_batch,
                                     self.options, drop_last=True)
        for step_in_epoch, batch in enumerate(batches):
            self._step(epoch * self.steps_per_epoch + step_in_epoch, step_in_epoch, batch, local)
            done = step_in_epoch + 1
            if self.rank == 0 and done < self.steps_per_epoch and time.time() - last_progress >= cfg.progress_every_s:
                logger.info(progress_line(epoch, done, self.steps_per_epoch, local["loss"] / max(local["seen"], 1),
                                          done * cfg.batch_size, time.time() - started))
                last_progress = time.time()
        return local, time.time() - started

    def _step(self, step: int, step_in_epoch: int, batch: dict[str, np.ndarray], local: dict[str, Any]) -> None:
        """Forward and backward one batch; an optimizer step every ``accumulation_steps`` batches."""
        cfg, device = self.cfg, self.device
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.total_steps, self.warmup_steps, cfg.optim)
        ok = np.array([e is None for e in batch["error"]])
        local["failed"] += int((~ok).sum())
        local["failure"] = local["failure"] or first_failure(batch)
        with torch.autocast(device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            if ok.any():
                views = to_views_tensor(batch["image"][ok], device)
                labels = torch.as_tensor(batch["label"][ok].astype(np.float32), device=device)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(self.model(views).float(), labels)
                loss = loss / cfg.optim.accumulation_steps
            else:  # every image of this batch failed to decode: a zero step keeps the DDP ranks in lockstep
                loss = sum(p.sum() * 0 for p in self.model.parameters() if p.requires_grad)
        self.scaler.scale(loss).backward()
        if (step_in_epoch + 1) % cfg.optim.accumulation_steps == 0:
            self.scaler.unscale_(self.optimizer)
            # The norm is logged even without clipping (as the official loop does): spikes precede collapse.
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad or math.inf)
            local["grad_norm_max"] = max(local["grad_norm_max"], float(norm))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        local["seen"] += int(ok.sum())
        local["loss"] += float(loss.detach()) * cfg.optim.accumulation_steps * int(ok.sum())

    def validate(self) -> dict[str, Any]:
        """Score this rank's share of the validation images at their own resolution (any-resolution path)."""
        cfg, device = self.cfg, self.device
        self.core.eval()
        out: dict[str, Any] = {"label": [], "generator": [], "logit": [], "failed": 0, "failure": None}
        shard = epoch_shard(self.val_rows, 0, cfg.seed, self.rank, self.world, equal=False)
        if shard.num_rows == 0:
            return out
        with torch.inference_mode(), torch.autocast(device.type, dtype=self.dtype or torch.float32,
                                                    enabled=self.dtype is not None):
            for batch in iter_image_batches(shard, self.val_transform, cfg.seed, cfg.val_batch_size, self.options,
                                            drop_last=False):
                ok = [i for i, e in enumerate(batch["error"]) if e is None]
                out["failed"] += len(batch["error"]) - len(ok)
                out["failure"] = out["failure"] or first_failure(batch)
                if not ok:
                    continue
                images = to_image_tensors([batch["image"][i] for i in ok], device)
                out["logit"] += self.core.forward_images(images).float().cpu().numpy().tolist()
                out["label"] += [int(batch["label"][i]) for i in ok]
                out["generator"] += [str(batch["generator"][i]) for i in ok]
        return out

    def _gather(self, local: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's sums, on every rank (each needs the metrics: early stopping must agree)."""
        if self.world == 1:
            return [local]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, local)
        return gathered

    def _log_metrics(self, metrics: dict[str, Any]) -> None:
        if self.rank != 0 or not self.inputs.mlflow_run_id:  # an untracked run (--no-mlflow) logs nowhere
            return
        try:
            tracking.log_metrics(self.inputs.tracking_uri, self.inputs.mlflow_run_id, metrics,
                                 step=int(metrics["epoch"]))
        except Exception as exc:  # noqa: BLE001 - an MLflow outage must not kill (and retry) hours of training
            logger.warning(f"epoch {metrics['epoch']}'s metrics were not logged to MLflow ({type(exc).__name__}: "
                           f"{str(exc)[:300]}); training goes on, and its checkpoints keep them")

    def _no_training_data(self, metrics: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        message = no_training_data_message(metrics, str(self.cfg.manifest))
        logger.info(f"[spai train] {message}")
        # Train V2 hands the driver only checkpointed metrics, and a raise would be retried max_failures times
        storage.write_bytes(self.inputs.data_error_uri, message.encode(), self.options)

    def _report(self, metrics: dict[str, Any]) -> None:
        """Every rank reports; rank 0 attaches the checkpoint (our safetensors + resumable training state). The run's
        name and MLflow run id go into the weights' metadata, so what scores with them can say where they came from."""
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)
            return
        epoch = int(metrics["epoch"])
        with tempfile.TemporaryDirectory() as directory:
            clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isnan(v)}
            save_checkpoint(os.path.join(directory, files.CHECKPOINT_WEIGHTS), export_model(self.core),
                            {"epoch": epoch, "metrics": clean, "run": self.cfg.name or "",
                             "mlflow_run_id": self.inputs.mlflow_run_id, "train_config": to_dict(self.cfg)})
            torch.save({"model": self.core.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": epoch,
                        "best_auc": self.state.best_auc, "stale": self.state.stale},
                       os.path.join(directory, files.TRAIN_STATE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
