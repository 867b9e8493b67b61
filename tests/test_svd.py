"""SVD fine-tuning on a toy transformer of timm ViT blocks (the backbones' own: fused qkv 96->288, proj 96->96)."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from timm.models.vision_transformer import Block
from torch import nn

from spai_core.svd import (
    SVDLinear,
    apply_svd,
    is_attention_linear,
    merge_svd,
    svd_trainable_parameters,
)

DIM = 96


class ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block(DIM, num_heads=4, mlp_ratio=2.0, qkv_bias=True) for _ in range(2)))
        self.head = nn.Linear(DIM, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(dim=1))


ATTENTION_NAMES = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv", "blocks.1.attn.proj"]


@pytest.fixture
def model() -> ToyModel:
    torch.manual_seed(0)
    return ToyModel().eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randn(3, 10, DIM, generator=torch.Generator().manual_seed(1))


def frozen_svd_model(model: nn.Module, rank: int) -> nn.Module:
    """The intended use: freeze the pretrained model, then make only the SVD residuals trainable."""
    model.requires_grad_(False)
    apply_svd(model, rank)
    return model


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_default_target_selects_attention_linears_only(model: ToyModel) -> None:
    assert [name for name, m in model.named_modules() if is_attention_linear(name, m)] == ATTENTION_NAMES
    assert not is_attention_linear("blocks.0.xattn.qkv", nn.Linear(2, 2))
    assert not is_attention_linear("blocks.0.attn.proj", nn.Conv2d(2, 2, 1))


def test_outputs_unchanged_at_initialisation(model: ToyModel, tokens: torch.Tensor) -> None:
    original = copy.deepcopy(model)
    assert apply_svd(model, rank=64) == ATTENTION_NAMES
    assert all(isinstance(model.get_submodule(name), SVDLinear) for name in ATTENTION_NAMES)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), original(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank", [0, 48, 95])
def test_trainable_parameter_count_matches_formula(
    model: ToyModel, rank: int, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="spai_core.svd"):
        frozen_svd_model(model, rank)
    per_block = (3 * DIM + DIM + 1) * (DIM - rank) + (DIM + DIM + 1) * (DIM - rank)
    assert per_block == svd_trainable_parameters(3 * DIM, DIM, rank) + svd_trainable_parameters(DIM, DIM, rank)
    assert trainable_count(model) == 2 * per_block
    assert f"{2 * per_block} trainable weights" in caplog.text, "apply_svd must report the trainable count"


def test_trainable_count_with_bias_is_explicit() -> None:
    assert svd_trainable_parameters(2304, 768, 767) == 3073
    assert svd_trainable_parameters(768, 768, 700, bias=True) == 1537 * 68 + 768
    with pytest.raises(ValueError, match="rank"):
        svd_trainable_parameters(96, 96, 97)


def test_requires_grad_flags(model: ToyModel) -> None:
    model.requires_grad_(False)
    qkv_bias = model.blocks[0].attn.qkv.bias
    model.blocks[1].attn.proj.bias.requires_grad_(True)  # a caller may choose to train a bias
    apply_svd(model, rank=32)
    layer = model.blocks[1].attn.proj
    assert "weight_main" in dict(layer.named_buffers()) and "weight_main" not in dict(layer.named_parameters())
    assert not layer.weight_main.requires_grad
    assert all(p.requires_grad for p in (layer.U_res, layer.S_res, layer.Vh_res))
    assert layer.bias.requires_grad and not model.blocks[0].attn.proj.bias.requires_grad, "bias keeps caller's flag"
    assert not model.head.weight.requires_grad
    qkv = model.blocks[0].attn.qkv
    assert (qkv.U_res.shape, qkv.S_res.shape, qkv.Vh_res.shape) == ((288, 64), (64,), (64, 96))
    assert qkv.bias is qkv_bias and not qkv.bias.requires_grad, "the fused qkv bias is carried over, frozen"


def test_principal_part_is_the_top_singular_directions(model: ToyModel) -> None:
    weight = model.blocks[0].attn.qkv.weight.detach().clone()
    apply_svd(model, rank=20)
    main = model.blocks[0].attn.qkv.weight_main
    assert torch.linalg.matrix_rank(main) == 20
    torch.testing.assert_close(torch.linalg.svdvals(main)[:20], torch.linalg.svdvals(weight)[:20])


def test_gradients_flow_only_into_the_residual(model: ToyModel, tokens: torch.Tensor) -> None:
    frozen_svd_model(model, rank=80)
    model(tokens).sum().backward()
    for name, param in model.named_parameters():
        is_residual = name.rsplit(".", 1)[-1] in ("U_res", "S_res", "Vh_res")
        assert (param.grad is not None) == is_residual, name
        if is_residual:
            assert param.grad.abs().sum() > 0, name
    assert all(buffer.grad is None for buffer in model.buffers())


def test_merged_model_reproduces_trained_svd_model(model: ToyModel, tokens: torch.Tensor) -> None:
    before = copy.deepcopy(model)
    frozen_svd_model(model, rank=90)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn(3, 1, generator=torch.Generator().manual_seed(2))
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(tokens), target).backward()
        optimizer.step()
    with torch.no_grad():
        trained = model(tokens)
        assert not torch.allclose(trained, before(tokens), atol=1e-4), "training should have changed the output"
        merged = merge_svd(copy.deepcopy(model))
        torch.testing.assert_close(merged(tokens), trained, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, SVDLinear) for m in merged.modules())
    assert merged.state_dict().keys() == before.state_dict().keys(), "export keeps the original key layout"
    assert trainable_count(merged) == 0


def test_full_rank_with_zero_residual_equals_original(model: ToyModel, tokens: torch.Tensor) -> None:
    original = copy.deepcopy(model)
    frozen_svd_model(model, rank=DIM)
    assert trainable_count(model) == 0
    assert model.blocks[0].attn.qkv.S_res.numel() == 0
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), original(tokens), atol=1e-5, rtol=1e-5)


def test_svd_checkpoint_roundtrip(model: ToyModel, tokens: torch.Tensor) -> None:
    frozen_svd_model(model, rank=70)
    with torch.no_grad():
        model.blocks[0].attn.qkv.S_res.mul_(1.5)
    torch.manual_seed(123)
    fresh = frozen_svd_model(ToyModel().eval(), rank=70)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), model(tokens))


def test_errors_tell_the_user_what_to_do(model: ToyModel) -> None:
    with pytest.raises(ValueError, match="target function"):
        apply_svd(model, rank=4, target=lambda name, module: False)
    with pytest.raises(ValueError, match="rank"):
        apply_svd(model, rank=DIM + 1)
    assert not any(isinstance(m, SVDLinear) for m in model.modules()), "a bad rank must not half-convert the model"


def test_merge_of_a_bare_svd_linear() -> None:
    linear = nn.Linear(8, 5)
    merged = merge_svd(SVDLinear.from_linear(linear, rank=3))
    assert isinstance(merged, nn.Linear)
    torch.testing.assert_close(merged.weight, linear.weight, atol=1e-6, rtol=1e-5)
    assert merged.bias is linear.bias


@pytest.mark.parametrize("config", ["spai_tiny", "spai_clip_b16"])
def test_svd_on_spai_backbones_is_exact_trains_residuals_and_merges(config: str) -> None:
    """On the timm backbones themselves (the MFM ViT's layout, and CLIP's pre-norm QuickGELU tower at test size):
    q/k/v (fused) and out projections split exactly, only the residuals learn, and the merged export computes the
    trained model with the plain layout. Compared on tile descriptors, which the backbone feeds directly."""
    from spai_core.spai import build_model, get_model_config

    torch.manual_seed(0)
    model = build_model(get_model_config(config, embed_dim=48, depth=2, num_heads=3, dropout=0.0)).eval()
    plain = copy.deepcopy(model)
    tiles = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    vit = model.mfvit.vit
    vit.requires_grad_(False)
    model.mfvit.backbone_frozen = False  # the backbone runs with autograd, so the residuals get gradients
    assert apply_svd(vit, rank=48) == [f"blocks.{b}.attn.{n}" for b in range(2) for n in ("qkv", "proj")]
    with torch.no_grad():
        torch.testing.assert_close(model.mfvit(tiles), plain.mfvit(tiles), atol=1e-5, rtol=1e-5)  # full rank: exact
    merge_svd(vit)
    apply_svd(vit, rank=20)
    optimizer = torch.optim.AdamW([p for p in vit.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model.mfvit(tiles)[:, :12].sum().backward()  # the similarity statistics: functions of the backbone alone
        optimizer.step()
    trained = {n for n, p in vit.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and {n.rsplit(".", 1)[-1] for n in trained} == {"U_res", "S_res", "Vh_res"}
    with torch.no_grad():
        tuned = model.mfvit(tiles)
        assert not torch.allclose(tuned, plain.mfvit(tiles), atol=1e-3), "training should have changed the output"
        merged = merge_svd(copy.deepcopy(model))
        torch.testing.assert_close(merged.mfvit(tiles), tuned, atol=1e-5, rtol=1e-5)
    assert merged.state_dict().keys() == plain.state_dict().keys()
