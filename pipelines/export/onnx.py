"""``spai export onnx``: a checkpoint as two ONNX graphs (:mod:`spai_core.export`), optionally checked against
PyTorch fp32 on real photos (:mod:`spai_core.onnx_runtime`)."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from pipelines.demo.corpus import ASSET_PHOTOS
from pipelines.infra.console import progress_bar
from spai_core.config import ConfigError, dump_config, option
from spai_core.detector import Detector
from spai_core.export import MANIFEST_FILE, export_checkpoint
from spai_core.onnx_runtime import ParityReport, compare_with_pytorch

logger = logging.getLogger(__name__)

CONFIG_FILE = "export.config.yaml"
# --validate's default photos: committed, real, and small enough for a ViT-B check in seconds each; between them they
# take the five-crop path (chelsea: 1 x 2 grid tiles) and the grid path (2 x 2 and more).
DEFAULT_PHOTOS = ("skimage__chelsea.jpg", "skimage__astronaut.jpg", "skimage__coffee.jpg", "sklearn__china.jpg")


@dataclasses.dataclass
class OnnxExportConfig:
    """What ``spai export onnx`` writes and checks; saved in the export folder as ``export.config.yaml``."""

    checkpoint: str = option("", flag="CHECKPOINT", help="weights to export: official spai.pth or our .safetensors")
    output: str = option("", flag="--output", short="-o", help="folder to write tile_encoder.onnx, aggregator.onnx "
                         "and spai_onnx.json (the preprocessing) into")
    model: str | None = option(None, flag="--model", help="model config of an official file: spai_vit_b16 "
                               "(default), or a smaller registered one for test weights")
    overwrite: bool = option(False, flag="--overwrite", help="replace an export already in --output")
    check: bool = option(False, flag="--validate", help="score real photos with the export and with PyTorch fp32 and "
                         "print the max abs/rel logit error per photo; exit status 1 outside --rtol")
    images: list[str] = option(default_factory=list, flag="--images", help="photos for --validate (default: "
                               f"{len(DEFAULT_PHOTOS)} committed photos of pipelines/assets/photos, 300 to 640 px)")
    rtol: float = option(1e-4, flag="--rtol", help="--validate passes when |d logit| <= rtol * |logit| + 1e-5")

    def validate(self) -> None:
        for name in ("checkpoint", "output"):
            if not getattr(self, name):
                raise ConfigError("is required", name)
        if not self.rtol > 0:
            raise ConfigError(f"must be > 0, got {self.rtol}", "rtol")
        missing = [path for path in self.images if not Path(path).is_file()]
        if missing:
            raise ConfigError(f"no such file(s): {', '.join(missing)}", "images")
        if not self.overwrite and (Path(self.output) / MANIFEST_FILE).exists():
            raise ConfigError(f"{self.output} holds an export already; pass --overwrite to replace it", "output")

    def photos(self) -> list[Path]:
        return [Path(p) for p in self.images] or [ASSET_PHOTOS / name for name in DEFAULT_PHOTOS]


def export_onnx_job(cfg: OnnxExportConfig) -> ParityReport | None:
    """Export, save the config beside the graphs, and (with ``--validate``) compare with PyTorch fp32."""
    manifest = export_checkpoint(cfg.checkpoint, cfg.output, cfg.model)
    (Path(cfg.output) / CONFIG_FILE).write_text(dump_config(cfg))
    logger.info("wrote %s and the two graphs it names", manifest)
    if not cfg.check:
        return None
    # The reference is the plain model: the CPU Detector's oneDNN patch is a faster path, not the one exported.
    reference = Detector.from_pretrained(cfg.checkpoint, "cpu", "fp32", config=cfg.model, fuse_cpu=False)
    photos = cfg.photos()
    return compare_with_pytorch(cfg.output, reference, progress_bar(iterable=photos, desc="validate", unit="photo"),
                                rtol=cfg.rtol)
