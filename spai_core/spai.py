"""SPAI: spectral learning detector of AI-generated images (Karageorgiou et al., CVPR 2025).

A tile is split into low/high-frequency images (``filters``); the original, low and high images go through
one timm ViT (``backbones``: the official MFM ViT-B/16, CLIP, any timm ViT); the Frequency Restoration
Estimator turns the three token stacks into a descriptor (72 similarity statistics + a spectral context
vector); Spectral Context Attention pools any number of tile descriptors of one image; an MLP head gives one
logit (sigmoid = P(AI-generated)).

Module and parameter names outside the backbone mirror the official ``PatchBasedMFViT``, and the backbone keeps
timm's, so official checkpoints map by name up to the backbone's checkpoint filter; see ``checkpoint.py`` for the
strict loader.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import create_backbone, embed, get_backbone_spec, shape_of
from .config import ConfigError
from .filters import frequency_mask, split_frequencies
from .tiling import Offset, plan_tiles


@dataclass
class ModelConfig:
    """Architecture and inference options of a SPAI model; saved inside every checkpoint."""

    name: str = "spai_vit_b16"
    backbone: str = "mfm_vit_b16"  # a name of backbones.list_backbones(), or timm:<model>
    img_size: int = 224  # tile size and FFT size
    # The backbone's ViT shape; None takes the backbone's own, and a built model records the values. The test-sized
    # configs shrink the MFM ViT-B/16 this way (random init: no pretrained weights exist at that size).
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    proj_dim: int = 1024  # FRE projection width = spectral context vector size
    mask_radius: int = 16  # low-pass radius in frequency bins of the tile spectrum
    sca_heads: int = 12
    sca_dim: int = 1536
    head_mlp_ratio: int = 3
    dropout: float = 0.5
    drop_path: float = 0.1
    minimum_patches: int = 4  # fewer grid tiles than this -> five-crop
    feature_batch: int = 400  # tiles encoded at once; bounds activation memory, not results
    max_tiles: int | None = None  # cap on tiles per image (None = all, as the official model)
    # Standardise tile descriptors (BatchNorm without affine) before pooling. Not in the official model: its MFM
    # backbone gives similarity statistics that vary across images, but from a randomly initialised backbone they
    # differ by ~0.3% of their size and the head cannot see them. Models with it have no official layout.
    descriptor_norm: bool = False

    def __post_init__(self) -> None:
        get_backbone_spec(self.backbone)  # an unknown name fails here, with the names to use
        # A radius below 1 leaves the low band empty, one reaching the spectrum's corners the high band.
        if self.mask_radius < 1 or frequency_mask(self.img_size, self.mask_radius).all():
            widest = next(r for r in range(1, self.img_size) if frequency_mask(self.img_size, r + 1).all())
            raise ConfigError(f"mask_radius must be 1 to {widest} for {self.img_size}-px tiles (both frequency bands "
                              f"non-empty), got {self.mask_radius}")

    @property
    def descriptor_dim(self) -> int:
        """6 similarity statistics per ViT layer + the spectral context vector (1096 for ViT-B); needs ``depth``,
        which a built model's config always has."""
        return 6 * self.depth + self.proj_dim

    def backbone_args(self) -> dict:
        """``create_backbone`` arguments for this config's tiles, drop path and any ViT shape it sets."""
        shape = {k: getattr(self, k) for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")}
        return {"img_size": self.img_size, "drop_path_rate": self.drop_path,
                **{k: v for k, v in shape.items() if v is not None}}

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """The registered config ``name``: what a config file's ``model.name`` starts from (``spai_core.config``)."""
        return get_model_config(name)


MODEL_CONFIGS: dict[str, ModelConfig] = {
    "spai_vit_b16": ModelConfig(),
    # The SVD fine-tuning seed's backbone: OpenAI CLIP ViT-B/16 (weights: backbones/clip_onnx.py converts them offline).
    "spai_clip_b16": ModelConfig(name="spai_clip_b16", backbone="clip_vit_b16"),
    # Same code path at CPU-test size: 4 blocks of width 64, small projections and head.
    "spai_tiny": ModelConfig(name="spai_tiny", embed_dim=64, depth=4, num_heads=4, proj_dim=64, sca_heads=4,
                             sca_dim=64, head_mlp_ratio=1, drop_path=0.0),
    "spai_small": ModelConfig(name="spai_small", embed_dim=192, depth=6, num_heads=3, proj_dim=256, sca_heads=4,
                              sca_dim=256, head_mlp_ratio=2),
}


def get_model_config(name: str, **overrides) -> ModelConfig:
    """A copy of a registered config (``spai_vit_b16``, ``spai_clip_b16``, ``spai_small``, ``spai_tiny``) with field
    overrides."""
    if name not in MODEL_CONFIGS:
        raise ConfigError(f"unknown model config {name!r}; use one of the registered configs: "
                          f"{', '.join(sorted(MODEL_CONFIGS))}")
    return dataclasses.replace(MODEL_CONFIGS[name], **overrides)


def _mlp(in_dim: int, dim: int, dropout: float, last_act: nn.Module) -> nn.Sequential:
    # Index layout (0 Dropout, 1 Linear, 2 GELU, 3 Dropout, 4 Linear, 5 act, 6 Dropout) matches official keys.
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(dim, dim), last_act, nn.Dropout(dropout))


class Projector(nn.Module):
    """[LayerNorm] -> 2-layer MLP -> LayerNorm, applied token-wise."""

    def __init__(self, in_dim: int, dim: int, dropout: float, input_norm: bool, last_act: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim) if input_norm else nn.Identity()
        self.projector = _mlp(in_dim, dim, dropout, last_act)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.projector(self.norm1(x)))


class PerLayerProjector(nn.Module):
    """One projector per ViT layer, shared by the original, low- and high-pass branches."""

    def __init__(self, depth: int, in_dim: int, dim: int, dropout: float):
        super().__init__()
        self.projectors = nn.ModuleList(Projector(in_dim, dim, dropout, True, nn.Identity()) for _ in range(depth))

    def forward(self, layer: int, tokens: torch.Tensor) -> torch.Tensor:
        return self.projectors[layer](tokens)


def _mean_std(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std over ``dim`` in float32, in two passes (the mean, then the centred sum of squares).

    As exact as ``torch.std`` up to float rounding, and on CPU ~10x faster for a dim that is not the innermost (its
    Welford kernel is not vectorised there); the std of bf16 tokens is not rounded to bf16 either.
    """
    x = x.float()
    mean = x.mean(dim=dim, keepdim=True)
    variance = (x - mean).square().sum(dim=dim) / (x.shape[dim] - 1)
    return mean.squeeze(dim), variance.sqrt()


class SpectralContextProjector(nn.Module):
    """Spectral context vector: per-layer token mean/std -> MLP -> softmax(alpha)-weighted layer sum -> MLP."""

    def __init__(self, depth: int, dim: int, dropout: float):
        super().__init__()
        self.alpha = nn.Parameter(torch.randn(1, depth, dim))
        self.proj1 = Projector(2 * dim, dim, dropout, False, nn.GELU())
        self.proj2 = Projector(dim, dim, dropout, False, nn.GELU())

    def forward(self, moments: torch.Tensor) -> torch.Tensor:
        """``T x layers x 2P``: per layer, the mean then the std over tokens of the original image's projections."""
        per_layer = self.proj1(moments)
        pooled = (per_layer * self.alpha.softmax(dim=1)).sum(dim=1)
        return self.proj2(pooled)


class FrequencyRestorationEstimator(nn.Module):
    """Tile descriptor from ViT tokens of the original, low- and high-pass images, reduced one layer at a time."""

    PAIRS = ((0, 1), (0, 2), (1, 2))  # (original, low), (original, high), (low, high)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.patch_projector = PerLayerProjector(cfg.depth, cfg.embed_dim, cfg.proj_dim, cfg.dropout)
        self.original_features_processor = SpectralContextProjector(cfg.depth, cfg.proj_dim, cfg.dropout)

    def layer_statistics(self, layer: int, tokens: torch.Tensor) -> torch.Tensor:
        """One layer's ``3T x N x D`` tokens (original, low, high stacked) -> ``T x (6 + 2P)``.

        The 6 similarity statistics (mean and std over tokens of each pair's cosine similarity), then the mean and
        std over tokens of the original image's projections, which the spectral context vector is built from.
        """
        branches = self.patch_projector(layer, tokens).chunk(3)
        stats = []
        for a, b in self.PAIRS:
            stats.extend(_mean_std(F.cosine_similarity(branches[a], branches[b], dim=-1, eps=1e-8), dim=1))
        return torch.cat([torch.stack(stats, dim=1), *_mean_std(branches[0], dim=1)], dim=1)

    def forward(self, per_layer: list[torch.Tensor]) -> torch.Tensor:
        """Every layer's ``layer_statistics`` -> ``T x descriptor_dim`` (statistic-major, as the official layout)."""
        stats = torch.stack(per_layer, dim=1)  # T x layers x (6 + 2P)
        similarity = stats[..., :6].transpose(1, 2).flatten(1)
        return torch.cat([similarity, self.original_features_processor(stats[..., 6:])], dim=1)


class PatchEncoder(nn.Module):
    """Per-tile encoder (official ``MFViT``): FFT split, shared ViT on three images, FRE descriptor."""

    def __init__(self, cfg: ModelConfig, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.features_processor = FrequencyRestorationEstimator(cfg)
        self.backbone_frozen = True
        spec = get_backbone_spec(cfg.backbone)
        self.register_buffer("frequencies_mask", frequency_mask(cfg.img_size, cfg.mask_radius), persistent=False)
        # The backbone's own normalisation, applied to each of the three images after the split.
        self.register_buffer("mean", torch.tensor(spec.mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(3, 1, 1), persistent=False)

    def set_mask_radius(self, radius: int) -> None:
        self.frequencies_mask = frequency_mask(self.frequencies_mask.shape[-1], radius).to(self.mean.device)

    def _backbone_grad(self) -> torch.autograd.grad_mode.set_grad_enabled:
        # A frozen backbone runs without autograd, so its activations are not kept for the backward pass.
        return torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """``T x 3 x S x S`` tiles in [0, 1] -> ``T x descriptor_dim``.

        The three images share one ViT pass; each block's tokens (prefix tokens dropped) are reduced to statistics
        before the next block runs, so activation memory is that of one layer, not of all ``depth`` layers.
        """
        return self.encode_split(tiles, *split_frequencies(tiles, self.frequencies_mask))

    def encode_split(self, tiles: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` given the tiles' low- and high-pass images (the ONNX export computes them without FFT)."""
        with self._backbone_grad():
            x = embed(self.vit, (torch.cat([tiles, low, high]) - self.mean) / self.std)
        per_layer = []
        for layer, block in enumerate(self.vit.blocks):
            with self._backbone_grad():
                x = block(x)
            per_layer.append(self.features_processor.layer_statistics(layer, x[:, self.vit.num_prefix_tokens:]))
        return self.features_processor(per_layer)


class SpectralContextAttention(nn.Module):
    """Single learned query cross-attending over one image's tile descriptors (permutation invariant)."""

    def __init__(self, dim: int, heads: int, inner_dim: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.scale = (inner_dim // heads) ** -0.5
        self.patch_aggregator = nn.Parameter(torch.zeros(heads, 1, inner_dim // heads))
        nn.init.trunc_normal_(self.patch_aggregator, std=0.02)
        self.to_kv = nn.Linear(dim, 2 * inner_dim, bias=False)
        self.attn_drop = nn.Dropout(dropout)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim, bias=False), nn.Dropout(dropout))

    def forward(self, desc: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``B x L x D`` descriptors (``valid``: ``B x L`` mask of real tiles) -> pooled ``B x D`` and attention
        ``B x H x L``."""
        batch, length, _ = desc.shape
        k, v = self.to_kv(desc).chunk(2, dim=-1)
        k, v = (t.reshape(batch, length, self.heads, -1).transpose(1, 2) for t in (k, v))
        scores = (self.patch_aggregator @ k.transpose(-2, -1)) * self.scale  # B x H x 1 x L
        if valid is not None:
            scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        attn = scores.softmax(dim=-1)
        pooled = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(batch, -1)
        return self.to_out(pooled), attn[:, :, 0]


class ClassificationHead(nn.Module):
    def __init__(self, dim: int, mlp_ratio: int, dropout: float):
        super().__init__()
        hidden = dim * mlp_ratio
        self.head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden),
                                  nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class SPAI(nn.Module):
    """The full detector. ``forward`` takes fixed-size views (training); ``forward_images`` any resolution."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        vit = create_backbone(cfg.backbone, **cfg.backbone_args())
        self.cfg = cfg = dataclasses.replace(cfg, **shape_of(vit))  # a saved config rebuilds this very shape
        self.sca = SpectralContextAttention(cfg.descriptor_dim, cfg.sca_heads, cfg.sca_dim, cfg.dropout)
        self.mfvit = PatchEncoder(cfg, vit)
        # eps far below BatchNorm's 1e-5: the similarity statistics' variance across tiles is itself ~1e-5.
        self.descriptor_norm = (nn.BatchNorm1d(cfg.descriptor_dim, eps=1e-10, affine=False) if cfg.descriptor_norm
                                else nn.Identity())
        self.norm = nn.LayerNorm(cfg.descriptor_dim)
        self.cls_head = ClassificationHead(cfg.descriptor_dim, cfg.head_mlp_ratio, cfg.dropout)
        self.apply(_init_weights)

    def set_mask_radius(self, radius: int) -> None:
        """Change the FFT low-pass radius (a hyper-parameter; checkpoints record it)."""
        self.cfg = dataclasses.replace(self.cfg, mask_radius=radius)
        self.mfvit.set_mask_radius(radius)

    def describe(self, tiles: torch.Tensor) -> torch.Tensor:
        """``T x 3 x S x S`` tiles -> ``T x descriptor_dim`` descriptors, standardised if the config says so."""
        return self.descriptor_norm(self.mfvit(tiles))

    def pool_features(self, desc: torch.Tensor,
                      valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tile descriptors ``B x L x D`` -> the pooled spectral feature ``B x D`` the classification head reads
        (the model's output with the head replaced by identity) and attention over tiles ``B x heads x L``."""
        pooled, attn = self.sca(desc, valid)
        return self.norm(pooled), attn

    def pool(self, desc: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tile descriptors ``B x L x D`` -> logits ``B`` and attention over tiles ``B x heads x L``."""
        features, attn = self.pool_features(desc, valid)
        return self.cls_head(features).squeeze(-1), attn

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """Training path: ``B x V x 3 x S x S`` augmented views of each image -> ``B`` logits."""
        batch, num_views = views.shape[:2]
        desc = self.describe(views.flatten(0, 1)).view(batch, num_views, -1)
        return self.pool(desc)[0]

    def forward_images(self, images: Sequence[torch.Tensor], chunk: int | None = None,
                       return_attention: bool = False):
        """Any-resolution path: a list of ``3 x H x W`` tensors in [0, 1] -> ``N`` logits.

        Tiles of all images are encoded together in chunks; each image's tiles are pooled on their own.
        Identical tiles of one image (the five-crop of a 224-px side) are encoded once.
        """
        features, attn, plans = self.features_images(images, chunk)
        logits = self.cls_head(features).squeeze(-1)
        if return_attention:
            return logits, attn, plans
        return logits

    def features_images(self, images: Sequence[torch.Tensor], chunk: int | None = None):
        """:meth:`forward_images` up to the classification head: the pooled spectral features ``N x D``, the
        attention over tiles ``N x heads x L`` and each image's tile plan."""
        plans = [self.plan_tiles(img) for img in images]
        unique = [(i, off) for i, (_, offsets) in enumerate(plans) for off in dict.fromkeys(offsets)]
        desc = self._encode_offsets([p[0] for p in plans], unique, chunk or self.cfg.feature_batch)
        index = {key: row for row, key in enumerate(unique)}
        lengths = [len(offsets) for _, offsets in plans]
        rows = torch.full((len(plans), max(lengths)), 0, dtype=torch.long, device=desc.device)
        valid = torch.zeros_like(rows, dtype=torch.bool)
        for i, (_, offsets) in enumerate(plans):
            rows[i, :len(offsets)] = torch.tensor([index[(i, off)] for off in offsets])
            valid[i, :len(offsets)] = True
        features, attn = self.pool_features(desc[rows], valid)
        return features, attn, plans

    def plan_tiles(self, image: torch.Tensor) -> tuple[torch.Tensor, list[Offset]]:
        """Pad an image as the official pipeline does and list the offsets of the tiles to pool."""
        return plan_tiles(image, self.cfg.img_size, self.cfg.minimum_patches, self.cfg.max_tiles)

    def _encode_offsets(self, padded: list[torch.Tensor], keys: list[tuple[int, Offset]], chunk: int) -> torch.Tensor:
        size = self.cfg.img_size
        out = []
        for start in range(0, len(keys), chunk):
            tiles = torch.stack([padded[i][:, r:r + size, c:c + size] for i, (r, c) in keys[start:start + chunk]])
            out.append(self.describe(tiles))
        return torch.cat(out)


def _init_weights(module: nn.Module) -> None:
    # The official model re-initialises every Linear (trunc-normal .02, zero bias) and LayerNorm (1, 0).
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_model(cfg: ModelConfig | str) -> SPAI:
    """Build a randomly initialised model from a config or a registered config name."""
    return SPAI(get_model_config(cfg) if isinstance(cfg, str) else cfg)
