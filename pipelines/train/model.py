"""The model side of training: the model a run starts from, what trains in each fine-tuning mode, the optimizer's
parameter groups and learning-rate schedule, autocast, and the plain copy that checkpoints hold."""
from __future__ import annotations

import copy
import math
from typing import Any

import torch

from pipelines.train.config import OptimConfig, TrainConfig
from spai_core.checkpoint import load_backbone, load_state_strict, read_checkpoint
from spai_core.spai import SPAI, build_model
from spai_core.svd import apply_svd, merge_svd


def initial_model(cfg: TrainConfig) -> SPAI:
    """The model a run starts from: built from ``cfg.model`` (which names its backbone), then full weights
    (``cfg.init``) or pretrained weights of that backbone (``cfg.backbone_weights``) if given. The driver builds it
    once to check the files before any worker starts."""
    model = build_model(cfg.model)
    if cfg.init:
        ckpt = read_checkpoint(cfg.init, cfg.model)
        load_state_strict(model, ckpt.state_dict, cfg.init)
    if cfg.backbone_weights:
        load_backbone(model, cfg.backbone_weights)
    return model


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


def export_model(model: SPAI) -> SPAI:
    """A plain copy for checkpoints: SVD layers merged back into ordinary weights."""
    return merge_svd(copy.deepcopy(model).cpu())


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; 1-D parameters (norms, biases, singular values) get none."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


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
