"""What an epoch reports: metrics gathered from every rank, the best epoch so far, and rank 0's console lines.

The validation metrics follow the paper's protocol (``spai_core.metrics``): overall, and each generator's fakes
against all the reals, as ``spai evaluate`` reports them.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from spai_core.metrics import binary_metrics, per_generator_metrics, sigmoid


def epoch_metrics(gathered: list[dict[str, Any]], epoch: int, train_time: float, lr: float) -> dict[str, float]:
    """Global train loss and validation metrics (overall and per generator against all reals)."""
    seen = sum(g["seen"] for g in gathered)
    logits = np.array([x for g in gathered for x in g["val"]["logit"]], dtype=np.float64)
    labels = np.array([x for g in gathered for x in g["val"]["label"]], dtype=np.int64)
    generators = np.array([x for g in gathered for x in g["val"]["generator"]], dtype=object)
    val_loss = float(np.mean(np.logaddexp(0, logits) - labels * logits)) if len(logits) else float("nan")
    metrics = {"epoch": epoch, "train_loss": sum(g["loss"] for g in gathered) / max(seen, 1), "lr": lr,
               "train_images": seen, "train_images_per_s": seen / max(train_time, 1e-9),
               "train_decode_failures": sum(g["failed"] for g in gathered),
               "train_grad_norm_max": max(g["grad_norm_max"] for g in gathered),
               "val_decode_failures": sum(g["val"]["failed"] for g in gathered), "val_loss": val_loss}
    failure = next((f for g in gathered for f in (g["failure"], g["val"]["failure"]) if f), None)
    if failure:
        metrics["decode_failure_example"] = failure
    scores = sigmoid(logits)
    overall = binary_metrics(labels, scores) if len(labels) else {}
    metrics.update({f"val_{k}": float(v) for k, v in overall.items()})
    metrics.setdefault("val_auc", float("nan"))
    metrics.setdefault("val_accuracy", float("nan"))
    if len(labels):
        for gen, gen_metrics in per_generator_metrics(labels, scores, generators).items():
            metrics[f"val_auc_{gen}"] = float(gen_metrics["auc"])
            metrics[f"val_accuracy_{gen}"] = float(gen_metrics["accuracy"])
    return metrics


def epoch_metric_names(val_generators: list[str]) -> set[str]:
    """The numeric metrics every epoch reports (to MLflow, and to Tune, whose scheduler may rank trials on any) when
    the val split's AI-generated images come from ``val_generators``; made by :func:`epoch_metrics`, so never stale."""
    val = {"label": [0] + [1] * len(val_generators), "generator": ["real", *val_generators],
           "logit": [0.0] * (1 + len(val_generators)), "failed": 0, "failure": None}
    rank = {"seen": 1, "loss": 0.0, "failed": 0, "failure": None, "val": val, "grad_norm_max": 0.0}
    return set(epoch_metrics([rank], 0, 1.0, 0.0)) | {"best_val_auc", "stale_epochs"}


def epoch_rank(value: float, epoch: int, mode: str = "max") -> tuple[float, int]:
    """Sort key of an epoch by a metric (higher is better for ``max``): of equal values the later epoch ranks higher,
    as it trained longer. Ties are common on a small val split; ``spai train`` and ``spai tune`` both pick this way."""
    return (value if mode == "max" else -value, epoch)


def best_of(candidates: list[tuple[dict[str, Any], Any]]) -> tuple[dict[str, Any], Any]:
    """The (metrics, checkpoint) of the highest val AUC (:func:`epoch_rank`)."""
    return max(candidates, key=lambda mc: epoch_rank(mc[0].get("val_auc", -1.0), mc[0].get("epoch", -1)))


def track_best(val_auc: float, best_auc: float, stale: int) -> tuple[float, int]:
    """(best val AUC so far, epochs since it improved) after an epoch. An undefined AUC (a val split without both
    classes) is no evidence either way, so it neither improves nor makes the run stale."""
    if math.isnan(val_auc):
        return best_auc, stale
    return (val_auc, 0) if val_auc > best_auc or math.isnan(best_auc) else (best_auc, stale + 1)


def progress_line(epoch: int, step: int, steps: int, loss: float, images: int, elapsed: float) -> str:
    """Rank 0's line within an epoch: how far it is, the mean loss so far, the rate and the time left."""
    left = round(elapsed / step * (steps - step))
    return (f"[spai train] epoch {epoch} step {step}/{steps} ({step / steps:.0%}): loss {loss:.4f}, "
            f"{images / max(elapsed, 1e-9):.1f} img/s, epoch ends in "
            f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}")


def epoch_line(metrics: dict[str, Any], stop: bool) -> str:
    """Rank 0's line at the end of an epoch."""
    return (f"[spai train] epoch {metrics['epoch']}: loss {metrics['train_loss']:.4f} val_auc {metrics['val_auc']:.4f} "
            f"val_acc {metrics['val_accuracy']:.4f} ({metrics['train_images_per_s']:.1f} img/s)"
            + failure_summary(metrics) + (" early stop" if stop else ""))


def failure_summary(metrics: dict[str, Any]) -> str:
    """The epoch line's note on images that failed to decode (empty when none did): counts and one example."""
    train, val = int(metrics["train_decode_failures"]), int(metrics["val_decode_failures"])
    if not train and not val:
        return ""
    return (f"; {train} train / {val} val images failed, e.g. {metrics['decode_failure_example']} "
            "(spai validate lists every reject)")


def no_training_data_message(metrics: dict[str, Any], manifest: str) -> str:
    """Why a run stopped at an epoch whose training images all failed, and what to check."""
    return (f"epoch {metrics['epoch']}: none of the {metrics['train_decode_failures']} training images could be "
            f"decoded, e.g. {metrics.get('decode_failure_example')}; check the manifest's paths and storage settings "
            f"(`spai validate {manifest}` lists every reject with its reason)")
