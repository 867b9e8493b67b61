"""Sem-SPAI end to end on real photos (the small demo corpus, tiny SPAI, a small random timm ViT): extract the
features once (deterministic, resumable), train a head with Ray Train, score images with the fused checkpoint and
evaluate it beside SPAI alone."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.evaluate.protocol import evaluate
from pipelines.evaluate.tables import read_scores
from pipelines.features.config import FeaturesConfig
from fusion_features import extract
from pipelines.features.job import INFO, PARTS, TABLE, FeaturesError, run_extraction
from pipelines.fusion.config import FUSION_RECIPE, FusionTrainConfig
from pipelines.fusion.run import run_fusion
from pipelines.infra.settings import TrackingConfig
from pipelines.score.config import ScoreConfig
from pipelines.score.job import score
from spai_core.config import ConfigError, load_config
from spai_core.fusion import load_fused

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


def test_features_are_keyed_rows_with_both_widths_and_the_models_identity(fusion_features):
    table = pq.read_table(fusion_features / TABLE)
    assert {"row_id", "uri", "label", "generator", "split", "spectral", "spai_logit", "semantic", "error"} <= set(
        table.column_names)
    assert table.schema.field("spectral").type == pa.list_(pa.float32(), 88)
    assert table.schema.field("semantic").type == pa.list_(pa.float32(), 64)
    assert len(set(table.column("row_id").to_pylist())) == table.num_rows == 48
    info = json.loads((fusion_features / INFO).read_text())
    assert info["identity"]["semantic"]["encoder"] == "timm:test_vit"
    assert (info["spectral_dim"], info["semantic_dim"]) == (88, 64)


def test_a_rerun_finds_every_row_done_and_a_lost_part_is_redone_identically(fusion_features, small_corpus,
                                                                           tiny_spai_file):
    before = pq.read_table(fusion_features / TABLE)
    again = extract(small_corpus, tiny_spai_file, fusion_features)
    assert (again.done_before, again.rows) == (48, 48)
    lost = sorted((fusion_features / PARTS).glob("part-*.parquet"))[0]
    lost_rows = pq.read_metadata(lost).num_rows
    lost.unlink()
    # how it runs may change
    resumed = extract(small_corpus, tiny_spai_file, fusion_features, workers=1, batch_size=4)
    assert resumed.done_before == 48 - lost_rows
    after = pq.read_table(fusion_features / TABLE)
    assert after.column("row_id").equals(before.column("row_id"))
    for name in ("spectral", "spai_logit", "semantic"):  # deterministic: the redone rows match bit for bit
        assert after.column(name).equals(before.column(name)), name


def test_extracting_into_a_folder_of_other_models_is_refused(fusion_features, small_corpus, tiny_spai_file):
    with pytest.raises(Exception, match="other settings.*semantic.encoder"):
        run_extraction(load_config(FeaturesConfig, None, flags={
            "manifest": small_corpus, "weights": tiny_spai_file, "output": str(fusion_features),
            "semantic": {"encoder": "timm:test_convnext"}}), show_progress=False)


def test_train_score_evaluate_end_to_end(fusion_features, small_corpus, tiny_spai_file, tmp_path, mlflow_store):
    cfg = load_config(FusionTrainConfig, FUSION_RECIPE, flags={
        "features": str(fusion_features), "output": str(tmp_path / "runs"), "name": "late", "epochs": 3,
        "batch_size": 8, "head.proj_dim": 16, "head.fusion_dim": 32, "tracking.uri": mlflow_store})
    result = run_fusion(cfg)
    assert Path(result.best_checkpoint).is_file() and (tmp_path / "runs" / "late" / "config.yaml").is_file()
    run = MlflowClient(mlflow_store).get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and "val_auc" in run.data.metrics and run.data.params["head.kind"] == "late"
    model, provenance = load_fused(result.best_checkpoint)
    assert model.head.cfg.proj_dim == 16 and provenance["run"] == "late"

    # the fused checkpoint scores images end to end, and gives the head's logit of the extracted features
    no_mlflow = TrackingConfig(enabled=False)
    fused_out, spai_out = str(tmp_path / "fused.parquet"), str(tmp_path / "spai.parquet")
    score(ScoreConfig(weights=result.best_checkpoint, input=small_corpus, output=fused_out, split="test",
                      device="cpu", tracking=no_mlflow), progress=False)
    score(ScoreConfig(weights=tiny_spai_file, input=small_corpus, output=spai_out, split="test", device="cpu",
                      tracking=no_mlflow), progress=False)
    table = pq.read_table(fusion_features / TABLE)
    test = table.filter(pc.equal(table.column("split"), "test"))
    with torch.no_grad():
        expected = model.head(*(torch.as_tensor(np.stack(test.column(c).to_numpy(zero_copy_only=False)))
                                if c != "spai_logit" else torch.as_tensor(test.column(c).to_numpy())
                                for c in ("spectral", "spai_logit", "semantic"))).numpy()
    fused, spai = read_scores(fused_out), read_scores(spai_out)
    by_uri = dict(zip(fused.column("uri").to_pylist(), fused.column("logit").to_pylist()))
    np.testing.assert_allclose([by_uri[u] for u in test.column("uri").to_pylist()], expected, atol=1e-4)
    spai_by_uri = dict(zip(spai.column("uri").to_pylist(), spai.column("logit").to_pylist()))
    np.testing.assert_allclose([spai_by_uri[u] for u in test.column("uri").to_pylist()],
                               test.column("spai_logit").to_numpy(), atol=1e-4)

    report = evaluate({"spai": spai, "fused": fused}, split="test", bootstrap=0)
    runs = {r["run"] for r in report.rows}
    assert len(runs) == 2 and all(r["auc"] == r["auc"] for r in report.rows if r["generator"] == "all")


def test_a_folder_without_a_feature_table_and_a_bad_head_are_clear_errors(tmp_path):
    with pytest.raises(FeaturesError, match="no finished feature table"):
        run_fusion(FusionTrainConfig(features=str(tmp_path), output=str(tmp_path / "runs")))
    with pytest.raises(ConfigError, match="head.kind"):
        load_config(FusionTrainConfig, FUSION_RECIPE, flags={"features": str(tmp_path), "head.kind": "early"})
