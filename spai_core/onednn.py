"""An optional CPU inference patch over a model's linears (timm's ViT blocks, SPAI's projectors): oneDNN linears on
weights packed once, GELU fused.

On CPU, ``F.linear`` hands the weight to MKL (fp32) or oneDNN (bf16), which reorders it into a blocked layout on
every call and, for fp32, first copies the broadcast bias into the output; a GELU after a linear is another pass over
the widest activation. :func:`fuse_for_cpu_inference` swaps each ``nn.Linear`` for a :class:`PackedLinear`, an
``nn.Linear`` subclass sharing the same parameters (state-dict keys and values unchanged), which in CPU inference
calls oneDNN's linear on a weight reordered once, with the bias and an exact GELU fused into the GEMM. Results equal the plain ops up to float rounding (parity-tested); everywhere else (GPU,
autograd, no oneDNN) it is the plain ``nn.Linear``. ``benchmarks/bench_core.py`` measures what it gains.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Rows the packed weights' blocked layout is chosen for: a chunk of 4 ViT-B tiles (12 sequences of 197 tokens). Any
# row count runs on them, with the same results; this only tunes the layout.
PACK_ROWS = 12 * 197


def onednn_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype oneDNN's fused kernel runs in here (fp32, or bf16 under CPU bf16 autocast), or None where the plain
    ops must run: off the CPU, under autograd (the kernel has no backward), without oneDNN or its bf16 support."""
    if (x.device.type != "cpu" or not torch.backends.mkldnn.is_available()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return None
    if torch.is_autocast_enabled("cpu"):
        bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.bfloat16 if bf16 else None
    return torch.float32 if x.dtype == weight.dtype == torch.float32 else None


class _Packed:
    """A packed weight and the (dtype, storage, version) of the weight it was packed from.

    Copies and pickles get an empty holder: a packed tensor is an opaque oneDNN tensor without storage to copy
    (``copy.deepcopy(model)`` would fail on it), and it is rebuilt on first use.
    """

    __slots__ = ("key", "weight")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.weight: torch.Tensor | None = None

    def __reduce__(self) -> tuple:  # pickle, copy.copy and copy.deepcopy all rebuild from this: an empty holder
        return _Packed, ()


class PackedLinear(nn.Linear):
    """``nn.Linear`` (optionally followed by exact GELU) that runs oneDNN's fused kernel in CPU inference.

    The packed copy is rebuilt when the weight changes (``load_state_dict``, an optimiser step, ``.to()``): the key
    holds its storage and version counter. A weight without a version counter (an inference tensor, made under
    ``torch.inference_mode()``) is reordered on each call, as ``F.linear`` would.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gelu: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.gelu = gelu
        self._packed = _Packed()

    @classmethod
    def from_linear(cls, linear: nn.Linear, gelu: bool = False) -> "PackedLinear":
        """A PackedLinear holding ``linear``'s own parameters (not copies)."""
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, gelu, device="meta")
        out.weight, out.bias = linear.weight, linear.bias
        out.train(linear.training)
        return out

    def _packed_weight(self, dtype: torch.dtype) -> torch.Tensor:
        weight = self.weight
        if weight.is_inference():
            return torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype), PACK_ROWS)
        key = (dtype, weight.data_ptr(), weight._version)
        if self._packed.key != key:
            self._packed.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), PACK_ROWS)
            self._packed.key = key
        return self._packed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = onednn_dtype(x, self.weight)
        if dtype is None:
            out = super().forward(x)
            return F.gelu(out) if self.gelu else out
        bias = None if self.bias is None else self.bias.to(dtype)
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), self._packed_weight(dtype), bias,
                                                  "gelu" if self.gelu else "none", [], "none" if self.gelu else "")

    def extra_repr(self) -> str:
        return super().extra_repr() + (", gelu=True" if self.gelu else "")


def _exact_gelu(module: nn.Module | None) -> bool:
    return type(module) is nn.GELU and module.approximate == "none"


def _fold_gelu(module: nn.Module) -> int:
    """Fold an exact GELU into the ``nn.Linear`` right before it: a timm ``Mlp``'s ``fc1``/``act``, or neighbours in
    an ``nn.Sequential``. The GELU's place becomes an ``nn.Identity`` (it has no parameters, so keys stay)."""
    if type(getattr(module, "fc1", None)) is nn.Linear and _exact_gelu(getattr(module, "act", None)):
        module.fc1, module.act = PackedLinear.from_linear(module.fc1, gelu=True), nn.Identity()
        return 1
    folded = 0
    if isinstance(module, nn.Sequential):
        for i in range(len(module) - 1):
            if type(module[i]) is nn.Linear and _exact_gelu(module[i + 1]):
                module[i], module[i + 1] = PackedLinear.from_linear(module[i], gelu=True), nn.Identity()
                folded += 1
    return folded


def fuse_for_cpu_inference(model: nn.Module) -> int:
    """Swap every ``nn.Linear`` of ``model`` for :class:`PackedLinear` in place, folding an exact GELU that follows
    one into it; returns the number of layers swapped. Idempotent. Layers of other types (SVD fine-tuning's
    factored linears) stay as they are."""
    swapped = 0
    for parent in list(model.modules()):
        swapped += _fold_gelu(parent)
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear.from_linear(child))
                swapped += 1
    return swapped
