"""``spai train``: SPAI training and fine-tuning with Ray Train (DDP), tracked in MLflow.

Each worker streams its own shard of the manifest through the Ray Data image pipeline every epoch: the
manifest is shuffled with ``(seed, epoch)``, dealt round-robin to the ranks and cut to equal length (DDP needs
every rank to take the same number of steps), then decoded and augmented by Ray Data tasks with per-row
generators seeded by ``(seed + epoch, uri)``. So augmentations differ per epoch, are reproducible, and a run
resumed at epoch k sees the same data order and views as an uninterrupted run (weights may differ in the last
bits: dropout and float reduction order are not replayed).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import yaml

from pipelines.infra import storage, tracking
from pipelines.data.dataset import decode_images, read_manifest_dataset
from pipelines.data.manifest import CORE_COLUMNS, read_manifest
from pipelines.data.transforms import AugmentConfig, ScoreTransformConfig, make_score_transform, make_train_transform
from spai_core.checkpoint import load_backbone, load_state_strict, read_checkpoint, save_checkpoint
from spai_core.config import ConfigError, apply_overrides, from_dict, read_yaml, to_dict
from spai_core.errors import UserError
from spai_core.metrics import binary_metrics
from spai_core.spai import SPAI, ModelConfig, build_model, get_model_config
from spai_core.svd import apply_svd, merge_svd

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
FINETUNE_MODES = ("head", "full", "svd")


@dataclass
class OptimConfig:
    """AdamW with a per-iteration cosine schedule after a linear warm-up (the official recipe)."""

    lr: float = 5e-4
    weight_decay: float = 0.05  # none on 1-D parameters and biases
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_epochs: float = 5.0
    warmup_lr: float = 2.5e-7
    min_lr: float = 2.5e-7
    clip_grad: float | None = None  # max gradient norm; None = no clipping (official)
    accumulation_steps: int = 1

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.warmup_epochs < 0 or self.accumulation_steps < 1:
            raise ConfigError(f"optim needs lr > 0, warmup_epochs >= 0 and accumulation_steps >= 1, got lr={self.lr}, "
                              f"warmup_epochs={self.warmup_epochs}, accumulation_steps={self.accumulation_steps}")


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved with the run and logged to MLflow as params."""

    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: str = "head"  # head: frozen backbone (official) | full | svd: principal/residual split of attention
    svd_rank: int = 384  # principal directions kept frozen per attention weight in svd mode
    epochs: int = 35
    batch_size: int = 72  # images per optimizer step across all workers (each image gives augment.views views)
    val_batch_size: int = 8  # images per any-resolution validation forward
    val_resize_to: int | None = None  # shorter side for validation images (None: original resolution)
    amp: str = "auto"  # autocast precision: auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    seed: int = 0
    patience: int | None = None  # early stopping: epochs without a better val AUC (None: never stop early)
    keep_checkpoints: int = 3  # best N checkpoints by val AUC are kept
    max_failures: int = 2  # worker failures survived by restarting from the last checkpoint
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    registered_model: str | None = "spai"  # MLflow registered model for the best checkpoint (null: none)
    progress_every_s: float = 60.0  # rank 0 prints a progress line within an epoch at most this often (0: every step)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.finetune not in FINETUNE_MODES:
            raise ConfigError(f"finetune must be one of {FINETUNE_MODES}, got {self.finetune!r}")
        if self.amp not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"amp must be auto, fp32, bf16 or fp16, got {self.amp!r}")
        if self.epochs < 1 or self.workers < 1 or self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ConfigError(f"need epochs >= 1, workers >= 1, cpus_per_worker > 0 and gpus_per_worker >= 0, got "
                              f"{self.epochs}, {self.workers}, {self.cpus_per_worker} and {self.gpus_per_worker}")
        if self.batch_size < self.workers:
            raise ConfigError(f"batch_size {self.batch_size} is smaller than workers {self.workers}")


def load_train_config(path: str | Path | None = None, overrides: tuple[str, ...] | list[str] = ()) -> TrainConfig:
    """Defaults <- YAML <- ``key=value`` overrides. ``model.name`` picks a registered model config as the base."""
    data = to_dict(TrainConfig())
    loaded: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config {path} does not exist; check --config ({CONFIG_DIR} holds spai.yaml, the "
                              "official recipe, and tiny.yaml)")
        loaded = read_yaml(path)
    name = dict(item.split("=", 1) for item in overrides if item.startswith("model.name=")).get(
        "model.name", loaded.get("model", {}).get("name"))
    if name:
        data["model"] = dataclasses.asdict(get_model_config(name))
    for key, value in loaded.items():
        if key not in data:
            raise ConfigError(f"{path}: unknown key {key!r}; known keys are {sorted(data)}")
        data[key] = {**data[key], **value} if isinstance(data[key], dict) and isinstance(value, dict) else value
    apply_overrides(data, overrides)
    return from_dict(TrainConfig, data)


# ----------------------------------------------------------------------------------------------- model set-up


def configure_finetune(model: SPAI, cfg: TrainConfig) -> dict[str, int]:
    """Set which parameters train for the fine-tuning mode; returns trainable/total parameter counts."""
    vit = model.mfvit.vit
    model.mfvit.backbone_frozen = cfg.finetune == "head"
    for param in vit.parameters():
        param.requires_grad = cfg.finetune == "full"
    if cfg.finetune == "svd":
        # Principal parts are frozen buffers; only the residual factors (and nothing else in the ViT) train.
        apply_svd(vit, cfg.svd_rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    backbone = sum(p.numel() for p in vit.parameters() if p.requires_grad)
    return {"params_trainable": trainable, "params_backbone_trainable": backbone,
            "params_total": sum(p.numel() for p in model.parameters())}


def initial_model(cfg: TrainConfig, init: str | None, backbone: str | None) -> SPAI:
    """A model built from the config, optionally started from full weights (``init``) or an MFM backbone."""
    model = build_model(cfg.model)
    if init:
        ckpt = read_checkpoint(init, cfg.model)
        load_state_strict(model, ckpt.state_dict, init)
    if backbone:
        load_backbone(model, backbone)
    return model


def export_model(model: SPAI) -> SPAI:
    """A plain copy for checkpoints: SVD layers merged back into ordinary weights."""
    import copy

    plain = copy.deepcopy(model).cpu()
    return merge_svd(plain)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; 1-D parameters (norms, biases, singular values) get none."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, warmup: int, cfg: OptimConfig) -> float:
    """Per-iteration schedule: linear warm-up from ``warmup_lr``, then cosine from ``lr`` to ``min_lr``."""
    if step < warmup:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / max(warmup, 1)
    progress = (step - warmup) / max(total - warmup, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


# ----------------------------------------------------------------------------------------------- data


def epoch_shard(table: pa.Table, epoch: int, seed: int, rank: int, world: int, equal: bool) -> pa.Table:
    """This rank's rows for an epoch: a ``(seed, epoch)`` shuffle dealt round-robin, cut to equal length if asked."""
    order = np.random.default_rng([seed, epoch]).permutation(table.num_rows)
    mine = order[rank::world]
    if equal:
        mine = mine[: table.num_rows // world]
    return table.take(pa.array(np.sort(mine) if not equal else mine))


def iter_image_batches(table: pa.Table, transform, seed: int, batch_size: int, options: storage.StorageOptions,
                       drop_last: bool) -> Iterator[dict[str, np.ndarray]]:
    """Decode (and transform) rows with Ray Data and yield numpy batches in the table's order; failed rows keep their
    ``error``."""
    ds = decode_images(read_manifest_dataset(table), transform, seed=seed, options=options)
    ds.context.enable_progress_bars = False  # one bar per worker per epoch drowns the log
    # Without it the threads that format prefetched batches hand them over as they finish, so batches (and the
    # weights they train) differ from run to run: a seeded run must see the same batches in the same order.
    ds.context.execution_options.preserve_order = True
    yield from ds.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last, prefetch_batches=2)


def to_views_tensor(images, device: torch.device) -> torch.Tensor:
    """``B`` arrays of ``V x S x S x 3`` uint8 -> ``B x V x 3 x S x S`` float in [0, 1]."""
    batch = torch.from_numpy(np.stack(list(images)))
    return batch.to(device).permute(0, 1, 4, 2, 3).float() * (1 / 255)


# ----------------------------------------------------------------------------------------------- worker loop


def _state_path(directory: str) -> str:
    return os.path.join(directory, "train_state.pt")


def train_loop(loop: dict[str, Any]) -> None:
    """Ray Train worker: restore, then per epoch train on this rank's shard, validate, report, checkpoint."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg = from_dict(TrainConfig, loop["config"])
    options = storage.StorageOptions(**loop["storage"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed + rank)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))

    model = initial_model(cfg, loop.get("init"), loop.get("backbone"))
    counts = configure_finetune(model, cfg)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    start_epoch, best_auc, stale = 0, float("nan"), 0  # NaN until an epoch has a val AUC; MLflow skips NaN
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = torch.load(_state_path(directory), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best_auc, stale = state["epoch"] + 1, state["best_auc"], state["stale"]
    with warnings.catch_warnings():  # torch 2.13 deprecates it for an argument that torch >= 2.4 (ours) may lack
        warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})
    core: SPAI = model.module if hasattr(model, "module") else model
    dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    manifest = read_manifest(loop["manifest"], options).select(list(CORE_COLUMNS))  # extras may clash with decode's
    train_rows = manifest.filter(pc.equal(manifest.column("split"), "train"))
    val_rows = manifest.filter(pc.equal(manifest.column("split"), "val"))
    per_worker = max(1, cfg.batch_size // world)
    steps_per_epoch = max(1, (train_rows.num_rows // world) // per_worker)
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, int(cfg.optim.warmup_epochs * steps_per_epoch)
    train_transform = make_train_transform(cfg.augment)
    val_transform = make_score_transform(ScoreTransformConfig(resize_to=cfg.val_resize_to))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    if rank == 0:
        per_epoch = steps_per_epoch * per_worker * world
        left_out = (f" of {per_epoch} images (full batches; the other {train_rows.num_rows - per_epoch} change every "
                    "epoch)" if per_epoch < train_rows.num_rows else "")
        say(f"[spai train] {train_rows.num_rows} train / {val_rows.num_rows} val images, {world} worker(s), "
            f"{steps_per_epoch} steps/epoch{left_out}, trainable params {counts['params_trainable']:,}")

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        started, seen, loss_sum, failed, failure, grad_norm_max = time.time(), 0, 0.0, 0, None, 0.0
        last_progress = started
        shard = epoch_shard(train_rows, epoch, cfg.seed, rank, world, equal=True)
        batches = iter_image_batches(shard, train_transform, cfg.seed + epoch, per_worker, options, drop_last=True)
        for step_in_epoch, batch in enumerate(batches):
            step = epoch * steps_per_epoch + step_in_epoch
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup_steps, cfg.optim)
            ok = np.array([e is None for e in batch["error"]])
            failed += int((~ok).sum())
            failure = failure or first_failure(batch)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                if ok.any():
                    views = to_views_tensor(batch["image"][ok], device)
                    labels = torch.as_tensor(batch["label"][ok].astype(np.float32), device=device)
                    loss = loss_fn(model(views).float(), labels) / cfg.optim.accumulation_steps
                else:  # every image of this batch failed to decode: a zero step keeps the DDP ranks in lockstep
                    loss = sum(p.sum() * 0 for p in model.parameters() if p.requires_grad)
            scaler.scale(loss).backward()
            if (step_in_epoch + 1) % cfg.optim.accumulation_steps == 0:
                scaler.unscale_(optimizer)
                # The norm is logged even without clipping (as the official loop does): spikes precede collapse.
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad or math.inf)
                grad_norm_max = max(grad_norm_max, float(norm))
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            seen += int(ok.sum())
            loss_sum += float(loss.detach()) * cfg.optim.accumulation_steps * int(ok.sum())
            done = step_in_epoch + 1
            if rank == 0 and done < steps_per_epoch and time.time() - last_progress >= cfg.progress_every_s:
                say(progress_line(epoch, done, steps_per_epoch, loss_sum / max(seen, 1), done * per_worker * world,
                                  time.time() - started))
                last_progress = time.time()
        train_time = time.time() - started

        val = validate(core, val_rows, cfg, rank, world, device, dtype, val_transform, options)
        local = {"seen": seen, "loss": loss_sum, "failed": failed, "failure": failure, "val": val,
                 "grad_norm_max": grad_norm_max}
        gathered = [local]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, local)
        metrics = epoch_metrics(gathered, epoch, train_time, optimizer.param_groups[0]["lr"])
        best_auc, stale = track_best(metrics["val_auc"], best_auc, stale)
        metrics.update(best_val_auc=best_auc, stale_epochs=stale, **counts)
        stop = cfg.patience is not None and stale > cfg.patience
        if rank == 0:
            try:
                tracking.log_metrics(loop["tracking_uri"], loop["mlflow_run_id"], metrics, step=epoch)
            except Exception as exc:  # noqa: BLE001 - an MLflow outage must not kill (and retry) hours of training
                say(f"[spai train] warning: epoch {epoch}'s metrics were not logged to MLflow ({type(exc).__name__}: "
                    f"{str(exc)[:300]}); training goes on, and its checkpoints keep them")
        if metrics["train_images"] == 0:  # nothing to learn from: no checkpoint, and the driver fails the run
            if rank == 0:
                message = no_training_data_message(metrics, loop["manifest"])
                say(f"[spai train] {message}")
                # Train V2 hands the driver only checkpointed metrics, and a raise would be retried max_failures times
                storage.write_bytes(loop["data_error_uri"], message.encode(), options)
            break
        report_epoch(core, optimizer, metrics, cfg, epoch, best_auc, stale, rank,
                     {"run": loop.get("run_name", ""), "mlflow_run_id": loop.get("mlflow_run_id")})
        if rank == 0:
            say(f"[spai train] epoch {epoch}: loss {metrics['train_loss']:.4f} val_auc {metrics['val_auc']:.4f} "
                f"val_acc {metrics['val_accuracy']:.4f} ({metrics['train_images_per_s']:.1f} img/s)"
                + failure_summary(metrics) + (" early stop" if stop else ""))
        if stop:
            break


def validate(model: SPAI, rows: pa.Table, cfg: TrainConfig, rank: int, world: int, device: torch.device,
             dtype: torch.dtype | None, transform, options: storage.StorageOptions) -> dict[str, Any]:
    """Score this rank's share of the validation images at their own resolution (any-resolution path)."""
    model.eval()
    out: dict[str, Any] = {"label": [], "generator": [], "logit": [], "failed": 0, "failure": None}
    shard = epoch_shard(rows, 0, cfg.seed, rank, world, equal=False)
    if shard.num_rows == 0:
        return out
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for batch in iter_image_batches(shard, transform, cfg.seed, cfg.val_batch_size, options, drop_last=False):
            ok = [i for i, e in enumerate(batch["error"]) if e is None]
            out["failed"] += sum(e is not None for e in batch["error"])
            out["failure"] = out["failure"] or first_failure(batch)
            if not ok:
                continue
            # a copy: Ray hands out read-only arrays, which torch warns about sharing
            images = [torch.from_numpy(np.array(batch["image"][i])).to(device).permute(2, 0, 1).float() * (1 / 255)
                      for i in ok]
            logits = model.forward_images(images).float().cpu().numpy()
            out["logit"] += logits.tolist()
            out["label"] += [int(batch["label"][i]) for i in ok]
            out["generator"] += [str(batch["generator"][i]) for i in ok]
    return out


def epoch_metrics(gathered: list[dict[str, Any]], epoch: int, train_time: float, lr: float) -> dict[str, float]:
    """Global train loss and validation metrics (overall and per generator against all reals)."""
    seen = sum(g["seen"] for g in gathered)
    logits = np.array([x for g in gathered for x in g["val"]["logit"]], dtype=np.float64)
    labels = np.array([x for g in gathered for x in g["val"]["label"]], dtype=np.int64)
    generators = np.array([x for g in gathered for x in g["val"]["generator"]])
    scores = 1 / (1 + np.exp(-logits)) if len(logits) else logits
    val_loss = float(np.mean(np.logaddexp(0, logits) - labels * logits)) if len(logits) else float("nan")
    metrics = {"epoch": epoch, "train_loss": sum(g["loss"] for g in gathered) / max(seen, 1), "lr": lr,
               "train_images": seen, "train_images_per_s": seen / max(train_time, 1e-9),
               "train_decode_failures": sum(g["failed"] for g in gathered),
               "train_grad_norm_max": max(g["grad_norm_max"] for g in gathered),
               "val_decode_failures": sum(g["val"]["failed"] for g in gathered), "val_loss": val_loss}
    failure = next((f for g in gathered for f in (g["failure"], g["val"]["failure"]) if f), None)
    if failure:
        metrics["decode_failure_example"] = failure
    overall = binary_metrics(labels, scores) if len(labels) else {}
    metrics.update({f"val_{k}": float(v) for k, v in overall.items()})
    metrics.setdefault("val_auc", float("nan"))
    metrics.setdefault("val_accuracy", float("nan"))
    real = labels == 0
    for gen in sorted(set(generators[labels == 1].tolist())):
        mask = real | (generators == gen)
        gen_metrics = binary_metrics(labels[mask], scores[mask])
        metrics[f"val_auc_{gen}"] = float(gen_metrics["auc"])
        metrics[f"val_accuracy_{gen}"] = float(gen_metrics["accuracy"])
    return metrics


def epoch_metric_names(val_generators: list[str]) -> set[str]:
    """The numeric metrics every epoch reports (to MLflow, and to Tune, whose scheduler may rank trials on any) when
    the val split's AI-generated images come from ``val_generators``; made by :func:`epoch_metrics`, so never stale."""
    val = {"label": [0] + [1] * len(val_generators), "generator": ["real", *val_generators],
           "logit": [0.0] * (1 + len(val_generators)), "failed": 0, "failure": None}
    rank = {"seen": 1, "loss": 0.0, "failed": 0, "failure": None, "val": val, "grad_norm_max": 0.0}
    return set(epoch_metrics([rank], 0, 1.0, 0.0)) | {"best_val_auc", "stale_epochs"}


def say(line: str) -> None:
    """Print a worker's line once. Ray Train sends ``print`` to its logger and, when ``sys.stdout`` has been wrapped
    (as in its workers), to the stream as well, so every line came out twice; the process's own stdout is neither."""
    print(line, file=sys.__stdout__, flush=True)


def progress_line(epoch: int, step: int, steps: int, loss: float, images: int, elapsed: float) -> str:
    """Rank 0's line within an epoch: how far it is, the mean loss so far, the rate and the time left."""
    left = round(elapsed / step * (steps - step))
    return (f"[spai train] epoch {epoch} step {step}/{steps} ({step / steps:.0%}): loss {loss:.4f}, "
            f"{images / max(elapsed, 1e-9):.1f} img/s, epoch ends in "
            f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}")


def track_best(val_auc: float, best_auc: float, stale: int) -> tuple[float, int]:
    """(best val AUC so far, epochs since it improved) after an epoch. An undefined AUC (a val split without both
    classes) is no evidence either way, so it neither improves nor makes the run stale."""
    if math.isnan(val_auc):
        return best_auc, stale
    return (val_auc, 0) if val_auc > best_auc or math.isnan(best_auc) else (best_auc, stale + 1)


def first_failure(batch: dict[str, np.ndarray]) -> str | None:
    """``uri (reason)`` of the first row of a batch that failed to decode or transform, else None."""
    return next((f"{uri} ({error})" for uri, error in zip(batch["uri"], batch["error"]) if error is not None), None)


def failure_summary(metrics: dict[str, Any]) -> str:
    """The epoch line's note on images that failed to decode (empty when none did): counts and one example."""
    train, val = int(metrics["train_decode_failures"]), int(metrics["val_decode_failures"])
    if not train and not val:
        return ""
    return (f"; {train} train / {val} val images failed, e.g. {metrics['decode_failure_example']} "
            "(spai validate lists every reject)")


def no_training_data_message(metrics: dict[str, Any], manifest: str) -> str:
    """Why a run stopped at an epoch whose training images all failed, and what to check."""
    return (f"epoch {metrics['epoch']}: none of the {metrics['train_decode_failures']} training images could be "
            f"decoded, e.g. {metrics.get('decode_failure_example')}; check the manifest's paths and storage settings "
            f"(`spai validate {manifest}` lists every reject with its reason)")


def report_epoch(model: SPAI, optimizer, metrics: dict[str, float], cfg: TrainConfig, epoch: int, best_auc: float,
                 stale: int, rank: int, run: dict[str, Any]) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (our safetensors + resumable training state). ``run``
    (name, MLflow run id) goes into the weights' metadata, so what scores with them can say where they came from."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isnan(v)}
        save_checkpoint(os.path.join(directory, "model.safetensors"), export_model(model),
                        {"epoch": epoch, "metrics": clean, **run, "train_config": to_dict(cfg)})
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                    "best_auc": best_auc, "stale": stale}, _state_path(directory))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


# ----------------------------------------------------------------------------------------------- driver


class TrainingDataError(UserError, RuntimeError):
    """Every training image of an epoch failed, so the run has nothing worth exporting or registering."""


@dataclass
class TrainResult:
    run_dir: str
    best_checkpoint: str | None  # our .safetensors of the best epoch by val AUC
    best_metrics: dict[str, Any]
    mlflow_run_id: str
    tracking_uri: str
    last_checkpoint: str | None = None  # our .safetensors of the last epoch trained


# What a resumed run may change: its length and how it runs, not what it learns from or how (that would make its
# checkpoints and its MLflow record describe another run). More epochs re-plan the learning-rate schedule.
RESUMABLE_CHANGES = ("epochs", "patience", "progress_every_s", "max_failures", "keep_checkpoints", "workers",
                     "gpus_per_worker", "cpus_per_worker")


def check_resumable(recorded: dict[str, Any], requested: dict[str, Any]) -> None:
    """Refuse a resume whose config differs from the run's own in anything but :data:`RESUMABLE_CHANGES`."""
    before, now = tracking.flatten(recorded), tracking.flatten(json.loads(json.dumps(requested)))  # as recorded
    changed = [f"{k}: {before.get(k)} before, {now.get(k)} now" for k in sorted(set(before) | set(now))
               if before.get(k) != now.get(k) and k not in RESUMABLE_CHANGES]
    if changed:
        raise ConfigError("--resume continues a run with its own config, but this command changes "
                          + "; ".join(changed) + f". Drop those overrides (a resume may change only "
                          f"{', '.join(RESUMABLE_CHANGES)}) or start a new run with another --name")


def check_splits(manifest: pa.Table, cfg: TrainConfig) -> list[str]:
    """Refuse a manifest whose train split cannot make one batch of both classes; warn when val AUC is undefined."""
    def labels(split: str) -> tuple[int, set[int]]:
        rows = manifest.filter(pc.equal(manifest.column("split"), split))
        return rows.num_rows, set(rows.column("label").drop_null().to_pylist())

    (train, train_labels), (val, val_labels) = labels("train"), labels("val")
    per_worker = train // cfg.workers
    if per_worker < cfg.batch_size // cfg.workers:  # each worker drops its last incomplete batch
        fix = (f"lower batch_size, e.g. batch_size={per_worker * cfg.workers}, or add training images" if per_worker
               else "add training images or use fewer workers")
        raise ConfigError(f"the manifest's train split has {train} image(s), less than one batch of batch_size="
                          f"{cfg.batch_size} over {cfg.workers} worker(s); {fix}")
    if train_labels != {0, 1}:
        raise ConfigError(f"the manifest's train split has labels {sorted(train_labels)}; a detector learns from "
                          "both real (0) and AI-generated (1) images: rebuild the manifest with both")
    if val_labels != {0, 1}:
        return [f"the val split has {val} image(s) with labels {sorted(val_labels)}, so val AUC is undefined: "
                "patience never stops the run early, and the last epoch is exported as the best; rebuild the "
                "manifest with real and AI-generated images in val to select epochs by val AUC"]
    return []


def run_training(cfg: TrainConfig, manifest: str, output: str = "runs", name: str | None = None,
                 resume: bool = False, init: str | None = None, backbone: str | None = None,
                 mlflow_uri: str | None = None, experiment: str = "spai-train", callbacks: list | None = None,
                 parent_run_id: str | None = None) -> TrainResult:
    """Run ``TorchTrainer.fit`` for ``cfg`` and export the best checkpoint; the library entry of ``spai train``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.infra.runtime import check_gpus, init_ray

    options = storage.StorageOptions.from_env()
    # Workers of a running cluster (RAY_ADDRESS) work in another folder than this driver, and a resume may run elsewhere
    output, manifest = storage.absolute(output), storage.absolute(manifest)
    init, backbone = (storage.absolute(path) if path else None for path in (init, backbone))
    name = name or time.strftime("spai-%Y%m%d-%H%M%S")
    run_dir = storage.join(output, name)
    marker = storage.join(run_dir, "spai_run.json")
    if resume and not storage.exists(marker, options):
        raise FileNotFoundError(f"nothing to resume at {run_dir}; check --output and --name")
    if not resume and storage.exists(marker, options):
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --name")
    # fail fast on a missing manifest, a wrong schema or splits this config cannot train on, before starting workers
    for warning in check_splits(read_manifest(manifest, options), cfg):
        print(f"[spai train] warning: {warning}", file=sys.stderr, flush=True)
    if init or backbone:  # a wrong file fails here once, not in every worker (and every retry) after Ray starts
        initial_model(cfg, init, backbone)

    # before the run is recorded: a local Ray without the GPUs asked for is an error, not a run that waits forever
    init_ray(reserved_cpus=cfg.workers * cfg.cpus_per_worker)
    if cfg.gpus_per_worker:
        check_gpus(cfg.workers * cfg.gpus_per_worker,
                   f"--workers {cfg.workers} --gpus-per-worker {cfg.gpus_per_worker:g}")

    if resume:
        recorded = json.loads(storage.read_bytes(marker, options))
        check_resumable(recorded["config"], to_dict(cfg))
        # The run continues in the store it started in (unless told otherwise): resolved afresh, the default store is
        # ./mlruns of the current folder, which does not hold the run when resuming from anywhere else.
        tracking_uri = tracking.resolve_tracking_uri(mlflow_uri or recorded.get("tracking_uri"))
        run_id = recorded["mlflow_run_id"]
        tracking.require_run(tracking_uri, run_id, f"{run_dir} was tracked as MLflow run {run_id}")
    else:
        tracking_uri = tracking.resolve_tracking_uri(mlflow_uri)
        run_id = tracking.start_run(tracking_uri, experiment, name, to_dict(cfg),
                                    {"manifest": manifest, "output": run_dir}, parent_run_id)
    # Rewritten on resume too: a resume may change the epochs (see RESUMABLE_CHANGES), and the record must say so.
    with tracking.ended_on_error(tracking_uri, run_id):  # e.g. a missing output bucket: the run must not stay RUNNING
        storage.write_bytes(marker, json.dumps({"mlflow_run_id": run_id, "tracking_uri": tracking_uri,
                                                "manifest": manifest, "config": to_dict(cfg)}).encode(), options)
        storage.write_bytes(storage.join(run_dir, "config.yaml"), yaml.safe_dump(to_dict(cfg)).encode(), options)

    data_error_uri = storage.join(run_dir, "data_error.txt")  # written by rank 0 when an epoch had nothing to train
    if storage.exists(data_error_uri, options):  # a resumed run may have been fixed since
        storage.Files(options).remove(data_error_uri)
    fs, storage_path = storage.filesystem(output, options)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": to_dict(cfg), "manifest": manifest, "storage": dataclasses.asdict(options),
                           "init": init, "backbone": backbone, "mlflow_run_id": run_id, "tracking_uri": tracking_uri,
                           "run_name": name, "data_error_uri": data_error_uri},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker}
                                                                 if cfg.gpus_per_worker else {})}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=fs if storage.is_s3(output) else None,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                                         checkpoint_score_attribute="val_auc",
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            # INFO echoes every report's whole metrics dict and each checkpoint's path; the epoch lines say it shorter
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks or None),
    )
    with tracking.ended_on_error(tracking_uri, run_id):
        try:
            result = trainer.fit()
        except SystemExit as exc:
            # Ray Train's own Ctrl-C handler aborts the run and then leaves fit() with SystemExit(1): an interruption,
            # which the CLI answers with how to resume
            raise KeyboardInterrupt from exc
        if storage.exists(data_error_uri, options):
            raise TrainingDataError(storage.read_bytes(data_error_uri, options).decode())
    return _export_weights(result, run_dir, cfg, options, tracking_uri, run_id)


def _copy_weights(checkpoint, uri: str, options: storage.StorageOptions) -> bytes:
    """Write a Ray checkpoint's ``model.safetensors`` to ``uri``; returns its bytes."""
    with checkpoint.as_directory() as directory:
        weights = Path(directory, "model.safetensors").read_bytes()
    storage.write_bytes(uri, weights, options)
    return weights


def best_of(candidates: list[tuple[dict[str, Any], Any]]) -> tuple[dict[str, Any], Any]:
    """The (metrics, checkpoint) of the highest val AUC; ties (common on a small val split) go to the later epoch,
    which trained longer, as `spai tune` ranks epochs too."""
    return max(candidates, key=lambda mc: (mc[0].get("val_auc", -1.0), mc[0].get("epoch", -1)))


def _export_weights(result, run_dir: str, cfg: TrainConfig, options: storage.StorageOptions,
                    tracking_uri: str, run_id: str) -> TrainResult:
    """Copy the best and the last checkpoint's weights to ``<run>/{best,last}.safetensors``; log and register the best
    in MLflow. On a small validation set the best epoch is a noisy pick, and the last one is where training ended."""
    ranked = [(m, c) for c, m in (result.best_checkpoints or []) if not math.isnan(m.get("val_auc", float("nan")))]
    if not ranked and result.checkpoint is not None:
        ranked = [(result.metrics or {}, result.checkpoint)]
    if not ranked:  # no epoch ended with a checkpoint: nothing to export, and the MLflow run must not stay RUNNING
        tracking.finish_run(tracking_uri, run_id, "FAILED")
        return TrainResult(run_dir, None, {}, run_id, tracking_uri)
    best_metrics, best = best_of(ranked)
    best_uri = storage.join(run_dir, "best.safetensors")
    weights = _copy_weights(best, best_uri, options)
    last_uri = storage.join(run_dir, "last.safetensors") if result.checkpoint is not None else None
    if last_uri:
        _copy_weights(result.checkpoint, last_uri, options)
    try:
        version = tracking.log_weights(tracking_uri, run_id, weights, "best.safetensors", cfg.registered_model)
        if version:
            print(f"[spai train] registered {cfg.registered_model} version {version}")
        tracking.log_metrics(tracking_uri, run_id, {f"best_{k}": v for k, v in best_metrics.items()
                                                    if k.startswith("val_")}, step=int(best_metrics["epoch"]))
        tracking.finish_run(tracking_uri, run_id)
    except Exception as exc:  # noqa: BLE001 - MLflow's own error type varies with the store
        raise tracking.TrackingError(
            f"training finished and its weights are in {run_dir} (best.safetensors, last.safetensors), but MLflow at "
            f"{tracking_uri} did not take them ({type(exc).__name__}: {str(exc)[:300]}); once it is reachable, run "
            "the same command with --resume to log and register them") from exc
    return TrainResult(run_dir, best_uri, dict(best_metrics), run_id, tracking_uri, last_uri)


def main(args: argparse.Namespace) -> int:
    default = CONFIG_DIR / "spai.yaml"
    cfg = load_train_config(args.config or (default if default.exists() else None), list(args.overrides))
    if args.workers is not None:
        cfg.workers = args.workers
    if args.gpus_per_worker is not None:
        cfg.gpus_per_worker = args.gpus_per_worker
    result = run_training(cfg, args.manifest, args.output or "runs", args.name, args.resume, args.init, args.backbone,
                          args.mlflow_uri, args.experiment)
    print(f"[spai train] run directory: {result.run_dir}")
    if result.best_checkpoint:
        print(f"[spai train] best checkpoint (epoch {int(result.best_metrics['epoch'])}, val AUC "
              f"{result.best_metrics.get('val_auc', float('nan')):.4f}): {result.best_checkpoint}")
    if result.last_checkpoint:
        print(f"[spai train] last epoch's weights: {result.last_checkpoint}")
    print(tracking.ui_hint(result.tracking_uri))
    return 0
