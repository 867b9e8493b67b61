"""ONNX export of a SPAI model: the tile encoder and the tile aggregator as two graphs, and their preprocessing.

Deployment runtimes (onnxruntime, TensorRT) get what the PyTorch path does per image, split at the one place where
the work changes shape: ``tile_encoder.onnx`` maps ``T x 3 x S x S`` tiles in [0, 1] (any ``T``) to ``T x D``
descriptors, the FFT split and the backbone's normalisation inside the graph; ``aggregator.onnx`` maps one image's
``1 x L x D`` descriptors (any ``L``) to its logit and the ``1 x heads x L`` tile attention. Tiling stays outside
(it is data-dependent slicing, not tensor algebra) and is described in ``spai_onnx.json`` for other runtimes;
:mod:`spai_core.onnx_runtime` does it with :mod:`spai_core.tiling`, exactly as the PyTorch path.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbones import get_backbone_spec
from .checkpoint import load_model
from .detector import file_sha256
from .spai import SPAI, ModelConfig

logger = logging.getLogger(__name__)

FORMAT_NAME = "spai-onnx"
FORMAT_VERSION = 1
ENCODER_FILE = "tile_encoder.onnx"
AGGREGATOR_FILE = "aggregator.onnx"
MANIFEST_FILE = "spai_onnx.json"
# 17: LayerNormalization is one op (opset 17 on), so the graphs stay readable and TensorRT 8.6+ fuses it.
OPSET = 17


class MatrixFrequencySplit(nn.Module):
    """:func:`spai_core.filters.split_frequencies` as exact matrix products, for graphs without an FFT.

    ONNX's legacy exporter has no ``fft_fft2`` (and ONNX's ``DFT`` is missing from TensorRT and slow elsewhere), so
    the masked 2-D DFT is written out: with ``C``/``S`` the cosine/sine parts of the DFT matrix restricted to the
    rows and columns of bins the mask keeps, the low-pass image is ``Re(W_r^H (M * (W_r X W_c^T)) conj(W_c))`` / N^2
    in real arithmetic. The 224/16 mask keeps a 32 x 32 band of bins, so this costs ~4% of one FFT's memory and
    a few MFLOPs per tile. The high-pass image is ``x - low``: ``ifft2(F * (1 - M)) = x - ifft2(F * M)`` exactly,
    since the inverse of the full spectrum is ``x``. Both are clamped to [0, 1] as the official model does.
    """

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        size = mask.shape[-1]
        keep = torch.fft.ifftshift(mask.to(torch.float64))  # the mask in the unshifted layout fft2 works in
        rows, cols = keep.any(dim=1).nonzero()[:, 0], keep.any(dim=0).nonzero()[:, 0]
        pixels = torch.arange(size)
        # Bin x pixel products reduced modulo N in integers, so the float64 angles (and cos/sin) are exact to rounding.
        row_angle = ((rows[:, None] * pixels) % size).double() * (2 * math.pi / size)
        col_angle = ((cols[:, None] * pixels) % size).double() * (2 * math.pi / size)
        for name, value in (("cos_r", row_angle.cos()), ("sin_r", row_angle.sin()), ("cos_c", col_angle.cos()),
                            ("sin_c", col_angle.sin()), ("band", keep[rows][:, cols] / size ** 2)):
            self.register_buffer(name, value.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        cos_x, sin_x = self.cos_r @ x, self.sin_r @ x  # ... x U x N
        real = cos_x @ self.cos_c.T - sin_x @ self.sin_c.T  # the kept band of fft2(x): U x V
        imag = -(cos_x @ self.sin_c.T + sin_x @ self.cos_c.T)
        real, imag = real * self.band, imag * self.band  # masked, 1/N^2 of the inverse folded in
        low = ((self.cos_r.T @ real - self.sin_r.T @ imag) @ self.cos_c
               - (self.cos_r.T @ imag + self.sin_r.T @ real) @ self.sin_c)
        return low.clamp(0, 1), (x - low).clamp(0, 1)


class TileEncoder(nn.Module):
    """Tiles in [0, 1] -> descriptors, as :meth:`SPAI.describe` with the split of :class:`MatrixFrequencySplit`."""

    def __init__(self, model: SPAI):
        super().__init__()
        self.model = model
        self.split = MatrixFrequencySplit(model.mfvit.frequencies_mask)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.model.descriptor_norm(self.model.mfvit.encode_split(tiles, *self.split(tiles)))


class Aggregator(nn.Module):
    """One image's tile descriptors -> its logit and the tile attention of each head (:meth:`SPAI.pool`)."""

    def __init__(self, model: SPAI):
        super().__init__()
        self.model = model

    def forward(self, descriptors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.pool(descriptors)


def preprocessing(model: SPAI) -> dict[str, Any]:
    """What a runtime does before and between the two graphs, as data (the ``preprocessing`` of the manifest)."""
    cfg = model.cfg
    spec = get_backbone_spec(cfg.backbone)
    return {
        "input": "RGB float32 in [0, 1]: uint8 * float32(1/255), no resizing",
        "tile_size": cfg.img_size,
        "padding": "sides under tile_size padded to it, centred (top/left = floor(pad/2)), OpenCV BORDER_REFLECT_101",
        "tiling": "non-overlapping tile_size grid anchored top-left, row-major, right/bottom remainders dropped; "
                  "fewer than minimum_patches grid tiles -> torchvision five_crop (tl, tr, bl, br, centre); "
                  "max_tiles (if set) keeps round(i * (n - 1) / (max_tiles - 1)) of the n grid tiles",
        "minimum_patches": cfg.minimum_patches,
        "max_tiles": cfg.max_tiles,
        "mask_radius": cfg.mask_radius,
        "normalisation": {"mean": list(spec.mean), "std": list(spec.std),
                          "where": "inside tile_encoder, after the frequency split, on each of the three images"},
        "descriptor_dim": cfg.descriptor_dim,
        "attention_heads": cfg.sca_heads,
    }


def _export(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_names: list[str],
            dynamic_axes: dict[str, dict[int, str]]) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter (torch.onnx's dynamo exporter needs onnxscript) warns about every traced branch.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=OPSET, input_names=[input_name],
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)


def export_onnx(model: SPAI, out_dir: str | Path, source: dict[str, Any] | None = None) -> Path:
    """Write ``tile_encoder.onnx``, ``aggregator.onnx`` and ``spai_onnx.json`` for ``model`` into ``out_dir``.

    Export from an unpatched model (not a CPU :class:`~spai_core.detector.Detector`'s, whose oneDNN linears do not
    trace). ``source`` (e.g. the checkpoint's name and hash) goes into the manifest. Returns the manifest's path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    size = model.cfg.img_size
    logger.info("exporting the tile encoder (%s-px tiles) to %s", size, out / ENCODER_FILE)
    # One example tile: the trace runs the model once; the tile axis stays dynamic (checked with 1 and 7 tiles).
    _export(TileEncoder(model).eval(), torch.rand(1, 3, size, size), out / ENCODER_FILE, "tiles", ["descriptors"],
            {"tiles": {0: "tiles"}, "descriptors": {0: "tiles"}})
    logger.info("exporting the aggregator to %s", out / AGGREGATOR_FILE)
    _export(Aggregator(model).eval(), torch.randn(1, 5, model.cfg.descriptor_dim), out / AGGREGATOR_FILE,
            "descriptors", ["logit", "attention"], {"descriptors": {1: "tiles"}, "attention": {2: "tiles"}})
    manifest = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "opset": OPSET,
        "encoder": {"file": ENCODER_FILE, "sha256": file_sha256(out / ENCODER_FILE),
                    "inputs": {"tiles": ["tiles", 3, size, size]}, "outputs": {"descriptors": ["tiles", "D"]}},
        "aggregator": {"file": AGGREGATOR_FILE, "sha256": file_sha256(out / AGGREGATOR_FILE),
                       "inputs": {"descriptors": [1, "tiles", "D"]},
                       "outputs": {"logit": [1], "attention": [1, "heads", "tiles"]}},
        "preprocessing": preprocessing(model),
        "output": "logit; sigmoid(logit) = P(AI-generated)",
        "model": dataclasses.asdict(model.cfg),
        "source": source or {},
    }
    path = out / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, config: ModelConfig | str | None = None) -> Path:
    """Export a checkpoint (official ``.pth`` or our ``.safetensors``, loaded strictly) with :func:`export_onnx`;
    the manifest names the checkpoint, its hash and its metadata (a calibrated threshold travels with it)."""
    model, loaded = load_model(checkpoint, config)
    # metadata is JSON-like already; default=str keeps an odd value (a date, a path) instead of failing the export
    metadata = json.loads(json.dumps(loaded.metadata, default=str))
    source = {"checkpoint": Path(checkpoint).name, "sha256": file_sha256(checkpoint), "kind": loaded.kind,
              "metadata": metadata}
    return export_onnx(model, out_dir, source)
