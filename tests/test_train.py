"""``spai train`` end to end: the real CLI on Ray (2 workers), held-out quality, checkpoints, failures, MLflow.

Every test runs the entry point as a subprocess, the way a user does, on the shared small demo corpus.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from safetensors.torch import load, load_file

from polling import free_port, wait_for
from pipelines.data.manifest import read_manifest, write_manifest
from pipelines.infra.storage import StorageOptions
from pipelines.infra.tracking import TrackingError, resolve_tracking_uri
from pipelines.infra.resume import check_resumable
from pipelines.train.config import CONFIG_DIR, OptimConfig, TrainConfig
from pipelines.train.epochs import best_of, epoch_metrics, failure_summary, track_best
from pipelines.train.run import RESUMABLE_CHANGES, Tracked, check_splits, export_weights, run_training
from spai_cli.main import main as spai
from spai_core.checkpoint import CheckpointError, convert, read_checkpoint, save_checkpoint
from spai_core.config import ConfigError, dump_config, load_config, to_dict
from spai_core.detector import Detector
from spai_core.metrics import binary_metrics
from spai_core.spai import build_model

pytestmark = pytest.mark.slow

SPAI = str(Path(sys.executable).with_name("spai"))
# Small batches give several steps per epoch on the small corpus; patience off so every requested epoch runs.
LEARN = ["batch_size=2", "optim.lr=3e-3", "optim.warmup_epochs=0.25", "patience=null"]
TWO_EPOCHS = ("epochs=2", "progress_every_s=0", *LEARN)  # the run the resume and reproducibility tests share
EPOCH_LINE = re.compile(r"\[spai train\] epoch (\d+):")
HEADER_LINE = re.compile(r"\[spai train\] \d+ train / \d+ val images")
PROGRESS_LINE = re.compile(r"\[spai train\] epoch (\d+) step (\d+)/(\d+) \(\d+%\): loss [\d.]+, [\d.]+ img/s, "
                           r"epoch ends in \d+:\d\d:\d\d")


def train_command(manifest: str, output: Path, name: str, *overrides: str, mlflow_uri: str | None = None,
                  resume: bool = False) -> list[str]:
    return [SPAI, "train", "--config", str(CONFIG_DIR / "tiny.yaml"), "--manifest", manifest, "--output", str(output),
            "--name", name, "--workers", "2", *(["--resume"] if resume else []),
            *(["--mlflow-uri", mlflow_uri] if mlflow_uri else []), *overrides]


def subprocess_env() -> dict[str, str]:
    # Ray's token auth would make the fresh local cluster refuse the driver; these tests own their cluster.
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def spai_train(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run to completion; stderr goes into ``stdout`` so that Ray's echo of each worker line stays adjacent."""
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


def log_lines(text: str, pattern: re.Pattern) -> list[str]:
    """Matching lines in order."""
    return [line for line in text.splitlines() if pattern.search(line)]


def printed_epochs(text: str) -> list[int]:
    return [int(EPOCH_LINE.search(line).group(1)) for line in log_lines(text, EPOCH_LINE)]


def split_logits(detector: Detector, manifest: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of one split (``test``: photos the model never saw)."""
    rows = read_manifest(manifest, split=split).to_pylist()
    images = [np.asarray(Image.open(r["uri"]).convert("RGB")) for r in rows]
    return detector.logits(images), np.array([r["label"] for r in rows])


def auc(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(binary_metrics(labels, 1 / (1 + np.exp(-logits)))["auc"])


def test_train_end_to_end(learning_corpus, tmp_path):
    epochs = 24
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = spai_train(train_command(learning_corpus, tmp_path / "runs", "e2e", f"epochs={epochs}", "patience=null",
                                    mlflow_uri=uri), tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:]
    best, last = (tmp_path / "runs" / "e2e" / f"{which}.safetensors" for which in ("best", "last"))
    assert read_checkpoint(last).metadata["epoch"] == epochs - 1

    # It learned: the last epoch's weights separate their own training images, and photos they never saw, well above
    # chance. Broken learning leaves both near 0.5 (0.38-0.56 measured before the tiny recipe was fixed; chance's
    # standard deviation is 0.06 on 84 train and 0.08 on 54 test images). Seeds 0-5 measured train 0.80-0.92 and
    # test 0.76-0.88. The best epoch by val AUC is a noisy pick on 24 validation images (often an early one, at train
    # 0.69-0.93 and test 0.66-0.83), so for it only the pick is checked.
    detector = Detector.from_pretrained(last, device="cpu", precision="fp32")
    train_auc = auc(*split_logits(detector, learning_corpus, "train"))
    test_auc = auc(*split_logits(detector, learning_corpus, "test"))
    print(f"AUC after {epochs} epochs: train {train_auc:.3f}, held-out test {test_auc:.3f}")
    assert train_auc >= 0.75 and test_auc >= 0.7, (train_auc, test_auc)

    run_id, val_auc = assert_mlflow_run(uri, "e2e", epochs)
    provenance = read_checkpoint(best).metadata
    assert val_auc[provenance["epoch"]] == max(val_auc)
    assert provenance["mlflow_run_id"] == run_id and provenance["run"] == "e2e"  # `spai score` tags its runs with it

    # The exported checkpoint reloads to identical scores; its standardised descriptors have no official layout.
    scored = [split_logits(Detector.from_pretrained(best, device="cpu", precision="fp32"), learning_corpus, "test")[0]
              for _ in range(2)]
    np.testing.assert_array_equal(*scored)
    with pytest.raises(CheckpointError, match="descriptor_norm"):
        convert(best, tmp_path / "official.pth")


def assert_mlflow_run(uri: str, name: str, epochs: int) -> tuple[str, list[float]]:
    """Per-epoch val_auc for every epoch, the best checkpoint as an artifact, and a registered model version; returns
    the run id and the val_auc of each epoch."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("spai-train")
    (run,) = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val_auc")
    assert sorted(m.step for m in history) == list(range(epochs))
    grad_norms = client.get_metric_history(run.info.run_id, "train_grad_norm_max")
    assert len(grad_norms) == epochs and all(m.value > 0 for m in grad_norms)
    assert "model/best.safetensors" in [a.path for a in client.list_artifacts(run.info.run_id, "model")]
    versions = client.search_model_versions("name = 'spai'")
    assert run.info.run_id in [v.run_id for v in versions]
    return run.info.run_id, [m.value for m in sorted(history, key=lambda m: m.step)]


def train_workers() -> list[int]:
    """Pids of live Ray Train worker processes (Ray sets their process title to ``ray::RayTrainWorker...``)."""
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return [int(line.split(None, 1)[0]) for line in ps.splitlines() if "RayTrainWorker" in line]


def test_worker_killed_mid_run_resumes_from_checkpoint(small_corpus, tmp_path):
    epochs = 3
    run_dir = tmp_path / "runs" / "killed"
    before = set(train_workers())  # other sessions' workers on a shared machine are not ours to kill
    log = tmp_path / "train.log"  # a file, not a pipe: nobody reads the output while we wait, and a full pipe blocks
    with log.open("w") as sink, subprocess.Popen(
            train_command(small_corpus, tmp_path / "runs", "killed", f"epochs={epochs}", "max_failures=2", *LEARN),
            cwd=tmp_path, env=subprocess_env(), stdout=sink, stderr=subprocess.STDOUT) as proc:
        # The checkpoint folder appears while rank 0 uploads; the controller commits it (writes its snapshot) only
        # later. Killing in between loses the checkpoint and rightly restarts at epoch 0 (seen in a run), so wait.
        def still_running(found):
            assert proc.poll() is None, f"spai train exited early:\n{log.read_text()[-4000:]}"
            return found

        wait_for(lambda: still_running((run_dir / "checkpoint_manager_snapshot.json").is_file()), 600,
                 "the first committed checkpoint")
        victim = wait_for(lambda: still_running(sorted(set(train_workers()) - before)), 60, "a training worker")[0]
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=600)
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    # A second worker group started (header printed again) and went on after the checkpoint, not from epoch 0.
    headers = [i for i, line in enumerate(log_lines(out, re.compile(f"{HEADER_LINE.pattern}|{EPOCH_LINE.pattern}")))
               if HEADER_LINE.search(line)]
    assert len(headers) == 2, out[-4000:]
    epochs_seen = printed_epochs(out)
    restart = epochs_seen[headers[1] - 1:]
    assert restart and restart[0] >= 1 and restart[-1] == epochs - 1, epochs_seen
    assert sorted(set(epochs_seen)) == list(range(epochs))


@contextlib.contextmanager
def another_local_ray(folder: Path):
    """A second Ray instance on this machine, as another user's ``ray start --head`` would leave one; its processes
    are ours to end (``ray stop`` would end every Ray on the machine)."""
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             f"--port={free_port()}", "--num-cpus=1", "--include-dashboard=false",
                             f"--temp-dir={folder}", "--disable-usage-stats"], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: list(folder.glob("session_*/logs/gcs_server.out")), 120, "the other Ray's GCS")
        yield
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)


@pytest.fixture(scope="module")
def two_epoch_run(small_corpus, tmp_path_factory) -> tuple[Path, str, dict[str, torch.Tensor], str]:
    """One 2-epoch run shared by the resume and reproducibility tests: (runs folder, its output, its best weights,
    its saved config.yaml). It runs beside another local Ray instance, as on a shared machine.

    The weights and config are read into memory at once (``load_file`` maps the file), because the resume test later
    continues this run in place.
    """
    runs = tmp_path_factory.mktemp("two_epochs") / "runs"
    with another_local_ray(tmp_path_factory.mktemp("other_ray")):
        done = spai_train(train_command(small_corpus, runs, "r", *TWO_EPOCHS), runs.parent)
    assert done.returncode == 0, done.stdout[-6000:]
    return (runs, done.stdout, load((runs / "r" / "best.safetensors").read_bytes()),
            (runs / "r" / "config.yaml").read_text())


def test_resume_continues_and_a_taken_name_is_refused(small_corpus, two_epoch_run, tmp_path):
    runs, output, *_ = two_epoch_run
    assert printed_epochs(output) == [0, 1]  # each line once: Ray Train's print patch once echoed every line twice
    # The output went to a pipe: plain text, without the colour codes Ray puts around each worker line's prefix
    assert "\x1b[" not in output
    # Ray Train's placement-group cleaner once found two Ray instances here and died with a 30-line traceback
    assert "Found multiple active Ray instances" not in output and "Traceback" not in output, output[-6000:]
    # and Ray logged an error-level line for Ray Train's preemption watcher, which a local Ray has no use for
    assert "has constructor arguments in the object store" not in output
    # progress within each epoch: every step but the last, whose numbers the epoch line gives
    progress = [PROGRESS_LINE.search(line).groups() for line in log_lines(output, PROGRESS_LINE)]
    steps = int(progress[0][2])
    assert progress == [(str(e), str(s), str(steps)) for e in (0, 1) for s in range(1, steps)], progress
    # Ray's routine INFO lines stay in its log files: each report's whole metrics dict, each dataset's plan
    assert "Reporting training result" not in output and "Execution plan of Dataset" not in output

    taken = spai_train(train_command(small_corpus, runs, "r", "epochs=2", *LEARN), tmp_path, timeout=120)
    assert taken.returncode == 2
    assert "error: " in taken.stdout and "already holds a run; pass --resume" in taken.stdout
    assert "Traceback" not in taken.stdout

    # The first run's MLflow store is the default ./mlruns of the folder it ran in; resuming from another folder (as
    # here) continues in that store, unless another one is named, which must hold the run.
    elsewhere = spai_train(train_command(small_corpus, runs, "r", "epochs=3", *LEARN, resume=True,
                                         mlflow_uri=f"sqlite:///{tmp_path}/other.db"), tmp_path, timeout=120)
    assert elsewhere.returncode == 2, elsewhere.stdout[-6000:]
    assert "which the MLflow store" in elsewhere.stdout and "Traceback" not in elsewhere.stdout
    resumed = spai_train(train_command(small_corpus, runs, "r", "epochs=3", *LEARN, resume=True), tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-6000:]
    assert printed_epochs(resumed.stdout) == [2]
    assert "epochs: 3" in (runs / "r" / "config.yaml").read_text()  # the record follows the resumed run
    assert_mlflow_run(f"sqlite:///{runs.parent}/mlruns/mlflow.db", "r", 3)


def test_a_saved_config_reruns_the_same_run(two_epoch_run, tmp_path):
    """The run's config.yaml alone (another name, untracked) gives the same weights, bit for bit: the saved config is
    the whole job, and a seeded run is reproducible (Ray Data once reordered batches between runs)."""
    _, _, first, config = two_epoch_run
    (tmp_path / "config.yaml").write_text(config)
    done = spai_train([SPAI, "train", "--config", str(tmp_path / "config.yaml"), "--output", str(tmp_path / "runs"),
                       "--name", "again", "--no-mlflow"], tmp_path)
    assert done.returncode == 0, done.stdout[-6000:]
    assert not (tmp_path / "mlruns").exists() and "MLflow" not in done.stdout
    again = load_file(tmp_path / "runs" / "again" / "best.safetensors")
    assert first.keys() == again.keys()
    for key, tensor in first.items():
        assert torch.equal(tensor, again[key]), key


def test_a_run_without_one_decodable_training_image_fails_and_says_why(small_corpus, tmp_path):
    """Images moved after the manifest was built: stop after epoch 0 instead of registering an untrained model."""
    from mlflow.tracking import MlflowClient

    table = read_manifest(small_corpus)
    moved = [str(tmp_path / "moved" / Path(uri).name) if split == "train" else uri
             for uri, split in zip(table.column("uri").to_pylist(), table.column("split").to_pylist())]
    table = table.set_column(table.schema.get_field_index("uri"), "uri", pa.array(moved))
    manifest = write_manifest(table, str(tmp_path / "moved-manifest"), {"builder": "test"})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = spai_train(train_command(manifest, tmp_path / "runs", "moved", "epochs=3", *LEARN, mlflow_uri=uri),
                      tmp_path)
    assert done.returncode == 2
    assert re.search(r"error: epoch 0: none of the \d+ training images could be decoded, e.g. "
                     r"\S+/moved/\S+ \(missing", done.stdout), done.stdout[-6000:]
    assert printed_epochs(done.stdout) == [0]
    assert not (tmp_path / "runs" / "moved" / "best.safetensors").exists()
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("spai-train").experiment_id])
    assert run.info.status == "FAILED" and not client.search_model_versions("name = 'spai'")


def test_splits_that_cannot_train_are_refused_before_ray_starts():
    def manifest(train: list[int], val: list[int]) -> pa.Table:
        return pa.table({"split": ["train"] * len(train) + ["val"] * len(val), "label": train + val})

    cfg = TrainConfig(batch_size=4, workers=2)
    assert check_splits(manifest([0, 1, 0, 1], [0, 1]), cfg) == []
    with pytest.raises(ConfigError, match=r"train split has 3 image\(s\), less than one batch of batch_size=4 over 2 "
                                          r"worker\(s\); lower batch_size, e.g. batch_size=2,"):
        check_splits(manifest([0, 1, 0], [0, 1]), cfg)
    with pytest.raises(ConfigError, match="train split has 1 image.*add training images or use fewer workers"):
        check_splits(manifest([0], [0, 1]), cfg)
    with pytest.raises(ConfigError, match=r"train split has labels \[1\]"):
        check_splits(manifest([1, 1, 1, 1], [0, 1]), cfg)
    (warning,) = check_splits(manifest([0, 1, 0, 1], [1, 1]), cfg)
    assert "val split has 2 image(s) with labels [1], so val AUC is undefined" in warning
    assert "with labels []" in check_splits(manifest([0, 1, 0, 1], []), cfg)[0]


def four_row_manifest(tmp_path: Path, train: int = 2) -> str:
    """A manifest of ``train`` train and 2 val rows, both classes in each; the images need not exist (nothing here
    decodes them)."""
    rows = [{"uri": f"/x/{i}.png", "label": i % 2, "split": split, "generator": "g", "source": "s", "group": str(i)}
            for i, split in enumerate(["train"] * train + ["val", "val"])]
    return write_manifest(rows, str(tmp_path / "m"), {"builder": "test"})


def tiny_job(manifest: str, tmp_path: Path, **flags) -> TrainConfig:
    """The tiny recipe with one worker, as the CLI builds it from flags (dotted keys)."""
    return load_config(TrainConfig, CONFIG_DIR / "tiny.yaml", ["batch_size=2", "workers=1"],
                       {"manifest": manifest, "output": str(tmp_path / "runs"), "name": "r", **flags})


def refused_before_ray(capsys, *argv: str) -> str:
    """Run ``spai`` in this process; it must exit 2 with one error line, no traceback, and no Ray started."""
    import ray

    assert not ray.is_initialized()
    assert spai(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and not ray.is_initialized(), err
    return err


@pytest.mark.parametrize("values, message", [
    # before: cfg.workers was set after validation, and a ZeroDivisionError came out of the driver
    (["--workers", "0"], "error: --workers (workers): must be at least 1, got 0"),
    # before: 100 workers silently split a batch of 72 into 1 image each (a global batch of 100)
    (["--workers", "100"], "error: --workers (workers): 100 worker(s) cannot split batch_size=72 (the images per "
                           "step over all workers) evenly; use batch_size=100,"),
    (["--workers", "5"], "use batch_size=70 or batch_size=75, or a worker count that divides it"),
    (["workers=100"], "error: --workers (workers): 100 worker(s) cannot split"),  # one path for flags and overrides
    # before: reported as 'batch_size -4 is smaller than workers 1'
    (["batch_size=-4"], "error: batch_size: must be at least 1, got -4"),
    # before: Ray retried starting the workers every 60 s for 10 minutes
    (["--gpus-per-worker", "-1"], "error: --gpus-per-worker (gpus_per_worker): must be 0 or more, got -1.0"),
])
def test_a_wrong_value_fails_before_ray_starts_naming_the_flag(values, message, tmp_path, capsys):
    err = refused_before_ray(capsys, "train", "--manifest", four_row_manifest(tmp_path), "--output",
                             str(tmp_path / "runs"), "batch_size=72", *values)
    assert message in err


def test_more_workers_or_gpus_than_a_local_ray_has_are_refused_before_it_starts(tmp_path, capsys, monkeypatch):
    """Before: a local Ray was started with CPUs for every worker (98 worker processes on 2 cores, then Ray's OOM
    killer), and GPU workers waited forever."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cores = os.cpu_count()
    job = ["train", "--config", str(CONFIG_DIR / "tiny.yaml"), "--manifest", four_row_manifest(tmp_path, 4 * cores),
           "--output", str(tmp_path / "runs"), f"batch_size={2 * cores}"]
    err = refused_before_ray(capsys, *job, "--workers", str(2 * cores))
    assert f"needs {2 * cores} CPUs, but this machine has {cores}; use --workers {cores} or fewer" in err
    if not torch.cuda.is_available():
        err = refused_before_ray(capsys, *job, "--workers", "1", "--gpus-per-worker", "1")
        assert "--workers 1 --gpus-per-worker 1 needs 1 GPU(s), but this machine has 0" in err
    assert not (tmp_path / "runs").exists()


def test_a_resume_that_changes_the_recipe_fails_before_ray_starts(tmp_path, capsys):
    """Before: the comparison ran after Ray had started (18-20 s)."""
    cfg = tiny_job(four_row_manifest(tmp_path), tmp_path)
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "spai_run.json").write_text(json.dumps({"mlflow_run_id": None, "tracking_uri": None,
                                                   "config": to_dict(cfg)}))
    (run / "config.yaml").write_text(dump_config(cfg))
    err = refused_before_ray(capsys, "train", "--output", str(tmp_path / "runs"), "--name", "r", "--resume",
                             "seed=3", "epochs=40")  # the run's own config, one change it may make, one it may not
    assert "run r was started with other settings than this command asks for: seed: 0 before, 3 now. Drop" in err


def test_a_bad_init_file_fails_before_the_run_is_recorded(tmp_path):
    manifest = four_row_manifest(tmp_path)
    (tmp_path / "bad.safetensors").write_bytes(b"<html>404 Not Found</html>")
    cfg = tiny_job(manifest, tmp_path, init=str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="bad.safetensors: neither a readable safetensors file"):
        run_training(cfg)
    assert not (tmp_path / "runs").exists()  # the corrected command is not refused as 'already holds a run'


def test_ctrl_c_leaves_the_run_killed_and_resumable(tmp_path, monkeypatch):
    """Ray Train's Ctrl-C handler aborts the run and leaves ``fit`` with SystemExit(1): that is an interruption (exit
    130 with how to resume, MLflow run KILLED), not a failure. Seen with a real SIGINT; simulated here."""
    from mlflow.tracking import MlflowClient
    from ray.train.torch import TorchTrainer

    import pipelines.infra.runtime

    manifest = four_row_manifest(tmp_path)
    monkeypatch.setattr(pipelines.infra.runtime, "init_ray", lambda reserved_cpus=0: None)

    def interrupted(self):
        raise SystemExit(1)

    monkeypatch.setattr(TorchTrainer, "fit", interrupted)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(KeyboardInterrupt):
        run_training(tiny_job(manifest, tmp_path, **{"tracking.uri": uri}))
    run_id = json.loads((tmp_path / "runs" / "r" / "spai_run.json").read_text())["mlflow_run_id"]
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"


def test_an_output_that_cannot_be_written_leaves_no_running_mlflow_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    import pipelines.infra.runtime

    manifest = four_row_manifest(tmp_path)
    monkeypatch.setattr(pipelines.infra.runtime, "init_ray", lambda reserved_cpus=0: None)
    (tmp_path / "a_file").write_text("not a folder")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(OSError):
        run_training(tiny_job(manifest, tmp_path, output=str(tmp_path / "a_file" / "runs"), **{"tracking.uri": uri}))
    (run,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("spai-train").experiment_id])
    assert run.info.status == "FAILED"


def test_mlflow_down_at_the_end_keeps_the_weights_and_says_how_to_log_them(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from mlflow.exceptions import MlflowException
    from ray.train import Checkpoint

    import pipelines.infra.tracking

    (tmp_path / "ckpt").mkdir()
    save_checkpoint(tmp_path / "ckpt" / "model.safetensors", build_model("spai_tiny"))
    checkpoint = Checkpoint.from_directory(str(tmp_path / "ckpt"))
    result = SimpleNamespace(best_checkpoints=[(checkpoint, {"epoch": 0, "val_auc": 0.7})], checkpoint=checkpoint,
                             metrics={"epoch": 0, "val_auc": 0.7})

    def unreachable(*args, **kwargs):
        raise MlflowException("API request to http://mlflow:5000/api/2.0/mlflow/runs/get failed")

    monkeypatch.setattr(pipelines.infra.tracking, "log_weights", unreachable)
    with pytest.raises(TrackingError, match="training finished and its weights are in .*run the same command with "
                                            "--resume to log and register them"):
        export_weights(result, str(tmp_path / "run"), TrainConfig(), StorageOptions(), Tracked("http://mlflow:5000", "id"))
    assert (tmp_path / "run" / "best.safetensors").is_file() and (tmp_path / "run" / "last.safetensors").is_file()


def test_a_resume_may_change_how_long_a_run_is_not_what_it_learns():
    recorded = json.loads(json.dumps(to_dict(TrainConfig())))  # as the run marker holds it: tuples became lists
    check_resumable(recorded, {**to_dict(TrainConfig()), "epochs": 50, "workers": 4, "tracking": {"uri": "x"}},
                    RESUMABLE_CHANGES)
    changed = to_dict(TrainConfig(optim=OptimConfig(lr=1e-2), seed=3, epochs=50))
    with pytest.raises(ConfigError, match=r"^run r was started with other settings than this command asks for: "
                                          r"optim.lr: 0.0005 before, 0.01 now; seed: 0 before, 3 now\. Drop them$"):
        check_resumable(recorded, changed, RESUMABLE_CHANGES, "run r", "Drop them")


def test_an_undefined_val_auc_neither_improves_nor_stales_a_run():
    nan = float("nan")  # the best before any epoch had a val AUC
    assert track_best(0.7, nan, 0) == (0.7, 0)
    assert track_best(0.6, 0.7, 0) == (0.7, 1)
    assert track_best(nan, 0.7, 1) == (0.7, 1)  # patience counts only epochs that could have improved
    best, stale = track_best(nan, nan, 0)
    assert math.isnan(best) and stale == 0
    assert track_best(0.8, 0.7, 1) == (0.8, 0)


def test_the_best_checkpoint_of_tied_epochs_is_the_later_one():
    epochs = [({"epoch": 0, "val_auc": 0.8}, "c0"), ({"epoch": 2, "val_auc": 0.9}, "c2"),
              ({"epoch": 1, "val_auc": 0.9}, "c1")]
    assert best_of(epochs)[1] == "c2"
    assert best_of(epochs[::-1])[1] == "c2"  # whatever order Ray lists them in


def test_epoch_line_counts_failed_images_and_shows_one():
    def rank(seen: int, failed: int, failure: str | None, val_failed: int, val_failure: str | None) -> dict:
        val = {"label": [0, 1], "generator": ["real", "gan"], "logit": [-1.0, 1.0], "failed": val_failed,
               "failure": val_failure}
        return {"seen": seen, "loss": 0.5 * seen, "failed": failed, "failure": failure, "val": val,
                "grad_norm_max": 1.0}

    clean = epoch_metrics([rank(4, 0, None, 0, None)] * 2, 0, 1.0, 1e-3)
    assert failure_summary(clean) == "" and "decode_failure_example" not in clean
    ranks = [rank(4, 0, None, 1, "/v.jpg (missing: gone)"), rank(2, 2, "/t.jpg (truncated: x)", 0, None)]
    metrics = epoch_metrics(ranks, 0, 1.0, 1e-3)
    assert (metrics["train_images"], metrics["train_decode_failures"], metrics["val_decode_failures"]) == (6, 2, 1)
    assert failure_summary(metrics) == ("; 2 train / 1 val images failed, e.g. /v.jpg (missing: gone) "
                                        "(spai validate lists every reject)")


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_an_unreachable_mlflow_server_is_an_error_not_a_hang():
    """MLflow's client retries a refused connection for about four minutes before it raises."""
    with pytest.raises(TrackingError, match=r"cannot reach the MLflow server at http://127.0.0.1:\d+: "):
        resolve_tracking_uri(f"http://127.0.0.1:{free_port()}")


def test_local_tracking_stores_are_made_absolute_for_workers_elsewhere(tmp_path, monkeypatch):
    """A relative SQLite store crashed MLflow ('relative path can't be expressed as a file URI') when it created the
    experiment, and would point Ray workers running in other folders at other files."""
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///m/mlflow.db") == f"sqlite:///{tmp_path}/m/mlflow.db"
    assert resolve_tracking_uri("./runs/mlruns") == str(tmp_path / "runs" / "mlruns")
    for kept in (f"sqlite:///{tmp_path}/x.db", "databricks", "file:///abs/mlruns"):
        assert resolve_tracking_uri(kept) == kept
    (tmp_path / "m").mkdir()
    from pipelines.infra.tracking import start_run
    start_run(resolve_tracking_uri("sqlite:///m/mlflow.db"), "e", "r", {"a": 1})  # raised before


def test_mlflow_server_remote_tracking(small_corpus, tmp_path):
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path}/db", "--default-artifact-root", str(tmp_path / "art"),
                               "--host", "127.0.0.1", "--port", str(port)], cwd=tmp_path, env=subprocess_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers(f"{uri}/health"), 120, "the MLflow server")
        done = spai_train(train_command(small_corpus, tmp_path / "runs", "remote", "epochs=1", *LEARN,
                                        mlflow_uri=uri), tmp_path)
        assert done.returncode == 0, done.stdout[-6000:]
        assert_mlflow_run(uri, "remote", 1)
        # the artifact went through the server into its artifact root, not into a local ./mlruns
        assert list((tmp_path / "art").rglob("best.safetensors"))
        assert not (tmp_path / "mlruns").exists()
    finally:
        # The server runs uvicorn workers in its own session; they may ignore SIGTERM on a busy machine (seen: >30 s).
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
