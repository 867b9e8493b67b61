"""Sem-SPAI in spai_core: the seed's head shapes, frozen parts, the fused checkpoint, features, refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from spai_core.backbones import BackboneError
from spai_core.checkpoint import CheckpointError, load_model, read_metadata
from spai_core.config import ConfigError
from spai_core.detector import Detector, file_sha256
from spai_core.fusion import (FusedDetector, FusedModel, FusionConfig, build_fused, build_head, load_fused,
                              save_fused)
from spai_core.onnx_runtime import load_detector
from spai_core.semantic import SemanticConfig, SemanticEncoder

TINY_SEMANTIC = SemanticConfig("timm:test_vit")  # random 64-d ViT, the same in every process (seed 0)
TINY_SPECTRAL = 88  # spai_tiny's descriptor_dim: 6 statistics x 4 layers + a 64-d spectral context vector


def _images(n: int = 3) -> list[np.ndarray]:
    """Images of different sizes (one below the 224-px tile, so five-crop), fixed content."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (180 + 60 * i, 250 + 20 * i, 3), dtype=np.uint8) for i in range(n)]


def _tensors(images: list[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(img).permute(2, 0, 1).float() / 255 for img in images]


def _trained(tiny_spai_file: str, kind: str = "late", steps: int = 3) -> FusedModel:
    """A fused model whose head took a few AdamW steps (on every parameter: the frozen ones must not move)."""
    torch.manual_seed(1)
    head = build_head(FusionConfig(kind=kind), TINY_SPECTRAL, 64)
    model = build_fused(tiny_spai_file, TINY_SEMANTIC, head).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    images, labels = _tensors(_images()), torch.tensor([0.0, 1.0, 1.0])
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model.forward_images(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_late_head_has_the_seeds_shapes_for_a_3072_d_semantic_feature():
    head = build_head(FusionConfig(), spectral_dim=1096, semantic_dim=3072)
    seen = {}
    for name in ("semantic_projection", "fusion_layer", "classifier"):
        getattr(head, name).register_forward_hook(
            lambda _, args, out, name=name: seen.update({name: (tuple(args[0].shape), tuple(out.shape))}))
    out = head(torch.randn(4, 1096), torch.randn(4), torch.randn(4, 3072))
    assert out.shape == (4,)
    assert seen["semantic_projection"] == ((4, 3072), (4, 256))
    assert seen["fusion_layer"] == ((4, 1352), (4, 512))
    assert seen["classifier"] == ((4, 1608), (4, 1))
    assert head.cfg.spectral_dim == 1096 and head.cfg.semantic_dim == 3072
    plain = build_head(FusionConfig(residual=False, proj_dim=128, fusion_dim=64), 1096, 3072)
    assert plain.fusion_layer[0].in_features == 1096 + 128 and plain.classifier.in_features == 64


def test_logit_fusion_starts_as_spai_and_learns_from_the_semantic_probe():
    head = build_head(FusionConfig(kind="logit"), 1096, 3072)
    spai_logit = torch.randn(5)
    torch.testing.assert_close(head(torch.randn(5, 1096), spai_logit, torch.randn(5, 3072)), spai_logit)
    assert sum(p.numel() for p in head.parameters()) == 2 * 3072 + 3072 + 1 + 3  # LayerNorm, probe, mix


def test_bad_configs_say_what_to_use():
    with pytest.raises(ConfigError, match="kind must be one of late, logit") as info:
        build_head(FusionConfig(kind="early"), 8, 8)
    assert info.value.field == "kind"
    with pytest.raises(BackboneError, match="unknown backbone 'convnext'.*timm:<timm model name>"):
        SemanticEncoder(SemanticConfig("convnext"))
    with pytest.raises(CheckpointError, match="no such weights file"):
        SemanticEncoder(SemanticConfig("timm:test_vit", weights="/nonexistent/clip.safetensors"))


def test_frozen_parts_get_no_gradient_and_stay_unchanged(tiny_spai_file):
    before = build_fused(tiny_spai_file, TINY_SEMANTIC)
    frozen = {k: v.clone() for k, v in before.state_dict().items()}
    model = _trained(tiny_spai_file)
    for name, param in model.named_parameters():
        assert name.startswith("head.") == param.requires_grad, name
        if not name.startswith("head."):
            assert param.grad is None, name
    for key, value in model.state_dict().items():
        if not key.startswith("head."):
            torch.testing.assert_close(value, frozen[key], rtol=0, atol=0, msg=key)
    head_init = build_head(FusionConfig(), TINY_SPECTRAL, 64)
    assert any(not torch.equal(p, q) for p, q in zip(model.head.parameters(), head_init.parameters()))
    assert not model.spai.training and not model.semantic.training  # frozen dropout / BatchNorm stay in eval


@pytest.mark.parametrize("kind", ["late", "logit"])
def test_save_load_round_trip_gives_identical_logits_through_load_detector(tiny_spai_file, tmp_path, kind):
    model = _trained(tiny_spai_file, kind)
    extractor = FusedDetector.for_extraction(tiny_spai_file, TINY_SEMANTIC, "cpu", "fp32")
    path = tmp_path / "fused.safetensors"
    save_fused(path, model, {"run": "r1", "epoch": 3}, features=extractor.identity)
    loaded = load_detector(path, device="cpu", precision="fp32")
    assert isinstance(loaded, FusedDetector)
    assert loaded.model_id == file_sha256(path, 16) and loaded.provenance == {"run": "r1", "epoch": 3}
    images = _images()
    with torch.no_grad():  # before FusedDetector patches its linears for the CPU
        plain = model.forward_images(_tensors(images)).numpy()
    expected = FusedDetector(model, "cpu", "fp32").logits(images)
    np.testing.assert_array_equal(loaded.logits(images), expected)
    np.testing.assert_allclose(plain, expected, atol=1e-5)  # the plain PyTorch model, up to oneDNN's rounding
    assert loaded.score(images[0]).shape == (1,) and loaded.num_tiles(500, 500) == 4
    bf16 = FusedDetector(load_fused(path)[0], "cpu", "bf16").logits(images)
    np.testing.assert_allclose(bf16, expected, atol=0.05)
    assert read_metadata(path) == {"run": "r1", "epoch": 3}
    with pytest.raises(CheckpointError, match="fused .*spai score"):
        load_model(path)


def test_features_are_deterministic_and_match_spai(tiny_spai_file):
    images = _images()
    first = FusedDetector.for_extraction(tiny_spai_file, TINY_SEMANTIC, "cpu", "fp32")
    spectral, spai_logit, semantic = first.features(images)
    assert spectral.shape == (3, TINY_SPECTRAL) and spai_logit.shape == (3,) and semantic.shape == (3, 64)
    assert spectral.dtype == semantic.dtype == np.float32
    again = FusedDetector.for_extraction(tiny_spai_file, TINY_SEMANTIC, "cpu", "fp32").features(images)
    for a, b in zip((spectral, spai_logit, semantic), again):
        np.testing.assert_array_equal(a, b)
    # One image alone gives its row of the batch (up to float rounding of a different tile batch).
    alone = first.features(images[1])
    for a, b in zip((spectral, spai_logit, semantic), alone):
        np.testing.assert_allclose(a[1:2], b, atol=1e-5)
    np.testing.assert_array_equal(spai_logit, Detector.from_pretrained(tiny_spai_file, "cpu", "fp32").logits(images))
    assert [len(x) for x in first.features([])] == [0, 0, 0]


def test_a_head_saved_with_other_backbones_is_refused(tiny_spai_file, tmp_path):
    model = _trained(tiny_spai_file, steps=1)
    other = FusedDetector.for_extraction(tiny_spai_file, SemanticConfig("timm:test_vit", seed=1), "cpu", "fp32")
    with pytest.raises(CheckpointError, match="trained on features of semantic timm:test_vit"):
        save_fused(tmp_path / "x.safetensors", model, features=other.identity)
    wide = build_head(FusionConfig(), TINY_SPECTRAL, 3072)
    with pytest.raises(CheckpointError, match="3072-d semantic features, but the frozen models give 88-d and 64-d"):
        build_fused(tiny_spai_file, TINY_SEMANTIC, wide)


def test_a_checkpoint_naming_another_encoder_is_refused(tiny_spai_file, tmp_path):
    path = tmp_path / "fused.safetensors"
    save_fused(path, _trained(tiny_spai_file, steps=1))
    state = load_file(str(path))
    with safe_open(str(path), "pt") as fh:
        header = fh.metadata()
    header["semantic_config"] = json.dumps({**json.loads(header["semantic_config"]), "encoder": "timm:test_convnext"})
    save_file(state, str(tmp_path / "edited.safetensors"), metadata=header)
    with pytest.raises(BackboneError, match="does not fit semantic encoder 'timm:test_convnext'.*missing key"):
        load_fused(tmp_path / "edited.safetensors")


def test_weights_of_another_encoder_are_refused(tmp_path):
    vit = tmp_path / "vit.safetensors"
    save_file(SemanticEncoder(TINY_SEMANTIC).model.state_dict(), str(vit))
    assert SemanticEncoder(SemanticConfig("timm:test_vit", weights=str(vit))).identity()["fingerprint"] == \
        SemanticEncoder(TINY_SEMANTIC).identity()["fingerprint"]
    with pytest.raises(BackboneError, match="weights of semantic encoder 'timm:test_convnext'"):
        SemanticEncoder(SemanticConfig("timm:test_convnext", weights=str(vit)))
    convnext = tmp_path / "convnext.safetensors"
    save_file(SemanticEncoder(SemanticConfig("timm:test_convnext")).model.state_dict(), str(convnext))
    with pytest.raises(BackboneError, match="does not fit semantic encoder 'timm:test_vit'.*missing key"):
        SemanticEncoder(SemanticConfig("timm:test_vit", weights=str(convnext)))


def test_clip_vit_b16_is_a_semantic_encoder_with_the_real_weights(photos, tmp_path):
    """Its 768-d pooled feature through CLIP's projection is the ONNX tower's image embedding (which also
    quantizes activations, hence a cosine bound; test_clip_backbone measured 0.956-0.989 on the photos)."""
    ort = pytest.importorskip("onnxruntime")
    from spai_core.backbones.clip_onnx import convert_clip_onnx, packaged_onnx_path
    from spai_core.detector import image_to_tensor

    weights = tmp_path / "clip.safetensors"
    projection = convert_clip_onnx(None, weights)["visual_projection.weight"]
    encoder = SemanticEncoder(SemanticConfig("clip_vit_b16", weights=str(weights)))
    assert encoder.dim == 768
    images = [image_to_tensor(p) for p in [p for p in photos if p.suffix.lower() == ".jpg"][:2]]
    ours = encoder(images) @ projection.T
    session = ort.InferenceSession(str(packaged_onnx_path()), providers=["CPUExecutionProvider"])
    theirs = torch.from_numpy(session.run(["image_embeds"], {"pixel_values": encoder.preprocess(images).numpy()})[0])
    assert torch.nn.functional.cosine_similarity(ours, theirs).min() > 0.94


def test_an_open_clip_convnext_checkpoint_loads_through_timms_filter(tmp_path):
    """open_clip keeps a timm ConvNeXt (ConvNeXt-XXL in the seed) under ``visual.trunk.``, beside its projection and
    text tower; the encoder takes the trunk and skips the rest."""
    reference = SemanticEncoder(SemanticConfig("timm:test_convnext"))
    state = {f"visual.trunk.{k}": v for k, v in reference.model.state_dict().items()}
    state.update({"visual.head.proj.weight": torch.zeros(16, reference.dim), "text.token_embedding.weight":
                  torch.zeros(10, 16), "logit_scale": torch.ones(())})
    path = tmp_path / "open_clip.safetensors"
    save_file(state, str(path))
    loaded = SemanticEncoder(SemanticConfig("timm:test_convnext", weights=str(path), seed=5))
    assert loaded.identity()["fingerprint"] == reference.identity()["fingerprint"]
