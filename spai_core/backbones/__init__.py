"""Backbones SPAI runs on: a registry of named configs, built with timm and loaded strictly.

A backbone is a timm ``VisionTransformer`` built without its head and final norm: SPAI reads the residual-stream
tokens after every block, running the blocks itself (:func:`embed`, then ``model.blocks``). A registry entry
(:class:`BackboneSpec`) names the timm architecture, the mean/std its weights expect (SPAI applies them after its
FFT split) and a ``checkpoint_filter`` that maps a weights file's layout onto timm's module names at load time, as
timm's own ``checkpoint_filter_fn`` does; the modules always keep timm's names.

Names (:func:`list_backbones`):

- ``mfm_vit_b16``: the official SPAI backbone, MFM-pretrained ViT-B/16 (``mfm.py``);
- ``clip_vit_b16``: OpenAI CLIP ViT-B/16 image tower (``clip.py``);
- ``timm:<model>[.<tag>]``: any timm ViT by name, e.g. ``timm:vit_small_patch16_224.augreg_in21k``; mean/std from
  timm's pretrained config of that name, weights in timm, open_clip, OpenAI CLIP or Hugging Face layout (``hf.py``).

A model family adds its entry from its own module at import::

    register_backbone("my_vit", BackboneSpec("vit_small_patch16_224", mean=..., std=..., checkpoint_filter=fn))
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_pretrained_cfg
from timm.models.vision_transformer import VisionTransformer

from ..errors import UserError
from .hf import checkpoint_filter_fn as any_layout_filter

_logger = logging.getLogger(__name__)

# A weights file's state dict (any layout) and the model it is for -> the model's timm keys.
CheckpointFilter = Callable[[Mapping[str, torch.Tensor], VisionTransformer], dict[str, torch.Tensor]]
TIMM_PREFIX = "timm:"
# Parts of a timm ViT after its blocks, which SPAI does not build: pretrained files hold them, loading skips them.
_UNUSED_PREFIXES = ("norm.", "fc_norm.", "head.", "attn_pool.")


class BackboneError(UserError, ValueError):
    """An unknown backbone name, or weights that do not fit the backbone."""


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and read its weights.

    ``model_args`` are timm ``create_model`` arguments on top of ``timm_name``'s own; ``checkpoint_filter`` adapts a
    weights file's keys (by default :func:`.hf.checkpoint_filter_fn`: timm, open_clip, OpenAI CLIP and the Hugging
    Face CLIP / ViT / DeiT / DINOv2 layouts).
    """

    timm_name: str
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    model_args: Mapping[str, Any] = field(default_factory=dict)
    checkpoint_filter: CheckpointFilter = any_layout_filter
    description: str = ""


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(name: str, spec: BackboneSpec) -> BackboneSpec:
    """Add a named backbone; a name is registered once (a second entry would silently change saved models)."""
    if name in _REGISTRY or name.startswith(TIMM_PREFIX):
        raise ValueError(f"backbone name {name!r} is taken (registered, or the {TIMM_PREFIX} prefix)")
    _REGISTRY[name] = spec
    return spec


def list_backbones() -> list[str]:
    """Registered names; any ``timm:<model>`` is accepted besides."""
    return sorted(_REGISTRY)


def get_backbone_spec(name: str) -> BackboneSpec:
    """The spec of a registered name, or of ``timm:<model>`` (mean/std from timm's pretrained config)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith(TIMM_PREFIX):
        timm_name = name[len(TIMM_PREFIX):]
        if not timm.is_model(timm_name):
            raise BackboneError(f"backbone {name!r}: timm has no model {timm_name!r}; list them with "
                                "`python -c \"import timm; print(timm.list_models('vit_*'))\"`")
        cfg = get_pretrained_cfg(timm_name)
        return BackboneSpec(timm_name, mean=tuple(cfg.mean) if cfg else IMAGENET_DEFAULT_MEAN,
                            std=tuple(cfg.std) if cfg else IMAGENET_DEFAULT_STD, description=f"timm {timm_name}")
    raise BackboneError(f"unknown backbone {name!r}; use one of {', '.join(list_backbones())} or "
                        f"{TIMM_PREFIX}<timm model name>")


def create_backbone(name: str, weights: str | Path | Mapping[str, torch.Tensor] | None = None, *,
                    img_size: int = 224, drop_path_rate: float = 0.0, **model_args: Any) -> VisionTransformer:
    """Build backbone ``name`` (random init) for ``img_size`` tiles, then load ``weights`` (a file or a state dict
    in any layout its filter reads) strictly. ``model_args`` override timm's (e.g. ``embed_dim=64, depth=4`` for
    test-sized models, which no pretrained weights fit)."""
    spec = get_backbone_spec(name)
    args = {**spec.model_args, **model_args}
    needs = "SPAI reads per-block tokens and needs a timm VisionTransformer (vit_*, deit3_*, CLIP, DINOv2, SigLIP)"
    try:  # other timm families reject the ViT-only arguments
        model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, global_pool="", final_norm=False,
                                  img_size=img_size, drop_path_rate=drop_path_rate, **args)
    except TypeError as exc:
        raise BackboneError(f"backbone {name!r} cannot be built as a ViT ({exc}); {needs}") from None
    if not isinstance(model, VisionTransformer):
        raise BackboneError(f"backbone {name!r} is a timm {type(model).__name__}; {needs}")
    if weights is not None:
        load_backbone_weights(model, name, weights)
    return model


def load_backbone_weights(model: VisionTransformer, name: str, weights: str | Path | Mapping[str, torch.Tensor],
                          source: str | None = None) -> None:
    """Load a weights file or state dict into ``model`` through backbone ``name``'s filter.

    Every parameter of the model must come from the weights with its shape; keys it has no place for (a
    pretraining decoder, a text tower, a classifier) are skipped and counted in the log.
    """
    if isinstance(weights, (str, Path)):
        from ..checkpoint import read_tensors  # checkpoint builds SPAI models, which import this module

        source = source or str(weights)
        weights = read_tensors(weights)
    source = source or "weights"
    state = get_backbone_spec(name).checkpoint_filter(dict(weights), model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or wrong:
        problems = ([f"{len(missing)} missing key(s), e.g. {missing[:4]}"] if missing else []) + (
            [f"{len(wrong)} shape mismatch(es), e.g. {wrong[:2]}"] if wrong else [])
        raise BackboneError(f"{source} does not fit backbone {name!r}: {'; '.join(problems)}. Give the weights of "
                            "that backbone, or set the model's backbone to the one they are for")
    skipped = [k for k in state if k not in expected]
    if skipped:
        unusual = [k for k in skipped if not k.startswith(_UNUSED_PREFIXES)]
        _logger.info("%s: skipped %d key(s) backbone %s has no place for%s", source, len(skipped), name,
                     f", e.g. {unusual[:4]}" if unusual else " (head and final norm)")
    model.load_state_dict({k: state[k].to(v.dtype) for k, v in expected.items()}, strict=True)


def embed(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Normalised ``B x 3 x S x S`` images -> the tokens entering the first block (timm's ``forward_features`` up
    to its blocks: patch and position embedding, prefix tokens, pre-norm)."""
    x = model._pos_embed(model.patch_embed(images))
    return model.norm_pre(model.patch_drop(x))


def shape_of(model: VisionTransformer) -> dict[str, Any]:
    """The ViT shape of a built backbone, as ``ModelConfig`` records it."""
    block = model.blocks[0]
    return {"patch_size": model.patch_embed.patch_size[0], "embed_dim": model.embed_dim, "depth": len(model.blocks),
            "num_heads": block.attn.num_heads, "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim}


# Model families register their entries on import (as timm's model modules do).
from . import clip, mfm  # noqa: E402,F401
