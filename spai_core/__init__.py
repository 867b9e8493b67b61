"""spai_core: the SPAI detector in plain PyTorch, apart from any training or cluster code.

    from spai_core import Detector
    det = Detector.from_pretrained("weights/spai.pth")
    det.score(["a.jpg"])  # P(AI-generated)

The names below are the public API. They are imported on first use, so that ``spai_core.config`` (which every
command's parser reads) does not pull in torch and timm.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # inference
    "Detector": "detector", "Explanation": "detector",
    # the model
    "SPAI": "spai", "ModelConfig": "spai", "build_model": "spai", "get_model_config": "spai",
    "MODEL_CONFIGS": "spai",
    # checkpoints
    "load_model": "checkpoint", "read_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "save_official": "checkpoint", "convert": "checkpoint", "load_backbone": "checkpoint",
    "CheckpointError": "checkpoint",
    # the backbone registry
    "BackboneSpec": "backbones", "register_backbone": "backbones", "get_backbone_spec": "backbones",
    "list_backbones": "backbones", "create_backbone": "backbones",
    # Sem-SPAI: frozen SPAI + a frozen semantic encoder + a trained fusion head
    "FusedDetector": "fusion", "FusedModel": "fusion", "FusionConfig": "fusion", "build_head": "fusion",
    "build_fused": "fusion", "save_fused": "fusion", "load_fused": "fusion", "SemanticConfig": "semantic",
    "SemanticEncoder": "semantic", "load_detector": "onnx_runtime",
    # configs and errors
    "load_config": "config", "ConfigError": "config", "UserError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'spai_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"spai_core.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
