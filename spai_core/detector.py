"""Inference API: load weights once, score images of any size and mode, explain a score with tile attention."""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .checkpoint import load_model
from .images import ImageLike, to_rgb_array
from .metrics import sigmoid
from .onednn import fuse_for_cpu_inference
from .spai import SPAI, ModelConfig
from .tiling import tile_offsets

PRECISIONS = ("fp32", "bf16")
ImageOrPath = ImageLike | str | os.PathLike
# Tiles encoded at once on CPU unless asked otherwise (the official 400 is sized for GPUs). The ViT-B GEMMs reach their
# speed from 4 tiles (12 sequences, 2364 rows) on: 4, 8 and 16 tiles took the same time per 1024-px image on a 2-core
# Zen 5 (measured with freed memory kept), so the smallest batch is taken, which keeps activations near 250 MB.
CPU_FEATURE_BATCH = 4


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse rather than hand it back to the OS; True if it took effect.

    Encoding a chunk of tiles allocates and frees activations of several MB to tens of MB per layer. By default glibc
    serves the largest with fresh mmaps and trims freed memory off the top of the heap, so each layer pays page
    faults again on first touch (~0.8M minor faults per 1024x1024 image in fp32). Keeping it makes ViT-B inference on
    a 2-core Zen 5 ~9% faster in fp32 and ~5% in bf16, for ~4% more peak RSS. Process-wide, like the thread count,
    and idempotent; a no-op where malloc is not glibc's.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):  # musl and other C libraries have no mallopt
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without a GPU is an error, not a silent fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but PyTorch sees no GPU; use --device cpu or auto")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 on GPUs (fast, scores within ~1e-2) and fp32 on CPU (exact official scores)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or auto, got {precision!r}")
    return precision


def image_to_tensor(image: ImageOrPath, device: torch.device | str = "cpu") -> torch.Tensor:
    """``3 x H x W`` float32 in [0, 1]: uint8 times float32(1/255), bit-exact with the official pipeline. A path is
    read as the official reader does (Pillow, converted to RGB)."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            array = to_rgb_array(opened)
    else:
        array = to_rgb_array(image)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array).to(device).permute(2, 0, 1).float() * (1 / 255)


def file_sha256(path: str | Path, limit: int | None = None) -> str:
    """Content hash of a file (identifies a checkpoint in score tables)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:limit] if limit else digest.hexdigest()


def _is_one_image(images: object) -> bool:
    """Whether ``images`` is one image rather than a batch: a path or an ``HxW(xC)`` array is a sequence too, but of
    characters or rows (an ``N x H x W x C`` array is a batch)."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return images.ndim <= 3
    return isinstance(images, (str, os.PathLike, Image.Image))


def images_to_tensors(images: Sequence[ImageOrPath] | ImageOrPath, device: torch.device | str) -> list[torch.Tensor]:
    """A batch of images (one image is a batch of one) as :func:`image_to_tensor` tensors."""
    if _is_one_image(images):
        images = [images]
    return [image_to_tensor(img, device) for img in images]


@dataclass
class Explanation:
    """Where the attention pooling looked: per-tile weights (mean over heads) and a pixel heat map."""

    logit: float
    score: float
    offsets: list[tuple[int, int]]  # tile top-left corners in the padded image
    weights: np.ndarray  # one weight per tile, summing to 1
    heatmap: np.ndarray  # H x W float32 over the original image (overlaps averaged, untiled pixels 0)


class Detector:
    """A loaded SPAI model with its device, precision and tiling options.

    On CPU (unless ``fuse_cpu`` is False) the model's linears are patched in place with fused oneDNN ones
    (:mod:`spai_core.onednn`): same parameters and state dict, same scores up to float rounding, faster inference.
    """

    def __init__(self, model: SPAI, device: str | torch.device = "auto", precision: str = "auto",
                 feature_batch: int | None = None, model_id: str = "unknown", provenance: dict | None = None,
                 fuse_cpu: bool = True):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.precision = resolve_precision(precision, self.device)
        self.model = model.to(self.device).eval()
        if self.device.type == "cpu":
            keep_freed_memory()
            if fuse_cpu:
                fuse_for_cpu_inference(model)
        default = min(model.cfg.feature_batch, CPU_FEATURE_BATCH) if self.device.type == "cpu" else None
        self.feature_batch = feature_batch or default or model.cfg.feature_batch
        self.model_id = model_id
        self.provenance = provenance or {}  # a checkpoint's metadata: training run, epoch, metrics

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "auto", precision: str = "auto",
                        config: ModelConfig | str | None = None, feature_batch: int | None = None,
                        max_tiles: int | None = None, fuse_cpu: bool = True) -> "Detector":
        """Load an official ``spai.pth`` or our ``.safetensors`` checkpoint (strictly) for inference."""
        model, loaded = load_model(path, config)
        if max_tiles is not None:
            model.cfg.max_tiles = max_tiles
        return cls(model, device, precision, feature_batch, model_id=file_sha256(path, 16), provenance=loaded.metadata,
                   fuse_cpu=fuse_cpu)

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """No autograd, and bf16 autocast when the precision says so."""
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                     enabled=self.precision == "bf16"):
            yield

    def logits(self, images: Sequence[ImageOrPath] | ImageOrPath) -> np.ndarray:
        """Raw logits (float32) of a batch of images (arrays, PIL images or paths; one image is a batch of one);
        tiles of all images are encoded together."""
        tensors = images_to_tensors(images, self.device)
        if not tensors:
            return np.zeros(0, dtype=np.float32)
        with self.inference():
            out = self.model.forward_images(tensors, chunk=self.feature_batch)
        return out.float().cpu().numpy()

    def score(self, images: Sequence[ImageOrPath] | ImageOrPath) -> np.ndarray:
        """P(AI-generated) = sigmoid(logit) per image (float64); takes what :meth:`logits` takes."""
        return sigmoid(self.logits(images))

    def num_tiles(self, height: int, width: int) -> int:
        """Tiles the attention pools for an image of this size (five-crop counts 5)."""
        size = self.config.img_size
        return len(tile_offsets(max(height, size), max(width, size), size, self.config.minimum_patches,
                                self.config.max_tiles))

    def explain(self, image: ImageOrPath) -> Explanation:
        """Score one image and return its tile attention as weights and a heat map."""
        tensor = image_to_tensor(image, self.device)
        with self.inference():
            logits, attn, plans = self.model.forward_images([tensor], chunk=self.feature_batch, return_attention=True)
        _, offsets = plans[0]
        weights = attn[0].float().mean(dim=0).cpu().numpy()[:len(offsets)]
        logit = float(logits[0])
        return Explanation(logit, float(sigmoid(logit)), offsets, weights,
                           self._heatmap(tensor.shape[-2:], offsets, weights))

    def _heatmap(self, shape: Sequence[int], offsets: list[tuple[int, int]], weights: np.ndarray) -> np.ndarray:
        height, width = shape
        size = self.config.img_size
        top, left = max(size - height, 0) // 2, max(size - width, 0) // 2
        total = np.zeros((max(height, size), max(width, size)), dtype=np.float32)
        count = np.zeros_like(total)
        for (r, c), w in zip(offsets, weights):
            total[r:r + size, c:c + size] += w
            count[r:r + size, c:c + size] += 1
        heat = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
        return heat[top:top + height, left:left + width]
