"""Every GPU measurement of the project in one run, one table: what to run the first minutes a GPU machine is lent.

Needs only what ``spai_core`` needs (torch, timm, safetensors, pillow, numpy, pyyaml), which GPU images have; Ray,
MLflow and the test suite's servers are not assumed there (``bench_score.py`` measures the Ray job where Ray is).

- scoring: the ViT-B/16 model's throughput through :class:`~spai_core.detector.Detector` on 1024-px photos, per
  tile batch (``--feature-batches``) and precision; the GPU's busy fraction (NVML samples, where ``nvidia-ml-py`` is
  installed) and MFU (model FLOPs over a large matmul's rate in that precision);
- agreement: the GPU's fp32 and bf16 logits against this machine's CPU fp32 ones on two photos;
- training: steps/s and peak memory of a bf16 training step (forward, backward, AdamW) with the backbone frozen (the
  official recipe) and trainable (full fine-tuning).

    bash benchmarks/gpu_check.sh                       # on the GPU machine: < 8 min on an H200
    python benchmarks/gpu_check.py --device cpu --quick   # the same code paths on CPU, test-sized, in a minute
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import threading
import time
from collections.abc import Iterator

import numpy as np
import torch

from bench_core import _timed, matmul_peak, test_images, tile_gflop
from spai_core.detector import Detector, image_to_tensor
from spai_core.spai import build_model


@contextlib.contextmanager
def busy_sampler(device: torch.device, interval: float = 0.05) -> Iterator[list[float]]:
    """Yields a list that fills with the GPU's utilisation (0-1) sampled through NVML while the block runs; it stays
    empty on CPU or without ``nvidia-ml-py``."""
    samples: list[float] = []
    if device.type != "cuda":
        yield samples
        return
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
    except Exception:  # noqa: BLE001 - no NVML here: the column stays empty rather than the run failing
        yield samples
        return
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


def scoring_rows(args: argparse.Namespace, device: torch.device) -> list[list[str]]:
    torch.manual_seed(0)
    model = build_model(args.model).eval()
    images = test_images((args.size, args.size), args.images)
    tiles = sum(len(set(model.plan_tiles(image_to_tensor(i))[1])) for i in images)  # encoded once each
    rows = []
    for precision in ("fp32", "bf16"):
        peak = matmul_peak(precision, device)
        for batch in args.feature_batches:
            detector = Detector(model, device, precision, feature_batch=batch)
            detector.logits(images[:2])  # warm-up: kernel choice and allocator growth
            with busy_sampler(device) as busy:
                seconds, _ = _timed(lambda: detector.logits(images), device)
            gflops = tiles * tile_gflop(model.cfg) / seconds
            rows.append(["score", precision, str(batch), f"{len(images) / seconds:.1f} img/s",
                         f"{tiles / seconds:.0f} tiles/s", f"{statistics.mean(busy):.0%}" if busy else "-",
                         f"{gflops / peak:.0%} of {_rate(peak)}", _memory(device)])
    return rows


def agreement_rows(args: argparse.Namespace, device: torch.device) -> list[list[str]]:
    torch.manual_seed(0)
    images = test_images((args.size, args.size), 2)
    reference = Detector(build_model(args.model).eval(), "cpu", "fp32").logits(images)
    rows = []
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        logits = Detector(build_model(args.model).eval(), device, precision).logits(images)
        rows.append(["agreement", precision, "-", f"max abs dlogit {np.abs(logits - reference).max():.1e}",
                     "vs CPU fp32", "-", "-", "-"])
    return rows


def training_rows(args: argparse.Namespace, device: torch.device) -> list[list[str]]:
    rows = []
    for frozen in (True, False):
        torch.manual_seed(0)
        model = build_model(args.model).to(device).train()
        model.mfvit.backbone_frozen = frozen
        model.mfvit.vit.requires_grad_(not frozen)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        size = model.cfg.img_size
        views = torch.rand(args.train_batch, 4, 3, size, size, device=device)  # 4 views per image, as the recipe
        labels = torch.randint(0, 2, (args.train_batch,), device=device).float()

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(model(views).float(), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, _ = _timed(lambda: [step() for _ in range(args.train_steps)], device)
        rows.append(["train bf16", "frozen backbone" if frozen else "full fine-tune", str(args.train_batch),
                     f"{args.train_steps / seconds:.2f} steps/s", f"{args.train_batch * args.train_steps / seconds:.1f}"
                     " img/s", "-", "-", _memory(device)])
    return rows


def _rate(gflops: float) -> str:
    return f"{gflops / 1000:.0f} TFLOP/s" if gflops >= 1000 else f"{gflops:.0f} GFLOP/s"


def _memory(device: torch.device) -> str:
    if device.type != "cuda":
        return "-"
    return f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu, to check the script itself")
    parser.add_argument("--quick", action="store_true", help="test-sized: spai_tiny, few images, one batch size")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("PyTorch sees no GPU here; --device cpu checks the script on CPU")
    quick = args.quick
    args.model = "spai_tiny" if quick else "spai_vit_b16"
    args.size, args.images = (512, 4) if quick else (1024, 32)
    args.feature_batches = [16] if quick else [16, 64, 256, 512]
    args.train_batch, args.train_steps = (2, 2) if quick else (16, 10)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; torch {torch.__version__}; model {args.model}; {args.images} photos of {args.size} px", flush=True)
    started = time.perf_counter()
    rows = scoring_rows(args, device) + agreement_rows(args, device) + training_rows(args, device)
    header = ["what", "precision / mode", "batch", "rate", "rate", "GPU busy", "MFU", "peak memory"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
