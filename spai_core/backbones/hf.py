"""Hugging Face layouts of ViT weights -> timm's keys, for any backbone: CLIP vision towers, ViT, DeiT and DINOv2.

Files published on the Hugging Face Hub (and what ``save_pretrained`` writes) keep transformers' historical key
names: ``encoder.layer.N.attention.attention.query`` for ViT / DeiT / DINOv2 (under ``vit.``, ``deit.`` or
``dinov2.`` when saved from a task model), ``vision_model.encoder.layers.N.self_attn.q_proj`` for CLIP. Both map
onto timm's ViT one to one, except that q, k and v are fused into ``qkv`` (in that order). :func:`checkpoint_filter_fn`
converts either, then hands the keys to timm's ViT filter, which reads the timm, OpenAI CLIP and open_clip layouts
and resamples the position embedding for other tile sizes.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
from timm.models.vision_transformer import checkpoint_filter_fn as timm_checkpoint_filter

Tensors = Mapping[str, torch.Tensor]

_PATCH_KEY = "embeddings.patch_embeddings.projection.weight"
_VIT_PREFIXES = ("", "vit.", "deit.", "dinov2.")
_VIT_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")
_VIT_SWAPS = (  # applied in order, each once per key
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.distillation_token", "dist_token"),  # DeiT distilled
    ("embeddings.register_tokens", "reg_token"),  # DINOv2 with registers
    ("encoder.layer.", "blocks."),
    ("attention.output.dense.", "attn.proj."),
    ("layernorm_before.", "norm1."),  # ViT / DeiT; DINOv2 already says norm1 / norm2
    ("layernorm_after.", "norm2."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
    ("layer_scale1.lambda1", "ls1.gamma"),  # DINOv2
    ("layer_scale2.lambda1", "ls2.gamma"),
    ("layernorm.", "norm."),
)
# Parts a SPAI backbone has no use for: masked-image pretraining's mask token, a task model's pooler and classifier.
_VIT_UNUSED = ("embeddings.mask_token", "pooler.", "classifier.", "cls_classifier.", "distillation_classifier.")

_CLIP_PREFIX = "vision_model."
_CLIP_PROJECTION = "visual_projection.weight"
_CLIP_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_CLIP_SWAPS = (
    ("embeddings.patch_embedding.", "patch_embed.proj."),
    ("pre_layrnorm.", "norm_pre."),  # sic: Hugging Face's spelling
    ("post_layernorm.", "norm."),
    ("encoder.layers.", "blocks."),
    ("layer_norm", "norm"),
    ("self_attn.out_proj.", "attn.proj."),
)
_QKV_ORDER = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}


def _fuse_qkv(out: dict[str, torch.Tensor], parts: dict[tuple[str, str], dict[str, torch.Tensor]]) -> None:
    for (layer, kind), found in parts.items():
        if len(found) == 3:  # else the fused key stays missing, and the strict load names it
            ordered = sorted(found.items(), key=lambda item: _QKV_ORDER[item[0]])
            out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([value for _, value in ordered])


def _vit_prefix(state_dict: Tensors) -> str | None:
    return next((p for p in _VIT_PREFIXES if p + _PATCH_KEY in state_dict), None)


def convert_vit(state_dict: Tensors, prefix: str = "") -> dict[str, torch.Tensor]:
    """Hugging Face ViT / DeiT / DINOv2 keys (under ``prefix``) -> timm ViT keys."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        if key.startswith(_VIT_UNUSED):
            continue
        if match := _VIT_QKV.fullmatch(key):
            layer, which, kind = match.groups()
            qkv.setdefault((layer, kind), {})[which] = value
            continue
        for old, new in _VIT_SWAPS:
            key = key.replace(old, new, 1)
        out[key] = value
    _fuse_qkv(out, qkv)
    return out


def convert_clip(state_dict: Tensors) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP vision keys -> timm ViT keys; the text tower and ``logit_scale`` of a ``CLIPModel`` are
    left out, the projection becomes a bias-free 512-d ``head``."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key == _CLIP_PROJECTION:
            out["head.weight"] = value
            out["head.bias"] = torch.zeros(value.shape[0], dtype=value.dtype)
            continue
        if not key.startswith(_CLIP_PREFIX):
            continue
        key = key[len(_CLIP_PREFIX):]
        if key == "embeddings.position_ids":  # a buffer older transformers versions saved
            continue
        if key == "embeddings.class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "embeddings.position_embedding.weight":
            out["pos_embed"] = value.unsqueeze(0)
        elif match := _CLIP_QKV.fullmatch(key):
            layer, which, kind = match.groups()
            qkv.setdefault((layer, kind), {})[which] = value
        else:
            for old, new in _CLIP_SWAPS:
                key = key.replace(old, new)
            out[key] = value
    _fuse_qkv(out, qkv)
    return out


def checkpoint_filter_fn(state_dict: Tensors, model) -> dict[str, torch.Tensor]:
    """Weights in a Hugging Face layout (CLIP vision, ViT, DeiT, DINOv2) or in timm, OpenAI CLIP or open_clip's ->
    timm ViT keys for ``model``."""
    if _CLIP_PREFIX + "embeddings.class_embedding" in state_dict:
        state_dict = convert_clip(state_dict)
    elif (prefix := _vit_prefix(state_dict)) is not None:
        state_dict = convert_vit(state_dict, prefix)
    return timm_checkpoint_filter(dict(state_dict), model)
