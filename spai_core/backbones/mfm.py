"""The official SPAI backbone: the MFM-pretrained ViT-B/16 (Xie et al., "Masked Frequency Modeling") as timm's ViT.

Its architecture is timm's ``vit_base_patch16_224``: pre-norm blocks, LayerNorm eps 1e-6, exact GELU, a learned
absolute position embedding that covers the CLS token, no layer scale. The one layout difference is the attention
bias: MFM (BEiT style) keeps a bias-free ``qkv`` linear with separate ``q_bias`` and ``v_bias`` and no key bias,
where timm has one fused ``qkv.bias``. :func:`checkpoint_filter_fn` folds ``cat(q_bias, 0, v_bias)`` into it, which
is exact: a key bias adds ``q . b_k`` to every score of a query's row, a constant that softmax removes. For the same
reason :func:`to_official` may drop the key part when writing the official layout back, whatever training made it.
"""
from __future__ import annotations

from typing import Mapping

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from . import BackboneSpec, register_backbone

NAME = "mfm_vit_b16"
_ENCODER = "encoder."  # MFM pretraining files hold the ViT under this prefix, beside the decoder


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model=None) -> dict[str, torch.Tensor]:
    """MFM pretraining files, the official SPAI ViT keys and our format-1 checkpoints -> timm ViT keys.

    Keys under ``encoder.`` are the ViT when there are any (the decoder is dropped); each block's ``q_bias`` and
    ``v_bias`` become ``qkv.bias``. Keys already in timm's layout pass through, so the filter is idempotent.
    """
    if any(k.startswith(_ENCODER) for k in state_dict):
        state_dict = {k[len(_ENCODER):]: v for k, v in state_dict.items() if k.startswith(_ENCODER)}
    out = {}
    for key, value in state_dict.items():
        prefix = key[:-len("q_bias")] if key.endswith("attn.q_bias") else None
        if prefix is not None and prefix + "v_bias" in state_dict:
            out[prefix + "qkv.bias"] = torch.cat([value, torch.zeros_like(value), state_dict[prefix + "v_bias"]])
        elif not (key.endswith("attn.v_bias") and key[:-len("v_bias")] + "q_bias" in state_dict):
            out[key] = value
    return out


def to_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ViT keys -> the official layout: each ``qkv.bias`` split into ``q_bias`` and ``v_bias`` (key part
    dropped; see the module docstring)."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("attn.qkv.bias"):
            q_bias, _, v_bias = value.chunk(3)
            prefix = key[:-len("qkv.bias")]
            out[prefix + "q_bias"], out[prefix + "v_bias"] = q_bias.clone(), v_bias.clone()
        else:
            out[key] = value
    return out


register_backbone(NAME, BackboneSpec(
    "vit_base_patch16_224", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
    checkpoint_filter=checkpoint_filter_fn,
    description="official SPAI backbone: MFM-pretrained ViT-B/16 (weights/mfm_pretrain_vit_base.pth, or spai.pth)"))
