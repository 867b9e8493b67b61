"""Checkpoint loading is strict and safe; conversions round-trip with identical scores."""
from __future__ import annotations

import builtins
import errno
import os
import pickle
import random
import subprocess
import sys
import types

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spai_cli.main import main as spai
from spai_core.backbones import BackboneError
from spai_core.checkpoint import (CheckpointError, convert, load_backbone, load_model, ours_to_official_key,
                                  read_checkpoint, save_checkpoint, save_official)
from spai_core.detector import Detector
from spai_core.errors import UserError
from spai_core.spai import build_model, get_model_config

IMAGES = [np.random.default_rng(i).integers(0, 256, (260, 300, 3), dtype=np.uint8) for i in range(2)]
NOT_WEIGHTS = "neither a readable safetensors file nor a PyTorch checkpoint .*not weights at all.*download"


@pytest.fixture()
def tiny():
    """The tiny model with the MFM ViT's layout: random q and v biases, no key bias."""
    torch.manual_seed(0)
    model = build_model("spai_tiny").eval()
    with torch.no_grad():
        for block in model.mfvit.vit.blocks:
            q, k, v = block.attn.qkv.bias.view(3, -1)
            q.normal_(std=0.5), k.zero_(), v.normal_(std=0.5)
    return model


def _mfm_layout(state):
    """Our (timm) attention bias in the MFM/official layout, split here independently of the code under test."""
    out = {}
    for key, value in state.items():
        if key.endswith("attn.qkv.bias"):
            q, k, v = value.clone().chunk(3)
            assert not k.any(), "a model built from MFM weights has no key bias"
            out[key.replace("qkv.bias", "q_bias")], out[key.replace("qkv.bias", "v_bias")] = q, v
        else:
            out[key] = value.clone()
    return out


def _official_state(model):
    state = {ours_to_official_key(k): v for k, v in _mfm_layout(model.state_dict()).items()}
    state["mfvit.frequencies_mask"] = model.mfvit.frequencies_mask.long()
    state["mfvit.vit.fc_norm.weight"] = torch.ones(64)  # unused official extra: ignored by name
    return state


def test_ours_round_trip_identical_scores(tiny, tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny, {"epoch": 3})
    model, ckpt = load_model(path)
    assert ckpt.config == tiny.cfg and ckpt.metadata["epoch"] == 3
    np.testing.assert_array_equal(Detector(model, "cpu").logits(IMAGES), Detector(tiny, "cpu").logits(IMAGES))


class YacsCfgNode(dict):
    """What the official file pickles: a yacs.config.CfgNode, a dict subclass with flags in __dict__."""


YacsCfgNode.__module__, YacsCfgNode.__qualname__ = "yacs.config", "CfgNode"


def test_official_layout_with_config_fp16_and_extras(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    monkeypatch.setitem(sys.modules, "yacs.config", types.SimpleNamespace(CfgNode=YacsCfgNode))
    cfg = YacsCfgNode(MODEL=YacsCfgNode(FRE=YacsCfgNode(MASKING_RADIUS=16)))
    cfg.__dict__["__immutable__"] = True
    state = {k: v.half() if v.is_floating_point() else v for k, v in _official_state(tiny).items()}
    torch.save({"model": state, "epoch": 7, "config": cfg, "max_accuracy": 0.9}, tmp_path / "spai.pth")
    monkeypatch.delitem(sys.modules, "yacs.config")  # the loader must not need yacs
    model, ckpt = load_model(tmp_path / "spai.pth", get_model_config("spai_tiny"))
    assert ckpt.kind == "official" and ckpt.metadata["epoch"] == 7
    assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())
    half_model = build_model("spai_tiny")
    half_model.load_state_dict({k: v.half().float() for k, v in tiny.state_dict().items()})
    np.testing.assert_array_equal(Detector(model, "cpu").logits(IMAGES), Detector(half_model, "cpu").logits(IMAGES))


def test_mask_radius_is_read_from_official_mask(tiny, tmp_path):
    state = _official_state(tiny)
    tiny.set_mask_radius(24)
    state["mfvit.frequencies_mask"] = tiny.mfvit.frequencies_mask.long()
    torch.save({"model": state}, tmp_path / "r24.pth")
    model, _ = load_model(tmp_path / "r24.pth", "spai_tiny")
    assert model.cfg.mask_radius == 24


def test_missing_key_and_wrong_shape_are_errors(tiny, tmp_path):
    state = _official_state(tiny)
    del state["cls_head.head.6.bias"]
    torch.save({"model": state}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing key.*cls_head.head.6.bias"):
        load_model(tmp_path / "missing.pth", "spai_tiny")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_model(tmp_path / "missing.pth", "spai_small")  # wrong config for these weights
    state = _official_state(tiny)
    state["something.else"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected key.*something.else"):
        load_model(tmp_path / "extra.pth", "spai_tiny")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/spai_pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _RunsCode()}, path)
    if os.path.exists("/tmp/spai_pwned"):
        os.remove("/tmp/spai_pwned")
    with pytest.raises(CheckpointError, match="refused.*posix.system|refused.*os.system|refused"):
        load_model(path, "spai_tiny")
    assert not os.path.exists("/tmp/spai_pwned")
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(CheckpointError):
        load_model(legacy, "spai_tiny")
    assert not os.path.exists("/tmp/spai_pwned")


def test_corrupt_truncated_empty_and_missing_files(tiny, tmp_path):
    save_checkpoint(tmp_path / "good.safetensors", tiny)
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=NOT_WEIGHTS):
        load_model(tmp_path / "trunc.safetensors")
    torch.save({"model": _official_state(tiny)}, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=NOT_WEIGHTS):
        load_model(tmp_path / "trunc.pth", "spai_tiny")
    for suffix in (".pth", ".safetensors"):
        (tmp_path / f"empty{suffix}").write_bytes(b"")
        with pytest.raises(CheckpointError, match="the file is empty"):
            load_model(tmp_path / f"empty{suffix}")
    with pytest.raises(CheckpointError, match="absent.pth: no such weights file"):
        load_model(tmp_path / "absent.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".bin"])
def test_bytes_that_are_not_weights_are_one_error_whatever_the_suffix(suffix, tmp_path):
    """The suffix must not decide: given a ``.safetensors`` path, torch.load hands the file to safetensors."""
    path = tmp_path / f"weights{suffix}"
    pages = [b"<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n", b"x",
             b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 8]  # error page, one byte, a JPEG
    for page in pages:
        path.write_bytes(page)
        with pytest.raises(CheckpointError, match=NOT_WEIGHTS):
            read_checkpoint(path)
    for seed in range(400):  # random bytes, half behind a pickle header: the unpickler fails in many different ways
        rng = random.Random(seed)
        noise = rng.randbytes(rng.choice([8, 64, 4096]))
        path.write_bytes(bytes([0x80, rng.randint(2, 5)]) + noise if seed % 2 else noise)
        with pytest.raises(CheckpointError, match=NOT_WEIGHTS):
            read_checkpoint(path)


def test_the_bytes_decide_the_format_not_the_suffix(tiny, tmp_path):
    save_official(tmp_path / "official.safetensors", tiny)
    save_checkpoint(tmp_path / "ours.pth", tiny)
    assert read_checkpoint(tmp_path / "official.safetensors", "spai_tiny").kind == "official"
    assert read_checkpoint(tmp_path / "ours.pth").kind == "spai-ray"


def test_a_folder_is_named_as_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path}: is a folder, not a weights file; .*{tmp_path}/spai.pth"):
        read_checkpoint(tmp_path)


def test_an_unreadable_file_says_why(tiny, tmp_path, monkeypatch):
    locked = tmp_path / "locked.pth"
    save_official(locked, tiny)
    locked.chmod(0)
    real_open = builtins.open

    def denying_open(file, *args, **kwargs):  # root reads any file whatever its mode, so refuse it here too
        if os.fspath(file) == str(locked):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(locked))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denying_open)
    with pytest.raises(CheckpointError, match="locked.pth: cannot read the weights file: Permission denied"):
        read_checkpoint(locked)


def test_damaged_metadata_of_our_format(tiny, tmp_path):
    for meta in ({"format": "spai-ray"}, {"format": "spai-ray", "model_config": "{cut"}):
        save_file({"x": torch.zeros(1)}, str(tmp_path / "m.safetensors"), metadata=meta)
        with pytest.raises(CheckpointError, match="its spai-ray metadata is damaged"):
            read_checkpoint(tmp_path / "m.safetensors")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_convert_creates_the_destination_folder(suffix, tiny, tmp_path):
    save_checkpoint(tmp_path / "ours.safetensors", tiny)
    convert(tmp_path / "ours.safetensors", tmp_path / "new" / "deeper" / f"out{suffix}")
    assert load_model(tmp_path / "new" / "deeper" / f"out{suffix}", "spai_tiny")[0].cfg == tiny.cfg


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_unwritable_destinations_are_errors(suffix, tiny, tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(CheckpointError, match="folder: is a folder; give the file to write"):
        (save_official if suffix == ".pth" else save_checkpoint)(tmp_path / "folder", tiny)
    for dst in (tmp_path / "file" / f"out{suffix}", tmp_path / f"{'x' * 300}{suffix}"):  # parent is a file; too long
        with pytest.raises(CheckpointError, match="cannot write the weights file"):
            (save_official if suffix == ".pth" else save_checkpoint)(dst, tiny)


def test_an_unknown_model_config_lists_the_registered_ones(tiny, tmp_path):
    save_official(tmp_path / "official.pth", tiny)
    names = "spai_clip_b16, spai_small, spai_tiny, spai_vit_b16"
    with pytest.raises(UserError, match=f"unknown model config 'bogus'; .*: {names}$"):
        convert(tmp_path / "official.pth", tmp_path / "out.safetensors", "bogus")


@pytest.mark.parametrize("src, config, dst, message", [
    ("rand.safetensors", "spai_tiny", "out.safetensors", "rand.safetensors: neither a readable safetensors file nor"),
    ("official.pth", "bogus", "out.safetensors", "unknown model config 'bogus'"),
    ("folder", "spai_tiny", "out.safetensors", "folder: is a folder, not a weights file"),
    ("official.pth", "spai_small", "out.safetensors", "Is the model config right? (`spai convert --model NAME`"),
    ("official.pth", "spai_tiny", "out.bin", "out.bin: name it .safetensors (our format) or .pth"),
])
def test_convert_cli_user_errors(src, config, dst, message, tiny, tmp_path, capsys):
    save_official(tmp_path / "official.pth", tiny)
    (tmp_path / "rand.safetensors").write_bytes(random.Random(0).randbytes(4096))
    (tmp_path / "folder").mkdir()
    assert spai(["convert", str(tmp_path / src), str(tmp_path / dst), "--model", config]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_convert_both_ways_keeps_scores(tiny, tmp_path):
    save_official(tmp_path / "official.pth", tiny, epoch=2)
    convert(tmp_path / "official.pth", tmp_path / "ours.safetensors", "spai_tiny")
    convert(tmp_path / "ours.safetensors", tmp_path / "back.pth")
    reference = Detector(tiny, "cpu").logits(IMAGES)
    for path in ("ours.safetensors", "back.pth"):
        model, _ = load_model(tmp_path / path, "spai_tiny")
        np.testing.assert_array_equal(Detector(model, "cpu").logits(IMAGES), reference)
    raw = torch.load(tmp_path / "back.pth", weights_only=True)
    assert "patch_aggregator" in raw["model"] and "to_kv.weight" in raw["model"] and raw["epoch"] == 2
    expected = _official_state(tiny)
    del expected["mfvit.vit.fc_norm.weight"]
    assert raw["model"].keys() == expected.keys()  # the official layout: q_bias/v_bias, no qkv.bias
    for key, value in expected.items():
        torch.testing.assert_close(raw["model"][key], value, rtol=0, atol=0)


def test_official_export_drops_a_key_bias_exactly(tiny, tmp_path):
    with torch.no_grad():  # full fine-tuning can move the key part of timm's fused bias; softmax ignores it
        for block in tiny.mfvit.vit.blocks:
            block.attn.qkv.bias.view(3, -1)[1].normal_(std=2.0)
    save_official(tmp_path / "official.pth", tiny)
    model, _ = load_model(tmp_path / "official.pth", "spai_tiny")
    assert not any(b.attn.qkv.bias.view(3, -1)[1].any() for b in model.mfvit.vit.blocks)
    np.testing.assert_allclose(Detector(model, "cpu").logits(IMAGES), Detector(tiny, "cpu").logits(IMAGES),
                               rtol=1e-5, atol=1e-5)


def test_format_1_checkpoints_still_load(tiny, tmp_path):
    """Files written before the backbone moved to timm: the MFM layout, a config with no backbone field."""
    config = dataclasses.asdict(tiny.cfg)
    del config["backbone"]
    meta = {"format": "spai-ray", "format_version": "1", "model_config": json.dumps(config),
            "metadata": json.dumps({"epoch": 4})}
    save_file({k: v.contiguous() for k, v in _mfm_layout(tiny.state_dict()).items()}, tmp_path / "v1.safetensors",
              metadata=meta)
    model, ckpt = load_model(tmp_path / "v1.safetensors")
    assert ckpt.config == tiny.cfg and ckpt.metadata["epoch"] == 4
    np.testing.assert_array_equal(Detector(model, "cpu").logits(IMAGES), Detector(tiny, "cpu").logits(IMAGES))
    meta["format_version"] = "3"
    save_file({"x": torch.zeros(1)}, tmp_path / "v3.safetensors", metadata=meta)
    with pytest.raises(CheckpointError, match="format 3, newer.*upgrade"):
        load_model(tmp_path / "v3.safetensors")


def test_descriptor_norm_statistics_round_trip_in_our_format_only(tmp_path):
    torch.manual_seed(0)
    model = build_model(get_model_config("spai_tiny", descriptor_norm=True))
    with torch.no_grad():  # a few training-mode passes move the running statistics off their initial 0/1
        for seed in range(3):
            model.train()(torch.rand(2, 2, 3, 224, 224, generator=torch.Generator().manual_seed(seed)))
    model.eval()
    assert model.descriptor_norm.num_batches_tracked == 3
    save_checkpoint(tmp_path / "norm.safetensors", model)
    loaded, ckpt = load_model(tmp_path / "norm.safetensors")
    assert ckpt.config.descriptor_norm
    torch.testing.assert_close(loaded.descriptor_norm.running_var, model.descriptor_norm.running_var, rtol=0, atol=0)
    np.testing.assert_array_equal(Detector(loaded, "cpu").logits(IMAGES), Detector(model, "cpu").logits(IMAGES))
    with pytest.raises(CheckpointError, match="descriptor_norm"):
        convert(tmp_path / "norm.safetensors", tmp_path / "official.pth")


def test_convert_cli(tiny, tmp_path):
    save_official(tmp_path / "official.pth", tiny)
    subprocess.run([sys.executable, "-m", "spai_cli.main", "convert", str(tmp_path / "official.pth"),
                    str(tmp_path / "ours.safetensors"), "--model", "spai_tiny"], check=True)
    assert load_model(tmp_path / "ours.safetensors")[1].config.name == "spai_tiny"


def test_mfm_backbone_loads_strictly(tiny, tmp_path):
    vit = {f"encoder.{k}": v + 1 for k, v in _mfm_layout(tiny.mfvit.vit.state_dict()).items()}
    vit["encoder.norm.weight"] = torch.ones(64)  # MFM extras are ignored
    vit["decoder.pred.weight"] = torch.ones(3)
    torch.save({"model": vit}, tmp_path / "mfm.pth")
    model = build_model("spai_tiny")
    load_backbone(model, tmp_path / "mfm.pth")
    torch.testing.assert_close(model.mfvit.vit.pos_embed, tiny.mfvit.vit.pos_embed + 1)
    q, k, v = model.mfvit.vit.blocks[2].attn.qkv.bias.view(3, -1)
    q_ref, _, v_ref = tiny.mfvit.vit.blocks[2].attn.qkv.bias.view(3, -1)
    torch.testing.assert_close(torch.stack([q, v]), torch.stack([q_ref, v_ref]) + 1)
    assert not k.any()  # MFM has no key bias
    del vit["encoder.blocks.0.attn.v_bias"]
    torch.save({"model": vit}, tmp_path / "mfm_bad.pth")
    with pytest.raises(BackboneError, match="missing key.*blocks.0.attn.qkv.bias"):
        load_backbone(build_model("spai_tiny"), tmp_path / "mfm_bad.pth")
    with pytest.raises(BackboneError, match="shape mismatch"):
        load_backbone(build_model("spai_small"), tmp_path / "mfm.pth")
    with pytest.raises(CheckpointError, match="backbone-only"):
        load_model(tmp_path / "mfm.pth", "spai_tiny")
