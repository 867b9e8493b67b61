"""The ``spai`` command: picks the subcommand, parses its flags and dispatches.

Each subcommand is one module of ``spai_cli`` with ``DESCRIPTION``, ``add_arguments(parser)`` and ``run(args)``;
its one-line help is in :data:`COMMANDS`. The work lives in the library, so the same functions serve Python users
and the CLI. This module also decides what the console shows (the library logs) and turns user errors and Ctrl-C
into one line and an exit status.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from types import ModuleType
from typing import Sequence

from pipelines.infra.console import log_to_console
from spai_cli.common import Parser
from spai_core.errors import UserError

EPILOG = """Environment:
  RAY_ADDRESS          connect to a running Ray cluster instead of starting a local one
  MLFLOW_TRACKING_URI  where runs are tracked (default: a local store, ./mlruns)
  AWS_ENDPOINT_URL     S3-compatible endpoint for s3:// URIs (MinIO, Ceph, moto, ...); credentials come
                       from the usual AWS variables and profiles (AWS_PROFILE, ~/.aws/credentials)
"""


# command -> (module in spai_cli, one-line help). Only the command being run imports its module (and through it the
# library's config classes), so `spai --help` stays instant.
COMMANDS = {
    "manifest": ("manifest", "build a Parquet manifest from GenImage folders, SPAI CSVs or real/fake folders"),
    "validate": ("validate", "open every image of a manifest; record sizes and hashes, list rejects"),
    "train": ("train", "train or fine-tune SPAI with Ray Train (DDP), tracked in MLflow"),
    "tune": ("tune", "search hyperparameters with Ray Tune + ASHA; every trial is a real train run"),
    "benchmark": ("benchmark", "benchmarks of parallel train runs: the cross-generator matrix (GenImage Table 4)"),
    "score": ("score", "score images (folder, CSV, manifest or s3:// prefix) with Ray Data"),
    "evaluate": ("evaluate", "metrics per generator (and per degradation) from a scored table"),
    "fusion": ("fusion", "Sem-SPAI: extract SPAI + semantic features (Ray Data), train a fusion head (Ray Train)"),
    "explain": ("explain", "overlays of where each score comes from (tile attention) on the images, with an index"),
    "calibrate": ("calibrate", "choose a decision threshold on a calibration split; keep it in the checkpoint"),
    "convert": ("convert", "convert weights between the official .pth layout and our .safetensors"),
    "export": ("export", "export a checkpoint as ONNX graphs (tile encoder + aggregator) for onnxruntime / TensorRT"),
    "backbone": ("backbone", "pretrained backbone weights (real CLIP ViT-B/16 weights offline)"),
    "demo": ("demo", "offline demo: build corpus -> train -> score -> evaluate on this machine"),
    "demo-data": ("demo_data", "build only the offline demo corpus (photos + CPU generators)"),
}

# what to tell a user who pressed Ctrl-C, for commands that can continue where they stopped
RESUME_HINTS = {
    "score": "re-run the same command to continue where it stopped",
    "train": "add --resume to the same command to continue from the last checkpoint",
    "tune": "add --resume and the search's --name to the same command to continue it",
    "benchmark": "add --resume and the benchmark's --name to the same command to continue it",
}


def _version() -> str:
    try:
        return importlib.metadata.version("spai-ray")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def _command_module(name: str) -> ModuleType:
    return importlib.import_module(f"spai_cli.{COMMANDS[name][0]}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``spai`` parser; with ``command``, that command's full parser (the others list only their help line)."""
    parser = Parser(
        prog="spai",
        description="SPAI AI-generated image detection on Ray: build manifests, train, tune, score, evaluate.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name, (_, help_line) in COMMANDS.items():
        if name == command:
            module = _command_module(name)
            module.add_arguments(sub.add_parser(name, help=help_line, description=module.DESCRIPTION))
        else:
            sub.add_parser(name, help=help_line, add_help=False)
    return parser


def command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command given, so that an error about its options comes with its own usage."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return command_parser(action.choices[getattr(args, action.dest)], args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))  # the command comes first
    if not argv:
        parser.print_help()
        return 2
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    log_to_console()
    try:
        return int(_command_module(args.command).run(args) or 0)
    except KeyboardInterrupt:
        hint = RESUME_HINTS.get(args.command)
        print(f"interrupted; {hint}" if hint else "interrupted", file=sys.stderr)
        return 130
    except (UserError, FileExistsError, FileNotFoundError) as exc:  # the message says what to do; a traceback buries it
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
