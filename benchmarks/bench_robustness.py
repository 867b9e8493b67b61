"""Robustness benchmark: one ``spai score --perturb`` sweep against one job per setting, then a model's AUC under
perturbations and the format-bias check.

Part 1, the sweep against separate jobs: the six GenImage Table 5 settings (shorter side 112 and 64 px, JPEG q65 and
q30, blur sigma 3 and 5) on the same ``--images`` photos, as one job and as six separate ``spai score`` processes
(each a fresh process as a user would start it: Ray start-up, model load, listing and decoding every time). Columns:
wall time of all its processes, images decoded (from the jobs' own summaries), rows scored, and the largest logit
difference between the two ways (0: the same variants, seeded the same, scored the same).

Part 2, with ``--manifest`` (a labelled manifest with a test split, e.g. ``<demo>/corpus/manifest``) and ``--weights``
(e.g. the ``best.safetensors`` that ``spai demo`` trains): one sweep job over the Table 5 settings, JPEG q96 and every
derivative kind; AUC per variant and its change from the original. The JPEG q96 row is the format-bias check: reals
and fakes are re-encoded alike, so a detector that learned file format (PNG fakes vs JPEG reals) rather than
generation loses its AUC there.

    python benchmarks/bench_robustness.py --images 12                  # part 1, a seeded random spai_tiny, minutes
    python benchmarks/bench_robustness.py --weights demo_out/runs/<run>/best.safetensors \\
        --manifest demo_out/corpus/manifest                             # parts 1 and 2 with the demo model
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

import pipelines
from spai_core.checkpoint import save_checkpoint
from spai_core.metrics import binary_metrics
from spai_core.spai import build_model

PHOTOS = Path(pipelines.__file__).resolve().parent / "assets" / "photos"
TABLE5 = ["short_side=112", "short_side=64", "jpeg=65", "jpeg=30", "blur=3", "blur=5"]  # GenImage's six settings
FORMAT_BIAS = "jpeg=96"
DERIVATIVES = ["recompress=2", "webp=80", "meme", "screenshot", "collage", "sticker", "filter=all"]
SCORED = re.compile(r"scored (\d+) (?:variants of (\d+) )?images")


def make_corpus(folder: Path, count: int, size: int) -> Path:
    """``count`` committed photos, the longer side cut to ``size`` px, as JPEG q95."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted(PHOTOS.glob("*.jpg"))
    for i in range(count):
        with Image.open(photos[i % len(photos)]) as img:
            img = img.convert("RGB")
            img.thumbnail((size, size))
            img.save(folder / f"img{i:03d}.jpg", quality=95)
    return folder


def score(weights: Path, source: str, output: Path, perturb: list[str], extra: list[str]) -> tuple[float, int, int]:
    """One ``spai score`` process: (wall seconds, images decoded, rows scored)."""
    argv = [sys.executable, "-m", "spai_cli.main", "score", "-w", str(weights), "-i", source, "-o", str(output),
            "--no-mlflow", "--device", "cpu", "--overwrite", *extra, "--perturb", *perturb]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode:
        raise SystemExit(f"spai score failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    found = SCORED.search(done.stdout)
    if found is None:
        raise SystemExit(f"no summary in the output of spai score:\n{done.stdout[-2000:]}")
    rows, images = int(found.group(1)), int(found.group(2) or found.group(1))
    return wall, images, rows


def logits_by_pair(table: pa.Table) -> dict[tuple[str, str], float]:
    return dict(zip(zip(table.column("uri").to_pylist(), table.column("variant").to_pylist()),
                    table.column("logit").to_pylist()))


def sweep_vs_separate(weights: Path, images: Path, work: Path, extra: list[str]) -> str:
    """Part 1's table."""
    sweep_out = work / "sweep.parquet"
    sweep = score(weights, str(images), sweep_out, [*TABLE5, "--no-original"], extra)
    separate, logits = [0.0, 0, 0], {}
    for setting in TABLE5:
        out = work / f"separate-{setting.replace('=', '_')}.parquet"
        wall, decoded, rows = score(weights, str(images), out, [setting, "--no-original"], extra)
        separate = [separate[0] + wall, separate[1] + decoded, separate[2] + rows]
        logits |= logits_by_pair(pq.read_table(out))
    swept = logits_by_pair(pq.read_table(sweep_out))
    diff = max(abs(swept[k] - v) for k, v in logits.items())
    lines = ["| run | jobs | wall s | decodes | rows | max abs dlogit |", "|---|---:|---:|---:|---:|---:|",
             f"| one sweep job (--perturb {' '.join(TABLE5)}) | 1 | {sweep[0]:.1f} | {sweep[1]} | {sweep[2]} | 0 |",
             f"| six separate jobs | 6 | {separate[0]:.1f} | {separate[1]} | {separate[2]} | {diff:.2g} |",
             f"\nspeed-up of the sweep: {separate[0] / sweep[0]:.2f}x; decodes: {separate[1] / sweep[1]:.0f}x fewer"]
    return "\n".join(lines)


def auc_table(table: pa.Table) -> str:
    """AUC, AP and failed rows per variant, and the AUC's change from the original."""
    rows, base = [], None
    for variant in dict.fromkeys(table.column("variant").to_pylist()):
        part = table.filter(pc.equal(table.column("variant"), variant))
        good = part.filter(pc.is_null(part.column("error")))
        metrics = binary_metrics(good.column("label").to_numpy(), good.column("score").to_numpy())
        base = metrics["auc"] if base is None else base
        rows.append(f"| {variant} | {metrics['auc']:.3f} | {metrics['auc'] - base:+.3f} | {metrics['ap']:.3f} | "
                    f"{part.num_rows - good.num_rows} |")
    return "\n".join(["| variant | AUC | dAUC | AP | failed |", "|---|---:|---:|---:|---:|", *rows])


def robustness(weights: Path, manifest: str, work: Path, extra: list[str]) -> str:
    """Part 2's table: one job over the test split, every variant."""
    out = work / "robustness.parquet"
    wall, decoded, rows = score(weights, manifest, out, [FORMAT_BIAS, *TABLE5, *DERIVATIVES], ["--split", "test",
                                                                                                *extra])
    return (f"{rows} rows ({decoded} images) scored in one job, {wall:.0f} s; {FORMAT_BIAS} is the format-bias "
            f"check\n\n" + auc_table(pq.read_table(out)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="model to score with (default: a seeded random spai_tiny, "
                        "part 1 only)")
    parser.add_argument("--manifest", help="labelled manifest with a test split, for part 2 (needs --weights)")
    parser.add_argument("--images", type=int, default=12, help="photos of part 1 (default: 12)")
    parser.add_argument("--size", type=int, default=512, help="their longer side in px (default: 512)")
    parser.add_argument("--workers", type=int, default=1, help="scoring actors of each job (default: 1)")
    parser.add_argument("--skip-separate", action="store_true", help="part 2 only")
    parser.add_argument("--work", type=Path, help="folder for corpus and outputs (default: a temporary one)")
    args = parser.parse_args()
    if args.manifest and not args.weights:
        parser.error("--manifest needs --weights: AUCs of a random model say nothing")
    extra = ["--workers", str(args.workers)]
    with tempfile.TemporaryDirectory(prefix="bench-robustness-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        weights = args.weights
        if weights is None:
            torch.manual_seed(0)
            weights = work / "spai_tiny.safetensors"
            save_checkpoint(weights, build_model("spai_tiny"))
        if not args.skip_separate:
            images = make_corpus(work / "images", args.images, args.size)
            print(f"## Sweep against separate jobs: {args.images} photos, <= {args.size} px, {weights.name}\n")
            print(sweep_vs_separate(weights, images, work, extra), flush=True)
        if args.manifest:
            print(f"\n## AUC per variant: {weights}, test split of {args.manifest}\n")
            print(robustness(weights, args.manifest, work, extra))


if __name__ == "__main__":
    main()
