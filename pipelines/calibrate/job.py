"""``spai calibrate``: choose a decision threshold on a calibration split and keep it in the checkpoint.

The input is the table ``spai score`` wrote for the calibration images (e.g. a manifest's ``val`` split) with the very
weights being calibrated: its ``model_id`` must be their hash (or that of an earlier calibration of the same tensors,
which the checkpoint lists in ``calibrated_from``), so that a threshold never comes from another model's scores. Failed
and unlabelled rows are left out and counted. The threshold (:mod:`spai_core.calibration`) goes into the checkpoint's
metadata as ``threshold`` = ``{value, target, calibrated_on, n_real, n_fake}``; tensors and model config are copied
unchanged, and ``spai score`` with the calibrated file adds ``threshold`` and ``predicted`` columns.

The config is saved as ``<weights>.calibrate.yaml`` beside the calibrated checkpoint (``spai calibrate --config`` of
it calibrates again, the same way), and each calibration is an MLflow run (experiment ``spai-calibrate``) with the
options as params and the threshold, counts and the calibration split's rates at it as metrics.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipelines.calibrate.config import CalibrateConfig, CalibrateError
from pipelines.evaluate.tables import read_scores, select_split, usable_rows
from pipelines.infra import tracking
from pipelines.infra.storage import Files, StorageOptions, absolute, basename, is_s3
from pipelines.perturb import NONE
from pipelines.score.inputs import local_weights
from pipelines.score.workdir import write_atomic
from spai_core import calibration
from spai_core.checkpoint import read_metadata, update_metadata
from spai_core.config import check_config, dump_config, to_dict
from spai_core.detector import file_sha256

logger = logging.getLogger(__name__)
CONFIG_SUFFIX = ".calibrate.yaml"


@dataclasses.dataclass
class CalibrationResult:
    """The threshold stored, where, what it gives on the calibration split, and what was left out."""

    output: str
    threshold: dict[str, Any]  # as in the checkpoint's metadata
    rates: dict[str, float]  # fpr, tpr, real and balanced accuracy on the calibration rows
    excluded: dict[str, int]  # rows left out: {"errors": n, "unlabelled": n, "perturbed": n}
    warnings: list[str]
    run_id: str | None = None

    def summary(self) -> str:
        t, r = self.threshold, self.rates
        names = {"errors": "failed", "unlabelled": "unlabelled", "perturbed": "perturbed"}
        left_out = ", ".join(f"{n} {names[why]}" for why, n in self.excluded.items() if n)
        return (f"threshold {t['value']:.6g} ({t['target']}) from {t['n_real']} real and {t['n_fake']} fake images"
                + (f" (left out: {left_out} rows)" if left_out else "")
                + f"; on them: real accuracy {r['real_accuracy']:.3f}, TPR {r['tpr']:.3f}, balanced accuracy "
                f"{r['balanced_accuracy']:.3f}\nwrote {self.output}"
                + (f"\ntracked as MLflow run {self.run_id}" if self.run_id else ""))


def check_scored_with(table: pa.Table, cfg: CalibrateConfig, model_ids: set[str]) -> None:
    """Raise unless every row of ``table`` was scored with weights of one of ``model_ids`` (these tensors)."""
    if "model_id" not in table.column_names:
        raise CalibrateError(f"{cfg.scores} has no model_id column; calibrate on the table `spai score` writes in "
                             "its own layout (not --official-csv)")
    others = sorted(set(table.column("model_id").drop_null().to_pylist()) - model_ids)
    if others:
        raise CalibrateError(f"{cfg.scores} was scored with other weights (model_id {', '.join(others)}) than "
                             f"{cfg.weights} (model_id {' or '.join(sorted(model_ids))}); score the calibration "
                             f"images with these weights (`spai score -w {cfg.weights} ...`) and calibrate on that "
                             "table")


def calibration_scores(table: pa.Table, cfg: CalibrateConfig) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Real and fake scores of the calibration rows (the split asked for), and the rows left out."""
    rows, pooled = select_split(table, cfg.scores, cfg.split)
    if pooled:
        raise CalibrateError(f"{cfg.scores} holds the splits {', '.join(pooled)}; pick the calibration split with "
                             "--split (e.g. val; a threshold from training rows would be too optimistic)")
    perturbed = 0
    if "variant" in rows.column_names:  # a sweep (`spai score --perturb`): the threshold is for the images as they are
        originals = rows.filter(pc.equal(rows.column("variant"), NONE.label))
        perturbed, rows = rows.num_rows - originals.num_rows, originals
        if rows.num_rows == 0:
            raise CalibrateError(f"{cfg.scores} holds only perturbed images (a `spai score --perturb` sweep without "
                                 f"the {NONE.label!r} variant); calibrate on scores of the images as they are")
    usable = usable_rows(rows, cfg.scores)
    real, fake = usable.scores[usable.labels == 0], usable.scores[usable.labels == 1]
    for what, scores in (("real (label 0)", real), ("AI-generated (label 1)", fake)):
        if scores.size == 0:
            raise CalibrateError(f"{cfg.scores}{f' split {cfg.split}' if cfg.split else ''} has no {what} images "
                                 "that scored; a calibration split needs both real and AI-generated images")
    return real, fake, {**usable.excluded, "perturbed": perturbed}


def choose_threshold(real: np.ndarray, fake: np.ndarray, cfg: CalibrateConfig) -> tuple[float, list[str]]:
    """The threshold for the config's target, and warnings about how far it can be trusted."""
    if cfg.balanced:
        return calibration.balanced_threshold(real, fake), []
    fpr, n = cfg.target_fpr, real.size
    if n < calibration.enough_reals(fpr):
        return calibration.fpr_threshold(real, fpr), [
            f"only {n} real images: none of their scores bounds the FPR at {fpr:g} (that takes at least "
            f"{calibration.enough_reals(fpr)}); the threshold is the highest of them, whose FPR on new real images is "
            f"about 1/{n + 1} = {1 / (n + 1):.3f}"]
    warnings = []
    spread = calibration.fpr_spread(n, fpr)
    if spread > fpr / 2:
        needed = calibration.reals_for_spread(fpr, fpr / 2)
        warnings.append(f"{n} real images pin the FPR on new real images only to about {fpr:g} +- {spread:.3f}; "
                        f"calibrate on at least {needed} for +- half the target")
    return calibration.fpr_threshold(real, fpr), warnings


def write_calibrated(path: str, destination: str, changes: dict[str, Any], files: Files) -> None:
    """``path`` with ``changes`` in its metadata, written to ``destination`` (local, in place too, or s3://)."""
    if not is_s3(destination):
        update_metadata(path, files.resolve(destination)[1], changes)
        return
    with tempfile.TemporaryDirectory(prefix="spai-calibrate-") as tmp:
        local = os.path.join(tmp, basename(destination))
        update_metadata(path, local, changes)
        with open(local, "rb") as fh:
            write_atomic(files, destination, fh.read())


def calibrate(cfg: CalibrateConfig, options: StorageOptions | None = None) -> CalibrationResult:
    """Choose the threshold of ``cfg`` and store it in the checkpoint; see the module docstring."""
    check_config(cfg)
    options = options or StorageOptions.from_env()
    files = Files(options)
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.uri) if cfg.tracking.enabled else None  # fails now
    table = read_scores(cfg.scores, options)
    if is_s3(cfg.weights) and files.info(cfg.weights).type != pafs.FileType.File:
        raise files.missing(cfg.weights)  # a local path gets read_metadata's own message
    with local_weights(cfg.weights, options) as path:
        earlier = read_metadata(path).get("calibrated_from", [])
        model_id = file_sha256(path, 16)  # how ``spai score`` names the weights (Detector.model_id)
        check_scored_with(table, cfg, {model_id, *earlier})
        real, fake, excluded = calibration_scores(table, cfg)
        value, warnings = choose_threshold(real, fake, cfg)
        threshold = {"value": value, "target": cfg.target, "calibrated_on": absolute(cfg.scores),
                     "n_real": int(real.size), "n_fake": int(fake.size)}
        write_calibrated(path, cfg.destination, {"threshold": threshold,
                                                 "calibrated_from": sorted({*earlier, model_id})}, files)
    for warning in warnings:
        logger.warning("%s", warning)
    saved = dataclasses.replace(cfg, weights=absolute(cfg.weights), scores=absolute(cfg.scores),
                                output=absolute(cfg.output) if cfg.output else None)
    files.write(cfg.destination + CONFIG_SUFFIX, dump_config(saved).encode())
    result = CalibrationResult(cfg.destination, threshold, calibration.rates(real, fake, value), excluded, warnings)
    if tracking_uri:
        result.run_id = track(result, saved, model_id, tracking_uri)
    return result


def track(result: CalibrationResult, cfg: CalibrateConfig, model_id: str, tracking_uri: str) -> str:
    """The calibration's MLflow run: options and the weights' hash as params; threshold, counts and rates as metrics."""
    name = basename(result.output).rsplit(".", 1)[0]
    run_id = tracking.start_run(tracking_uri, cfg.tracking.experiment, name, {**to_dict(cfg), "model_id": model_id},
                                {"output": absolute(result.output), "target": result.threshold["target"]})
    metrics = {"threshold": result.threshold["value"], "n_real": result.threshold["n_real"],
               "n_fake": result.threshold["n_fake"], **{f"excluded_{k}": v for k, v in result.excluded.items()},
               **{f"calibration_{k}": v for k, v in result.rates.items()}}
    tracking.log_metrics(tracking_uri, run_id, metrics, step=0)
    tracking.finish_run(tracking_uri, run_id)
    return run_id
