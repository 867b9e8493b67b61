"""`spai demo`: its flags, and the call into the library."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="offline demo: build corpus -> train -> score -> evaluate on this machine",
                       description="Builds (or reuses) the offline demo corpus from committed photos and CPU "
                       "generators, trains the tiny config with Ray Train, scores the held-out set with Ray Data "
                       "and prints a per-generator table with a ROC report.")
    p.add_argument("--output", "-o", default="demo_out", help="working directory for corpus, runs and report "
                   "(default: demo_out)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: 2)")
    p.add_argument("--epochs", type=int, default=None, help="override the demo's epoch count")
    p.add_argument("--rebuild", action="store_true", help="rebuild the corpus even if it exists")
    return p


def run(args: argparse.Namespace) -> int:
    from pipelines.demo.run import main

    return int(main(args) or 0)
