"""``spai tune``: the search-space schema, and a real ASHA search on CPU tracked in MLflow, then resumed.

On two CPU cores no trial learns anything in three epochs of a few images, so a search over learning rates would
leave ASHA's decisions to noise. The end-to-end test makes them known in advance instead: learning rates are tiny,
so each trial's validation AUC stays its initial model's, which depends on the seed only. The test measures that
AUC per seed in-process and grids the seeds best-first; the third trial starts after one of the first two has
passed the first rung with a higher AUC, so ASHA must stop it there.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from polling import wait_for
from pipelines.data.decode import decode_image
from pipelines.data.manifest import read_manifest, write_manifest
from pipelines.demo.corpus import DemoCorpusConfig, build_demo_corpus
from pipelines.infra.runtime import remove_orphaned_placement_groups
from pipelines.train.config import CONFIG_DIR, TrainConfig
from spai_cli.main import build_parser
from spai_cli.main import main as spai
from spai_cli.options import config_from_args
from spai_core.checkpoint import CheckpointError, load_model, save_checkpoint
from spai_core.config import ConfigError, check_config, from_dict, load_config, read_yaml, to_dict
from spai_core.metrics import binary_metrics
from spai_core.spai import build_model
from tune.config import DEFAULT_SPACE, TuneConfig, search_layers
from tune.report import TIME_ATTR, SearchResult, epoch_history, trial_status
from tune.search import check_metric
from tune.space import SearchSpace, check_space, trial_config, tune_param_space

MAX_T = 3
# Training that leaves the seeded initial weights as they are (see the module docstring); one view keeps steps cheap.
# No descriptor_norm: its running statistics would change the model in training mode whatever the learning rate.
OVERRIDES = ["batch_size=8", "patience=null", "keep_checkpoints=2", "augment.views=1", "optim.warmup_epochs=0",
             "optim.lr=1e-10", "optim.warmup_lr=1e-10", "optim.min_lr=1e-10", "model.descriptor_norm=false"]


def tiny(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, CONFIG_DIR / "tiny.yaml", overrides)


def base_dict(**changes) -> dict:
    return {**to_dict(tiny()), **changes}


def space_from_dict(data: dict) -> SearchSpace:
    """A search space as ``spai tune`` reads one: typed, then checked."""
    return check_config(from_dict(SearchSpace, data))


# ----------------------------------------------------------------------------------------------- schema (fast)


def test_space_schema_and_errors(tmp_path):
    space = space_from_dict(read_yaml(DEFAULT_SPACE))
    base = base_dict(epochs=space.scheduler.max_t, workers=1)
    check_space(space, base)
    assert set(tune_param_space(space)) == set(space.params)
    assert space.params["model.mask_radius"].probes() == [8, 32]  # randint ends are both included
    cfg = trial_config(base, {"optim.lr": np.float64(2e-4), "model.mask_radius": np.int64(24)})
    assert cfg.optim.lr == 2e-4 and cfg.model.mask_radius == 24 and type(cfg.model.mask_radius) is int

    def error(params: dict, scheduler: dict | None = None) -> str:
        with pytest.raises(ConfigError) as info:
            check_space(space_from_dict({"params": params, "scheduler": scheduler or {"max_t": 4}}), base)
        return str(info.value)

    assert error({}).startswith("params: must map dotted training-config paths to distributions")

    assert "'optim.lrr' is not a training config field" in error({"optim.lrr": {"type": "uniform", "low": 0,
                                                                                "high": 1}})
    assert "optim has" in error({"optim.lrr": {"type": "uniform", "low": 0, "high": 1}})
    assert "is a section" in error({"optim": {"type": "choice", "values": [1]}})
    assert "integer; use randint" in error({"model.mask_radius": {"type": "uniform", "low": 8, "high": 32}})
    assert "scheduler.max_t" in error({"epochs": {"type": "randint", "low": 1, "high": 3}})
    assert "--workers-per-trial" in error({"workers": {"type": "choice", "values": [1, 2]}})
    assert "finetune='nope'" in error({"finetune": {"type": "choice", "values": ["full", "nope"]}})
    assert "low > 0" in error({"optim.lr": {"type": "loguniform", "low": 0, "high": 1}})
    assert "grace_period < max_t" in error({"optim.lr": {"type": "uniform", "low": 0, "high": 1}},
                                           {"max_t": 2, "grace_period": 2})
    with pytest.raises(ConfigError, match="unknown key"):
        space_from_dict({"params": {"optim.lr": {"type": "uniform", "low": 0, "high": 1, "step": 2}}})
    with pytest.raises(ConfigError, match="not one of"):
        space_from_dict({"params": {"optim.lr": {"type": "normal", "low": 0, "high": 1}}})


def test_a_scheduler_metric_training_never_reports_is_refused():
    manifest = pa.table({"split": ["train", "train", "val", "val", "val"], "label": [0, 1, 0, 1, 1],
                         "generator": ["real", "sdv5", "real", "sdv5", "glide"]})
    for metric in ("val_auc", "val_loss", "best_val_auc", "val_ece", "val_auc_glide", "val_accuracy_sdv5"):
        check_metric(metric, manifest)
    for metric in ("val_acu", "val_auc_midjourney", "val_auc_real"):
        with pytest.raises(ConfigError, match=f"space.scheduler.metric: '{metric}' is not reported.*val_auc_glide"):
            check_metric(metric, manifest)


def test_every_trial_gets_the_init_weights_and_a_bad_file_fails_before_the_search(tmp_path, monkeypatch):
    import tune.search

    rows = [{"uri": f"/x/{i}.png", "label": i % 2, "split": split, "generator": "g" if i % 2 else "real",
             "source": "s", "group": str(i)} for i, split in enumerate(["train", "train", "val", "val"])]
    manifest = write_manifest(rows, str(tmp_path / "m"), {"builder": "test"})
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"params": {"optim.lr": {"type": "uniform", "low": 1e-4,
                                                                                 "high": 1e-3}},
                                                         "scheduler": {"max_t": 3}}))
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "init.safetensors", build_model(tiny().model))
    searches = []  # what each run_search would have handed to Tune
    monkeypatch.setattr(tune.search, "start_ray", lambda cfg: 1)  # no Ray: nothing here needs one
    monkeypatch.setattr(tune.search, "make_tuner", lambda search, options: None)

    def no_trials(tuner, search, options) -> SearchResult:
        searches.append(search)
        return SearchResult(search.dir, [], None, None, None, search.parent_run_id, search.tracking_uri)

    monkeypatch.setattr(tune.search, "_fit", no_trials)
    monkeypatch.chdir(tmp_path)
    command = ["tune", "--config", str(CONFIG_DIR / "tiny.yaml"), "--manifest", manifest, "--space", "space.yaml",
               "--trials", "1", "--max-concurrent", "1", "--output", "out", "--mlflow-uri",
               f"sqlite:///{tmp_path}/mlflow.db", "batch_size=2"]
    assert spai([*command, "--name", "s", "--init", "init.safetensors"]) == 0
    (search,) = searches
    assert search.setup.base["init"] == str(tmp_path / "init.safetensors") and search.setup.base["backbone_weights"] \
        is None
    assert search.setup.base["batch_size"] == 2 and search.setup.base["epochs"] == 3

    # the saved config is the whole search: --config of it runs the same one again (under another name)
    assert spai(["tune", "--config", str(tmp_path / "out" / "s" / "config.yaml"), "--name", "again"]) == 0
    assert dataclasses.replace(searches[1].cfg, name="s") == search.cfg
    assert searches[1].dir == str(tmp_path / "out" / "again")

    (tmp_path / "bad.safetensors").write_bytes(b"<html>404</html>")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        tune.search.run_search(load_config(TuneConfig, search_layers(str(CONFIG_DIR / "tiny.yaml"), "space.yaml"),
                                           ["train.batch_size=2"], {"manifest": manifest, "output": "out",
                                                                    "name": "t", "init": "bad.safetensors"}))
    assert not (tmp_path / "out" / "t").exists()


@pytest.mark.parametrize("values, message", [
    (["--workers-per-trial", "0"], "error: --workers-per-trial (workers_per_trial): must be at least 1, got 0"),
    (["--gpus-per-worker", "-1"], "error: --gpus-per-worker (gpus_per_worker): must be 0 or more, got -1.0"),
    (["--trials", "0"], "error: --trials (trials): must be at least 1, got 0"),
    (["--workers-per-trial", "5"], "error: --workers-per-trial (workers_per_trial): the base training config does "
                                   "not fit 5 worker(s) per trial"),  # 5 workers cannot split batch_size=8
    (["batch_size=-4"], "error: train.batch_size: must be at least 1, got -4"),
])
def test_a_wrong_value_fails_before_ray_starts_naming_the_flag(values, message, tmp_path, capsys):
    import ray

    assert spai(["tune", "--config", str(CONFIG_DIR / "tiny.yaml"), "--manifest", str(tmp_path / "m"), "--output",
                 str(tmp_path / "out"), *values]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not ray.is_initialized(), err


@pytest.mark.parametrize("values, message", [
    (["--manifest", "m"], "error: --manifest (manifest): fusion trials read a feature table: pass --features"),
    ([], "error: --features (features): no feature table of `spai fusion extract` given"),
    (["--features", "f", "head.kind=early"], "error: fusion.head.kind: kind must be one of late, logit"),
    (["--features", "f", "--init", "w.safetensors"], "error: --init (init): fusion trials train a head on frozen"),
])
def test_a_fusion_search_refuses_what_does_not_apply_to_a_head_before_ray_starts(values, message, tmp_path, capsys):
    import ray

    assert spai(["tune", "--config", str(CONFIG_DIR / "fusion.yaml"), "--output", str(tmp_path / "out"),
                 *values]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not ray.is_initialized(), err
    assert spai(["tune", "--config", str(CONFIG_DIR / "tiny.yaml"), "--features", "f"]) == 2
    assert "--features is for a fusion head search" in capsys.readouterr().err


def test_concurrency_leaves_each_node_a_cpu_for_decoding(monkeypatch):
    import tune.search

    def cluster(*node_cpus: float, gpus: float = 0.0) -> None:
        nodes = [{"Alive": True, "Resources": {"CPU": c}} for c in node_cpus]
        monkeypatch.setattr(tune.search.ray, "nodes", lambda: nodes)
        monkeypatch.setattr(tune.search.ray, "cluster_resources", lambda: {"CPU": sum(node_cpus), "GPU": gpus})

    cluster(2.0, 2.0, 2.0)  # three trials would hold a CPU on each node and starve their decode tasks (seen: a hang)
    assert tune.search.default_concurrency(1.01, 0) == 1
    cluster(5.0)  # a local Ray sized for two trials
    assert tune.search.default_concurrency(1.01, 0) == 2
    cluster(0.0, 48.0, 48.0, gpus=8)
    assert tune.search.default_concurrency(4.01, 1) == 8


def test_trial_status_follows_tunes_record_not_late_epochs():
    """A trial ASHA stopped at a rung of max_t - 1 may still log epoch max_t to MLflow; Tune's last result says
    what happened."""
    assert trial_status(False, {TIME_ATTR: 4, "stale_epochs": 0}, max_t=5, patience=None) == "stopped_early"
    assert trial_status(False, {TIME_ATTR: 5, "stale_epochs": 0}, max_t=5, patience=None) == "completed"
    assert trial_status(False, {TIME_ATTR: 3, "stale_epochs": 3}, max_t=5, patience=2) == "completed"  # own patience
    assert trial_status(False, {TIME_ATTR: 3, "stale_epochs": 2}, max_t=5, patience=2) == "stopped_early"
    assert trial_status(False, None, max_t=5, patience=2) == "stopped_early"
    assert trial_status(True, {TIME_ATTR: 5}, max_t=5, patience=None) == "failed"


def test_an_untracked_search_reads_its_trials_curves_from_tunes_record():
    """--no-mlflow: no MLflow run to read a trial's epochs from, so Tune's own record of its reports gives them."""
    import pandas as pd
    from types import SimpleNamespace

    frame = pd.DataFrame({"epoch": [0, 1], "val_auc": [0.5, 0.75], "stale_epochs": [0, 0], "lr": [1e-3, 1e-4]})
    history = epoch_history(SimpleNamespace(metrics_dataframe=frame), None, None, ("val_auc", "stale_epochs"))
    assert history == {0: {"val_auc": 0.5, "stale_epochs": 0.0}, 1: {"val_auc": 0.75, "stale_epochs": 0.0}}


# ----------------------------------------------------------------------------------------------- search (slow)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    """10 photos, reals and autoencoder fakes only: 20 train and 12 val images, built in ~15 s."""
    cfg = DemoCorpusConfig(seed=3, max_photos=10, reals_per_photo=2, fakes_per_generator=2, max_side=320,
                           split_fractions=[0.5, 0.3, 0.2], generators=["autoencoder"],
                           seen_generators=["autoencoder"], autoencoder_iterations=60)
    return build_demo_corpus(tmp_path_factory.mktemp("tune") / "corpus", cfg, progress=False)


def initial_val_aucs(cfg: TrainConfig, manifest: str, seeds: range) -> dict[int, float]:
    """Validation AUC of the model a ``spai train`` rank 0 starts from, per seed, scored in-process."""
    rows = [r for r in read_manifest(manifest).to_pylist() if r["split"] == "val"]
    images = [torch.from_numpy(decode_image(Path(r["uri"]).read_bytes())[0].copy()).permute(2, 0, 1).float() / 255
              for r in rows]
    labels = np.array([r["label"] for r in rows])
    aucs = {}
    for seed in seeds:
        torch.manual_seed(seed)  # as train_loop seeds rank 0 right before building the model
        with torch.inference_mode():
            logits = build_model(cfg.model).eval().forward_images(images).double().numpy()
        aucs[seed] = float(binary_metrics(labels, 1 / (1 + np.exp(-logits)))["auc"])
    return aucs


def read_table(search: Path) -> list[dict]:
    return list(csv.DictReader((search / "trials.csv").read_text().splitlines()))


@pytest.mark.slow
def test_asha_search_mlflow_and_resume(manifest, tmp_path, monkeypatch):
    import ray
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.shutdown()  # a Ray left by another test may be too small for two trials
    base = tiny(*OVERRIDES)
    aucs = initial_val_aucs(base, manifest, range(5))
    ranked = sorted(aucs, key=aucs.get, reverse=True)
    seeds = ranked[:2] + [ranked[-1], ranked[-2]]  # the two best start together; the worst comes third
    # A mask radius moves these AUCs by at most one 1/36 step here; keep a margin well above that.
    assert aucs[seeds[1]] - aucs[seeds[2]] >= 0.1, f"seeds 0-4 give too similar initial AUCs: {aucs}"
    space = {"seed": 7, "scheduler": {"max_t": MAX_T, "grace_period": 1, "reduction_factor": 2},
             "params": {"seed": {"type": "grid", "values": seeds},
                        "optim.lr": {"type": "loguniform", "low": 1e-11, "high": 1e-10},
                        "model.mask_radius": {"type": "randint", "low": 8, "high": 32}}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = ["tune", "--config", str(CONFIG_DIR / "tiny.yaml"), "--manifest", manifest, "--space",
               str(tmp_path / "space.yaml"), "--trials", "1", "--max-concurrent", "2", "--workers-per-trial", "1",
               "--output", str(tmp_path / "out"), "--name", "search", "--mlflow-uri", uri, *OVERRIDES]
    search = tmp_path / "out" / "search"
    try:
        assert spai(command) == 0
        rows = read_table(search)
        trial_dirs = sorted(p.name for p in search.iterdir() if p.is_dir() and p.name != "train")
        train_dirs = sorted(p.name for p in (search / "train").iterdir())

        # ASHA: every trial reported each epoch; the third trial (worst seed) was stopped at the first rung
        assert [int(r["seed"]) for r in rows] == seeds  # trial ids follow the grid order
        assert len(rows) == 4 and sorted(r["trial_id"] for r in rows) == trial_dirs == train_dirs
        epochs = {r["trial_id"]: int(r["epochs"]) for r in rows}
        stopped = [r["trial_id"] for r in rows if r["status"] == "stopped_early"]
        assert all(r["status"] in ("completed", "stopped_early") for r in rows), rows
        # ASHA stopped the third trial on its first result (Tune's own record of what it saw). Its Train run trains
        # on while the stop travels back, so at most one more epoch may have been trained (and logged) by then.
        seen = [json.loads(line)[TIME_ATTR] for line in (search / rows[2]["trial_id"] / "result.json").open()]
        assert rows[2]["status"] == "stopped_early" and seen == [1] and epochs[rows[2]["trial_id"]] in (1, 2)
        assert all(epochs[t] < MAX_T for t in stopped)
        assert all(epochs[r["trial_id"]] == MAX_T for r in rows if r["status"] == "completed")
        assert any(r["status"] == "completed" for r in rows)
        print("trials:", [(r["trial_id"], r["seed"], r["model.mask_radius"], r["status"], r["epochs"],
                           r["best_val_auc"]) for r in rows])

        # each trial's checkpoint is a model with the mask radius the trial sampled
        for row in rows:
            model, _ = load_model(row["checkpoint"])
            assert model.cfg.mask_radius == int(row["model.mask_radius"])
        best = max(rows, key=lambda r: float(r["best_val_auc"]))
        assert load_model(search / "best.safetensors")[0].cfg.mask_radius == int(best["model.mask_radius"])

        # the best config is a ready training config (manifest included), and `spai train` accepts it
        best_cfg = load_config(TrainConfig, search / "best_config.yaml")
        assert (best_cfg.seed, best_cfg.model.mask_radius, best_cfg.epochs, best_cfg.manifest) == (
            int(best["seed"]), int(best["model.mask_radius"]), MAX_T, manifest)
        assert math.isclose(best_cfg.optim.lr, float(best["optim.lr"]))
        assert best_cfg.registered_model == "spai" and best_cfg.tracking.experiment == "spai-train"
        args = build_parser("train").parse_args(["train", "--config", str(search / "best_config.yaml")])
        assert config_from_args(TrainConfig, args) == best_cfg

        # MLflow: one parent run with the results, a child run per trial tagged with its outcome
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("spai-tune").experiment_id])
        parents = [r for r in runs if r.data.tags.get("spai.kind") == "tune"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        parent = parents[0].info.run_id
        children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}
        assert sorted(children) == trial_dirs
        for row in rows:
            child = children[row["trial_id"]]
            assert child.data.tags["spai.tune.status"] == row["status"]
            assert child.info.status == ("FINISHED" if row["status"] == "completed" else "KILLED")
            assert len(client.get_metric_history(child.info.run_id, "val_auc")) == int(row["epochs"])
            assert child.data.params["model.mask_radius"] == row["model.mask_radius"]
        artifacts = {a.path for a in client.list_artifacts(parent)}
        assert {"trials.csv", "val_auc.png", "best_config.yaml", "model"} <= artifacts
        # one registered model version per search (the best trial's weights, on the parent run), none per trial
        versions = client.search_model_versions("name = 'spai'")
        assert [v.run_id for v in versions] == [parent]
        assert (search / "val_auc.png").read_bytes()[:4] == b"\x89PNG"

        # resuming the finished search runs nothing again
        assert spai(["tune", "--resume", "--manifest", manifest, "--output", str(tmp_path / "out"), "--name",
                     "search"]) == 0
        assert sorted(p.name for p in search.iterdir() if p.is_dir() and p.name != "train") == trial_dirs
        assert sorted(p.name for p in (search / "train").iterdir()) == train_dirs
        assert {r["trial_id"]: int(r["epochs"]) for r in read_table(search)} == epochs
        runs = client.search_runs([client.get_experiment_by_name("spai-tune").experiment_id])
        assert len(runs) == 1 + len(rows)
        assert len(client.search_model_versions("name = 'spai'")) == 1
    finally:
        ray.shutdown()


@pytest.mark.usefixtures("ray_session")
def test_a_dead_actors_placement_group_is_removed_and_a_drivers_kept():
    """What a killed trial's Train run leaves (a placement group whose creator actor died) is freed; the driver's
    own groups, and those of live actors, are not. Left in place, the first kept the shared 2-CPU Ray's next job
    waiting for a CPU forever."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    @ray.remote(num_cpus=0)
    class Creator:
        def create(self) -> str:
            group = placement_group([{"CPU": 0.5}])
            ray.get(group.ready())
            return group.id.hex()

    creator = Creator.remote()
    orphan = ray.get(creator.create.remote())
    own = placement_group([{"CPU": 0.5}])
    ray.get(own.ready())
    try:
        assert remove_orphaned_placement_groups() == 0  # its creator is alive
        ray.kill(creator)
        assert wait_for(remove_orphaned_placement_groups, 30, "the dead actor's placement group to go") == 1
        states = {group: placement_group_table()[group]["state"] for group in (orphan, own.id.hex())}
        assert states == {orphan: "REMOVED", own.id.hex(): "CREATED"}
    finally:
        remove_placement_group(own)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_fusion_head_search_checks_its_space_against_the_fusion_config(fusion_features, tmp_path, mlflow_store,
                                                                         capsys):
    """The same search over a Sem-SPAI head (`spai fusion train` trials, inferred from the fusion recipe): a grid of
    the two head kinds on a tiny feature table, ASHA off its rungs, one parent MLflow run with a child per trial."""
    from mlflow.tracking import MlflowClient

    from pipelines.fusion.config import FUSION_RECIPE, FusionTrainConfig
    from spai_core.fusion import load_fused

    space = {"scheduler": {"max_t": 2, "grace_period": 1},
             "params": {"head.kind": {"type": "grid", "values": ["late", "logit"]},
                        "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-3}}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    recipe = {**read_yaml(FUSION_RECIPE), "head": {"proj_dim": 16, "fusion_dim": 32}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    command = ["tune", "--config", str(tmp_path / "recipe.yaml"), "--features", str(fusion_features),
               "--trials", "1", "--output", str(tmp_path / "out"), "--name", "heads"]
    # the space's keys are checked against the fusion config, not spai train's
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**space, "params": {"model.mask_radius": {
        "type": "randint", "low": 8, "high": 32}}}))
    assert spai([*command, "--space", str(tmp_path / "bad.yaml")]) == 2
    assert "'model.mask_radius' is not a training config field" in capsys.readouterr().err

    # KEY=VALUE set fields of the fusion recipe, as they set spai train's in a spai search
    assert spai([*command, "--space", str(tmp_path / "space.yaml"), "batch_size=8"]) == 0
    search = tmp_path / "out" / "heads"
    rows = read_table(search)
    # ASHA may stop the worse head at the rung of epoch 1; the best trial trained both epochs and exported its head
    assert [r["head.kind"] for r in rows] == ["late", "logit"]
    assert all(r["status"] in ("completed", "stopped_early") for r in rows)
    best = max(rows, key=lambda r: (float(r["best_val_auc"]), r["status"] == "completed"))  # a tie: the one ASHA kept
    assert best["status"] == "completed" and int(best["epochs"]) == 2
    model, _ = load_fused(search / "best.safetensors")
    assert model.head.cfg.kind == best["head.kind"]
    best_cfg = load_config(FusionTrainConfig, search / "best_config.yaml")
    assert (best_cfg.head.kind, best_cfg.features, best_cfg.epochs, best_cfg.batch_size) == (
        best["head.kind"], str(fusion_features), 2, 8)
    assert "spai fusion train --config" in (search / "best_config.yaml").read_text()

    client = MlflowClient(mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("spai-tune").experiment_id])
    (parent,) = [r.info.run_id for r in runs if r.data.tags.get("spai.kind") == "tune"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}
    assert sorted(children) == sorted(r["trial_id"] for r in rows)
    for row in rows:
        child = children[row["trial_id"]]
        assert child.data.tags["spai.tune.status"] == row["status"]
        assert child.info.status == ("FINISHED" if row["status"] == "completed" else "KILLED")
