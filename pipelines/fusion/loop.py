"""The Ray Train side of a head run: each worker trains the head on its shard of the feature table's train split
(streamed from Parquet by Ray Data), scores its shard of the val split, and reports every epoch; rank 0 attaches
the checkpoint (head, optimizer and early-stopping state). The metrics are ``spai train``'s (val AUC overall and
per generator, :func:`pipelines.train.epochs.epoch_metrics`), so epochs are selected and stopped the same way."""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipelines.fusion.config import FusionTrainConfig
from pipelines.infra.console import log_to_console
from pipelines.train.epochs import epoch_line, epoch_metrics, track_best
from pipelines.train.loop import EpochState, WorkerRun
from pipelines.train.model import lr_at, make_optimizer
from spai_core.config import from_dict
from spai_core.fusion import FusionConfig, build_head

logger = logging.getLogger(__name__)

HEAD_STATE = "head_state.pt"  # inside each Ray Train checkpoint folder
COLUMNS = ["spectral", "spai_logit", "semantic", "label", "generator"]


@dataclass
class LoopInputs:
    """What the driver hands every worker (Ray Train's ``train_loop_config``)."""

    config: dict[str, Any]  # the FusionTrainConfig, as a dict
    head: dict[str, Any]  # the FusionConfig with the table's feature widths
    train_rows: int
    mlflow_run_id: str | None
    tracking_uri: str | None


def train_loop(loop: dict[str, Any]) -> None:
    """Ray Train worker entry point."""
    log_to_console()
    HeadRun(LoopInputs(**loop)).run()


def tensors(batch: dict[str, np.ndarray], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(spectral, spai_logit, semantic, label) of a numpy batch of the feature table."""
    def stack(column: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.stack(list(column)).astype(np.float32), device=device)

    return (stack(batch["spectral"]), torch.as_tensor(batch["spai_logit"].astype(np.float32), device=device),
            stack(batch["semantic"]), torch.as_tensor(batch["label"].astype(np.float32), device=device))


class HeadRun:
    """One rank's share of a head run."""

    def __init__(self, inputs: LoopInputs):
        import ray.train
        import ray.train.torch

        self.inputs = inputs
        self.cfg = cfg = from_dict(FusionTrainConfig, inputs.config)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        torch.manual_seed(cfg.seed)  # every rank builds the same head
        head_cfg = from_dict(FusionConfig, inputs.head)
        head = build_head(head_cfg, head_cfg.spectral_dim, head_cfg.semantic_dim)
        self.optimizer = make_optimizer(head, cfg.optim)
        self.state = self._restore(head)
        self.model = ray.train.torch.prepare_model(head)
        self.head = self.model.module if hasattr(self.model, "module") else self.model
        self.steps_per_epoch = max(1, math.ceil(inputs.train_rows / cfg.batch_size))
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = int(cfg.optim.warmup_epochs * self.steps_per_epoch)

    def _restore(self, head: torch.nn.Module) -> EpochState:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return EpochState()
        with checkpoint.as_directory() as directory:
            saved = torch.load(os.path.join(directory, HEAD_STATE), map_location="cpu", weights_only=True)
        head.load_state_dict(saved["head"])
        self.optimizer.load_state_dict(saved["optimizer"])
        return EpochState(saved["epoch"] + 1, saved["best_auc"], saved["stale"])

    def run(self) -> None:
        for epoch in range(self.state.epoch, self.cfg.epochs):
            local, train_time = self.train_epoch(epoch)
            local["val"] = self.validate()
            metrics = epoch_metrics(self._gather(local), epoch, train_time, self.optimizer.param_groups[0]["lr"])
            self.state = EpochState(epoch + 1, *track_best(metrics["val_auc"], self.state.best_auc, self.state.stale))
            metrics.update(best_val_auc=self.state.best_auc, stale_epochs=self.state.stale)
            stop = self.cfg.patience is not None and self.state.stale > self.cfg.patience
            self._log_metrics(metrics)
            self._report(metrics)
            if self.rank == 0:  # spai train's epoch line, under this command's name
                logger.info(epoch_line(metrics, stop).replace("[spai train]", "[spai fusion]"))
            if stop:
                return

    def train_epoch(self, epoch: int) -> tuple[dict[str, Any], float]:
        import ray.train

        cfg = self.cfg
        self.model.train()
        started = time.time()
        local = {"seen": 0, "loss": 0.0, "failed": 0, "failure": None, "grad_norm_max": 0.0}
        shard = ray.train.get_dataset_shard("train")
        batches = shard.iter_batches(batch_size=cfg.per_worker_batch, batch_format="numpy",
                                     local_shuffle_buffer_size=max(cfg.per_worker_batch * 8, 256),
                                     local_shuffle_seed=cfg.seed * 100_003 + epoch)
        for step_in_epoch, batch in enumerate(batches):
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(epoch * self.steps_per_epoch + step_in_epoch, self.total_steps,
                                    self.warmup_steps, cfg.optim)
            spectral, logit, semantic, label = tensors(batch, self.device)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(self.model(spectral, logit, semantic), label)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad or math.inf)
            local["grad_norm_max"] = max(local["grad_norm_max"], float(norm))
            self.optimizer.step()
            local["seen"] += len(label)
            local["loss"] += float(loss.detach()) * len(label)
        return local, time.time() - started

    def validate(self) -> dict[str, Any]:
        import ray.train

        self.head.eval()
        out: dict[str, Any] = {"label": [], "generator": [], "logit": [], "failed": 0, "failure": None}
        with torch.inference_mode():
            for batch in ray.train.get_dataset_shard("val").iter_batches(batch_size=1024, batch_format="numpy"):
                spectral, logit, semantic, label = tensors(batch, self.device)
                out["logit"] += self.head(spectral, logit, semantic).float().cpu().numpy().tolist()
                out["label"] += label.int().cpu().numpy().tolist()
                out["generator"] += [str(g) for g in batch["generator"]]
        return out

    # the same as spai train's workers: every rank's sums on every rank, and rank 0's MLflow logging
    _gather = WorkerRun._gather
    _log_metrics = WorkerRun._log_metrics

    def _report(self, metrics: dict[str, Any]) -> None:
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            torch.save({"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "epoch": int(metrics["epoch"]), "best_auc": self.state.best_auc, "stale": self.state.stale},
                       os.path.join(directory, HEAD_STATE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
