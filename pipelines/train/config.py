"""The config of a training run: the recipe (model, optimizer, augmentation, schedule) and the job (data, output,
resources, tracking). Saved as ``<run>/config.yaml``; ``spai train --config`` of that file reruns the same job."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from pipelines.data.transforms import AugmentConfig
from pipelines.infra.settings import TrackingConfig
from spai_core.config import ConfigError, option
from spai_core.spai import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
OFFICIAL_RECIPE = CONFIG_DIR / "spai.yaml"  # what `spai train` and `spai tune` start from without --config
FINETUNE_MODES = ("head", "full", "svd")
AMP_MODES = ("auto", "fp32", "bf16", "fp16")


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

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"must be above 0, got {self.lr}", "lr")
        for name in ("weight_decay", "warmup_epochs", "warmup_lr", "min_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"must be 0 or more, got {getattr(self, name)}", name)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"must be two numbers in [0, 1), got {self.betas}", "betas")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ConfigError(f"must be above 0 (or null: no clipping), got {self.clip_grad}", "clip_grad")
        if self.accumulation_steps < 1:
            raise ConfigError(f"must be at least 1, got {self.accumulation_steps}", "accumulation_steps")


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved with the run and logged to MLflow as params."""

    manifest: str | None = option(None, flag="--manifest", short="-m",
                                  help="manifest path or s3:// URI with train and val rows")
    output: str = option("runs", flag="--output", short="-o", help="folder or s3:// URI of the run directories")
    name: str | None = option(None, flag="--name", help="run name, its folder under --output (default: generated)")
    init: str | None = option(None, flag="--init", help="start from weights: official spai.pth or our checkpoint")
    backbone_weights: str | None = option(None, flag="--backbone",
                                          help="weights of the model's backbone (model.backbone): e.g. "
                                          "mfm_pretrain_vit_base.pth for mfm_vit_b16, the converted CLIP file for "
                                          "clip_vit_b16, a timm/open_clip file for timm:<model>")
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: str = "head"  # head: frozen backbone (official) | full | svd: principal/residual split of attention
    svd_rank: int = 384  # principal directions kept frozen per attention weight in svd mode
    epochs: int = 35
    batch_size: int = 72  # images per optimizer step over all workers (each image gives augment.views views)
    val_batch_size: int = 8  # images per any-resolution validation forward
    val_resize_to: int | None = None  # shorter side for validation images (None: original resolution)
    amp: str = "auto"  # autocast precision: auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    seed: int = 0
    patience: int | None = None  # early stopping: epochs without a better val AUC (None: never stop early)
    keep_checkpoints: int = 3  # best N checkpoints by val AUC are kept
    max_failures: int = 2  # worker failures survived by restarting from the last checkpoint
    workers: int = option(1, flag="--workers", help="Ray Train workers (DDP ranks)")
    gpus_per_worker: float = option(0.0, flag="--gpus-per-worker", help="GPUs per worker (0: CPU, gloo)")
    cpus_per_worker: float = 1.0
    registered_model: str | None = "spai"  # MLflow registered model for the best checkpoint (null: none)
    progress_every_s: float = 60.0  # rank 0 logs a progress line within an epoch at most this often (0: every step)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    tracking: TrackingConfig = field(default_factory=partial(TrackingConfig, experiment="spai-train"))

    def validate(self) -> None:
        """Signs and ranges first, so that a negative value is not reported as a mismatch of two fields."""
        if self.finetune not in FINETUNE_MODES:
            raise ConfigError(f"must be one of {', '.join(FINETUNE_MODES)}, got {self.finetune!r}", "finetune")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"must be one of {', '.join(AMP_MODES)}, got {self.amp!r}", "amp")
        for name in ("epochs", "batch_size", "val_batch_size", "keep_checkpoints", "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be at least 1, got {getattr(self, name)}", name)
        for name in ("svd_rank", "progress_every_s", "gpus_per_worker"):
            if getattr(self, name) < 0:
                raise ConfigError(f"must be 0 or more, got {getattr(self, name)}", name)
        if not self.cpus_per_worker > 0:
            raise ConfigError(f"must be above 0, got {self.cpus_per_worker}", "cpus_per_worker")
        if self.patience is not None and self.patience < 0:
            raise ConfigError(f"must be 0 or more (or null: never stop early), got {self.patience}", "patience")
        if self.val_resize_to is not None and self.val_resize_to < 1:
            raise ConfigError(f"must be at least 1 (or null: original size), got {self.val_resize_to}",
                              "val_resize_to")
        self._check_batch_split()

    def _check_batch_split(self) -> None:
        """Each worker takes ``batch_size / workers`` images a step; a remainder would silently shrink the batch."""
        if self.batch_size % self.workers == 0:
            return
        below = self.batch_size - self.batch_size % self.workers
        sizes = " or ".join(f"batch_size={b}" for b in (below, below + self.workers) if b)
        raise ConfigError(f"{self.workers} worker(s) cannot split batch_size={self.batch_size} (the images per step "
                          f"over all workers) evenly; use {sizes}, or a worker count that divides it", "workers")

    @property
    def per_worker_batch(self) -> int:
        return self.batch_size // self.workers
