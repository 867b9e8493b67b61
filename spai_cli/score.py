"""`spai score`: its flags, and the call into the library."""
from __future__ import annotations

import argparse

from spai_cli.common import add_mlflow_options

def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("score", help="score images (folder, CSV, manifest or s3:// prefix) with Ray Data",
                       description="Batch scoring: read -> decode on CPU workers -> score on an actor pool -> "
                       "write, streaming and resumable (re-run the same command to continue). Rows that fail keep "
                       "their reason in the output; the exit status is 1 when none could be scored.")
    p.add_argument("--weights", "-w", required=True, help="official spai.pth or our checkpoint (.safetensors)")
    p.add_argument("--input", "-i", required=True, help="image, folder, official CSV, manifest or s3:// prefix")
    p.add_argument("--recursive", "-r", action="store_true", help="score a folder's subfolders too (default: its "
                   "top level, like the official tool)")
    p.add_argument("--output", "-o", required=True, help="PATH.parquet, PATH.csv or s3:// URI")
    p.add_argument("--overwrite", action="store_true", help="score again and replace an existing --output (it stays "
                   "until the new one is complete; an interrupted run is still continued, not restarted)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model runs (auto: GPUs when the Ray cluster has them)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="fp32 reproduces the official scores; bf16 is faster on GPUs and bf16-capable CPUs "
                   "(auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call (default: 8)")
    p.add_argument("--workers", type=int, default=None, help="scoring actors (default: GPUs, else 1)")
    p.add_argument("--gpus", type=float, default=None, help="GPUs per scoring actor (default: 1 with --device cuda "
                   "or auto on a GPU cluster)")
    p.add_argument("--cpus-per-worker", type=int, default=None,
                   help="torch threads of each CPU scoring actor (default: the node's CPUs split between the actors)")
    p.add_argument("--resize-to", type=int, default=None, help="resize so the SHORTER side is N (official behaviour)")
    p.add_argument("--max-tiles", type=int, default=None, help="cap on 224-px tiles per image (huge images)")
    p.add_argument("--feature-batch", type=int, default=None, help="tiles encoded at once (bounds memory)")
    p.add_argument("--max-pixels", type=int, default=None, help="larger images are rows with a decompression_bomb "
                   "error (default: 134217728, 16384 x 8192)")
    p.add_argument("--jpeg-quality", type=int, default=None, help="degradation: re-encode as JPEG at this quality")
    p.add_argument("--blur-sigma", type=float, default=None, help="degradation: Gaussian blur sigma")
    p.add_argument("--noise-sigma", type=float, default=None, help="degradation: Gaussian noise sigma (0-255)")
    p.add_argument("--scale", type=float, default=None, help="degradation: resize by this factor")
    p.add_argument("--root", default=None, help="root dir for relative paths of a CSV input")
    p.add_argument("--split", default=None, help="score only rows of this split")
    p.add_argument("--tag", default="spai", help="score column name in the official CSV layout")
    p.add_argument("--official-csv", action="store_true",
                   help="write the official CSV layout (input columns + --tag column) instead of ours")
    p.add_argument("--part-rows", type=int, default=1000,
                   help="finished rows per part file of the resumable work dir <output>.parts/ (a kill redoes at "
                   "most this many rows, or one minute of work; default: 1000)")
    add_mlflow_options(p, "spai-score", "the job's options, counts and speed")
    return p


def run(args: argparse.Namespace) -> int:
    from pipelines.score.job import main

    return int(main(args) or 0)
