"""Scoring with an ONNX export (:mod:`spai_core.export`) under onnxruntime, and its parity with PyTorch.

:class:`OnnxDetector` answers what :class:`~spai_core.detector.Detector` answers for scoring (``logits``,
``score``, ``num_tiles``, ``model_id``, ``provenance``): each image is read and tiled with :mod:`spai_core.tiling`
exactly as the PyTorch path does, the tiles of a batch go through the encoder session in chunks (identical tiles,
such as a small image's five-crop, once), and each image's descriptors through the aggregator session.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .detector import CPU_FEATURE_BATCH, Detector, ImageOrPath, _is_one_image, file_sha256, image_to_tensor
from .checkpoint import is_fused
from .errors import UserError
from .export import FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE
from .fusion import FusedDetector
from .metrics import sigmoid
from .tiling import plan_tiles, tile_offsets

RUNTIMES = ("pytorch", "onnxruntime")


class OnnxExportError(UserError, ValueError):
    """An export folder that is missing, incomplete or altered, or a runtime setting it cannot run with."""


def read_manifest(folder: str | Path, verify: bool = True) -> dict[str, Any]:
    """The ``spai_onnx.json`` of an export folder; with ``verify``, both graphs are checked against its hashes."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if folder.is_file():
        raise OnnxExportError(f"{folder}: is a file; onnxruntime takes the folder `spai export onnx` writes (from this "
                              f"checkpoint: spai export onnx {folder} -o DIR)")
    if not path.is_file():
        raise OnnxExportError(f"{folder}: no {MANIFEST_FILE} here; export a checkpoint into it with "
                              f"`spai export onnx CHECKPOINT -o {folder}`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OnnxExportError(f"{path}: unreadable ({exc}); export the model again") from None
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise OnnxExportError(f"{path}: not a {FORMAT_NAME} v{FORMAT_VERSION} manifest; export the model again")
    for part in ("encoder", "aggregator"):
        graph = folder / manifest[part]["file"]
        if not graph.is_file():
            raise OnnxExportError(f"{graph}: missing; copy the whole export folder or export the model again")
        if verify and file_sha256(graph) != manifest[part]["sha256"]:
            raise OnnxExportError(f"{graph}: its content differs from the hash in {MANIFEST_FILE} (altered or "
                                  "truncated); export the model again")
    return manifest


def onnx_device(device: str) -> str:
    """``cuda`` or ``cpu``: where this onnxruntime runs for ``--device``; ``cuda`` asked of a CPU-only build (the
    ``onnxruntime`` wheel, not ``onnxruntime-gpu``) is an error."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        return "cuda"
    if device.startswith("cuda"):
        raise OnnxExportError(f"--device cuda was asked for but this onnxruntime has no CUDA provider (it has "
                              f"{', '.join(available)}); install onnxruntime-gpu or use --device cpu")
    return "cpu"


def _providers(device: str) -> list[str]:
    return (["CUDAExecutionProvider", "CPUExecutionProvider"] if onnx_device(device) == "cuda"
            else ["CPUExecutionProvider"])


class OnnxDetector:
    """An exported SPAI model in two onnxruntime sessions (fp32), scoring images as :class:`Detector` does."""

    def __init__(self, folder: str | Path, device: str = "auto", feature_batch: int | None = None,
                 max_tiles: int | None = None, threads: int | None = None):
        import onnxruntime as ort

        folder = Path(folder)
        manifest = read_manifest(folder)
        self.preprocessing = dict(manifest["preprocessing"])
        if max_tiles is not None:
            self.preprocessing["max_tiles"] = max_tiles
        options = ort.SessionOptions()
        # The caller's thread budget (a scoring actor sets torch's), not onnxruntime's default of every core.
        options.intra_op_num_threads = threads or torch.get_num_threads()
        providers = _providers(device)
        self.encoder, self.aggregator = (ort.InferenceSession(str(folder / manifest[part]["file"]), options,
                                                              providers=providers)
                                         for part in ("encoder", "aggregator"))
        self.device = torch.device("cuda" if providers[0].startswith("CUDA") else "cpu")
        self.precision = "fp32"
        self.feature_batch = feature_batch or CPU_FEATURE_BATCH
        # The manifest names both graphs by hash, and they were checked against it just now.
        self.model_id = "onnx-" + hashlib.sha256((folder / MANIFEST_FILE).read_bytes()).hexdigest()[:16]
        self.provenance = manifest.get("source", {}).get("metadata", {})

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "auto", precision: str = "auto",
                        feature_batch: int | None = None, max_tiles: int | None = None) -> "OnnxDetector":
        """:meth:`Detector.from_pretrained`'s signature, for an export folder (fp32 only: that is what it holds)."""
        if precision not in ("auto", "fp32"):
            raise OnnxExportError(f"onnxruntime runs the fp32 export; precision {precision!r} needs the PyTorch "
                                  "runtime (drop --precision or use --runtime pytorch)")
        return cls(path, device, feature_batch, max_tiles)

    def _plan(self, image: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        pre = self.preprocessing
        return plan_tiles(image, pre["tile_size"], pre["minimum_patches"], pre["max_tiles"])

    def num_tiles(self, height: int, width: int) -> int:
        """Tiles the attention pools for an image of this size (five-crop counts 5)."""
        pre, size = self.preprocessing, self.preprocessing["tile_size"]
        return len(tile_offsets(max(height, size), max(width, size), size, pre["minimum_patches"], pre["max_tiles"]))

    def describe(self, tiles: np.ndarray) -> np.ndarray:
        """``T x 3 x S x S`` float32 tiles in [0, 1] -> ``T x D`` descriptors, ``feature_batch`` tiles per call."""
        return np.concatenate([self.encoder.run(None, {"tiles": tiles[i:i + self.feature_batch]})[0]
                               for i in range(0, len(tiles), self.feature_batch)])

    def pool(self, descriptors: np.ndarray) -> tuple[float, np.ndarray]:
        """One image's ``L x D`` descriptors -> its logit and the ``heads x L`` tile attention."""
        logit, attention = self.aggregator.run(None, {"descriptors": descriptors[None]})
        return float(logit[0]), attention[0]

    def logits(self, images: Sequence[ImageOrPath] | ImageOrPath) -> np.ndarray:
        """Raw logits (float32) of a batch of images (arrays, PIL images or paths), as :meth:`Detector.logits`."""
        if _is_one_image(images):
            images = [images]
        plans = [self._plan(image_to_tensor(img)) for img in images]
        keys = [(i, offset) for i, (_, offsets) in enumerate(plans) for offset in dict.fromkeys(offsets)]
        if not keys:
            return np.zeros(0, dtype=np.float32)
        size = self.preprocessing["tile_size"]
        tiles = np.stack([plans[i][0][:, r:r + size, c:c + size].numpy() for i, (r, c) in keys])
        descriptors = self.describe(tiles)
        row = {key: n for n, key in enumerate(keys)}
        return np.array([self.pool(descriptors[[row[(i, offset)] for offset in offsets]])[0]
                         for i, (_, offsets) in enumerate(plans)], dtype=np.float32)

    def score(self, images: Sequence[ImageOrPath] | ImageOrPath) -> np.ndarray:
        """P(AI-generated) = sigmoid(logit) per image (float64)."""
        return sigmoid(self.logits(images))


def load_detector(path: str | Path, runtime: str = "pytorch",
                  **kwargs: Any) -> Detector | OnnxDetector | FusedDetector:
    """A Detector of ``runtime`` (``pytorch``: a checkpoint file, a fused Sem-SPAI one included; ``onnxruntime``:
    an export folder)."""
    if runtime not in RUNTIMES:
        raise OnnxExportError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "onnxruntime":
        return OnnxDetector.from_pretrained(path, **kwargs)
    if is_fused(path):  # a Sem-SPAI checkpoint scores through the same calls
        return FusedDetector.from_pretrained(path, **kwargs)
    return Detector.from_pretrained(path, **kwargs)


@dataclasses.dataclass
class ParityRow:
    image: str
    tiles: int
    pytorch: float  # logit
    onnxruntime: float

    @property
    def abs_error(self) -> float:
        return abs(self.onnxruntime - self.pytorch)

    @property
    def rel_error(self) -> float:
        return self.abs_error / max(abs(self.pytorch), 1e-12)


@dataclasses.dataclass
class ParityReport:
    """ONNX against PyTorch fp32 logits per image; passes when every ``|d| <= atol + rtol * |pytorch|``."""

    rows: list[ParityRow]
    rtol: float = 1e-4
    atol: float = 1e-5

    @property
    def max_abs(self) -> float:
        return max((r.abs_error for r in self.rows), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((r.rel_error for r in self.rows), default=0.0)

    @property
    def passed(self) -> bool:
        return all(r.abs_error <= self.atol + self.rtol * abs(r.pytorch) for r in self.rows)

    def table(self) -> str:
        lines = [f"{'image':<44} {'tiles':>5} {'pytorch':>12} {'onnxruntime':>12} {'|d|':>9} {'rel':>9}"]
        lines += [f"{os.path.basename(r.image)[:44]:<44} {r.tiles:>5} {r.pytorch:>12.7f} {r.onnxruntime:>12.7f} "
                  f"{r.abs_error:>9.2e} {r.rel_error:>9.2e}" for r in self.rows]
        verdict = "within" if self.passed else "OUTSIDE"
        lines.append(f"max |d| {self.max_abs:.2e}, max rel. {self.max_rel:.2e}: {verdict} rtol {self.rtol:g} + atol "
                     f"{self.atol:g}")
        return "\n".join(lines)


def compare_with_pytorch(folder: str | Path, reference: Detector, images: Sequence[str | Path],
                         rtol: float = 1e-4, atol: float = 1e-5) -> ParityReport:
    """Score ``images`` with the export and with ``reference`` (a PyTorch fp32 Detector), one image at a time."""
    onnx = OnnxDetector(folder, "cpu")
    rows = []
    for path in images:
        with Image.open(path) as opened:
            width, height = opened.size
        rows.append(ParityRow(str(path), reference.num_tiles(height, width), float(reference.logits(path)[0]),
                              float(onnx.logits(path)[0])))
    return ParityReport(rows, rtol, atol)
