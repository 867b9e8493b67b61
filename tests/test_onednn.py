"""The CPU inference patch (spai_core.onednn): same parameters and state dict, same outputs, plain ops elsewhere."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from spai_core.onednn import PackedLinear, fuse_for_cpu_inference
from spai_core.spai import build_model

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return build_model("spai_tiny").eval()


def test_fused_model_keeps_its_state_dict_and_scores() -> None:
    plain = _tiny()
    fused = copy.deepcopy(plain)
    swapped = fuse_for_cpu_inference(fused)
    assert swapped == sum(type(m) is nn.Linear for m in plain.modules())
    assert fuse_for_cpu_inference(fused) == 0  # idempotent
    assert all(isinstance(b.mlp.fc1, PackedLinear) and b.mlp.fc1.gelu for b in fused.mfvit.vit.blocks)
    projector = fused.mfvit.features_processor.patch_projector.projectors[0].projector  # Linear, GELU as in Sequential
    assert projector[1].gelu and isinstance(projector[2], nn.Identity)
    assert not any(type(m) in (nn.Linear, nn.GELU) for m in fused.modules())
    before, after = plain.state_dict(), fused.state_dict()
    assert list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)
    images = [torch.rand(3, 300, 260), torch.rand(3, 224, 224)]
    with torch.inference_mode():
        expected, got = plain.forward_images(images), fused.forward_images(images)
        with torch.autocast("cpu", torch.bfloat16):
            expected16, got16 = plain.forward_images(images), fused.forward_images(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got16.float(), expected16.float(), rtol=0.05, atol=0.05)


def test_packed_linear_repacks_a_changed_weight_and_trains_as_nn_linear() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(32, 48)
    packed = PackedLinear.from_linear(linear, gelu=True)
    assert packed.weight is linear.weight  # shares the parameter, no copy
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), nn.functional.gelu(linear(x)))
        linear.weight.mul_(2)  # an in-place change (load_state_dict, an optimiser step) must not serve stale packing
        torch.testing.assert_close(packed(x), nn.functional.gelu(linear(x)))
    x.requires_grad_(True)
    packed(x).sum().backward()  # under autograd: the plain ops, which have a backward
    assert linear.weight.grad is not None and x.grad is not None
    clone = pickle.loads(pickle.dumps(packed))  # the packed oneDNN tensor has no storage; copies rebuild it
    with torch.no_grad():
        torch.testing.assert_close(clone(x), packed(x))
