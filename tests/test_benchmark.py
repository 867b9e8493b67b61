"""``spai benchmark cross-generator``: the training sets of the rows, the matrix on score tables with known answers,
the config saved and accepted back, errors before Ray starts, and a real run on CPU tracked in MLflow, then resumed."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from pipelines.data.manifest import read_manifest, write_manifest
from pipelines.train.config import CONFIG_DIR, TrainConfig
from spai_cli.main import main as spai
from spai_core.config import ConfigError, load_config
from tune.benchmark.matrix import build_matrix
from tune.benchmark.sets import training_sets

TINY = str(CONFIG_DIR / "tiny.yaml")


def manifest_rows(generators=("a", "b", "c"), test_reals: int = 2) -> list[dict]:
    """Two reals and one fake per generator in train and val; ``test_reals`` reals and a fake per generator in test."""
    rows = []
    for split in ("train", "val", "test"):
        reals = test_reals if split == "test" else 2
        rows += [{"uri": f"/x/{split}/real{i}.png", "label": 0, "split": split, "generator": "real", "source": "s",
                  "group": f"{split}r{i}"} for i in range(reals)]
        rows += [{"uri": f"/x/{split}/{g}.png", "label": 1, "split": split, "generator": g, "source": "s",
                  "group": f"{split}{g}"} for g in generators]
    return rows


# ----------------------------------------------------------------------------------------------- rows (fast)


def test_each_row_trains_on_its_generators_and_every_real_of_train_and_val():
    table = pa.Table.from_pylist(manifest_rows())
    one = training_sets(["a", "b", "c"], None, leave_one_out=False)
    assert [(s.name, s.slug, s.generators) for s in one] == [("a", "a", ("a",)), ("b", "b", ("b",)),
                                                             ("c", "c", ("c",))]
    rows = one[1].rows(table).to_pylist()
    assert sorted((r["split"], r["generator"]) for r in rows) == [("train", "b"), ("train", "real"), ("train", "real"),
                                                                  ("val", "b"), ("val", "real"), ("val", "real")]
    out = training_sets(["a", "b", "c"], ["a", "c"], leave_one_out=True)
    assert [(s.name, s.slug, s.generators) for s in out] == [("all but a", "without_a", ("c",)),
                                                             ("all but c", "without_c", ("a",))]
    assert {r["generator"] for r in training_sets(["a", "b", "c"], None, True)[0].rows(table).to_pylist()} == {
        "real", "b", "c"}
    with pytest.raises(ConfigError, match=r"\['z'\] have no AI-generated images in the manifest's train split; it "
                                          "has a, b, c"):
        training_sets(["a", "b", "c"], ["a", "z"], leave_one_out=False)
    with pytest.raises(ConfigError, match="--leave-one-out needs two or more training generators"):
        training_sets(["a"], None, leave_one_out=True)


# ----------------------------------------------------------------------------------------------- matrix (fast)


def scored(seed: int, columns: list[str]) -> pa.Table:
    """A score table like a row's test_scores.parquet: random test scores, a failed row, and train rows (which a
    test matrix must ignore)."""
    rng = np.random.default_rng(seed)
    rows = [{"label": 0, "generator": "real", "split": "test", "score": float(s), "error": None}
            for s in rng.uniform(0, 0.7, 12)]
    rows += [{"label": 1, "generator": g, "split": "test", "score": float(s), "error": None}
             for g in columns for s in rng.uniform(0.2, 1.0, 6)]
    rows += [{"label": 1, "generator": columns[0], "split": "test", "score": None, "error": "truncated: cut"},
             {"label": 1, "generator": columns[0], "split": "train", "score": 0.0, "error": None}]
    return pa.Table.from_pylist(rows)


def cell(table: pa.Table, generator: str, threshold: float) -> tuple[float, float]:
    """AUC and accuracy of a generator's test fakes against the test reals, by scikit-learn and by hand."""
    rows = [r for r in table.to_pylist() if r["split"] == "test" and r["error"] is None
            and (r["label"] == 0 or r["generator"] == generator)]
    labels, scores = np.array([r["label"] for r in rows]), np.array([r["score"] for r in rows])
    return roc_auc_score(labels, scores), float(np.mean((scores > threshold) == labels))


def test_matrix_cells_means_and_files_on_known_scores(tmp_path):
    columns = ["a", "b", "c"]
    rows = training_sets(["a", "b", "c"], None, leave_one_out=False)
    tables = {"a": scored(0, columns), "b": scored(1, columns), "c": None}  # c's trial failed
    matrix = build_matrix(rows, columns, tables, 0.6, {"c": "out of memory"})
    expected = {m: np.full((3, 3), np.nan) for m in ("auc", "accuracy")}
    for i, row in enumerate("ab"):
        for j, column in enumerate(columns):
            expected["auc"][i, j], expected["accuracy"][i, j] = cell(tables[row], column, 0.6)
    for metric in expected:
        np.testing.assert_allclose(matrix.values[metric], expected[metric])
    auc = expected["auc"]
    assert matrix.mean("auc", seen=True) == pytest.approx((auc[0, 0] + auc[1, 1]) / 2)  # the diagonal
    assert matrix.mean("auc", seen=False) == pytest.approx(np.mean([auc[0, 1], auc[0, 2], auc[1, 0], auc[1, 2]]))
    np.testing.assert_allclose(matrix.row_means("auc"), [auc[0].mean(), auc[1].mean(), np.nan])
    np.testing.assert_allclose(matrix.column_means("auc"), auc[:2].mean(axis=0))  # the failed row is left out
    notes = " ".join(matrix.notes)
    assert "c: no model to test (out of memory)" in notes and "a: 1 test image(s) failed to score" in notes

    table = list(csv.reader(matrix.csv("auc").splitlines()))
    assert table[0] == ["train_on", "a", "b", "c", "mean"] and [r[0] for r in table[1:]] == ["a", "b", "c", "mean"]
    assert [float(v) for v in table[1][1:4]] == pytest.approx(list(auc[0])) and table[3][1:] == ["", "", "", ""]
    markdown = matrix.markdown("Cross-generator benchmark t")
    assert f"| a | **{auc[0, 0]:.3f}** | {auc[0, 1]:.3f} |" in markdown
    assert f"Mean over seen cells {matrix.mean('auc', True):.3f}" in markdown
    assert matrix.heatmap_png("t")[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------------------- config (fast)


@pytest.fixture()
def fake_manifest(tmp_path) -> str:
    return write_manifest(manifest_rows(), str(tmp_path / "m"), {"builder": "test"})


def test_the_saved_config_reruns_the_benchmark_and_each_row_gets_its_manifest(fake_manifest, tmp_path, monkeypatch):
    import tune.benchmark.cross_generator as xgen

    searches = []  # what each run would have handed to Tune
    monkeypatch.setattr(xgen, "start_ray", lambda cfg: 1)  # no Ray: nothing here needs one
    monkeypatch.setattr(xgen, "make_tuner", lambda search, rows, options: searches.append((search, rows)))
    monkeypatch.setattr(xgen, "fit_trials", lambda tuner, search, options: [])  # no trial ran: empty cells
    command = ["benchmark", "cross-generator", "--config", TINY, "-m", fake_manifest, "-o", str(tmp_path / "out"),
               "--leave-one-out", "--generators", "a", "b", "--no-mlflow", "batch_size=2", "epochs=3"]
    assert spai([*command, "--name", "x"]) == 0
    (search, rows), bench = searches[0], tmp_path / "out" / "x"
    assert [r.slug for r in rows] == ["without_a", "without_b"]
    assert search.cfg.train.batch_size == 2 and search.cfg.leave_one_out and search.cfg.generators == ["a", "b"]
    assert load_config(TrainConfig, TINY, ["batch_size=2", "epochs=3"]) == search.cfg.train
    trained = read_manifest(str(bench / "manifests" / "without_a")).to_pylist()
    assert sorted({(r["split"], r["generator"]) for r in trained}) == [("train", "b"), ("train", "real"),
                                                                       ("val", "b"), ("val", "real")]
    with (bench / "auc.csv").open() as f:  # every cell empty: no trial left test scores
        assert list(csv.reader(f))[0] == ["train_on", "a", "b", "c", "mean"]
    assert "all but a: no model to test" in (bench / "cross_generator.md").read_text()

    assert spai(["benchmark", "cross-generator", "--config", str(bench / "config.yaml"), "--name", "again"]) == 0
    assert dataclasses.replace(searches[1][0].cfg, name="x") == search.cfg
    assert spai([*command, "--name", "x"]) == 2  # a taken name


@pytest.mark.parametrize("values, message", [
    (["--threshold", "1"], "error: --threshold (threshold): must be strictly between 0 and 1"),
    (["--generators", "a", "z"], "error: --generators (generators): generator(s) ['z'] have no AI-generated images "
                                 "in the manifest's train split; it has a, b, c"),
    (["--leave-one-out", "--generators", "a"], "error: --generators (generators): --leave-one-out needs two or "
                                               "more generators"),
    (["batch_size=64"], "error: training set a: the manifest's train split has 3 image(s), less than one batch"),
    (["--workers-per-trial", "0"], "error: --workers-per-trial (workers_per_trial): must be at least 1, got 0"),
    (["--resume"], "error: --resume needs the --name of the benchmark"),
])
def test_a_wrong_value_fails_before_ray_starts_naming_the_flag(values, message, fake_manifest, tmp_path, capsys):
    import ray

    assert spai(["benchmark", "cross-generator", "--config", TINY, "-m", fake_manifest, "-o", str(tmp_path / "o"),
                 "--no-mlflow", *values]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not ray.is_initialized(), err
    assert not (tmp_path / "o").exists()


def test_a_test_split_without_reals_is_refused(tmp_path, capsys):
    manifest = write_manifest(manifest_rows(test_reals=0), str(tmp_path / "m"), {"builder": "test"})
    assert spai(["benchmark", "cross-generator", "--config", TINY, "-m", manifest, "--no-mlflow"]) == 2
    assert "error: --manifest (manifest): the manifest's test split has 3 row(s) but needs real and AI-generated " \
           "images" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- real run (slow)


def mtimes(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_cross_generator_benchmark_trains_tests_tracks_and_resumes(small_corpus, tmp_path):
    """One row (a one-epoch model of one of the small corpus's two generators: a seen and an unseen column) as a
    real trial, tracked, then resumed. The grid over several rows is the fast test's above."""
    import ray
    from mlflow.tracking import MlflowClient

    ray.shutdown()  # a Ray left by another test may be too small for a trial and its scoring
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    command = ["benchmark", "cross-generator", "--config", TINY, "-m", small_corpus, "-o", str(out), "--name", "b",
               "--generators", "waifu2x_upconv7", "--mlflow-uri", uri, "epochs=1", "augment.views=1",
               "keep_checkpoints=1"]
    try:
        assert spai(command) == 0
        bench = out / "b"
        manifest = read_manifest(small_corpus).to_pylist()
        generators = sorted({r["generator"] for r in manifest if r["label"] == 1})
        with (bench / "auc.csv").open() as f:
            table = list(csv.reader(f))
        rows = ["waifu2x_upconv7"]
        assert table[0] == ["train_on", *generators, "mean"] and [r[0] for r in table[1:]] == [*rows, "mean"]
        assert len(generators) == 2  # a seen and an unseen column
        for i, row in enumerate(rows):
            run = bench / "train" / row
            # the row's model trained on its manifest: its generator's fakes and the reals, nothing of the test split
            assert load_config(TrainConfig, run / "config.yaml").manifest == str(bench / "manifests" / row)
            trained = read_manifest(str(bench / "manifests" / row)).to_pylist()
            assert {r["generator"] for r in trained} == {"real", row} and {r["split"] for r in trained} <= {"train",
                                                                                                          "val"}
            # ...and scored the whole test split, whose AUCs the matrix holds
            scores = pq.read_table(run / "test_scores.parquet")
            assert scores.num_rows == sum(r["split"] == "test" for r in manifest)
            for j, column in enumerate(generators):
                assert float(table[i + 1][j + 1]) == pytest.approx(cell(scores, column, 0.5)[0], abs=1e-5)

        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("spai-benchmark").experiment_id])
        (parent,) = [r for r in runs if r.data.tags.get("spai.kind") == "cross_generator"]
        assert parent.info.status == "FINISHED" and "auc_seen_mean" in parent.data.metrics
        children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert sorted(children) == rows
        for j, column in enumerate(generators):
            assert children[rows[0]].data.metrics[f"test_auc_{column}"] == pytest.approx(float(table[1][j + 1]),
                                                                                          abs=1e-5)
        assert {"auc.csv", "accuracy.csv", "cross_generator.md", "cross_generator.png"} <= {
            a.path for a in client.list_artifacts(parent.info.run_id)}

        # resuming the finished benchmark trains and scores nothing again
        before = mtimes(bench / "train")
        ray.shutdown()
        assert spai(["benchmark", "cross-generator", "--resume", "-o", str(out), "--name", "b"]) == 0
        assert mtimes(bench / "train") == before
        assert len(client.search_runs([parent.info.experiment_id])) == 2
        assert json.loads((bench / "spai_search.json").read_text())["mlflow_run_id"] == parent.info.run_id
        assert not math.isnan(float(table[-1][-1]))
    finally:
        ray.shutdown()
