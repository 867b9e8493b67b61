"""``spai evaluate``: per-generator metrics against all reals, seen/unseen groups, excluded rows, degradation runs,
splits, refused inputs, report files and MLflow logging, on hand-made score tables with known AUCs."""
from __future__ import annotations

import base64
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.evaluate.config import EvaluateError
from pipelines.evaluate.protocol import evaluate
from pipelines.evaluate.report import write_report
from pipelines.evaluate.tables import label_runs
from spai_cli.main import main as cli

REALS = [0.1, 0.2, 0.3, 0.4]
FAKES = {"sdxl": [0.6, 0.7, 0.8, 0.9],  # above every real: AUC 1
         "flux": [0.05, 0.15, 0.25, 0.35]}  # beats 0+1+2+3 of 16 real pairs: AUC 6/16


pytestmark = pytest.mark.usefixtures("mlflow_store")  # `spai evaluate` logs to MLflow by default


def score_table(fakes: dict[str, list[float]] = FAKES, resize_to: int | None = None) -> pa.Table:
    """Reals, fakes per generator, plus one failed row and one unlabelled row that must be left out."""
    rows = [{"label": 0, "generator": "real", "score": s, "error": None} for s in REALS]
    rows += [{"label": 1, "generator": g, "score": s, "error": None} for g, scores in fakes.items() for s in scores]
    rows += [{"label": 1, "generator": "sdxl", "score": None, "error": "truncated: cut short"},
             {"label": None, "generator": None, "score": 0.99, "error": None}]
    options = json.dumps({"precision": "fp32", "resize_to": resize_to, "max_tiles": None})
    return pa.Table.from_pylist([{**r, "options": options} for r in rows])


def by_generator(report, run: str | None = None) -> dict[str, dict]:
    return {r["generator"]: r for r in report.rows if run is None or r["run"] == run}


def with_splits(**tables: pa.Table) -> pa.Table:
    """The tables' rows in one table with a ``split`` column naming each one's (a scored whole manifest)."""
    return pa.concat_tables([t.append_column("split", pa.array([name] * t.num_rows)) for name, t in tables.items()])


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
    assert ("4 real images put the false-positive rate in steps of 25.0%, so TPR at 1% and 5% FPR is interpolated "
            "between ROC points, not measured (100+ reals measure it)") in report.markdown()
    many_reals = evaluate(pa.table({"label": [0] * 40 + [1], "generator": ["real"] * 40 + ["x"],
                                    "score": [i / 100 for i in range(41)]}))
    assert "steps of 2.5%, so TPR at 1% FPR is interpolated" in many_reals.markdown()  # 5% FPR is 2 steps: measured


def test_seen_generators_are_listed_apart():
    report = evaluate(score_table(), seen=["sdxl"])
    groups = [(r["generator"], r["group"]) for r in report.rows]
    assert groups == [("sdxl", "seen"), ("flux", "unseen"), ("real", ""), ("overall", "")]
    table = report.markdown()
    assert table.index("| clean | sdxl | seen |") < table.index("| clean | flux | unseen |")


def test_degradation_runs_are_labelled_from_options_and_compared():
    weaker = {"sdxl": [0.35, 0.45, 0.8, 0.9], "flux": FAKES["flux"]}  # 0.35 beats 3 reals, the rest 4: 15/16
    report = evaluate([score_table(), score_table(weaker, resize_to=512)])
    assert report.runs == ["clean", "resize_to=512"]
    assert by_generator(report, "resize_to=512")["sdxl"]["auc"] == pytest.approx(15 / 16)
    assert "### AUC per run" in report.markdown()
    assert "| sdxl | 1.0000 | 0.9375 |" in report.markdown()
    assert list(label_runs({"a/x.parquet": score_table(), "b/y.parquet": score_table()}).values()) == [
        "clean [x.parquet]", "clean [y.parquet]"]


def test_unusable_tables_say_what_to_do():
    with pytest.raises(EvaluateError, match="lacks column.*label"):
        evaluate(pa.table({"uri": ["a"], "score": [0.5]}))
    unlabelled = pa.table({"label": pa.array([None], pa.int8()), "generator": ["x"], "score": [0.5]})
    with pytest.raises(EvaluateError, match="no labelled rows"):
        evaluate(unlabelled)


def test_errors_name_the_score_table_not_its_run_label():
    """A table scored without degradations is the run 'clean' in the report; an error about it names its file."""
    with pytest.raises(EvaluateError, match=r"^score table /data/scores\.parquet lacks column\(s\) \['label'\]"):
        evaluate({"/data/scores.parquet": score_table().drop_columns(["label"])})
    with pytest.raises(EvaluateError, match=r"^score table table #1 has no rows of split 'test'"):
        evaluate([with_splits(test=score_table()), score_table(resize_to=512)], split="test")


def test_threshold_must_be_a_probability_strictly_inside_0_1():
    for threshold in (2, 1, 0, -0.5, math.nan):
        with pytest.raises(EvaluateError, match="threshold must be strictly between 0 and 1"):
            evaluate(score_table(), threshold=threshold)
    assert by_generator(evaluate(score_table(), threshold=0.3))["real"]["accuracy"] == 0.75  # only 0.4 is above


def test_scores_outside_0_1_are_refused_as_not_probabilities():
    outside = score_table({"sdxl": [1.5, 0.7, -0.2, 0.9]})
    with pytest.raises(EvaluateError, match=r"2 row\(s\) are not, e\.g\. 1\.5; .*not a logit"):
        evaluate(outside)
    with pytest.raises(EvaluateError, match=r"1 row\(s\) are not, e\.g\. inf"):
        evaluate(score_table({"sdxl": [math.inf]}))
    assert by_generator(evaluate(score_table({"sdxl": [0.0, 1.0]})))["sdxl"]["n_fake"] == 2  # bounds are fine


def test_seen_generators_must_be_in_the_data():
    with pytest.raises(EvaluateError, match=r"\['dalle'\] have no scored .* present are flux, sdxl"):
        evaluate(score_table(), seen=["sdxl", "dalle"])
    # one table holding it is enough: tables of different test sets share one list of training generators
    report = evaluate([score_table({"flux": FAKES["flux"]}), score_table(resize_to=512)], seen=["sdxl"])
    assert by_generator(report, "resize_to=512")["sdxl"]["group"] == "seen"


def test_splits_are_pooled_with_a_note_or_selected():
    table = with_splits(test=score_table(), train=score_table({"flux": [0.95, 0.96]}))
    pooled = evaluate(table)
    assert pooled.pooled == {"clean": ["test", "train"]}
    assert by_generator(pooled)["flux"]["n_fake"] == 6 and by_generator(pooled)["flux"]["auc"] != pytest.approx(6 / 16)
    assert "clean: the metrics pool splits test, train; `--split test` restricts them" in pooled.markdown()
    selected = evaluate(table, split="test")
    assert by_generator(selected)["flux"]["auc"] == pytest.approx(6 / 16)
    assert by_generator(selected)["real"]["n_real"] == 4
    assert selected.pooled == {} and "the metrics pool" not in selected.markdown()
    assert selected.excluded == {"clean": {"errors": 1, "unlabelled": 1}}
    assert evaluate(with_splits(test=score_table())).pooled == {}  # one split: nothing pooled
    with pytest.raises(EvaluateError, match="no rows of split 'val'; its splits are test, train"):
        evaluate(table, split="val")
    with pytest.raises(EvaluateError, match="no split column"):
        evaluate(score_table(), split="test")


def test_cli_refuses_bad_inputs_and_selects_a_split(tmp_path, capsys):
    path = str(tmp_path / "scores.parquet")
    pq.write_table(with_splits(test=score_table(), train=score_table({"flux": [0.95, 0.96]})), path)
    for flags, message in ((["--threshold", "2"], "--threshold (threshold): must be strictly between 0 and 1"),
                           (["--seen", "dalle"], "present are flux, sdxl"),
                           (["--split", "val"], "its splits are test, train")):
        assert cli(["evaluate", path, *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    assert cli(["evaluate", path]) == 0 and "`--split test` restricts them" in capsys.readouterr().out
    assert cli(["evaluate", path, "--split", "test"]) == 0
    assert "| clean | flux |  | 0.3750 |" in capsys.readouterr().out


def test_report_files(tmp_path):
    report = evaluate([score_table(), score_table(resize_to=256)])
    written = write_report(report, str(tmp_path))
    names = sorted(p.rsplit("/", 1)[-1] for p in written)
    assert names == ["metrics.csv", "metrics.md", "report.html", "roc_flux.png", "roc_overall.png", "roc_sdxl.png"]
    assert (tmp_path / "roc_sdxl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "resize_to=256" in (tmp_path / "metrics.csv").read_text()


def test_cli_prints_writes_and_logs_to_mlflow(tmp_path, capsys):
    pq.write_table(score_table(), tmp_path / "scores.parquet")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = cli(["evaluate", str(tmp_path / "scores.parquet"), "--output", str(tmp_path / "report"), "--seen", "sdxl",
                "--mlflow-uri", tracking, "--bootstrap", "200"])
    out = capsys.readouterr().out
    assert code == 0 and "| clean | sdxl | seen | 1.0000 |" in out
    assert (tmp_path / "report" / "roc_flux.png").exists()
    from mlflow.tracking import MlflowClient
    run_id = out.strip().rsplit(" ", 1)[-1]
    client = MlflowClient(tracking)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["eval/clean/flux/auc"] == pytest.approx(6 / 16)
    assert {a.path for a in client.list_artifacts(run_id, "evaluation")} >= {
        "evaluation/metrics.md", "evaluation/report.html", "evaluation/roc_sdxl.png"}
    assert np.isfinite(metrics["eval/clean/overall/ap"]) and metrics["eval/clean/flux/auc_lo"] <= 6 / 16
    params = client.get_run(run_id).data.params
    assert (params["protocol"], params["bootstrap"]) == ("pooled", "200")  # one real source: pooled
    assert client.get_run(run_id).info.run_name == "evaluate clean"


def test_cli_logs_to_mlflow_unless_told_not_to(tmp_path, mlflow_store, capsys):
    pq.write_table(score_table(), tmp_path / "scores.parquet")
    tracking = mlflow_store  # $MLFLOW_TRACKING_URI, used without --mlflow-uri
    assert cli(["evaluate", str(tmp_path / "scores.parquet"), "--no-mlflow"]) == 0
    assert "logged to MLflow" not in capsys.readouterr().out and not (tmp_path / "mlflow.db").exists()
    pq.write_table(score_table(), tmp_path / "other.parquet")
    assert cli(["evaluate", str(tmp_path / "scores.parquet"), str(tmp_path / "other.parquet"), "--experiment",
                "robustness"]) == 0
    run_id = capsys.readouterr().out.strip().rsplit(" ", 1)[-1]
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "robustness"
    # two clean runs are told apart by file: "clean [other.parquet]", whose key drops the brackets and spaces
    metrics = run.data.metrics
    assert metrics["eval/clean_other.parquet/mean/auc"] == metrics["eval/clean_scores.parquet/mean/auc"]


def test_a_saved_config_makes_the_same_report_again(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    pq.write_table(with_splits(test=score_table(), train=score_table({"flux": [0.95, 0.96]})), "scores.parquet")
    assert cli(["evaluate", "scores.parquet", "-o", "report", "--split", "test", "--seen", "sdxl", "--threshold",
                "0.3", "--no-mlflow", "--protocol", "paired", "--bootstrap", "300", "--seed", "3"]) == 0
    first = (tmp_path / "report" / "metrics.csv").read_text()
    assert "protocol: paired" in (tmp_path / "report" / "config.yaml").read_text()
    assert "wrote 8 report file(s) to report" in capsys.readouterr().out  # the config and pairs.csv among them
    (tmp_path / "report" / "metrics.csv").unlink()
    monkeypatch.chdir(tmp_path / "report")  # the saved paths are absolute
    assert cli(["evaluate", "--config", "config.yaml"]) == 0
    assert (tmp_path / "report" / "metrics.csv").read_text() == first


def test_a_wrong_value_fails_before_any_table_is_read(tmp_path, capsys):
    for flags, message in ((["--threshold", "50"], "--threshold (threshold): must be strictly between 0 and 1"),
                           (["--run-id", "abc", "--no-mlflow"], "--run-id (run_id): contradicts --no-mlflow"),
                           ([], "SCORES (scores): give at least one score table")):
        scores = [] if not flags else [str(tmp_path / "missing.parquet")]
        assert cli(["evaluate", *scores, *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}"), err


def test_explain_draws_the_most_confident_mistakes(tmp_path, photos):
    import torch

    from spai_core.checkpoint import save_checkpoint
    from spai_core.spai import build_model

    torch.manual_seed(0)
    weights = tmp_path / "tiny.safetensors"
    save_checkpoint(weights, build_model("spai_tiny"))
    small = sorted(photos, key=lambda p: p.stat().st_size)[:4]  # small photos: three overlays to draw, kept fast
    # reals a (0.9, FP 1), b (0.7, FP 2), c (0.2, right); fakes d (0.1, FN 1), e (0.8, right), a moved file (0.3, FN 2)
    uris = [str(small[0]), str(small[1]), str(small[2]), str(small[3]), str(small[0]), str(tmp_path / "moved.jpg")]
    table = pa.table({"uri": uris, "label": [0, 0, 0, 1, 1, 1], "score": [0.9, 0.7, 0.2, 0.1, 0.8, 0.3],
                      "generator": ["real", "real", "real", "sd", "sd", "sd"], "error": [None] * 6})
    scores = tmp_path / "scores.parquet"
    pq.write_table(table, scores)
    out = tmp_path / "report"
    assert cli(["evaluate", str(scores), "-o", str(out), "--bootstrap", "0", "--no-mlflow", "--explain",
                 str(weights), "--explain-count", "2"]) == 0
    drawn = sorted(p.name for p in (out / "explain").iterdir())
    stem = [p.stem for p in small]
    assert drawn == sorted([f"fp_1_{stem[0]}.png", f"fp_2_{stem[1]}.png", f"fn_1_{stem[3]}.png"])
    md = (out / "metrics.md").read_text()
    assert f"| false negative 2 | {uris[5]} | sd | 0.3000 | error: missing" in md
    assert f"| false positive 1 | {uris[0]} | real | 0.9000 | explain/fp_1_{stem[0]}.png |" in md
    assert uris[2] not in md.split("Most confident mistakes")[1]  # right answers are not mistakes
    page = (out / "report.html").read_text()
    overlay = base64.b64encode((out / "explain" / f"fn_1_{stem[3]}.png").read_bytes()).decode()
    assert "Most confident mistakes" in page and overlay in page
