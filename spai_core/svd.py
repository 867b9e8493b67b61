"""SVD fine-tuning of attention linears: a frozen principal part plus a trainable residual in the weight's own basis.

Each selected ``nn.Linear`` weight ``W`` (out x in) is decomposed once, ``W = U diag(S) Vh`` with
``k = min(out, in)`` singular values, and rewritten as

    W = W_main + U_res diag(S_res) Vh_res

* ``W_main = U[:, :r] diag(S[:r]) Vh[:r, :]``: the top ``r`` singular directions, a buffer (saved in the state dict,
  never trained), so the pretrained behaviour carried by the dominant directions is kept exactly;
* ``U_res`` (out x k-r), ``S_res`` (k-r), ``Vh_res`` (k-r x in): the remaining directions, initialised from the SVD
  and trainable, so at initialisation the layer computes exactly what it did before.

Trainable weights per layer: ``(out + in + 1) * (k - r)`` (:func:`svd_trainable_parameters`). The residual factors are
free parameters: nothing keeps ``U_res`` / ``Vh_res`` orthonormal or orthogonal to the principal directions during
training (the seed method does not either), so ``W_main`` stays fixed but the residual may drift into its span.

Fused qkv. SPAI's backbones are timm ViTs (the MFM ViT-B/16, CLIP ViT-B/16, ...), whose attention holds
``qkv = nn.Linear(D, 3D)`` and ``proj = nn.Linear(D, D)`` (a CLIP file's separate q/k/v projections are fused by its
checkpoint filter). The fused qkv is decomposed as ONE 3D x D matrix (k = D, singular directions shared by q, k and
v), which is what applying the method to the attention's linear modules literally does. Why not split per q/k/v: the
three projections read the same token, so one right-singular basis ranks the input directions by their use across
all of attention; it needs fewer residual parameters (4D+1 vs 3 x (2D+1) per residual direction); and the merged
export keeps timm's fused ``attn.qkv.weight`` layout. The trade-off: "top r" ranks directions of the stacked
spectrum, so q, k and v do not each keep exactly r of their own directions.

Biases are carried over as the same ``nn.Parameter`` (``qkv`` and ``proj`` have one), keeping its ``requires_grad``:
freeze the backbone before :func:`apply_svd` and only the residual factors train; unfreeze biases explicitly to
train them too (then count them with ``svd_trainable_parameters(..., bias=True)``).

Checkpoints: load pretrained weights before :func:`apply_svd` (the state dict keys change from ``weight`` to
``weight_main``/``U_res``/``S_res``/``Vh_res``); to reload an SVD checkpoint, build the model, apply SVD with the same
rank, then load. :func:`merge_svd` turns the model back into plain linears in timm's key layout for export
and for inference, where it also saves recombining the weight on every forward.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

_logger = logging.getLogger(__name__)


def _residual_size(out_features: int, in_features: int, rank: int) -> int:
    full = min(out_features, in_features)
    if not 0 <= rank <= full:
        raise ValueError(
            f"SVD rank must be in 0..min(out, in) = {full} for a {out_features}x{in_features} weight, got {rank}"
        )
    return full - rank


def svd_trainable_parameters(out_features: int, in_features: int, rank: int, *, bias: bool = False) -> int:
    """Trainable parameters of one SVD layer: ``(out + in + 1) * (min(out, in) - rank)``, plus ``out`` if its bias
    is trainable (by default it is not counted: a frozen backbone keeps its biases frozen)."""
    residual = _residual_size(out_features, in_features, rank)
    return (out_features + in_features + 1) * residual + (out_features if bias else 0)


class SVDLinear(nn.Module):
    """A linear layer whose weight is ``weight_main + U_res diag(S_res) Vh_res`` (frozen principal part + trainable
    residual); see the module docstring."""

    def __init__(
        self,
        weight_main: torch.Tensor,
        u_res: torch.Tensor,
        s_res: torch.Tensor,
        vh_res: torch.Tensor,
        bias: nn.Parameter | None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_main.shape
        self.rank = min(weight_main.shape) - s_res.numel()
        self.register_buffer("weight_main", weight_main)
        self.U_res = nn.Parameter(u_res)
        self.S_res = nn.Parameter(s_res)
        self.Vh_res = nn.Parameter(vh_res)
        self.register_parameter("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> SVDLinear:
        """Split ``linear`` into the top-``rank`` principal part and the residual; reuses its bias parameter."""
        weight = linear.weight.detach()
        _residual_size(*weight.shape, rank)
        # float64 so that principal + residual reproduces the float32 weight to rounding error.
        u, s, vh = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
        weight_main = (u[:, :rank] * s[:rank]) @ vh[:rank]
        parts = (weight_main, u[:, rank:], s[rank:], vh[rank:])
        return cls(*(part.to(weight.dtype).contiguous() for part in parts), bias=linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The combined weight (out x in); differentiable with respect to the residual factors only."""
        return torch.addmm(self.weight_main, self.U_res * self.S_res, self.Vh_res)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def merged(self) -> nn.Linear:
        """A plain frozen ``nn.Linear`` with the combined weight and this layer's bias parameter."""
        weight = self.weight.detach()
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device=weight.device, dtype=weight.dtype)
        linear.weight = nn.Parameter(weight.clone(), requires_grad=False)
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"residual={self.S_res.numel()}, bias={self.bias is not None}"
        )


def is_attention_linear(name: str, module: nn.Module) -> bool:
    """Default target: the fused ``attn.qkv`` and the ``attn.proj`` linears of every transformer block."""
    return isinstance(module, nn.Linear) and any(
        name == suffix or name.endswith("." + suffix) for suffix in ("attn.qkv", "attn.proj")
    )


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def apply_svd(
    model: nn.Module, rank: int, target: Callable[[str, nn.Linear], bool] = is_attention_linear
) -> list[str]:
    """Replace every ``nn.Linear`` submodule for which ``target(name, module)`` holds by an :class:`SVDLinear` keeping
    ``rank`` principal directions, in place; returns the replaced names. The residual factors are trainable; the
    rest of the model keeps its ``requires_grad`` flags, so freeze the backbone first. Run the backbone with autograd
    on (not under ``torch.no_grad``, as a frozen backbone often is) or the residuals receive no gradient.
    """
    linears = {name: module for name, module in model.named_modules() if name and isinstance(module, nn.Linear)}
    selected = {name: linear for name, linear in linears.items() if target(name, linear)}
    if not selected:
        raise ValueError(
            "apply_svd found no nn.Linear matching the target; pass a target function that selects the attention "
            "linears of this model (the default matches names ending in 'attn.qkv' and 'attn.proj')"
        )
    # Counting first also validates the rank for every layer before the model is changed.
    trainable = sum(svd_trainable_parameters(m.out_features, m.in_features, rank) for m in selected.values())
    for name, linear in selected.items():
        _replace(model, name, SVDLinear.from_linear(linear, rank))
    _logger.info("SVD fine-tuning: %d linears at rank %d, %d trainable weights", len(selected), rank, trainable)
    return list(selected)


def merge_svd(model: nn.Module) -> nn.Module:
    """Replace every :class:`SVDLinear` by a plain frozen ``nn.Linear`` with the combined weight (for export and
    inference); in place, and returns the model (a new module if ``model`` itself is an :class:`SVDLinear`)."""
    if isinstance(model, SVDLinear):
        return model.merged()
    for name in [name for name, module in model.named_modules() if isinstance(module, SVDLinear)]:
        _replace(model, name, model.get_submodule(name).merged())
    return model
