"""What every command's parser shares."""
from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    """No option abbreviations: ``--prec`` working today would silently change meaning once ``--precompute`` exists."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def add_mlflow_options(p: argparse.ArgumentParser, experiment: str, what: str) -> None:
    """Where a command records its run: every run is tracked unless told not to."""
    p.add_argument("--experiment", default=experiment, help=f"MLflow experiment name (default: {experiment})")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--mlflow-uri", default=None,
                       help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    where.add_argument("--no-mlflow", action="store_true", help=f"do not record this run in MLflow (it records {what})")

