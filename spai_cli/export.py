"""`spai export`: deployment formats of a checkpoint; its flags, and the calls into the library."""
from __future__ import annotations

import argparse
import logging

from spai_cli.options import add_config_options, config_from_args

logger = logging.getLogger(__name__)

DESCRIPTION = "Export a checkpoint for deployment runtimes."

ONNX_DESCRIPTION = (
    "Write the model as two ONNX graphs (opset 17, fp32): tile_encoder.onnx (N x 3 x 224 x 224 tiles in [0, 1], any "
    "N -> N x D descriptors; the FFT split and normalisation are inside, the FFT as exact matrix products) and "
    "aggregator.onnx (1 x L x D descriptors of one image, any L -> logit and per-head tile attention), plus "
    "spai_onnx.json: tiling rule, mask radius, normalisation and the hashes of the graphs and the checkpoint. Score "
    "with them: spai score --runtime onnxruntime --weights DIR, or spai_core.onnx_runtime.OnnxDetector(DIR).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipelines.export.onnx import OnnxExportConfig

    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    onnx = formats.add_parser("onnx", help="tile encoder + aggregator as ONNX graphs, for onnxruntime or TensorRT",
                              description=ONNX_DESCRIPTION)
    add_config_options(onnx, OnnxExportConfig, overrides=False)


def run(args: argparse.Namespace) -> int:
    from pipelines.export.onnx import OnnxExportConfig, export_onnx_job

    cfg = config_from_args(OnnxExportConfig, args)
    report = export_onnx_job(cfg)
    if report is None:
        return 0
    logger.info("onnxruntime against PyTorch fp32 (logits):\n%s", report.table())
    return 0 if report.passed else 1
