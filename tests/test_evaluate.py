"""``spai evaluate``: per-generator metrics against all reals, seen/unseen groups, excluded rows, degradation runs,
report files and MLflow logging, on hand-made score tables with known AUCs."""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.evaluate import EvaluateError, evaluate, label_runs, write_report
from spai_cli.main import main as cli

REALS = [0.1, 0.2, 0.3, 0.4]
FAKES = {"sdxl": [0.6, 0.7, 0.8, 0.9],  # above every real: AUC 1
         "flux": [0.05, 0.15, 0.25, 0.35]}  # beats 0+1+2+3 of 16 real pairs: AUC 6/16


def score_table(fakes: dict[str, list[float]] = FAKES, jpeg_quality: int | None = None) -> pa.Table:
    """Reals, fakes per generator, plus one failed row and one unlabelled row that must be left out."""
    rows = [{"label": 0, "generator": "real", "score": s, "error": None} for s in REALS]
    rows += [{"label": 1, "generator": g, "score": s, "error": None} for g, scores in fakes.items() for s in scores]
    rows += [{"label": 1, "generator": "sdxl", "score": None, "error": "truncated: cut short"},
             {"label": None, "generator": None, "score": 0.99, "error": None}]
    options = json.dumps({"precision": "fp32", "jpeg_quality": jpeg_quality, "blur_sigma": None})
    return pa.Table.from_pylist([{**r, "options": options} for r in rows])


def by_generator(report, run: str | None = None) -> dict[str, dict]:
    return {r["generator"]: r for r in report.rows if run is None or r["run"] == run}


def test_each_generator_is_paired_with_all_reals():
    report = evaluate(score_table())
    rows = by_generator(report)
    assert rows["sdxl"]["auc"] == 1.0 and rows["flux"]["auc"] == pytest.approx(6 / 16)
    assert rows["sdxl"]["n_fake"] == 4 and rows["sdxl"]["n_real"] == 4
    assert rows["mean"]["auc"] == pytest.approx((1 + 6 / 16) / 2)
    assert rows["overall"]["n_fake"] == 8 and rows["overall"]["n_real"] == 4
    assert rows["real"]["accuracy"] == 1.0 and math.isnan(rows["real"]["auc"])  # every real below 0.5
    assert rows["flux"]["accuracy"] == pytest.approx(4 / 8)  # reals right, flux fakes all missed
    assert report.excluded == {"clean": {"errors": 1, "unlabelled": 1}}
    assert "left out 1 row(s) that failed to score and 1 without a label" in report.markdown()


def test_seen_generators_are_listed_apart():
    report = evaluate(score_table(), seen=["sdxl"])
    groups = [(r["generator"], r["group"]) for r in report.rows]
    assert groups == [("sdxl", "seen"), ("flux", "unseen"), ("real", ""), ("overall", "")]
    table = report.markdown()
    assert table.index("| clean | sdxl | seen |") < table.index("| clean | flux | unseen |")


def test_degradation_runs_are_labelled_from_options_and_compared():
    weaker = {"sdxl": [0.35, 0.45, 0.8, 0.9], "flux": FAKES["flux"]}  # 0.35 beats 3 reals, the rest 4: 15/16
    report = evaluate([score_table(), score_table(weaker, jpeg_quality=75)])
    assert report.runs == ["clean", "jpeg_quality=75"]
    assert by_generator(report, "jpeg_quality=75")["sdxl"]["auc"] == pytest.approx(15 / 16)
    assert "AUC per run:" in report.markdown()
    assert "| sdxl | 1.0000 | 0.9375 |" in report.markdown()
    assert list(label_runs({"a/x.parquet": score_table(), "b/y.parquet": score_table()})) == [
        "clean [x.parquet]", "clean [y.parquet]"]


def test_unusable_tables_say_what_to_do():
    with pytest.raises(EvaluateError, match="lacks column.*label"):
        evaluate(pa.table({"uri": ["a"], "score": [0.5]}))
    unlabelled = pa.table({"label": pa.array([None], pa.int8()), "generator": ["x"], "score": [0.5]})
    with pytest.raises(EvaluateError, match="no labelled rows"):
        evaluate(unlabelled)


def test_report_files(tmp_path):
    report = evaluate([score_table(), score_table(jpeg_quality=50)])
    written = write_report(report, str(tmp_path))
    names = sorted(p.rsplit("/", 1)[-1] for p in written)
    assert names == ["metrics.csv", "metrics.md", "roc_flux.png", "roc_overall.png", "roc_sdxl.png"]
    assert (tmp_path / "roc_sdxl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "jpeg_quality=50" in (tmp_path / "metrics.csv").read_text()


def test_cli_prints_writes_and_logs_to_mlflow(tmp_path, capsys):
    pq.write_table(score_table(), tmp_path / "scores.parquet")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = cli(["evaluate", str(tmp_path / "scores.parquet"), "--output", str(tmp_path / "report"), "--seen", "sdxl",
                "--mlflow-uri", tracking])
    out = capsys.readouterr().out
    assert code == 0 and "| clean | sdxl | seen | 1.0000 |" in out
    assert (tmp_path / "report" / "roc_flux.png").exists()
    from mlflow.tracking import MlflowClient
    run_id = out.strip().rsplit(" ", 1)[-1]
    client = MlflowClient(tracking)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["eval/clean/flux/auc"] == pytest.approx(6 / 16)
    assert {a.path for a in client.list_artifacts(run_id, "evaluation")} >= {"evaluation/metrics.md",
                                                                          "evaluation/roc_sdxl.png"}
    assert np.isfinite(metrics["eval/clean/overall/ap"])
