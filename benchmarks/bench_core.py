"""spai_core speed and memory: our Detector vs a naive per-image loop, as a fraction of the machine's matmul peak.

Each (method, size, precision) runs in its own subprocess so peak RSS is that case's alone. The naive loop is the
official tool's way: one image per call, fp32, every tile encoded (the five identical crops of a 224 image too).
FLOPs are counted analytically from the model config (a ViT-B/16 pass is ~35 GFLOP); the peak is a large matmul
timed per precision in each case's own process, right after the case.

    python benchmarks/bench_core.py                          # ViT-B, 224/512/1024/2048x1536, 2 images each
    python benchmarks/bench_core.py --model spai_tiny --images 4 --sizes 224 512
    python benchmarks/bench_core.py --sizes 1024 --images 1 --unfused   # what the oneDNN patch (spai_core.onednn) gains
    python benchmarks/bench_core.py --device cuda --images 16  # on a GPU: "of peak" is then the MFU

On a GPU, timings synchronise the device, and memory is the device's peak allocation instead of the process RSS.

Side by side with an older version of the code (rows tagged with its name; ``vs naive`` and ``max|dlogit|`` are then
against this tree's naive loop), on the same weights, which both trees must load (the parity fixture's recipe, in the
official layout, fits any version)::

    git archive 93c6783 spai_core | tar -x -C /tmp/old       # 93c6783: the last hand-written ViT with oneDNN kernels
    python -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from parity import *; \
        write_official_checkpoint(Path('/tmp/parity.pth'))"
    python benchmarks/bench_core.py --weights /tmp/parity.pth --baseline /tmp/old --sizes 1024 --images 1
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from spai_core.checkpoint import load_model
from spai_core.detector import Detector, image_to_tensor
from spai_core.metrics import binary_metrics
from spai_core.spai import ModelConfig, build_model

PHOTOS = Path(__file__).resolve().parents[1] / "pipelines" / "assets" / "photos"
PEAK_SIZE = 2048
T = TypeVar("T")
SIZES = {"224": (224, 224), "512": (512, 512), "1024": (1024, 1024), "2048x1536": (1536, 2048)}


def tile_gflop(cfg: ModelConfig) -> float:
    """Forward GFLOP of one tile: three ViT passes plus the FRE projections (2 FLOP per multiply-add)."""
    tokens, dim, hidden = (cfg.img_size // cfg.patch_size) ** 2 + 1, cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    block = tokens * (4 * dim * dim + 2 * dim * hidden) + 2 * tokens * tokens * dim
    embed = (tokens - 1) * dim * 3 * cfg.patch_size ** 2
    projector = (tokens - 1) * (dim * cfg.proj_dim + cfg.proj_dim ** 2)
    return 2 * 3 * (cfg.depth * (block + projector) + embed) / 1e9


def matmul_peak(precision: str, device: torch.device, size: int = PEAK_SIZE, repeats: int = 5) -> float:
    """GFLOP/s of a square matmul in this precision: the best of ``repeats`` runs of each GEMM library PyTorch has
    (on CPU MKL through ``a @ b`` and oneDNN's linear, which bf16 linears run on), so that "of peak" is not flattered
    by the slower one. On a GPU the matmul is 4x bigger, since a 2048^3 one is over before the clocks rise."""
    size = size * 4 if device.type == "cuda" else size
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    kernels = [lambda: a @ b]
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = float("inf")
    for kernel in kernels:
        kernel()
        best = min(best, *(_timed(kernel, device)[0] for _ in range(repeats)))
    return 2 * size ** 3 / best / 1e9


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """(seconds, result) of ``fn()``, with the device's queued work finished at both ends."""
    _synchronize(device)
    start = time.perf_counter()
    result = fn()
    _synchronize(device)
    return time.perf_counter() - start, result


def test_images(size: tuple[int, int], count: int) -> list[np.ndarray]:
    photos = sorted(PHOTOS.glob("*.jpg"))[:count]
    return [np.asarray(Image.open(p).convert("RGB").resize(size[::-1], Image.LANCZOS)) for p in photos]


def naive_logits(model, images: list[np.ndarray], device: torch.device) -> np.ndarray:
    """Batch 1, fp32, every tile encoded: the official per-image path."""
    out = []
    with torch.inference_mode():
        for image in images:
            padded, offsets = model.plan_tiles(image_to_tensor(image, device))
            size = model.cfg.img_size
            tiles = torch.stack([padded[:, r:r + size, c:c + size] for r, c in offsets])
            out.append(float(model.pool(model.describe(tiles)[None])[0][0]))
    return np.array(out, dtype=np.float32)


def run_case(args: argparse.Namespace) -> dict:
    """One measurement in this process: returns throughput, tiles, FLOP rate and peak RSS."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_model(args.weights)[0] if args.weights else build_model(args.model).eval()
    images = test_images(SIZES[args.size], args.images)
    if args.method == "naive":  # the official code: the plain model, no Detector (nor its CPU kernels)
        model.to(device).eval()
    else:  # moves the model there; "unfused" leaves out the oneDNN patch, to show what it gains
        detector = Detector(model, device, args.precision, feature_batch=args.feature_batch,
                            **({"fuse_cpu": False} if args.method == "unfused" else {}))

    def run(batch: list[np.ndarray]) -> np.ndarray:
        return naive_logits(model, batch, device) if args.method == "naive" else detector.logits(batch)

    run(images[:1])  # warm-up: first-call allocations (and CUDA kernel selection) are not what a long job sees
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cpu_start = time.process_time()
    seconds, logits = _timed(lambda: run(images), device)
    cpu_seconds = time.process_time() - cpu_start  # steadier than wall time where other processes share the CPUs
    encoded = sum(len(model.plan_tiles(image_to_tensor(i))[1]) for i in images)
    unique = sum(len(set(model.plan_tiles(image_to_tensor(i))[1])) for i in images)
    tiles = encoded if args.method == "naive" else unique
    gflop = tiles * tile_gflop(model.cfg)
    if device.type == "cuda":
        peak_memory = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:
        peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # before the matmul's buffers
    return {"images_per_s": len(images) / seconds, "tiles_per_s": tiles / seconds, "gflop_per_s": gflop / seconds,
            "cpu_s_per_image": cpu_seconds / len(images),
            "peak_memory_gib": peak_memory, "logits": logits.tolist(),
            "matmul_peak": matmul_peak(args.precision, device)}


def subprocess_case(args: argparse.Namespace, method: str, size: str, precision: str, images: int,
                    tree: Path | None = None) -> dict:
    """One case in a fresh process, importing ``spai_core`` from ``tree`` when given (else this checkout's)."""
    cmd = [sys.executable, __file__, "--case", "--model", args.model, "--threads", str(args.threads), "--method",
           method, "--size", size, "--precision", precision, "--images", str(images), "--device", args.device]
    cmd += ["--feature-batch", str(args.feature_batch)] if args.feature_batch else []
    cmd += ["--weights", str(args.weights)] if args.weights else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree or ""), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spai_vit_b16")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--images", type=int, default=2, help="images per size")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--feature-batch", type=int, default=None,
                        help="tiles encoded at once by our detector (default: the Detector's CPU default)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                        help="where the model runs (default: cuda when there is one)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="a checkpoint to load instead of a seeded random --model (needed with --baseline)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a folder holding an older spai_core package, measured beside this one")
    parser.add_argument("--unfused", action="store_true",
                        help="also run our Detector without its oneDNN CPU patch (spai_core.onednn), this tree only")
    parser.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="224", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.threads} CPU threads"
    print(f"model {args.model} on {where}; 'of peak' divides by a {PEAK_SIZE}^3 matmul in the case's "
          "precision timed in the case's own process right after it, since this machine's clock drifts by 10-20% "
          "over minutes")
    if args.baseline and not args.weights:
        parser.error("--baseline needs --weights: two versions build different random models from one seed")
    memory = "peak GPU GiB" if args.device == "cuda" else "peak RSS GiB"
    header = ["size", "code", "method", "prec", "img/s", "CPU s/img", "tiles/s", "GFLOP/s", "matmul GFLOP/s",
              "of peak", memory, "vs naive", "max|dlogit|"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    trees = [("this", None)] + ([(args.baseline.name, args.baseline)] if args.baseline else [])
    cases = [("naive", "fp32")] + [(m, p) for p in args.precisions for m in ["ours"] + ["unfused"] * args.unfused]
    for size in args.sizes:
        naive = None
        # Each case runs in both trees back to back, so that load from other processes hits both alike.
        for method, precision in cases:
            rows = [(code, subprocess_case(args, method, size, precision, args.images, tree)) for code, tree in trees
                    if method != "unfused" or tree is None]
            naive = naive or rows[0][1]  # this tree's naive loop is the reference for every row
            for code, r in rows:
                delta = np.abs(np.array(r["logits"]) - np.array(naive["logits"])).max()
                print(f"| {size} | {code} | {method} | {precision} | {r['images_per_s']:.3f} | "
                      f"{r['cpu_s_per_image']:.1f} | "
                      f"{r['tiles_per_s']:.2f} | {r['gflop_per_s']:.0f} | {r['matmul_peak']:.0f} | "
                      f"{r['gflop_per_s'] / r['matmul_peak']:.2f} | {r['peak_memory_gib']:.2f} | "
                      f"{r['images_per_s'] / naive['images_per_s']:.2f}x | {delta:.2e} |", flush=True)
    if "bf16" in args.precisions:
        report_bf16_auc(args)


def report_bf16_auc(args: argparse.Namespace) -> None:
    """bf16 vs fp32 scores of one model on real photos: max |delta logit| and the ranking (AUC of fp32 labels)."""
    torch.manual_seed(0)
    model = load_model(args.weights)[0] if args.weights else build_model(args.model).eval()
    images = test_images(SIZES["512"], 8)
    fp32 = Detector(model, args.device, "fp32", feature_batch=args.feature_batch).logits(images)
    bf16 = Detector(model, args.device, "bf16", feature_batch=args.feature_batch).logits(images)
    labels = (fp32 > np.median(fp32)).astype(int)  # random weights: compare rankings, not accuracy
    print(f"bf16 vs fp32 on 8 real photos: max |dlogit| {np.abs(bf16 - fp32).max():.3e}; AUC of bf16 scores against "
          f"the fp32 split at the median: {binary_metrics(labels, bf16)['auc']:.3f} (1.0 = same ranking)")


if __name__ == "__main__":
    main()
