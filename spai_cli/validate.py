"""`spai validate`: its flags, and the call into the library."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
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
    return p


def run(args: argparse.Namespace) -> int:
    from pipelines.data.validate import main

    return int(main(args) or 0)
