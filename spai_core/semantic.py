"""Frozen semantic encoders for Sem-SPAI: any registry backbone or timm model as a pooled image embedding.

The encoder sees the whole image resized to ``img_size`` (224) with the weights' own mean/std and returns timm's
pooled features (``create_model(num_classes=0)``: the final norm and pooling kept, the classifier dropped), e.g.
768-d for the CLIP ViT-B/16 image tower (``clip_vit_b16``, weights from ``spai backbone import-clip-onnx``) and
3072-d for ConvNeXt-XXL (``timm:convnext_xxlarge``, whose open_clip checkpoints keep it under ``visual.trunk.*``,
which timm's ConvNeXt filter maps). Weights are local files only and load strictly.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.models import model_entrypoint
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .backbones import BackboneError, get_backbone_spec
from .config import ConfigError

_logger = logging.getLogger(__name__)


@dataclass
class SemanticConfig:
    """Which frozen encoder gives the semantic feature, and from which weights; saved in fused checkpoints."""

    encoder: str = "clip_vit_b16"  # a registry backbone (backbones.list_backbones()) or timm:<model>
    # A local weights file in any layout the encoder's filter reads; None = random init from ``seed`` (tests and
    # demos: every process builds the same encoder, so features from different Ray workers agree).
    weights: str | None = None
    seed: int = 0
    img_size: int = 224  # the image is resized to this square before encoding
    model_args: dict[str, Any] = field(default_factory=dict)  # timm create_model overrides (test-sized models)

    def validate(self) -> None:
        get_backbone_spec(self.encoder)  # an unknown name fails with the names to use
        if self.img_size < 16:
            raise ConfigError(f"img_size must be at least 16, got {self.img_size}", "img_size")


def _layout_filter(encoder: str, model: nn.Module) -> Callable[[Mapping[str, torch.Tensor], nn.Module], dict]:
    """The checkpoint filter for ``model``: the registry's for ViTs (timm, open_clip, OpenAI, Hugging Face layouts),
    else the filter of the timm module that defines the architecture (ConvNeXt's reads open_clip's ``visual.trunk``),
    else none."""
    if isinstance(model, VisionTransformer):
        return get_backbone_spec(encoder).checkpoint_filter
    module = importlib.import_module(model_entrypoint(get_backbone_spec(encoder).timm_name).__module__)
    return getattr(module, "checkpoint_filter_fn", lambda state, _: dict(state))


def state_fingerprint(module: nn.Module) -> str:
    """A 16-hex content hash of a module's state dict (names, shapes, fp32 values): the same weights give the same
    fingerprint whatever file format they came from, so feature tables and fused checkpoints can be matched."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        tensor = value.detach().float().contiguous().cpu()
        digest.update(f"{key}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


class SemanticEncoder(nn.Module):
    """A frozen timm model: a batch of ``3 x H x W`` images in [0, 1] (any sizes) -> ``B x dim`` pooled features."""

    def __init__(self, cfg: SemanticConfig, state: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        spec = get_backbone_spec(cfg.encoder)
        args = {**spec.model_args, **cfg.model_args}
        try:
            with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
                torch.manual_seed(cfg.seed)
                self.model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **args)
        except TypeError as exc:
            raise BackboneError(f"semantic encoder {cfg.encoder!r} cannot be built with {args} ({exc})") from None
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        if state is not None:
            self.load_weights(state, "fused checkpoint", filtered=True)
        elif cfg.weights is not None:
            from .checkpoint import read_tensors  # checkpoint imports the model modules

            self.load_weights(read_tensors(cfg.weights), cfg.weights)
        else:
            _logger.info("semantic encoder %s: random weights (no weights file given)", cfg.encoder)
        self.requires_grad_(False)
        self.eval()

    @property
    def dim(self) -> int:
        """Width of the pooled feature."""
        return self.model.num_features

    def load_weights(self, state: Mapping[str, torch.Tensor], source: str, filtered: bool = False) -> None:
        """Load every parameter strictly (through the layout filter unless ``filtered``); extra keys are skipped."""
        from .checkpoint import fit_problems

        if not filtered:
            try:
                state = _layout_filter(self.cfg.encoder, self.model)(dict(state), self.model)
            except (KeyError, IndexError, RuntimeError, ValueError) as exc:  # a filter meeting another model's keys
                raise BackboneError(f"{source} cannot be read as weights of semantic encoder {self.cfg.encoder!r} "
                                    f"({type(self.model).__name__}): its layout filter failed on "
                                    f"{type(exc).__name__}: {exc}. Give that encoder's weights, or set "
                                    "semantic.encoder to the one they are for") from None
        expected = self.model.state_dict()
        problems = fit_problems(expected, state, unexpected_ok=not filtered)
        if problems:
            raise BackboneError(f"{source} does not fit semantic encoder {self.cfg.encoder!r} "
                                f"({type(self.model).__name__}, {self.dim}-d): {'; '.join(problems)}. Give that "
                                "encoder's weights, or set semantic.encoder to the one they are for")
        self.model.load_state_dict({k: state[k].to(v.dtype) for k, v in expected.items()}, strict=True)

    def train(self, mode: bool = True) -> "SemanticEncoder":
        return super().train(False)  # frozen: dropout and norms stay in inference mode

    def preprocess(self, images: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """``3 x H x W`` images in [0, 1] -> the normalised ``B x 3 x S x S`` batch the encoder sees: each whole
        image squashed to the square (antialiased bilinear), so nothing of the scene is cropped away."""
        size = (self.cfg.img_size, self.cfg.img_size)
        batch = torch.cat([F.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True,
                                         align_corners=False) for img in images])
        return (batch.clamp(0, 1) - self.mean) / self.std

    def forward(self, images: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Images as :meth:`preprocess` takes them -> ``B x dim`` pooled features (no autograd: frozen)."""
        with torch.no_grad():
            return self.model(self.preprocess(images))

    def identity(self) -> dict[str, Any]:
        """What a feature table or fused checkpoint records of this encoder."""
        return {"encoder": self.cfg.encoder, "weights": Path(self.cfg.weights).name if self.cfg.weights else None,
                "dim": self.dim, "fingerprint": state_fingerprint(self)}
