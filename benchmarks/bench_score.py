"""Benchmark ``spai score`` against a plain loop that scores one image at a time (batch 1, fp32: the official tool).

Corpus: ``--images`` squares cut from the committed photos, 224 to 2048 px, alternately JPEG and PNG. Both sides use
the same weights (``--model``: a seeded random ``spai_tiny`` by default for speed, ``spai_vit_b16`` for real figures)
on the same machine, one run each, every run a fresh process as a user would start it (Ray start-up and model load
included). Rows: the loops (``--loops``), ``spai score`` with each ``--workers`` count and ``--precisions`` value on
CPU, and on a CUDA machine the loops and ``spai score`` on the GPU in each precision (with the GPU's mean utilisation
from ``nvidia-smi``). The goals are set against the official tool's way ("official": one image per call, every tile
encoded, the five identical crops of a 224 image too); the "detector" loop calls our Detector one image at a time,
which shows what the Ray pipeline adds or costs over our own in-process loop.

Columns: ``wall`` is the whole process; ``work`` leaves out start-up (imports, Ray, listing) but keeps the model load;
memory is the peak PSS of the process tree (sampled from ``/proc``, Linux), so Ray's raylet, workers and shared object
store pages count once instead of once per process as summed RSS would. ``max |dlogit|`` compares each run's logits
with the first loop's. ``steady`` is the rate after the first results, which a long job runs at; ``scaling eff.`` is a
run's steady rate over ``workers`` x that of its one-worker twin; give
``--cpus-per-worker`` so that the twins' workers are the same size (else one worker already has every CPU). With it, the
Detector loop also runs in 1 and N concurrent processes of that many threads: their scaling is the machine's own
(shared caches, memory bandwidth and clocks), the ceiling for the workers' scaling.

    python benchmarks/bench_score.py --images 28                        # CPU, spai_tiny, a few minutes on 2 cores
    python benchmarks/bench_score.py --model spai_vit_b16 --images 7    # the real model, one image per size: ~12 min
    python benchmarks/bench_score.py --model spai_vit_b16 --images 28 --sizes 512 --batch-size 1 --precisions fp32 \
        --cpus-per-worker 1                                             # scaling from 1 to 2 one-CPU workers
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

import pipelines
from bench_core import naive_logits
from spai_core.checkpoint import save_checkpoint
from spai_core.detector import Detector
from spai_core.images import to_rgb_array
from spai_core.spai import build_model

SIZES = (224, 512, 1024, 2048, 384, 768, 1536)
PHOTOS = Path(pipelines.__file__).resolve().parent / "assets" / "photos"
SAMPLE_SECONDS = 0.25  # shortest interval between memory samples
# Reading PSS walks every process's page tables: ~50 ms of CPU for a local Ray tree of 13 processes scoring with
# ViT-B. Sampled every 0.25 s that took ~20% of a core from the run it measured (and far less from a one-process
# loop), so the sampler waits this many times its last sample's duration: ~2% of a core.
SAMPLER_IDLE_FACTOR = 50
# Baselines, by --loops name: "official" is what the goals are set against (the official tool's way).
LOOPS = {"official": "loop, official way (batch 1)", "detector": "loop, our Detector (batch 1)"}


@dataclasses.dataclass
class Measurement:
    """One benchmark row."""

    name: str
    device: str
    workers: int
    precision: str
    images: int
    wall_s: float
    work_s: float
    peak_pss: int  # bytes
    max_dlogit: float = float("nan")
    gpu_util: float | None = None
    cpus_per_worker: int | None = None  # None: the node's CPUs split between the workers
    steady: float = float("nan")  # images/s after the first results: the rate a long job runs at, start-up apart


def scaling_efficiency(row: Measurement, rows: list[Measurement]) -> float | None:
    """Steady throughput of ``row`` over ``workers`` x that of the same run with one worker, if there is one."""
    single = [r for r in rows if r.name == row.name and r.workers == 1 and (r.device, r.precision, r.cpus_per_worker)
              == (row.device, row.precision, row.cpus_per_worker)]
    if row.workers == 1 or not single:
        return None
    return row.steady / (row.workers * single[0].steady)


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def make_corpus(folder: Path, count: int, sizes: Sequence[int] = SIZES) -> list[Path]:
    """``count`` squares of the photos at sizes cycling through ``sizes``, alternately JPEG and PNG."""
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.open(photos[i % len(photos)]).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        size = sizes[i % len(sizes)]
        square = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
        path = folder / f"img{i:04d}_{size}.{'jpg' if i % 2 == 0 else 'png'}"
        square.save(path, quality=90)
        paths.append(path)
    return paths


def make_weights(path: Path, model: str) -> Path:
    torch.manual_seed(0)
    save_checkpoint(path, build_model(model))
    return path


# ---------------------------------------------------------------------------------------------------------------
# The baseline: what the official tool does


def loop_shard(weights: str, paths: list[Path], device: str, method: str, threads: int | None) -> dict:
    """Open each image and score it alone in fp32: ``{"seconds", "first" (seconds to the first logit), "logits"}``.
    ``method`` "official" encodes every tile of an image in one call, as the official tool does (the five identical
    crops of a 224 image too); "detector" calls our Detector with one image."""
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    # the official tool runs the plain model: no oneDNN patch for its loop
    detector = Detector.from_pretrained(weights, device, "fp32", fuse_cpu=method != "official")
    logits, first = {}, None
    for path in paths:
        image = to_rgb_array(Image.open(path))
        logit = (naive_logits(detector.model, [image], detector.device) if method == "official"
                 else detector.logits([image]))
        logits[path.name] = float(logit[0])
        first = first or time.perf_counter() - started
    return {"seconds": time.perf_counter() - started, "first": first, "logits": logits}


def loop(weights: str, corpus: str, device: str, result: str, method: str, threads: int | None = None,
         processes: int = 1) -> None:
    """Run :func:`loop_shard` over the corpus, in one process or split over ``processes`` concurrent ones (each with
    ``threads`` torch threads); write the logits and the steady rate (each process's rate after its first image,
    summed) to ``result``."""
    paths = sorted(Path(corpus).iterdir())
    if processes == 1:
        shards = [loop_shard(weights, paths, device, method, threads)]
    else:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            shards = pool.starmap(loop_shard, [(weights, paths[i::processes], device, method, threads)
                                               for i in range(processes)])
    steady = sum((len(s["logits"]) - 1) / (s["seconds"] - s["first"]) for s in shards if len(s["logits"]) > 1)
    Path(result).write_text(json.dumps({"seconds": max(s["seconds"] for s in shards), "steady": steady or None,
                                        "logits": {k: v for s in shards for k, v in s["logits"].items()}}))


# ---------------------------------------------------------------------------------------------------------------
# Measuring a process tree


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:  # the process ended while we looked
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(parent, []).append(int(entry))
    return tree


def tree_memory(roots: list[int], field: str = "Pss") -> int:
    """Bytes of one ``smaps_rollup`` field (``Pss``: proportional set size; ``Pss_Shmem``: its shared-memory part)
    summed over ``roots`` and all their descendants, each page counted once however many processes map it."""
    tree, stack, total = _children(), list(roots), 0
    pattern = re.compile(rf"^{field}:\s+(\d+) kB", re.M)
    while stack:
        pid = stack.pop()
        stack += tree.get(pid, [])
        try:
            match = pattern.search(Path(f"/proc/{pid}/smaps_rollup").read_text())
        except OSError:  # the process ended while we looked
            continue
        total += int(match.group(1)) * 1024 if match else 0
    return total


def tree_pss(root: int) -> int:
    """Bytes of proportional set size of ``root`` and all its descendants."""
    return tree_memory([root])


def gpu_utilisation() -> float | None:
    """Current utilisation (%) of the first GPU, or None without ``nvidia-smi``."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True)
    return float(out.stdout.split()[0]) if out.returncode == 0 and out.stdout.strip() else None


def run_measured(command: list[str], log: Path) -> tuple[float, int, float | None]:
    """(wall seconds, peak tree PSS, mean GPU utilisation) of a command; its output goes to ``log``."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local Ray, like a user's laptop
    peak, utils = 0, []
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            interval = SAMPLE_SECONDS
            while not stop.wait(interval):
                sampled = time.perf_counter()
                peak = max(peak, tree_pss(process.pid))
                util = gpu_utilisation()
                if util is not None:
                    utils.append(util)
                interval = max(SAMPLE_SECONDS, SAMPLER_IDLE_FACTOR * (time.perf_counter() - sampled))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        stop.set()
        sampler.join()
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed with code {code}; see {log}")
    return time.perf_counter() - started, peak, (float(np.mean(utils)) if utils else None)


# ---------------------------------------------------------------------------------------------------------------
# Runs


def max_dlogit(logits: dict[str, float], reference: dict[str, float] | None) -> float:
    """Largest logit difference from the reference run (0 for the reference itself)."""
    return max(abs(logits[k] - v) for k, v in reference.items()) if reference else 0.0


def bench_loop(weights: Path, corpus: Path, device: str, method: str, work: Path, reference: dict[str, float] | None,
               threads: int | None = None, processes: int = 1) -> tuple[Measurement, dict[str, float]]:
    name = f"loop-{method}-{device}" + (f"-{processes}x{threads}" if threads else "")
    command = [sys.executable, __file__, "--loop", str(weights), str(corpus), device, str(work / f"{name}.json"),
               method, "--loop-processes", str(processes)] + (["--loop-threads", str(threads)] if threads else [])
    wall, peak, util = run_measured(command, work / f"{name}.log")
    data = json.loads((work / f"{name}.json").read_text())
    logits = data["logits"]
    return Measurement(LOOPS[method], device, processes, "fp32", len(logits), wall, data["seconds"], peak,
                       max_dlogit(logits, reference), util, threads, data["steady"] or float("nan")), logits


def bench_score(weights: Path, corpus: Path, device: str, workers: int, precision: str, batch_size: int,
                work: Path, reference: dict[str, float], cpus_per_worker: int | None = None) -> Measurement:
    name = f"score-{device}-{workers}w-{precision}" + (f"-{cpus_per_worker}cpu" if cpus_per_worker else "")
    output = work / f"{name}.parquet"
    command = [sys.executable, "-m", "spai_cli.main", "score", "-w", str(weights), "-i", str(corpus), "-o",
               str(output), "--device", device, "--precision", precision, "--workers", str(workers),
               "--batch-size", str(batch_size)]
    command += ["--cpus-per-worker", str(cpus_per_worker)] if cpus_per_worker else []
    wall, peak, util = run_measured(command, work / f"{name}.log")
    log = (work / f"{name}.log").read_text()
    seconds = float(re.search(r"scored \d+ images in ([\d.]+) s", log).group(1))
    since = re.search(r"([\d.]+) img/s since", log)
    steady = float(since.group(1)) if since else float("nan")
    table = pq.read_table(output)
    logits = dict(zip(table.column("image").to_pylist(), table.column("logit").to_pylist()))
    return Measurement("spai score", device, workers, precision, table.num_rows, wall, seconds, peak,
                       max_dlogit(logits, reference), util, cpus_per_worker, steady)


def format_table(rows: list[Measurement]) -> str:
    base: dict[str, Measurement] = {}
    for r in rows:
        if r.name.startswith("loop"):
            base.setdefault(r.device, r)  # the first loop of --loops
    header = ("run", "device", "workers", "CPUs/worker", "precision", "images", "wall s", "img/s wall", "img/s work",
              "img/s steady", "vs loop", "scaling eff.", "peak PSS GiB", "max |dlogit|", "GPU util %")
    base_names = ", ".join(sorted({b.name for b in base.values()}))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        speedup = base[r.device].wall_s / r.wall_s if r.device in base else float("nan")
        efficiency = scaling_efficiency(r, rows)
        cells = (r.name, r.device, r.workers, r.cpus_per_worker or "auto", r.precision, r.images, f"{r.wall_s:.1f}",
                 f"{r.images / r.wall_s:.2f}", f"{r.images / r.work_s:.2f}", f"{r.steady:.2f}", f"{speedup:.2f}x",
                 "-" if efficiency is None else f"{efficiency:.2f}", f"{r.peak_pss / 2 ** 30:.2f}",
                 f"{r.max_dlogit:.1e}", "-" if r.gpu_util is None else f"{r.gpu_util:.0f}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    notes = (f"vs loop: that loop's wall time / the run's, against the first loop of the device ({base_names}); "
             "img/s work leaves out start-up but keeps the model load; steady: the rate after the first results; "
             "max |dlogit|: against that first loop's logits; a loop's workers are its concurrent processes.")
    return "\n".join(lines + ["", notes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="spai_tiny", help="model config of the seeded random weights")
    parser.add_argument("--images", type=int, default=28, help="corpus size (sizes cycle through 224..2048)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES),
                        help="square image sizes the corpus cycles through (one size balances workers best)")
    parser.add_argument("--batch-size", type=int, default=8, help="spai score --batch-size")
    parser.add_argument("--workers", default="1,2", help="CPU worker counts to run spai score with")
    parser.add_argument("--cpus-per-worker", type=int, default=None,
                        help="spai score --cpus-per-worker for the CPU runs: fix each worker's threads so the runs "
                        "with 1 and 2 workers measure scaling (default: the CPUs split between the workers)")
    parser.add_argument("--precisions", default="fp32,bf16",
                        help="spai score --precision values to run (bf16 pays off on CPUs with AVX512-BF16 or AMX)")
    parser.add_argument("--work-dir", default=None, help="keep corpus, logs and outputs here (default: a temp dir)")
    parser.add_argument("--loops", default="official,detector",
                        help="plain-loop baselines, the first being what 'vs loop' compares with: official (every "
                        "tile of one image per call, as the official tool does) and detector (our Detector, one "
                        "image per call: what Ray adds over our own in-process loop)")
    parser.add_argument("--loop", nargs=5, metavar=("WEIGHTS", "CORPUS", "DEVICE", "RESULT", "METHOD"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--loop-threads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--loop-processes", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop:
        loop(*args.loop, args.loop_threads, args.loop_processes)
        return
    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus = work / "corpus"
        shutil.rmtree(corpus, ignore_errors=True)
        make_corpus(corpus, args.images, args.sizes)
        weights = make_weights(work / f"{args.model}.safetensors", args.model)
        rows = []
        for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
            reference = None
            for method in args.loops.split(","):
                row, logits = bench_loop(weights, corpus, device, method, work, reference)
                rows.append(row)
                reference = reference or logits
            worker_counts = sorted(map(int, args.workers.split(",")))
            if device == "cpu" and args.cpus_per_worker and worker_counts[-1] > 1:
                # The machine's own scaling: our Detector loop in 1 and N concurrent processes of the workers' size.
                for processes in sorted({1, *worker_counts}):
                    rows.append(bench_loop(weights, corpus, device, "detector", work, reference, args.cpus_per_worker,
                                           processes)[0])
            precisions = args.precisions.split(",")
            runs = [(w, p) for p in precisions for w in worker_counts] if device == "cpu" else [
                (1, p) for p in precisions]
            for workers, precision in runs:
                rows.append(bench_score(weights, corpus, device, workers, precision, args.batch_size, work,
                                        reference, args.cpus_per_worker if device == "cpu" else None))
        print(f"\nmodel {args.model}, {args.images} images of {tuple(args.sizes)} px (JPEG/PNG), "
              f"batch {args.batch_size}, {os.cpu_count()} CPUs"
              + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
        print(format_table(rows))


if __name__ == "__main__":
    main()
