"""The backbone registry: names, the generic timm path with a local weights file, per-block tokens, and SPAI models
whose checkpoint alone names their backbone."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from spai_core.backbones import (BackboneError, BackboneSpec, create_backbone, embed, get_backbone_spec,
                                 list_backbones, register_backbone)
from spai_core.checkpoint import load_backbone, load_model, save_checkpoint
from spai_core.detector import Detector
from spai_core.spai import build_model, get_model_config

SMALL = {"embed_dim": 48, "depth": 2, "num_heads": 3}  # keeps timm models fast to build and run


def test_registered_names_and_their_normalisation():
    assert {"mfm_vit_b16", "clip_vit_b16"} <= set(list_backbones())
    assert get_backbone_spec("mfm_vit_b16").mean == (0.485, 0.456, 0.406)
    assert get_backbone_spec("clip_vit_b16").mean == pytest.approx((0.4815, 0.4578, 0.4082), abs=1e-4)
    # timm:<model> takes mean/std from timm's pretrained config of that name and tag
    assert get_backbone_spec("timm:vit_small_patch16_224.augreg_in21k").std == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="taken"):
        register_backbone("mfm_vit_b16", BackboneSpec("vit_tiny_patch16_224"))


@pytest.mark.parametrize("name,message", [
    ("vit_b16", "unknown backbone.*mfm_vit_b16.*timm:<timm model name>"),
    ("timm:not_a_model", "timm has no model"),
    ("timm:resnet18", "cannot be built as a ViT.*needs a timm VisionTransformer"),
])
def test_bad_names_say_what_to_use(name, message):
    with pytest.raises(BackboneError, match=message):
        create_backbone(name)
    if name == "vit_b16":
        with pytest.raises(BackboneError):  # a config naming it fails when read, not when first built
            get_model_config("spai_tiny", backbone=name)


def test_block_by_block_tokens_are_timms_forward():
    torch.manual_seed(0)
    full = timm.create_model("vit_base_patch16_clip_quickgelu_224", **SMALL).eval()  # pre-norm, with its final norm
    backbone = create_backbone("clip_vit_b16", full.state_dict(), **SMALL).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        x = embed(backbone, images)
        for block in backbone.blocks:
            x = block(x)
        torch.testing.assert_close(full.norm(x), full.forward_features(images), rtol=0, atol=1e-6)


def test_timm_model_by_name_with_a_local_weights_file(tmp_path):
    """A timm checkpoint as timm publishes it (head and final norm included) loads strictly into the backbone."""
    torch.manual_seed(1)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=10, depth=2)
    save_file(source.state_dict(), tmp_path / "vit_tiny.safetensors")
    backbone = create_backbone("timm:vit_tiny_patch16_224", tmp_path / "vit_tiny.safetensors", depth=2)
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key], rtol=0, atol=0)
    with pytest.raises(BackboneError, match="12 missing key.*blocks.2.norm1"):
        create_backbone("timm:vit_tiny_patch16_224", tmp_path / "vit_tiny.safetensors", depth=3)
    with pytest.raises(BackboneError, match="shape mismatch"):
        create_backbone("timm:vit_small_patch16_224", tmp_path / "vit_tiny.safetensors", depth=2)


def test_spai_on_a_timm_backbone_records_it_in_the_checkpoint(tmp_path):
    """Backbone and shape go into the model config, so the checkpoint alone rebuilds the model (no flag)."""
    torch.manual_seed(2)
    cfg = get_model_config("spai_tiny", backbone="timm:vit_tiny_patch16_224", embed_dim=None, num_heads=None,
                           depth=2)
    model = build_model(cfg).eval()
    assert (model.cfg.embed_dim, model.cfg.num_heads, model.cfg.depth, model.cfg.patch_size) == (192, 3, 2, 16)
    torch.testing.assert_close(model.mfvit.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))  # timm's, not ImageNet's
    source = timm.create_model("vit_tiny_patch16_224", depth=2)
    torch.save({"model": source.state_dict()}, tmp_path / "vit_tiny.pth")
    load_backbone(model, tmp_path / "vit_tiny.pth")
    torch.testing.assert_close(model.mfvit.vit.pos_embed, source.pos_embed, rtol=0, atol=0)
    save_checkpoint(tmp_path / "m.safetensors", model)
    loaded, ckpt = load_model(tmp_path / "m.safetensors")
    assert ckpt.config.backbone == "timm:vit_tiny_patch16_224" and ckpt.config == model.cfg
    image = np.random.default_rng(0).integers(0, 256, (300, 260, 3), dtype=np.uint8)
    np.testing.assert_array_equal(Detector(loaded, "cpu").logits([image]), Detector(model, "cpu").logits([image]))


def test_clip_spai_uses_clips_normalisation_and_pre_norm():
    model = build_model(get_model_config("spai_clip_b16", **SMALL))
    assert model.cfg.backbone == "clip_vit_b16"
    torch.testing.assert_close(model.mfvit.std.flatten(), torch.tensor(get_backbone_spec("clip_vit_b16").std))
    assert isinstance(model.mfvit.vit.norm_pre, torch.nn.LayerNorm) and model.mfvit.vit.norm_pre.eps == 1e-5
    assert type(model.mfvit.vit.blocks[0].mlp.act).__name__ == "QuickGELU"
