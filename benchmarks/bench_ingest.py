"""Ingest benchmark: decoded images/s and peak object-store use of the Ray Data pipeline vs a plain Pillow loop.

Makes square JPEGs (512 and 2048 px by default, the same decoded volume per size) from the committed demo photos in a
temporary folder, then decodes them (1) in a plain Pillow loop, in one process and split over N processes, and
(2) through ``read_manifest_dataset -> decode_images`` with Ray started on N CPUs, consuming every image on the
driver. The goal: the pipeline within 10% of the plain loop per core, and object-store use bounded by the pipeline's
in-flight blocks, not by the corpus size.

Each Ray Data execution starts at one task at a time: Ray Data 2.60 learns the cluster's resources from its
autoscaling coordinator asynchronously and refreshes them once a second, so for about the first second its resource
limits are zero and only its liveness rule launches tasks. The table therefore shows the whole-job rate and the
steady rate (images that arrive in the second half of the job over that half), which is what a long job runs at.

    python benchmarks/bench_ingest.py                       # 12288 JPEGs of 512 px, 768 of 2048 px, 3 rounds: ~14 min
    python benchmarks/bench_ingest.py --corpus-mb 2304 --rounds 1  # a quick look; too few blocks for a steady rate
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray
from PIL import Image
from ray.data._internal.execution.execution_callback import ExecutionCallback

from pipelines.data.dataset import decode_images, read_manifest_dataset
from pipelines.data.manifest import rows_to_table, write_manifest

PHOTOS = Path(__file__).resolve().parents[1] / "pipelines" / "assets" / "photos"
MB = 1 << 20
# The driver takes blocks as they come: re-batching full-resolution images (32 rows of 2048 px from 6-row blocks)
# copies 400 MB per batch on the driver, a consumer's cost that no real consumer pays (training crops first).
CONSUMER_PREFETCH = 2  # as pipelines.train.job.iter_decoded


@dataclasses.dataclass
class Result:
    images_per_s: float  # all images / wall time from the job's start (Ray: planning and ramp-up included)
    images_per_cpu_s: float  # images per CPU-second spent decoding (Ray: all worker tasks), immune to other load
    startup_s: float = 0.0  # time to the first batch (planning, task launch): paid once per job, not per image
    steady_images_per_s: float = 0.0  # images arriving in the second half of the job / that half (plain: = overall)
    peak_object_store_mb: float = 0.0


def make_corpus(folder: Path, size: int, count: int) -> list[Path]:
    """``count`` JPEGs of ``size x size`` (quality 90): centre crops of the demo photos, cycled."""
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not photos:
        raise SystemExit(f"no photos in {PHOTOS}; the demo photos ship with the repository")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img{i:05d}.jpg"
        if not path.exists():
            with Image.open(photos[i % len(photos)]) as img:
                img = img.convert("RGB")
                side = min(img.size)
                left, top = (img.width - side) // 2, (img.height - side) // 2
                crop = img.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
                crop.save(path, quality=90)
        paths.append(path)
    return paths


def _decode_all(paths: list[Path]) -> float:
    """Open, decode and convert each image to an RGB array the plain Pillow way; returns CPU seconds."""
    cpu = time.process_time()
    for path in paths:
        with Image.open(path) as img:
            np.asarray(img if img.mode == "RGB" else img.convert("RGB"))  # convert("RGB") of RGB would copy
    return time.process_time() - cpu


def plain_loop(paths: list[Path], processes: int = 1) -> Result:
    """The plain Pillow loop, in one process or split over ``processes`` (the per-core baseline for N CPUs)."""
    start = time.perf_counter()
    if processes == 1:
        cpu = _decode_all(paths)
    else:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            pool.map(_decode_all, [[]] * processes)  # warm-up: every process started and its imports done
            shards = [paths[i::processes] for i in range(processes)]
            start = time.perf_counter()
            cpu = sum(pool.map(_decode_all, shards))
    rate = len(paths) / (time.perf_counter() - start)
    return Result(rate, len(paths) / cpu, steady_images_per_s=rate)


def peak_tracker() -> tuple[type[ExecutionCallback], Callable[[], int]]:
    """An execution callback class recording Ray Data's peak object-store usage, and a getter for the peak.

    Ray Data's own accounting (what its backpressure bounds) is read from the executor, because the public memory
    APIs (`ray memory`, state API) need gRPC packages this environment does not have.
    """
    peak = [0]

    class PeakObjectStore(ExecutionCallback):
        def on_execution_step(self, executor) -> None:
            usage = executor._resource_manager.get_global_usage().object_store_memory
            peak[0] = max(peak[0], int(usage))

    return PeakObjectStore, lambda: peak[0]


def pipeline(manifest: str, expected: int) -> Result:
    """Decode every image of ``manifest`` through Ray Data and touch it on the driver."""
    tracker, peak = peak_tracker()
    context = ray.data.DataContext.get_current()
    context.custom_execution_callback_classes = [tracker]
    start = time.perf_counter()
    seen, arrivals = 0, []
    ds = decode_images(read_manifest_dataset(manifest))
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=CONSUMER_PREFETCH):
        if any(batch["error"]):
            raise RuntimeError(f"decode failed: {[e for e in batch['error'] if e]}")
        seen += sum(int(image[0, 0, 0] >= 0) for image in batch["image"])
        arrivals.append((time.perf_counter() - start, len(batch["image"])))
    elapsed = time.perf_counter() - start
    context.custom_execution_callback_classes = []
    if seen != expected:
        raise RuntimeError(f"decoded {seen} images, expected {expected}")
    cpu = ds._get_stats_summary().get_total_cpu_time()  # summed over every task of every operator
    late = sum(n for t, n in arrivals if t > elapsed / 2)
    return Result(seen / elapsed, seen / cpu, startup_s=arrivals[0][0], peak_object_store_mb=peak() / MB,
                  steady_images_per_s=late / (elapsed / 2))


def write_corpus_manifest(paths: list[Path], size: int, folder: Path) -> str:
    # width and height as a validated manifest has them (`spai validate`): the pipeline sizes its blocks by pixels.
    rows = [{"uri": str(p), "label": 0, "split": "test", "generator": "real", "source": "bench", "group": p.stem,
             "width": size, "height": size} for p in paths]
    return write_manifest(rows_to_table(rows), str(folder / "manifest"), {"builder": "bench_ingest"})


def run(corpus_mb: int, sizes: list[int], cpus: list[int], rounds: int, workdir: Path) -> dict:
    """Results per (kind, CPUs, size), one per round. Each Ray job runs right after the plain loops it is compared with
    (this machine's speed drifts by tens of percent over minutes with its neighbours' load)."""
    counts = {s: max(1, corpus_mb * MB // (s * s * 3)) for s in sizes}
    corpora = {s: make_corpus(workdir / str(s), s, counts[s]) for s in sizes}
    manifests = {s: write_corpus_manifest(paths, s, workdir / str(s)) for s, paths in corpora.items()}
    results: dict = {"counts": counts}
    for n in cpus:
        ray.init(address="local", num_cpus=n, include_dashboard=False, logging_level=logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            pipeline(manifests[sizes[0]], counts[sizes[0]])  # warm-up: start (and import into) every worker first
            for _ in range(rounds):
                for s in sizes:
                    one = plain_loop(corpora[s])
                    results.setdefault(("plain 1", n, s), []).append(one)
                    results.setdefault(("plain", n, s), []).append(one if n == 1 else plain_loop(corpora[s], n))
                    results.setdefault(("ray", n, s), []).append(pipeline(manifests[s], counts[s]))
        finally:
            ray.shutdown()
    return results


def round_columns(one: Result, plain: Result, r: Result, n: int) -> dict[str, float]:
    """The table's figures for one round of one size on ``n`` CPUs."""
    return {"plain 1 img/s": one.images_per_s, "plain N img/s": plain.images_per_s, "ray img/s": r.images_per_s,
            "steady": r.steady_images_per_s, "/core": r.steady_images_per_s / n / one.images_per_s,
            "vs plain N": r.steady_images_per_s / plain.images_per_s, "img/CPU-s": r.images_per_cpu_s,
            "eff": r.images_per_cpu_s / one.images_per_cpu_s, "startup s": r.startup_s,
            "peak MB": r.peak_object_store_mb}


def format_table(results: dict, sizes: list[int], cpus: list[int]) -> str:
    percent = {"/core", "vs plain N", "eff"}
    names = list(round_columns(*[Result(1, 1)] * 3, 1))
    header = f"{'size':>5} {'CPUs':>4} {'images':>6} " + " ".join(f"{name:>{max(len(name), 6)}}" for name in names)
    header += f" {'/core per round':>16}"
    lines = [header, "-" * len(header)]
    for s in sizes:
        for n in cpus:
            per_round = [round_columns(one, plain, r, n) for one, plain, r in
                         zip(results[("plain 1", n, s)], results[("plain", n, s)], results[("ray", n, s)])]
            medians = {name: statistics.median(row[name] for row in per_round) for name in names}
            cells = [f"{medians[name]:>{max(len(name), 6)}{'.0%' if name in percent else '.1f'}}" for name in names]
            spread = " ".join(f"{row['/core']:.0%}" for row in per_round)
            lines.append(f"{s:>5} {n:>4} {results['counts'][s]:>6} " + " ".join(cells) + f" {spread:>16}")
    notes = ("Medians over rounds; in each round the plain loops run right before the Ray job they are compared with. "
             "img/s: all images / wall clock (Ray: from the job's start, ramp-up included); steady: Ray images in the "
             "second half of the job / its duration; plain N: the plain loop split over N processes; /core: (steady / "
             "N) / plain-1 img/s; vs plain N: steady / plain-N img/s, both on N cores; img/CPU-s and eff: images per "
             "CPU-second of decoding work (Ray: all its tasks) and its ratio to the one-process plain loop, which "
             "other load on the machine does not distort; startup s: time to the first batch, once per job; peak MB: "
             "Ray Data's peak object-store use (the corpus is the same decoded MB per size).")
    return "\n".join(lines + ["", notes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus-mb", type=int, default=9216,
                        help="decoded MB per size (9216: 12288 images of 512 px, 768 of 2048 px, 12 input blocks "
                        "each, so the second half of a job is a steady rate; 2304 gives 3 blocks)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2], help="Ray CPU counts to compare")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per figure; the table shows medians")
    parser.add_argument("--workdir", default=None, help="keep the generated JPEGs here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        results = run(args.corpus_mb, args.sizes, args.cpus, args.rounds, workdir)
    print(format_table(results, args.sizes, args.cpus))


if __name__ == "__main__":
    main()
