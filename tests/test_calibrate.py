"""``spai calibrate``: thresholds for a target FPR and for the best balanced accuracy on known scores, stored in the
checkpoint's metadata without touching its weights; refusals of tables that cannot calibrate these weights; and
``spai score`` applying the stored threshold."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pipelines.calibrate.config import CalibrateConfig
from pipelines.calibrate.job import calibrate
from pipelines.infra.settings import TrackingConfig
from pipelines.score.job import ScoreConfig, score
from spai_cli.main import main as cli
from spai_core import calibration
from spai_core.checkpoint import CheckpointError, load_model, read_metadata, save_checkpoint, update_metadata
from spai_core.detector import file_sha256
from spai_core.spai import build_model


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_checkpoint(path, build_model("spai_tiny"), {"run": "tiny-run", "epoch": 2})
    return path


SCHEMA = pa.schema([("uri", pa.string()), ("label", pa.int64()), ("generator", pa.string()), ("split", pa.string()),
                    ("score", pa.float64()), ("error", pa.string()), ("model_id", pa.string())])


def score_table(model_id: str, real: list[float], fake: list[float], split: str = "val", **extra) -> pa.Table:
    """A table like `spai score` writes for a labelled manifest."""
    n = len(real) + len(fake)
    columns = {"uri": [f"img{i}.jpg" for i in range(n)], "label": [0] * len(real) + [1] * len(fake),
               "generator": ["real"] * len(real) + ["sdxl"] * len(fake), "split": [split] * n,
               "score": real + fake, "error": [None] * n, "model_id": [model_id] * n}
    columns.update(extra)
    return pa.table(columns, SCHEMA)


# ---------------------------------------------------------------------------------------------------------------
# choosing thresholds


def test_fpr_threshold_is_the_conformal_order_statistic():
    real = np.random.default_rng(0).permutation(np.arange(1, 100) / 100)  # 0.01 ... 0.99
    # rank ceil(100 * 0.95) = 95 of 99: four reals (0.96 ... 0.99) lie above it
    assert calibration.fpr_threshold(real, 0.05) == 0.95
    assert calibration.rates(real, [0.5, 0.97], 0.95) == {"fpr": 4 / 99, "tpr": 0.5, "real_accuracy": 95 / 99,
                                                           "balanced_accuracy": (0.5 + 95 / 99) / 2}
    # too few reals for the target: the highest of them
    assert calibration.enough_reals(0.05) == 19
    assert calibration.fpr_threshold([0.2, 0.7, 0.4], 0.05) == 0.7


def test_fpr_threshold_holds_its_rate_on_new_reals():
    rng = np.random.default_rng(1)
    new = rng.beta(2, 5, 100_000)
    fprs = [np.mean(new > calibration.fpr_threshold(rng.beta(2, 5, 99), 0.05)) for _ in range(400)]
    assert abs(np.mean(fprs) - 0.05) < 0.006  # expected (n + 1 - rank) / (n + 1) = 5 / 100
    assert abs(np.std(fprs) - calibration.fpr_spread(99, 0.05)) < 0.005


def test_balanced_threshold_separates_and_sits_between_scores():
    assert calibration.balanced_threshold([0.1, 0.2, 0.3], [0.5, 0.6, 0.9]) == pytest.approx(0.4)
    # overlapping: best at 0.45 (TNR 3/4, TPR 1), half-way to the next score 0.5
    t = calibration.balanced_threshold([0.1, 0.2, 0.45, 0.7], [0.5, 0.6, 0.8])
    assert t == pytest.approx(0.475)
    assert calibration.rates([0.1, 0.2, 0.45, 0.7], [0.5, 0.6, 0.8], t)["balanced_accuracy"] == 0.875


# ---------------------------------------------------------------------------------------------------------------
# the checkpoint's metadata


def test_update_metadata_keeps_the_weights_and_loads_strictly(weights, tmp_path):
    out = tmp_path / "calibrated.safetensors"
    update_metadata(weights, out, {"threshold": {"value": 0.3}})
    model, ckpt = load_model(out)
    original, _ = load_model(weights)
    assert ckpt.metadata == {"run": "tiny-run", "epoch": 2, "threshold": {"value": 0.3}}
    assert ckpt.config == original.cfg
    state, before = model.state_dict(), original.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)
    update_metadata(out, out, {"threshold": {"value": 0.4}})  # in place
    assert read_metadata(out)["threshold"] == {"value": 0.4} and not list(tmp_path.glob("*.tmp"))


def test_official_weights_are_sent_to_convert(tmp_path):
    pth = tmp_path / "spai.pth"
    torch.save({"model": {}}, pth)
    with pytest.raises(CheckpointError, match="spai convert"):
        update_metadata(pth, tmp_path / "x.safetensors", {})


# ---------------------------------------------------------------------------------------------------------------
# spai calibrate


def test_calibrate_stores_the_threshold_tracks_and_reruns_from_its_config(weights, tmp_path, monkeypatch, capsys,
                                                                           mlflow_store):
    monkeypatch.chdir(tmp_path)
    model_id = file_sha256(weights, 16)
    real = list(np.linspace(0.05, 0.6, 40))
    table = pa.concat_tables([
        score_table(model_id, real, [0.55, 0.7, 0.8, 0.9]),
        score_table(model_id, [0.99], [0.01], split="train"),  # left out by --split
        score_table(model_id, [None], [0.3], error=["decode_failed: x", None], label=[0, None]),
    ])
    pq.write_table(table, "val.parquet")
    assert cli(["calibrate", "-w", str(weights), "--scores", "val.parquet", "--split", "val", "--target-fpr", "0.05",
                "-o", "cal.safetensors"]) == 0
    out = capsys.readouterr()
    # rank ceil(41 * 0.95) = 39 of the 40 reals; one unlabelled and one failed row left out
    threshold = read_metadata("cal.safetensors")["threshold"]
    assert threshold == {"value": sorted(real)[38], "target": "fpr=0.05",
                         "calibrated_on": str(tmp_path / "val.parquet"), "n_real": 40, "n_fake": 4}
    assert "(left out: 1 failed, 1 unlabelled rows)" in out.out
    assert "pin the FPR on new real images only to about 0.05 +- 0.034" in out.err  # 40 reals is few
    run = MlflowClient(mlflow_store).search_runs([MlflowClient(mlflow_store).get_experiment_by_name(
        "spai-calibrate").experiment_id])[0]
    assert run.data.metrics["threshold"] == threshold["value"] and run.data.params["model_id"] == model_id
    assert read_metadata(weights).get("threshold") is None  # --output leaves the original alone

    saved = yaml.safe_load(Path("cal.safetensors.calibrate.yaml").read_text())
    assert saved["weights"] == str(weights) and saved["target_fpr"] == 0.05
    Path("cal.safetensors").unlink()
    assert cli(["calibrate", "--config", "cal.safetensors.calibrate.yaml", "--no-mlflow"]) == 0
    assert read_metadata("cal.safetensors")["threshold"] == threshold
    # in place, from the table of the uncalibrated weights: the same tensors, which calibrated_from lists
    before = file_sha256(tmp_path / "cal.safetensors", 16)
    assert cli(["calibrate", "-w", "cal.safetensors", "-s", "val.parquet", "--split", "val", "--balanced",
                "--no-mlflow"]) == 0
    metadata = read_metadata("cal.safetensors")
    assert metadata["threshold"]["target"] == "balanced" and metadata["threshold"]["value"] == pytest.approx(
        (max(r for r in real if r < 0.55) + 0.55) / 2)  # TPR 1 and TNR 36/40 beat TPR 3/4 and TNR 1
    assert metadata["calibrated_from"] == sorted([model_id, before])


@pytest.mark.parametrize("case, message", [
    ("other weights", "was scored with other weights (model_id 0000000000000000)"),
    ("no reals", "has no real (label 0) images that scored"),
    ("pooled splits", "holds the splits train, val; pick the calibration split with --split"),
])
def test_calibrate_refuses_tables_that_cannot_calibrate_these_weights(weights, tmp_path, capsys, case, message):
    model_id = file_sha256(weights, 16)
    table = {"other weights": score_table("0000000000000000", [0.1, 0.2], [0.8]),
             "no reals": score_table(model_id, [], [0.8, 0.9]),
             "pooled splits": pa.concat_tables([score_table(model_id, [0.1], [0.9]),
                                                score_table(model_id, [0.2], [0.7], split="train")])}[case]
    pq.write_table(table, tmp_path / "s.parquet")
    assert cli(["calibrate", "-w", str(weights), "-s", str(tmp_path / "s.parquet"), "--balanced",
                "-o", str(tmp_path / "c.safetensors"), "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "c.safetensors").exists()


def test_calibrate_flags_are_checked_first(weights, capsys):
    for flags, message in ((["-s", "x.parquet"], "--target-fpr (target_fpr): give one target"),
                           (["-s", "x.parquet", "--target-fpr", "5"], "must be a rate strictly between 0 and 0.5"),
                           (["-s", "x.parquet", "--balanced", "-o", "x.pth"], "`spai convert` them to .safetensors")):
        assert cli(["calibrate", "-w", str(weights), *flags]) == 2
        assert message in capsys.readouterr().err


def test_too_few_reals_warn_and_take_the_highest(weights, tmp_path, caplog):
    pq.write_table(score_table(file_sha256(weights, 16), [0.2, 0.4, 0.3], [0.9]), tmp_path / "s.parquet")
    result = calibrate(CalibrateConfig(weights=str(weights), scores=str(tmp_path / "s.parquet"), target_fpr=0.05,
                                       output=str(tmp_path / "c.safetensors"), tracking=TrackingConfig(enabled=False)))
    assert result.threshold["value"] == 0.4 and "only 3 real images" in caplog.text


def test_a_sweep_calibrates_on_its_original_images(weights, tmp_path):
    model_id = file_sha256(weights, 16)
    clean = score_table(model_id, [0.1, 0.2, 0.3], [0.6, 0.7])
    jpeg = score_table(model_id, [0.9, 0.95, 0.99], [0.01, 0.02])  # would move the threshold if it counted
    table = pa.concat_tables([clean, jpeg])
    table = table.append_column("variant", pa.array(["none"] * 5 + ["jpeg=75"] * 5))
    pq.write_table(table, tmp_path / "sweep.parquet")
    cfg = CalibrateConfig(weights=str(weights), scores=str(tmp_path / "sweep.parquet"), balanced=True,
                          output=str(tmp_path / "c.safetensors"), tracking=TrackingConfig(enabled=False))
    result = calibrate(cfg)
    assert result.threshold["value"] == pytest.approx(0.45) and result.excluded["perturbed"] == 5
    assert result.threshold["n_real"] == 3 and result.threshold["n_fake"] == 2


# ---------------------------------------------------------------------------------------------------------------
# spai score with calibrated weights


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_score_predicts_with_the_calibrated_threshold(weights, photos, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for photo in [p for p in photos if p.name.startswith("skimage__")]:  # three small photos: few tiles to score
        (folder / photo.name).write_bytes(photo.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a JPEG")
    score(ScoreConfig(weights=str(weights), input=str(folder), output=str(tmp_path / "a.parquet"),
                      tracking=TrackingConfig(enabled=False)), progress=False)
    first = pq.read_table(tmp_path / "a.parquet")
    assert not {"threshold", "predicted"} & set(first.column_names)  # weights without a threshold
    scores = first.column("score").drop_null().to_numpy()
    calibrated = tmp_path / "calibrated.safetensors"
    middle = float(np.median(scores))  # some photos above, some not
    update_metadata(weights, calibrated, {"threshold": {"value": middle, "target": "balanced"}})
    score(ScoreConfig(weights=str(calibrated), input=str(folder), output=str(tmp_path / "b.parquet"),
                      tracking=TrackingConfig(enabled=False)), progress=False)
    table = pq.read_table(tmp_path / "b.parquet")
    assert table.schema.field("threshold").type == pa.float64() and table.schema.field("predicted").type == pa.int8()
    rows = table.to_pylist()
    assert all(row["threshold"] == middle for row in rows)
    assert [row["predicted"] for row in rows] == [None if row["score"] is None else int(row["score"] > middle)
                                                  for row in rows]
    assert {row["predicted"] for row in rows} == {0, 1, None}
