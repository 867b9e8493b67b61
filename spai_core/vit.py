"""ViT-B/16 backbone in the BEiT/MFM style that SPAI uses: q/v biases, no final norm, every block's tokens.

Parameter names match the official (and MFM) checkpoints, so weights load by name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype :func:`linear` runs oneDNN's fused CPU kernel in (fp32, or bf16 under CPU bf16 autocast), or None
    where it must use the plain ops: on GPU, under autograd (the op has no backward), without oneDNN."""
    if (x.device.type != "cpu" or not torch.backends.mkldnn.is_available()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return None
    if torch.is_autocast_enabled("cpu"):
        bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.bfloat16 if bf16 else None
    return torch.float32 if x.dtype == weight.dtype == torch.float32 else None


# Rows the packed weights' blocked layout is chosen for: a chunk of 4 ViT-B tiles (12 sequences of 197 tokens). Any
# row count runs on them, bit-identically; this only tunes the layout.
PACK_ROWS = 12 * 197


class _PackedWeight:
    """A layer's packed weight and the (dtype, storage, version) it was packed from.

    Copies and pickles of the layer get an empty one: the packed tensor is an opaque oneDNN tensor, which has no
    storage to copy (``copy.deepcopy(model)``, ``pickle.dumps(model)`` would fail), and it is rebuilt on first use.
    """

    __slots__ = ("key", "weight")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.weight: torch.Tensor | None = None

    def __reduce__(self) -> tuple:  # what pickle, copy.copy and copy.deepcopy all rebuild from: an empty holder
        return _PackedWeight, ()


def _packed_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``layer.weight`` in ``dtype``, reordered once into oneDNN's blocked layout and kept on the layer.

    oneDNN otherwise reorders the weight on every call: packed, the ViT-B GEMMs run 10-35% faster in bf16 and 5-12%
    in fp32 on a 2-core Zen 5, with bit-identical results, for one extra copy of the weights in that dtype. The copy
    is rebuilt when the weight changes (an optimiser step, ``load_state_dict``, ``.to()``). Used as they come: a
    weight computed on each call (SVD fine-tuning's), and an inference tensor (a model built under
    ``torch.inference_mode()``), which has no version counter to tell an in-place load from the weight packed.
    """
    weight = layer.weight
    if not isinstance(weight, nn.Parameter) or weight.is_inference():
        return weight.to(dtype)
    key = (dtype, weight.data_ptr(), weight._version)
    packed = layer.__dict__.setdefault("_onednn_packed", _PackedWeight())  # a plain attribute, not a state-dict key
    if packed.key != key:
        packed.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), PACK_ROWS)
        packed.key = key
    return packed.weight


def linear(x: torch.Tensor, layer: nn.Module, bias: torch.Tensor | None = None, gelu: bool = False,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + gelu(x @ layer.weight.T + bias)`` (each part optional; exact GELU; ``bias`` defaults to the
    layer's own, and is given where it is composed per call, as the attention's q/v bias).

    On CPU inference this is oneDNN's linear on the layer's packed weight (:func:`_packed_weight`) with the bias and
    GELU (and in fp32 the residual add) fused into the GEMM: in fp32 about 20% faster per ViT-B image than
    ``F.linear`` (MKL ``addmm`` first copies the broadcast bias into the output) followed by separate element-wise
    passes, equal to it up to float rounding. Under bf16 autocast it computes what autocast would (bf16 operands,
    bf16 output, the residual added in its own dtype). Elsewhere (GPU, training) the plain ops.
    """
    bias = layer.bias if bias is None else bias
    dtype = _onednn_dtype(x, layer.weight)
    if dtype is None:
        out = F.linear(x, layer.weight, bias)
        out = F.gelu(out) if gelu else out
        return out if residual is None else residual + out
    weight = _packed_weight(layer, dtype)
    if dtype == torch.float32 and residual is not None and not gelu:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    bias = None if bias is None else bias.to(dtype)
    out = torch.ops.mkldnn._linear_pointwise(x.to(dtype), weight, bias, "gelu" if gelu else "none", [],
                                             "none" if gelu else "")
    return out if residual is None else residual + out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention of ``B x H x N x d`` heads, scores scaled by ``d ** -0.5`` as in the official model.

    Under CPU bf16 autocast inference it is two batched bf16 GEMMs (oneDNN) around a bf16 softmax: for ViT's 197
    tokens about 1.8x faster than PyTorch's CPU flash-attention kernel, which runs these small GEMMs at a fifth of the
    bf16 matmul peak. The scores are rounded to bf16 before the softmax, as in non-fused attention under autocast
    on GPU. Elsewhere (fp32, GPU, training) ``scaled_dot_product_attention``.
    """
    if _onednn_dtype(q, k) != torch.bfloat16:
        return F.scaled_dot_product_attention(q, k, v)
    batch, heads, tokens, dim = q.shape
    q, k, v = (t.reshape(batch * heads, tokens, dim) for t in (q, k, v))
    scores = torch.bmm(q * dim ** -0.5, k.transpose(1, 2))
    return torch.bmm(scores.softmax(dim=-1), v).view(batch, heads, tokens, dim)


class DropPath(nn.Module):
    """Stochastic depth per sample; active only in training mode (the official recipe keeps it on)."""

    def __init__(self, prob: float = 0.0):
        super().__init__()
        self.prob = prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return x
        keep = 1.0 - self.prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention with a bias-free fused qkv and separate learnable q and v biases (k bias 0)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of ``x``, plus ``residual`` when given (added inside the output projection)."""
        batch, tokens, dim = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = linear(x, self.qkv, bias).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v)
        return linear(out.transpose(1, 2).reshape(batch, tokens, dim), self.proj, residual=residual)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """MLP of ``x``, plus ``residual`` when given (added inside the second linear)."""
        hidden = linear(x, self.fc1, gelu=True)
        return linear(hidden, self.fc2, residual=residual)


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6, no layer scale)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_path.training and self.drop_path.prob > 0:  # the residual must skip the dropped branch
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = self.attn(self.norm1(x), residual=x)
        return self.mlp(self.norm2(x), residual=x)


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, dim: int):
        super().__init__()
        self.img_size = img_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"tiles must be {self.img_size}x{self.img_size}, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT whose blocks are run one at a time by the caller (``embed``, then ``blocks``), so that a consumer of every
    block's tokens can reduce each layer as it comes instead of holding all of them (``depth`` x the memory)."""

    def __init__(self, img_size: int, patch_size: int, dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 drop_path: float):
        super().__init__()
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(img_size, patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, rate) for rate in rates)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 3 x S x S`` images -> ``B x (1 + N) x D`` tokens (CLS first) entering the first block."""
        x = self.patch_embed(x)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
