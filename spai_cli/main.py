"""The ``spai`` command: parses arguments and dispatches to ``pipelines``, ``tune`` and ``spai_core``.

Each subcommand's work lives in the library; this module only turns flags into calls, so the same
functions serve Python users and the CLI. Imports are lazy so ``spai --help`` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from typing import Sequence

from spai_core.errors import UserError

EPILOG = """Environment:
  RAY_ADDRESS          connect to a running Ray cluster instead of starting a local one
  MLFLOW_TRACKING_URI  where runs are tracked (default: a local store, ./mlruns)
  AWS_ENDPOINT_URL     S3-compatible endpoint for s3:// URIs (MinIO, Ceph, moto, ...); credentials come
                       from the usual AWS variables and profiles (AWS_PROFILE, ~/.aws/credentials)
"""


class Parser(argparse.ArgumentParser):
    """No option abbreviations: ``--prec`` working today would silently change meaning once ``--precompute`` exists."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def _add_manifest_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "manifest",
        help="build a Parquet manifest from GenImage folders, SPAI CSVs or real/fake folders",
        description="Build one Parquet manifest (uri, label, split, generator, source, group) from a dataset "
        "layout on disk or under an s3:// prefix, and write a JSON sidecar with counts. "
        "Run `spai validate` on it next to find corrupt or duplicated images.",
    )
    kinds = p.add_subparsers(dest="layout", required=True, metavar="LAYOUT")
    gen = kinds.add_parser("genimage", help="<root>/<generator>/{train,val}/{ai,nature} (all 8 generators)")
    gen.add_argument("root", help="GenImage root directory or s3:// prefix")
    gen.add_argument("--generators", nargs="*", default=None,
                     help="generator folders to include, by folder or short name (sdv5, glide...; default: all)")
    gen.add_argument("--val-fraction", type=float, default=0.0,
                     help="move this fraction of each generator's train groups to val (GenImage's val is used as test)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the --val-fraction split")
    csv = kinds.add_parser("csv", help="official SPAI CSV (image,class,split; extra columns kept)")
    csv.add_argument("csv", help="CSV file (local or s3://)")
    csv.add_argument("--root", default=None, help="root dir for relative image paths (default: the CSV's folder)")
    csv.add_argument("--generator", default=None, help="generator name for all rows (default: a `generator` column "
                     "if present, else 'real' for class 0 and 'unknown' for class 1)")
    fold = kinds.add_parser("folders", help="real and fake folders, searched recursively")
    fold.add_argument("--real", nargs="+", required=True, help="folder(s) or s3:// prefixes of real images")
    fold.add_argument("--fake", nargs="+", required=True,
                      help="folder(s) of generated images; NAME=PATH names the generator (default: folder name), "
                      "and folders given one name are one generator")
    fold.add_argument("--balance", action="store_true", help="subsample reals to the number of fakes")
    fold.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions, split by group (seeded)")
    fold.add_argument("--seed", type=int, default=0, help="seed of the split (and of --balance)")
    fold.add_argument("--group-by", choices=["stem", "folder"], default="stem",
                      help="what never straddles splits: the file stem minus generator tags (beach_sdxl.png -> beach), "
                      "or the parent folder")
    for k in (gen, csv, fold):
        k.add_argument("--output", "-o", required=True, help="manifest path (directory) or s3:// URI")
        k.add_argument("--source", default=None, help="dataset name for the `source` column")


def add_mlflow_options(p: argparse.ArgumentParser, experiment: str, what: str) -> None:
    """Where a command records its run: every run is tracked unless told not to."""
    p.add_argument("--experiment", default=experiment, help=f"MLflow experiment name (default: {experiment})")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--mlflow-uri", default=None,
                       help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    where.add_argument("--no-mlflow", action="store_true", help=f"do not record this run in MLflow (it records {what})")


def _version() -> str:
    try:
        return importlib.metadata.version("spai-ray")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="spai",
        description="SPAI AI-generated image detection on Ray: build manifests, train, tune, score, evaluate.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_manifest_parser(sub)

    p = sub.add_parser("validate", help="open every image of a manifest; record sizes and hashes, list rejects",
                       description="A Ray Data job that decodes every image of a manifest, records width, height, "
                       "format, bytes and a content hash, writes rejects (missing, zero-byte, truncated, not an "
                       "image, decompression bomb, unreadable) with their reason, and reports content duplicated "
                       "across splits (leakage).")
    p.add_argument("manifest", help="manifest path or s3:// URI")
    p.add_argument("--output", "-o", default=None,
                   help="where to write the validated manifest (default: <manifest>.validated)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="decompression-bomb limit in pixels (default: 134217728, 16384 x 8192)")

    p = sub.add_parser("train", help="train or fine-tune SPAI with Ray Train (DDP), tracked in MLflow",
                       description="Train SPAI on a manifest with Ray Train. The YAML config holds the recipe "
                       "(configs/spai.yaml is the official one, configs/tiny.yaml a CPU-sized one); key=value "
                       "overrides change any field, e.g. optim.lr=1e-4 model.mask_radius=24.")
    p.add_argument("--config", "-c", default=None, help="training config YAML (default: the official recipe)")
    p.add_argument("--manifest", "-m", required=True, help="manifest path or s3:// URI with train and val rows")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (DDP ranks; default: the config's "
                   "`workers`, 1 in the official recipe)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker (0 = CPU, gloo; default: the "
                   "config's `gpus_per_worker`)")
    p.add_argument("--output", "-o", default=None, help="run directory or s3:// URI (default: runs/)")
    p.add_argument("--name", default=None, help="run name (default: generated)")
    p.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns; "
                   "a --resume continues in the store the run started in)")
    p.add_argument("--experiment", default="spai-train", help="MLflow experiment name (default: spai-train)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run with this --name/--output")
    p.add_argument("--init", default=None, help="start from weights: official spai.pth or our checkpoint")
    p.add_argument("--backbone", default=None, help="MFM ViT-B/16 backbone weights (mfm_pretrain_vit_base.pth)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")

    p = sub.add_parser("tune", help="search hyperparameters with Ray Tune + ASHA; every trial is a real train run",
                       description="Hyperparameter search over the training config with Ray Tune and ASHA. "
                       "configs/search_space.yaml is the default space (lr, mask radius, weight decay and batch "
                       "size; epochs are ASHA's max_t).")
    p.add_argument("--config", "-c", default=None, help="base training config YAML")
    p.add_argument("--manifest", "-m", required=True, help="manifest path or s3:// URI with train and val rows")
    p.add_argument("--space", default=None, help="search space YAML (default: configs/search_space.yaml)")
    p.add_argument("--trials", type=int, default=8, help="number of trials to sample (default: 8)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials running at once (default: as many as the cluster's CPUs/GPUs hold)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial, split over its workers "
                   "(default: 0, CPU)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers (DDP ranks) per trial "
                   "(default: 1)")
    p.add_argument("--output", "-o", default=None, help="search directory or s3:// URI (default: runs/tune)")
    p.add_argument("--name", default=None, help="search name, its folder under --output (default: generated)")
    p.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    p.add_argument("--experiment", default="spai-tune", help="MLflow experiment name (default: spai-tune)")
    p.add_argument("--init", default=None, help="every trial starts from these weights: official spai.pth or our "
                   "checkpoint")
    p.add_argument("--backbone", default=None, help="MFM ViT-B/16 backbone weights (mfm_pretrain_vit_base.pth) of "
                   "every trial; the official recipe needs them")
    p.add_argument("--resume", action="store_true", help="resume an interrupted search without re-running trials")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the base training config")

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

    p = sub.add_parser("evaluate", help="metrics per generator (and per degradation) from a scored table",
                       description="AUC, AP, accuracy, TPR at 1%/5% FPR and ECE per generator, each fake "
                       "generator paired with all real rows; writes a table and ROC plots.")
    p.add_argument("scores", nargs="+", help="scored table(s) written by `spai score`")
    p.add_argument("--output", "-o", default=None,
                   help="report directory (table CSV/Markdown + ROC PNG; default: print the table only)")
    p.add_argument("--threshold", type=float, default=0.5, help="score threshold for accuracy (default: 0.5)")
    p.add_argument("--seen", nargs="*", default=None, help="generators seen in training (listed apart)")
    p.add_argument("--split", default=None, help="evaluate only the rows of this split, e.g. test (default: all rows; "
                   "the report notes when they pool several splits)")
    add_mlflow_options(p, "spai-evaluate", "the metrics and report files")
    p.add_argument("--run-id", default=None, help="MLflow run to attach the report to (e.g. the training run) instead "
                   "of a new one")

    p = sub.add_parser("convert", help="convert weights between the official .pth layout and our .safetensors",
                       description="official spai.pth -> ours.safetensors, or ours -> official layout (.pth) "
                       "loadable by the official code. Direction is taken from the file suffixes.")
    p.add_argument("src", help="weights to convert: official .pth or our .safetensors")
    p.add_argument("dst", help="file to write: .safetensors (ours) or .pth (official layout)")
    p.add_argument("--model", default=None, help="model config of an official file: spai_vit_b16 (default), or a "
                   "smaller registered one for test weights")

    p = sub.add_parser("demo", help="offline demo: build corpus -> train -> score -> evaluate on this machine",
                       description="Builds (or reuses) the offline demo corpus from committed photos and CPU "
                       "generators, trains the tiny config with Ray Train, scores the held-out set with Ray Data "
                       "and prints a per-generator table with a ROC report.")
    p.add_argument("--output", "-o", default="demo_out", help="working directory for corpus, runs and report "
                   "(default: demo_out)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: 2)")
    p.add_argument("--epochs", type=int, default=None, help="override the demo's epoch count")
    p.add_argument("--rebuild", action="store_true", help="rebuild the corpus even if it exists")

    p = sub.add_parser("demo-data", help="build only the offline demo corpus (photos + CPU generators)",
                       description="Real photos (committed, licensed) and fakes made from down-scaled copies of them "
                       "by GAN up-samplers (ncnn, CPU) and a small transposed-convolution autoencoder; every image "
                       "JPEG re-compressed alike; split by photo; some generators held out for test. A corpus "
                       "built with the same config is reused. Needs `pip install -e .[demo]`.")
    p.add_argument("--output", "-o", default="demo_out/corpus", help="corpus folder (images/ and manifest/)")
    p.add_argument("--seed", type=int, default=None, help="corpus seed (default: the config's, 0)")
    p.add_argument("--config", "-c", default=None, help="DemoCorpusConfig YAML (default: the built-in recipe)")
    p.add_argument("--rebuild", action="store_true", help="rebuild even if a corpus with this config exists")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. max_photos=12 autoencoder_iterations=3000")
    return parser


# command -> "module:function"; each function takes the parsed argparse.Namespace
COMMANDS = {
    "manifest": "pipelines.data.manifest:main",
    "validate": "pipelines.data.validate:main",
    "train": "pipelines.train.job:main",
    "tune": "tune.search:main",
    "score": "pipelines.score.job:main",
    "evaluate": "pipelines.evaluate.report:main",
    "convert": "spai_core.checkpoint:convert_main",
    "demo": "pipelines.demo.run:main",
    "demo-data": "pipelines.demo.corpus:main",
}


# what to tell a user who pressed Ctrl-C, for commands that can continue where they stopped
RESUME_HINTS = {
    "score": "re-run the same command to continue where it stopped",
    "train": "add --resume to the same command to continue from the last checkpoint",
    "tune": "add --resume and the search's --name to the same command to continue it",
}


def command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command given, so that an error about its options comes with its own usage."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return command_parser(action.choices[getattr(args, action.dest)], args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.print_help()
        return 2
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    module_name, func_name = COMMANDS[args.command].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        hint = RESUME_HINTS.get(args.command)
        print(f"interrupted; {hint}" if hint else "interrupted", file=sys.stderr)
        return 130
    except (UserError, FileExistsError, FileNotFoundError) as exc:  # the message says what to do; a traceback buries it
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
