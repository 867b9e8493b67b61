"""Ingest benchmark: decoded images/s and peak object-store use of the Ray Data pipeline vs a plain Pillow loop.

Makes square JPEGs (512 and 2048 px by default) from the committed demo photos in a temporary folder, then decodes
them (1) in a plain single-process Pillow loop and (2) through ``read_manifest_dataset -> decode_images`` with Ray
started on 1 and 2 CPUs, consuming every image on the driver. The goal: the pipeline within 10% of the plain loop
per core, and object-store use bounded by the pipeline's in-flight blocks, not by the corpus size.

    python benchmarks/bench_ingest.py --images 96
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ray
from PIL import Image
from ray.data._internal.execution.execution_callback import ExecutionCallback

from pipelines.data import DEFAULT_BATCH_SIZE, decode_images, read_manifest_dataset
from pipelines.manifest import rows_to_table, write_manifest
from spai_core.images import to_rgb_array

PHOTOS = Path(__file__).resolve().parents[1] / "pipelines" / "assets" / "photos"
MB = 1 << 20


@dataclasses.dataclass
class Result:
    images_per_s: float  # steady state: images after the first batch / time after the first batch
    images_per_cpu_s: float  # images per CPU-second spent decoding (Ray: all worker tasks), immune to other load
    startup_s: float = 0.0  # time to the first batch (planning, task launch): paid once per job, not per image
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


def plain_loop(paths: list[Path]) -> Result:
    """One process, one core: open, decode, convert to the RGB array, exactly what the pipeline does per image."""
    start, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        with Image.open(path) as img:
            to_rgb_array(img)
    return Result(len(paths) / (time.perf_counter() - start), len(paths) / (time.process_time() - cpu))


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
    seen, first = 0, None
    ds = decode_images(read_manifest_dataset(manifest))
    for batch in ds.iter_batches(batch_size=DEFAULT_BATCH_SIZE, batch_format="numpy"):
        if any(batch["error"]):
            raise RuntimeError(f"decode failed: {[e for e in batch['error'] if e]}")
        seen += sum(int(image[0, 0, 0] >= 0) for image in batch["image"])
        first = first or (time.perf_counter(), seen)
    elapsed = time.perf_counter() - first[0]
    context.custom_execution_callback_classes = []
    if seen != expected:
        raise RuntimeError(f"decoded {seen} images, expected {expected}")
    cpu = ds._get_stats_summary().get_total_cpu_time()  # summed over every task of every operator
    return Result((seen - first[1]) / elapsed, seen / cpu, first[0] - start, peak() / MB)


def write_corpus_manifest(paths: list[Path], size: int, folder: Path) -> str:
    # width and height as a validated manifest has them (`spai validate`): the pipeline sizes its blocks by pixels.
    rows = [{"uri": str(p), "label": 0, "split": "test", "generator": "real", "source": "bench", "group": p.stem,
             "width": size, "height": size} for p in paths]
    return write_manifest(rows_to_table(rows), str(folder / "manifest"), {"builder": "bench_ingest"})


def run(images: int, sizes: list[int], cpus: list[int], workdir: Path) -> dict:
    corpora = {s: make_corpus(workdir / str(s), s, images) for s in sizes}
    manifests = {s: write_corpus_manifest(paths, s, workdir / str(s)) for s, paths in corpora.items()}
    results = {("plain", 1, s): plain_loop(paths) for s, paths in corpora.items()}
    for n in cpus:
        ray.init(num_cpus=n, include_dashboard=False, logging_level=logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            pipeline(manifests[sizes[0]], images)  # warm-up: start (and import into) every worker before timing
            for s in sizes:
                results[("ray", n, s)] = pipeline(manifests[s], images)
        finally:
            ray.shutdown()
    return results


def format_table(results: dict, images: int, sizes: list[int], cpus: list[int]) -> str:
    header = f"{'size':>5} {'images':>6} {'decoded MB':>10} {'plain img/s':>11} {'img/CPU-s':>9}"
    for n in cpus:
        header += (f" | {f'ray {n} CPU img/s':>15} {'/core':>6} {'img/CPU-s':>9} {'eff':>5} {'startup s':>9}"
                   f" {'peak MB':>7}")
    lines = [header, "-" * len(header)]
    for s in sizes:
        plain = results[("plain", 1, s)]
        line = f"{s:>5} {images:>6} {images * s * s * 3 / MB:>10.0f} {plain.images_per_s:>11.1f}"
        line += f" {plain.images_per_cpu_s:>9.1f}"
        for n in cpus:
            r = results[("ray", n, s)]
            line += (f" | {r.images_per_s:>15.1f} {r.images_per_s / n / plain.images_per_s:>6.0%}"
                     f" {r.images_per_cpu_s:>9.1f} {r.images_per_cpu_s / plain.images_per_cpu_s:>5.0%}"
                     f" {r.startup_s:>9.2f} {r.peak_object_store_mb:>7.0f}")
        lines.append(line)
    notes = ("img/s: steady state after the first batch (wall clock; the plain loop uses one core); /core: (ray img/s "
             "/ CPUs) / plain img/s; img/CPU-s and eff: images per CPU-second of decoding work (Ray: all its tasks) "
             "and its ratio to the plain loop, which other load on the machine does not distort; startup s: time to "
             "the first batch, once per job; peak MB: Ray Data's peak object-store use, vs the decoded MB of the "
             "corpus.")
    return "\n".join(lines + ["", notes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96, help="images per size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2], help="Ray CPU counts to compare")
    parser.add_argument("--workdir", default=None, help="keep the generated JPEGs here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        results = run(args.images, args.sizes, args.cpus, workdir)
    print(format_table(results, args.images, args.sizes, args.cpus))


if __name__ == "__main__":
    main()
