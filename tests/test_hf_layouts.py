"""Backbone weights in Hugging Face layouts (ViT, DINOv2) load into timm and give transformers' own block outputs.

The reference is transformers itself: a small randomly initialised model, saved with ``save_pretrained`` (the
layout published on the Hub), loaded by file path through ``timm:<name>`` as a user would.
"""
from __future__ import annotations

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTForImageClassification

from spai_core.backbones import create_backbone, embed

SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 224,
         "layer_norm_eps": 1e-6}  # timm's eps, so that the outputs match to float rounding


def _block_tokens(backbone, pixels: torch.Tensor) -> list[torch.Tensor]:
    x, out = embed(backbone, pixels), []
    for block in backbone.blocks:
        x = block(x)
        out.append(x)
    return out


@pytest.mark.parametrize("timm_name, hf_model", [
    ("vit_base_patch16_224", lambda: ViTForImageClassification(ViTConfig(**SMALL, intermediate_size=128,
                                                                         num_labels=3))),
    ("vit_small_patch14_dinov2", lambda: Dinov2Model(Dinov2Config(**SMALL, patch_size=14, mlp_ratio=2))),
], ids=["vit-with-classifier", "dinov2"])
def test_hugging_face_weights_give_transformers_block_outputs(tmp_path, timm_name, hf_model):
    torch.manual_seed(0)
    reference = hf_model().eval()
    with torch.no_grad():  # random layer scales and tokens, so that every key's place is checked
        for param in reference.parameters():
            param.normal_(0, 0.05)
    reference.save_pretrained(tmp_path)
    patch = reference.config.patch_size
    backbone = create_backbone(f"timm:{timm_name}", tmp_path / "model.safetensors", embed_dim=64, depth=2,
                               num_heads=4, mlp_ratio=2.0, patch_size=patch).eval()
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[1:]
        got = _block_tokens(backbone, pixels)
    assert len(got) == len(expected) == 2
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
