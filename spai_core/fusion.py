"""Sem-SPAI: frozen SPAI + a frozen semantic encoder + a small trained fusion head, as one detector.

Per image the frozen parts give three features (what a feature table stores per row):

- ``spectral``: SPAI's pooled spectral feature, the classification head's input (``descriptor_dim``: 1096 for
  ViT-B, 88 for ``spai_tiny``), at the image's native resolution;
- ``spai_logit``: SPAI's own logit;
- ``semantic``: the semantic encoder's pooled feature of the image resized to 224 (:mod:`.semantic`).

Two heads read them (:func:`build_head`, ``FusionConfig.kind``):

- ``late`` (the Sem-SPAI seed): semantic projection (D -> ``proj_dim`` 256), concatenation with the spectral
  feature (1096 + 256 = 1352) -> fusion layer (``fusion_dim`` 512), residual concatenation with the spectral
  feature (512 + 1096 = 1608) -> linear classifier;
- ``logit`` (CO-SPY-style baseline): a linear probe on the semantic feature gives a second logit, and a learned
  affine combination of it and SPAI's logit is the output (initialised to SPAI's logit alone).

:class:`FusedModel` holds the three modules (the frozen ones get no gradient); :func:`save_fused` /
:func:`load_fused` write and read it as one checkpoint with the frozen weights embedded, and :class:`FusedDetector`
is its inference API, the one :class:`~spai_core.detector.Detector` has, plus :meth:`FusedDetector.features`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from .checkpoint import (FORMAT_NAME, FORMAT_VERSION, FUSED_KIND, CheckpointError, fit_problems, load_model,
                         load_state_strict, read_fused_parts, writing)
from .config import ConfigError, from_dict
from .detector import Detector, ImageOrPath, file_sha256, images_to_tensors
from .metrics import sigmoid
from .semantic import SemanticConfig, SemanticEncoder, state_fingerprint
from .spai import SPAI, ModelConfig, build_model

HEADS = ("late", "logit")


@dataclass
class FusionConfig:
    """The fusion head; ``spectral_dim`` and ``semantic_dim`` are taken from the frozen models when it is built."""

    kind: str = "late"  # late (Sem-SPAI) | logit (CO-SPY-style logit fusion)
    proj_dim: int = 256  # semantic projection width (late)
    fusion_dim: int = 512  # fusion layer width (late)
    residual: bool = True  # concatenate the spectral feature again before the classifier (late)
    dropout: float = 0.0  # after the fusion layer (late)
    spectral_dim: int | None = None  # SPAI's descriptor_dim
    semantic_dim: int | None = None  # the semantic encoder's width

    def validate(self) -> None:
        if self.kind not in HEADS:
            raise ConfigError(f"kind must be one of {', '.join(HEADS)}, got {self.kind!r}", "kind")
        for name in ("proj_dim", "fusion_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}", name)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}", "dropout")


class LateFusionHead(nn.Module):
    """The Sem-SPAI late fusion head (shapes in the module docstring)."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        spectral, semantic = cfg.spectral_dim, cfg.semantic_dim
        # The LayerNorm puts encoders of any feature scale on one footing (SPAI's feature is LayerNormed already).
        self.semantic_projection = nn.Sequential(nn.LayerNorm(semantic), nn.Linear(semantic, cfg.proj_dim), nn.GELU())
        self.fusion_layer = nn.Sequential(nn.Linear(spectral + cfg.proj_dim, cfg.fusion_dim), nn.GELU(),
                                          nn.Dropout(cfg.dropout))
        self.residual = cfg.residual
        self.classifier = nn.Linear(cfg.fusion_dim + (spectral if cfg.residual else 0), 1)

    def forward(self, spectral: torch.Tensor, spai_logit: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        """``B x F``, ``B`` (unused: the spectral feature already carries it), ``B x D`` -> ``B`` logits."""
        fused = self.fusion_layer(torch.cat([spectral, self.semantic_projection(semantic)], dim=1))
        final = torch.cat([spectral, fused], dim=1) if self.residual else fused
        return self.classifier(final).squeeze(-1)


class LogitFusionHead(nn.Module):
    """CO-SPY-style: ``w1 * spai_logit + w2 * probe(semantic) + b``, starting at SPAI's logit (w = 1, 1, probe 0)."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.probe = nn.Sequential(nn.LayerNorm(cfg.semantic_dim), nn.Linear(cfg.semantic_dim, 1))
        nn.init.zeros_(self.probe[1].weight)
        nn.init.zeros_(self.probe[1].bias)
        self.mix = nn.Linear(2, 1)
        nn.init.ones_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)

    def forward(self, spectral: torch.Tensor, spai_logit: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([spai_logit.to(semantic.dtype), self.probe(semantic).squeeze(-1)], dim=1)
        return self.mix(logits).squeeze(-1)


def build_head(cfg: FusionConfig, spectral_dim: int, semantic_dim: int) -> LateFusionHead | LogitFusionHead:
    """The head-only module trained on feature tables; its ``cfg`` records the input widths."""
    cfg = dataclasses.replace(cfg, spectral_dim=spectral_dim, semantic_dim=semantic_dim)
    cfg.validate()
    head = (LateFusionHead if cfg.kind == "late" else LogitFusionHead)(cfg)
    head.cfg = cfg
    return head


class FusedModel(nn.Module):
    """Frozen SPAI + frozen semantic encoder (+ a head): images -> features -> logits; only the head trains."""

    def __init__(self, spai: SPAI, semantic: SemanticEncoder, head: nn.Module | None = None):
        super().__init__()
        self.spai = spai.requires_grad_(False).eval()
        self.semantic = semantic.requires_grad_(False).eval()
        self.head = head
        self._identity: dict[str, Any] | None = None
        if head is not None:
            check_head(head.cfg, self.spai.cfg.descriptor_dim, self.semantic.dim)

    def train(self, mode: bool = True) -> "FusedModel":
        super().train(mode)
        self.spai.eval()  # frozen: SPAI's dropout and BatchNorm stay in inference mode
        self.semantic.eval()
        return self

    def features(self, images: Sequence[torch.Tensor],
                 chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``3 x H x W`` images in [0, 1] -> spectral ``B x F``, SPAI logit ``B``, semantic ``B x D`` (no grad)."""
        with torch.no_grad():
            spectral = self.spai.features_images(images, chunk)[0]
            return spectral, self.spai.cls_head(spectral).squeeze(-1), self.semantic(images)

    def forward_images(self, images: Sequence[torch.Tensor], chunk: int | None = None) -> torch.Tensor:
        if self.head is None:
            raise ValueError("this FusedModel has no head (feature extraction only); build one with build_head")
        return self.head(*self.features(images, chunk))

    def identity(self) -> dict[str, Any]:
        """The frozen models' identities (names and weight fingerprints): feature tables record it, and
        :func:`save_fused` checks that a head is saved with the models its features came from. Hashed once
        (the frozen weights do not change; ConvNeXt-XXL's 3.4 GB take seconds)."""
        if self._identity is None:
            self._identity = self._hash_identity()
        return self._identity

    def _hash_identity(self) -> dict[str, Any]:
        return {"spai": {"model": self.spai.cfg.name, "backbone": self.spai.cfg.backbone,
                         "dim": self.spai.cfg.descriptor_dim, "fingerprint": state_fingerprint(self.spai)},
                "semantic": self.semantic.identity()}


def check_head(cfg: FusionConfig, spectral_dim: int, semantic_dim: int) -> None:
    """A head built for other feature widths than the frozen models give is an error naming both."""
    if (cfg.spectral_dim, cfg.semantic_dim) != (spectral_dim, semantic_dim):
        raise CheckpointError(f"the fusion head reads {cfg.spectral_dim}-d spectral and {cfg.semantic_dim}-d semantic "
                              f"features, but the frozen models give {spectral_dim}-d and {semantic_dim}-d: it was "
                              "trained on features of other backbones; give the SPAI weights and semantic encoder "
                              "its feature table was extracted with")


def build_fused(spai_weights: str | Path, semantic: SemanticConfig, head: nn.Module | None = None,
                spai_config: ModelConfig | str | None = None) -> FusedModel:
    """The fused model from a SPAI weights file (ours or official, with ``spai_config``), a semantic encoder config
    (its weights file loads strictly) and optionally a trained head."""
    spai, _ = load_model(spai_weights, spai_config)
    return FusedModel(spai, SemanticEncoder(semantic), head)


def save_fused(path: str | Path, model: FusedModel, metadata: Mapping[str, Any] | None = None,
               features: Mapping[str, Any] | None = None) -> None:
    """Write the fused detector as one safetensors checkpoint: SPAI, the semantic encoder and the head, all
    embedded (a Ray worker on any node needs this one file), with their configs and identities in the header.

    ``features`` is the identity a feature table recorded (:meth:`FusedModel.identity`); a head trained on features
    of other frozen models is refused.
    """
    if model.head is None:
        raise ValueError("save_fused needs a FusedModel with a trained head")
    identity = model.identity()
    if features is not None:
        for part in ("spai", "semantic"):
            got, want = identity[part], features.get(part, {})
            if got.get("fingerprint") != want.get("fingerprint"):
                raise CheckpointError(f"the head was trained on features of {part} {_describe(want)}, but the model "
                                      f"being saved has {part} {_describe(got)}; build it with the weights the "
                                      "features were extracted with")
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": FUSED_KIND,
            "model_config": json.dumps(dataclasses.asdict(model.spai.cfg)),
            "semantic_config": json.dumps(dataclasses.asdict(model.semantic.cfg)),
            "fusion_config": json.dumps(dataclasses.asdict(model.head.cfg)),
            "identity": json.dumps(identity),
            "metadata": json.dumps(dict(metadata or {}), default=str)}
    with writing(path) as dst:
        save_file(state, str(dst), metadata=meta)


def _describe(identity: Mapping[str, Any]) -> str:
    name = identity.get("encoder") or identity.get("model") or "?"
    return f"{name} (weights {identity.get('fingerprint', '?')})"


def _part(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_fused(path: str | Path) -> tuple[FusedModel, dict[str, Any]]:
    """Rebuild a fused detector from its checkpoint, every part strictly; returns it and the file's provenance."""
    path = Path(path)
    state, header, provenance = read_fused_parts(path)
    try:
        spai_cfg = from_dict(ModelConfig, json.loads(header["model_config"]), f"{path}:model_config")
        semantic_cfg = from_dict(SemanticConfig, json.loads(header["semantic_config"]), f"{path}:semantic_config")
        fusion_cfg = from_dict(FusionConfig, json.loads(header["fusion_config"]), f"{path}:fusion_config")
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: its fused-detector metadata is damaged ({exc!r}); save it again") from None
    unknown = [k for k in state if not k.startswith(("spai.", "semantic.model.", "head."))]
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} key(s) outside the spai, semantic and head parts, e.g. "
                              f"{unknown[:5]}")
    spai = build_model(spai_cfg)
    load_state_strict(spai, _part(state, "spai."), f"{path} (spai part)")
    semantic = SemanticEncoder(semantic_cfg, state=_part(state, "semantic.model."))
    head = build_head(fusion_cfg, fusion_cfg.spectral_dim, fusion_cfg.semantic_dim)
    problems = fit_problems(head.state_dict(), _part(state, "head."))
    if problems:
        raise CheckpointError(f"{path}: the head part does not fit a {fusion_cfg.kind} fusion head: "
                              f"{'; '.join(problems)}")
    head.load_state_dict(_part(state, "head."), strict=True)
    return FusedModel(spai, semantic, head).eval(), provenance


class FusedDetector:
    """A loaded fused model with the :class:`~spai_core.detector.Detector` API (``logits``, ``score``,
    ``num_tiles``, ``model_id``, ``provenance``, ``device``, ``precision``) and :meth:`features`.

    Without a head it extracts features only (``logits`` is then an error). SPAI runs through a
    :class:`Detector`, so it gets the same CPU fusion, tile batching and precision handling.
    """

    def __init__(self, model: FusedModel, device: str | torch.device = "auto", precision: str = "auto",
                 feature_batch: int | None = None, model_id: str = "unknown", provenance: dict | None = None,
                 fuse_cpu: bool = True):
        self.spectral = Detector(model.spai, device, precision, feature_batch, model_id, provenance, fuse_cpu)
        self.device, self.precision = self.spectral.device, self.spectral.precision
        self.model = model.to(self.device).eval()
        self.model_id = model_id
        self.provenance = provenance or {}

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "auto", precision: str = "auto",
                        feature_batch: int | None = None, max_tiles: int | None = None, fuse_cpu: bool = True,
                        config: Any = None) -> "FusedDetector":
        """Load a fused checkpoint (:func:`save_fused`); ``config`` is accepted for the Detector signature and
        must be None: the file names its own models."""
        if config is not None:
            raise CheckpointError(f"{path}: a fused detector checkpoint names its own models; drop the model config")
        model, provenance = load_fused(path)
        if max_tiles is not None:
            model.spai.cfg.max_tiles = max_tiles
        return cls(model, device, precision, feature_batch, file_sha256(path, 16), provenance, fuse_cpu)

    @classmethod
    def for_extraction(cls, spai_weights: str | Path, semantic: SemanticConfig, device: str = "auto",
                       precision: str = "auto", feature_batch: int | None = None, max_tiles: int | None = None,
                       spai_config: ModelConfig | str | None = None) -> "FusedDetector":
        """The frozen models without a head, for feature extraction; ``identity`` is what the table records."""
        model = build_fused(spai_weights, semantic, spai_config=spai_config)
        if max_tiles is not None:
            model.spai.cfg.max_tiles = max_tiles
        return cls(model, device, precision, feature_batch, file_sha256(spai_weights, 16))

    @property
    def config(self) -> ModelConfig:
        return self.model.spai.cfg

    @property
    def identity(self) -> dict[str, Any]:
        return self.model.identity()

    def features(self, images: Sequence[ImageOrPath] | ImageOrPath) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Spectral ``B x F``, SPAI logit ``B`` and semantic ``B x D`` features (float32) of a batch of images."""
        tensors = images_to_tensors(images, self.device)
        if not tensors:
            return (np.zeros((0, self.config.descriptor_dim), np.float32), np.zeros(0, np.float32),
                    np.zeros((0, self.model.semantic.dim), np.float32))
        with self.spectral.inference():
            parts = self.model.features(tensors, self.spectral.feature_batch)
        return tuple(p.float().cpu().numpy() for p in parts)

    def logits(self, images: Sequence[ImageOrPath] | ImageOrPath) -> np.ndarray:
        """Raw fused logits (float32) of a batch of images; takes what :meth:`Detector.logits` takes."""
        if self.model.head is None:
            raise ValueError("this FusedDetector has no head (built for feature extraction)")
        tensors = images_to_tensors(images, self.device)
        if not tensors:
            return np.zeros(0, dtype=np.float32)
        with self.spectral.inference():
            out = self.model.forward_images(tensors, self.spectral.feature_batch)
        return out.float().cpu().numpy()

    def score(self, images: Sequence[ImageOrPath] | ImageOrPath) -> np.ndarray:
        """P(AI-generated) = sigmoid(fused logit) per image (float64)."""
        return sigmoid(self.logits(images))

    def num_tiles(self, height: int, width: int) -> int:
        """Tiles SPAI pools for an image of this size."""
        return self.spectral.num_tiles(height, width)
