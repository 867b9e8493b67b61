"""Fine-tuning modes of ``spai train`` on the tiny model, without Ray: what trains, and what the export computes."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

from pipelines.train.config import CONFIG_DIR, TrainConfig
from pipelines.train.model import configure_finetune, export_model, initial_model, param_groups
from spai_core.config import load_config
from spai_core.spai import SPAI, build_model
from spai_core.svd import SVDLinear, is_attention_linear, svd_trainable_parameters

FULL_RANK = 64  # spai_tiny: qkv is 192 x 64 and proj 64 x 64, so min(out, in) = 64 for both


def tiny_config(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, CONFIG_DIR / "tiny.yaml", overrides)


def tiny_model(seed: int = 0) -> SPAI:
    torch.manual_seed(seed)
    return build_model("spai_tiny")


def random_views(seed: int, batch: int = 2, views: int = 2) -> torch.Tensor:
    return torch.rand(batch, views, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def eval_logits(model: SPAI, views: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(views)


@pytest.mark.parametrize("rank", [0, 40])
def test_svd_trainable_parameters_match_the_formula(rank):
    model = tiny_model()
    attention = [m for n, m in model.mfvit.vit.named_modules() if is_attention_linear(n, m)]
    vit_ids = {id(p) for p in model.mfvit.vit.parameters()}
    outside_vit = sum(p.numel() for p in model.parameters() if id(p) not in vit_ids)
    expected_backbone = sum(svd_trainable_parameters(m.out_features, m.in_features, rank) for m in attention)

    counts = configure_finetune(model, tiny_config("finetune=svd", f"svd_rank={rank}"))

    assert len(attention) == 2 * model.cfg.depth
    assert counts["params_backbone_trainable"] == expected_backbone > 0
    assert counts["params_trainable"] == expected_backbone + outside_vit
    assert counts["params_trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # only the residual factors train inside the ViT: biases, norms, patch embedding and MLPs stay frozen
    trainable_vit = {n.rsplit(".", 1)[-1] for n, p in model.mfvit.vit.named_parameters() if p.requires_grad}
    assert trainable_vit == {"U_res", "S_res", "Vh_res"}


def test_merged_export_reproduces_the_trained_svd_model():
    model = tiny_model()
    configure_finetune(model, tiny_config("finetune=svd", "svd_rank=48"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("U_res")}
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-2)
    labels = torch.tensor([0.0, 1.0])
    for step in range(3):
        model.train()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(random_views(step)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # the steps reached the residuals (the backbone ran with autograd on), so the check below is not vacuous
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)

    merged = export_model(model)

    assert not any(isinstance(m, SVDLinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(build_model("spai_tiny").state_dict()), "export must use the plain layout"
    views = random_views(100)
    torch.testing.assert_close(eval_logits(merged, views), eval_logits(model, views), rtol=0, atol=1e-4)
    images = [torch.rand(3, 240, 300, generator=torch.Generator().manual_seed(7))]
    with torch.inference_mode():
        torch.testing.assert_close(merged.forward_images(images), model.forward_images(images), rtol=0, atol=1e-4)


@pytest.mark.parametrize("rank", [FULL_RANK, 0])
def test_svd_split_at_initialisation_equals_the_original_model(rank):
    """Full rank (empty residual) and rank 0 (all residual) both start from exactly the original weights."""
    original = tiny_model()
    model = copy.deepcopy(original)
    counts = configure_finetune(model, tiny_config("finetune=svd", f"svd_rank={rank}"))

    if rank == FULL_RANK:
        assert counts["params_backbone_trainable"] == 0
        assert all(m.S_res.numel() == 0 for m in model.modules() if isinstance(m, SVDLinear))
    views = random_views(1)
    torch.testing.assert_close(eval_logits(model, views), eval_logits(original, views), rtol=0, atol=1e-4)


def test_head_mode_freezes_the_backbone_and_runs_it_without_grad():
    model = tiny_model()
    counts = configure_finetune(model, tiny_config("finetune=head"))
    assert counts["params_backbone_trainable"] == 0
    assert not any(p.requires_grad for p in model.mfvit.vit.parameters())
    block_output_grad: list[bool] = []
    for block in model.mfvit.vit.blocks:
        block.register_forward_hook(lambda module, args, out: block_output_grad.append(out.requires_grad))

    model.train()
    model(random_views(2)).sum().backward()

    # no autograd graph through the ViT (saves its activations), yet the head and the FRE projections learn
    assert block_output_grad == [False] * len(model.mfvit.vit.blocks)
    assert all(p.grad is None for p in model.mfvit.vit.parameters())
    assert all(p.grad is not None for p in model.cls_head.parameters())
    assert all(p.grad is not None for p in model.mfvit.features_processor.parameters() if p.requires_grad)


def test_training_starts_from_the_weights_of_the_backbone_the_config_names(tmp_path):
    """The config's model section names the backbone, ``--backbone`` gives its weights: here CLIP's architecture at
    the tiny size, from a timm-layout file with the head and final norm it has no use for."""
    source = timm.create_model("vit_base_patch16_clip_quickgelu_224", num_classes=512, embed_dim=64, depth=4,
                               num_heads=4)
    torch.save(source.state_dict(), tmp_path / "clip_tiny.pth")
    cfg = tiny_config("model.backbone=clip_vit_b16", f"backbone_weights={tmp_path / 'clip_tiny.pth'}")
    model = initial_model(cfg)
    assert model.cfg.backbone == "clip_vit_b16" and model.cfg.depth == 4
    for key, value in model.mfvit.vit.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key], rtol=0, atol=0)
