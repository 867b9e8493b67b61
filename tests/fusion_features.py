"""The Sem-SPAI test inputs: a tiny SPAI checkpoint and the feature extraction the fusion tests run with it (a small
random timm ViT as the semantic encoder)."""
from __future__ import annotations

from pathlib import Path

import torch

from pipelines.features.config import FeaturesConfig
from pipelines.features.job import FeaturesResult, run_extraction
from spai_core.checkpoint import save_checkpoint
from spai_core.config import load_config
from spai_core.spai import build_model, get_model_config

SEMANTIC = {"encoder": "timm:test_vit"}  # 64-d, random weights from a fixed seed


def save_tiny_spai(path: Path) -> str:
    """A tiny SPAI with random weights from a fixed seed, saved at ``path``."""
    torch.manual_seed(0)
    save_checkpoint(path, build_model(get_model_config("spai_tiny", descriptor_norm=True)).eval())
    return str(path)


def extract(manifest: str, weights: str, output: Path, **extra) -> FeaturesResult:
    """``spai fusion extract`` of ``manifest`` into ``output`` in small parts and batches (resume is per part)."""
    return run_extraction(load_config(FeaturesConfig, None, flags={
        "manifest": manifest, "weights": weights, "output": str(output), "semantic": SEMANTIC, "part_rows": 12,
        "batch_size": 6, **extra}), show_progress=False)
