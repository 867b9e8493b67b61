"""onnxruntime against PyTorch on CPU, fp32, on a mixed-size set of the committed photos, side by side.

The same images go through three runtimes, each given the same threads: the PyTorch Detector as it scores on CPU
(timm's ViT with the oneDNN patch of ``spai_core.onednn``), the plain PyTorch model the export is traced from, and the
two exported graphs under onnxruntime (``spai_core.onnx_runtime.OnnxDetector``). Each runtime scores the whole set
in one call (tiles of all images encoded together, ``--feature-batch`` at a time), ``--repeats`` times after a warm-up
image; the best time counts, with its CPU time (all threads), which a shared machine disturbs less. ``max|dlogit|``
is against the plain PyTorch model.

    python benchmarks/bench_onnx.py                          # ViT-B (random weights), 6 photos <= 640 px, 2 threads
    python benchmarks/bench_onnx.py --model spai_tiny --images 12 --max-side 1024
    python benchmarks/bench_onnx.py --weights spai.pth --export /tmp/spai-onnx   # an export made before (or made there)
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spai_core.checkpoint import save_checkpoint
from spai_core.detector import CPU_FEATURE_BATCH, Detector
from spai_core.export import MANIFEST_FILE, export_checkpoint
from spai_core.images import to_rgb_array
from spai_core.onnx_runtime import OnnxDetector
from spai_core.spai import build_model

PHOTOS = Path(__file__).resolve().parents[1] / "pipelines" / "assets" / "photos"


def mixed_photos(count: int, max_side: int) -> list[np.ndarray]:
    """``count`` committed photos spread from the smallest to the largest, each shrunk to ``max_side`` at most (the
    small ones keep their size, so the set mixes five-crop and grid images of several shapes)."""
    paths = sorted(PHOTOS.glob("*.jpg"), key=lambda p: Image.open(p).size[0] * Image.open(p).size[1])
    picks = [paths[round(i * (len(paths) - 1) / max(count - 1, 1))] for i in range(count)]
    images = []
    for path in picks:
        image = Image.open(path).convert("RGB")
        image.thumbnail((max_side, max_side))
        images.append(to_rgb_array(image))
    return images


def timed(scorer, images: list[np.ndarray], repeats: int) -> tuple[float, float, np.ndarray]:
    """Best wall time, the CPU time of that run (all threads: steadier than wall time on a shared machine), and the
    logits."""
    scorer.logits(images[:1])  # warm-up: first-call allocations, onnxruntime's kernel choices
    best, cpu, logits = float("inf"), float("inf"), None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        logits = scorer.logits(images)
        if time.perf_counter() - start < best:
            best, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return best, cpu, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="spai_vit_b16", help="registered config of the random weights")
    parser.add_argument("--weights", default=None, help="checkpoint to export and score (default: random --model)")
    parser.add_argument("--export", default=None, help="export folder: used if it holds one, else written there")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--max-side", type=int, default=640)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--feature-batch", type=int, default=CPU_FEATURE_BATCH)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        weights = args.weights
        if weights is None:
            torch.manual_seed(0)
            weights = str(Path(tmp) / f"{args.model}.safetensors")
            save_checkpoint(weights, build_model(args.model))
        folder = Path(args.export or Path(tmp) / "export")
        if not (folder / MANIFEST_FILE).is_file():
            start = time.perf_counter()
            export_checkpoint(weights, folder)
            print(f"exported in {time.perf_counter() - start:.1f} s")
        images = mixed_photos(args.images, args.max_side)
        plain = Detector.from_pretrained(weights, "cpu", "fp32", feature_batch=args.feature_batch, fuse_cpu=False)
        runtimes = {"pytorch (oneDNN patch)": Detector.from_pretrained(weights, "cpu", "fp32",
                                                                       feature_batch=args.feature_batch),
                    "pytorch (plain)": plain,
                    "onnxruntime": OnnxDetector(folder, "cpu", args.feature_batch, threads=args.threads)}
        tiles = sum(plain.num_tiles(*image.shape[:2]) for image in images)
        sizes = sorted({f"{i.shape[1]}x{i.shape[0]}" for i in images})
        print(f"{len(images)} photos ({', '.join(sizes)}), {tiles} tiles, {args.threads} threads, fp32, "
              f"feature batch {args.feature_batch}")
        results = {name: timed(scorer, images, args.repeats) for name, scorer in runtimes.items()}
    reference = results["pytorch (plain)"][2]
    print("| runtime | wall s | CPU s | images/s | tiles/s | max abs dlogit |\n|---|---:|---:|---:|---:|---:|")
    for name, (seconds, cpu, logits) in results.items():
        print(f"| {name} | {seconds:.2f} | {cpu:.2f} | {len(images) / seconds:.3f} | {tiles / seconds:.2f} | "
              f"{np.abs(logits - reference).max():.2e} |")


if __name__ == "__main__":
    main()
