"""`spai convert`: its flags, and the call into the library."""
from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)

DESCRIPTION = ("official spai.pth -> ours.safetensors, or ours -> official layout (.pth) "
               "loadable by the official code. Direction is taken from the file suffixes.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="weights to convert: official .pth or our .safetensors")
    p.add_argument("dst", help="file to write: .safetensors (ours) or .pth (official layout)")
    p.add_argument("--model", default=None, help="model config of an official file: spai_vit_b16 (default), or a "
                   "smaller registered one for test weights")


def run(args: argparse.Namespace) -> int:
    from spai_core.checkpoint import convert

    convert(args.src, args.dst, args.model)
    logger.info("wrote %s", args.dst)
    return 0
