"""``spai demo``: the whole job offline on embedded defaults: corpus -> train -> score -> evaluate.

Every step is the library call behind the matching CLI command (``spai demo-data``, ``spai train``,
``spai score``, ``spai evaluate``), so the demo exercises exactly what users run on their own data.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from pipelines.infra import tracking
from pipelines.demo.corpus import build_demo_corpus
from pipelines.evaluate.report import evaluate, log_report, read_scores, write_report
from pipelines.data.manifest import read_sidecar
from pipelines.score.job import ScoreConfig, score
from pipelines.train.job import CONFIG_DIR, load_train_config, run_training


def _step(number: int, text: str) -> None:
    print(f"\n==> [{number}/4] {text}", flush=True)


def run_demo(output: str | Path = "demo_out", workers: int = 2, epochs: int | None = None,
             rebuild: bool = False) -> Path:
    """Run the four steps under ``output``; returns the report directory."""
    output = Path(output).resolve()
    started = time.time()
    _step(1, "demo corpus: committed photos + CPU generators (reused when already built)")
    manifest = build_demo_corpus(output / "corpus", rebuild=rebuild)
    seen = (read_sidecar(manifest) or {}).get("build", {}).get("seen_generators")

    _step(2, f"training the tiny config with Ray Train on {workers} local worker(s)")
    overrides = [f"workers={workers}"] + ([f"epochs={epochs}"] if epochs else [])
    cfg = load_train_config(CONFIG_DIR / "tiny.yaml", overrides)
    tracking_uri = f"sqlite:///{output / 'mlruns' / 'mlflow.db'}"
    (output / "mlruns").mkdir(parents=True, exist_ok=True)
    result = run_training(cfg, manifest, str(output / "runs"), time.strftime("demo-%Y%m%d-%H%M%S"),
                          mlflow_uri=tracking_uri, experiment="spai-demo")
    if result.best_checkpoint is None:
        raise RuntimeError("training produced no checkpoint; see the log above")

    _step(3, "scoring the held-out test split with Ray Data")
    scores_path = Path(result.run_dir) / "test_scores.parquet"
    score(ScoreConfig(weights=result.best_checkpoint, input=manifest, output=str(scores_path), split="test",
                      mlflow_uri=tracking_uri, experiment="spai-demo"))

    _step(4, "evaluating per generator (each generator's fakes against all real test images)")
    report = evaluate({"demo": read_scores(str(scores_path))}, seen=seen)
    report_dir = output / "report"
    write_report(report, str(report_dir))
    log_report(report, tracking_uri, result.mlflow_run_id)
    print(report.markdown())
    print(f"\nSeen in training: {', '.join(seen or [])}; the other generators were never seen (cross-generator).")
    print(f"Report (table + ROC curves): {report_dir}")
    print(f"Best checkpoint: {result.best_checkpoint}")
    print(tracking.ui_hint(tracking_uri))
    print(f"Total time: {(time.time() - started) / 60:.1f} min")
    return report_dir


def main(args: argparse.Namespace) -> int:
    run_demo(args.output, args.workers, args.epochs, args.rebuild)
    return 0
