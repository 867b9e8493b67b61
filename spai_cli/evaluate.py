"""`spai evaluate`: its flags, and the call into the library."""
from __future__ import annotations

import argparse

from spai_cli.common import add_mlflow_options

def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
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
    return p


def run(args: argparse.Namespace) -> int:
    from pipelines.evaluate.report import main

    return int(main(args) or 0)
