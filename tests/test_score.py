"""``spai score``: folder, CSV, manifest and S3 inputs give the Detector's logits; bad files become row errors; a killed
run resumes without duplicates or gaps; the official layout and the official parity scores are reproduced."""
from __future__ import annotations

import collections
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from ray.data.extensions import ArrowTensorArray

from parity import FIXTURE, expected_rows, write_official_checkpoint
from pipelines.data.manifest import rows_to_table, write_manifest
from pipelines.infra.runtime import ClusterError, check_gpus
from pipelines.infra.settings import TrackingConfig
from pipelines.score.config import ActorPlan, ScoreConfig, plan_actors
from pipelines.score.job import ScoreResult, prepare, record, score
from pipelines.score.outputs import Written
from pipelines.score.scorer import Scorer
from pipelines.score.variants import variant_block
from pipelines.score.workdir import WorkDir
from pipelines.infra.storage import Files, StorageOptions, read_bytes
from pipelines.data.transforms import row_rng
from pipelines.perturb import parse_variants
from polling import free_port
from s3server import upload_folder
from spai_cli.main import main as spai
from spai_core.checkpoint import save_checkpoint
from spai_core.config import load_config
from spai_core.detector import Detector
from spai_core.errors import UserError
from spai_core.images import to_rgb_array
from spai_core.onnx_runtime import OnnxDetector
from spai_core.spai import build_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session", "module_mlflow_store")]
BAD_FILES = {"zero.jpg": b"", "text.jpg": b"this is a text file, not a JPEG", "cut.jpg": None}  # None: truncated


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_checkpoint(path, build_model("spai_tiny"), {"run": "tiny-run", "mlflow_run_id": "0123abcd", "epoch": 2})
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, photos) -> Path:
    """Eight real photos, 256-600 px, half PNG and half JPEG."""
    folder = tmp_path_factory.mktemp("corpus")
    for i, photo in enumerate(photos[::3][:8]):
        image = Image.open(photo).convert("RGB")
        image.thumbnail((600, 600) if i % 2 else (420, 420))
        image.save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}", quality=95)
    return folder


@pytest.fixture(scope="module")
def expected(weights, corpus) -> dict[str, float]:
    """Logits of ``Detector.logits`` called directly, by file name."""
    torch.set_num_threads(2)
    files = sorted(corpus.iterdir())
    logits = Detector.from_pretrained(weights, "cpu", "fp32").logits([to_rgb_array(Image.open(f)) for f in files])
    return {f.name: float(v) for f, v in zip(files, logits)}


def bad_files(folder: Path, good: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in BAD_FILES.items():
        data = good.read_bytes()[:2000] if data is None else data
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


def run(weights, source, output, **kwargs) -> pa.Table:
    score(ScoreConfig(weights=str(weights), input=str(source), output=str(output), batch_size=3, **kwargs),
          progress=False)
    return read_table(str(output))


def read_table(uri: str) -> pa.Table:
    data = read_bytes(uri)
    return pacsv.read_csv(io.BytesIO(data)) if uri.endswith(".csv") else pq.read_table(io.BytesIO(data))


def check_logits(table: pa.Table, expected: dict[str, float]) -> None:
    """Every expected image is in the table once, with the Detector's logit and its sigmoid as score."""
    rows = {Path(u).name: (logit, score) for u, logit, score in zip(
        table.column("uri").to_pylist(), table.column("logit").to_pylist(), table.column("score").to_pylist())}
    logits = np.array([rows[name][0] for name in expected])
    np.testing.assert_allclose(logits, list(expected.values()), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose([rows[name][1] for name in expected], 1 / (1 + np.exp(-logits)), rtol=1e-6)


def test_folder_input_matches_detector_and_truncated_file_is_an_error(weights, corpus, expected, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for f in corpus.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    bad_files(folder, corpus / "img0.jpg")
    (folder / "notes.txt").write_text("not an image, by name or content")
    (folder / "gone.jpg").symlink_to(tmp_path / "moved.jpg")  # a broken link
    result = score(ScoreConfig(weights=str(weights), input=str(folder), output=str(tmp_path / "scores.parquet")),
                   progress=False)
    out = read_table(str(tmp_path / "scores.parquet"))
    check_logits(out, expected)
    assert "not in the output: 1 input file(s) that are not images by name or content" in result.summary()
    errors = dict(zip([Path(u).name for u in out.column("uri").to_pylist()], out.column("error").to_pylist()))
    # A file named as an image is a row whatever its content: each bad one fails with its reason.
    assert set(errors) == set(expected) | {"cut.jpg", "zero.jpg", "text.jpg", "gone.jpg"}
    assert [errors[name].split(":")[0] for name in ("cut.jpg", "zero.jpg", "text.jpg", "gone.jpg")] == [
        "truncated", "zero_byte", "not_an_image", "missing"]
    assert out.column("logit").null_count == 4
    assert set(out.column("precision").to_pylist()) == {"fp32"}
    assert json.loads(out.column("options")[0].as_py())["variants"] == ["none"]
    assert "variant" not in out.column_names  # a plain job has no sweep columns
    tiles = dict(zip([Path(u).name for u in out.column("uri").to_pylist()], out.column("tiles").to_pylist()))
    assert tiles["cut.jpg"] is None and all(tiles[name] >= 4 for name in expected)
    assert not (tmp_path / "scores.parquet.parts").exists()
    assert "weights" in (tmp_path / "scores.parquet.config.yaml").read_text()
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "scores"
    assert run.data.params["weights"] == str(weights)
    assert {k: run.data.tags[k] for k in ("train_run_id", "train_run", "train_epoch")} == {
        "train_run_id": "0123abcd", "train_run": "tiny-run", "train_epoch": "2"}  # from the checkpoint's metadata
    assert run.data.params["model_id"] == out.column("model_id")[0].as_py() and run.data.params["plan.device"] == "cpu"
    assert {k: run.data.metrics[k] for k in ("rows", "scored", "failed", "failed_truncated", "failed_missing")} == {
        "rows": 12, "scored": 8, "failed": 4, "failed_truncated": 1, "failed_missing": 1}


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture()
def csv_input(corpus, tmp_path) -> Path:
    """An official CSV with relative paths: the corpus, every kind of bad file and a missing one."""
    bad = bad_files(tmp_path / "bad", corpus / "img0.jpg")
    rows = [{"image": os.path.relpath(p, tmp_path), "class": i % 2, "split": "test", "note": f"n{i}"}
            for i, p in enumerate(sorted(corpus.iterdir()) + bad + [tmp_path / "gone.png"])]
    return write_csv(tmp_path / "fake_demo.csv", rows)


def test_csv_input_records_every_bad_file(weights, csv_input, expected, tmp_path):
    out = run(weights, csv_input, tmp_path / "scores.csv")
    check_logits(out, expected)
    errors = {Path(u).name: e for u, e in zip(out.column("uri").to_pylist(), out.column("error").to_pylist()) if e}
    assert {n: e.split(":")[0] for n, e in errors.items()} == {
        "zero.jpg": "zero_byte", "text.jpg": "not_an_image", "cut.jpg": "truncated", "gone.png": "missing"}
    assert out.num_rows == len(expected) + 4 and out.column("note").to_pylist()[-1] == f"n{out.num_rows - 1}"


def test_official_csv_layout(weights, csv_input, expected, tmp_path):
    output = tmp_path / "out" / "fake_demo.csv"
    run(weights, csv_input, output, official_csv=True, tag="spai_tiny")
    with open(output) as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["image", "class", "split", "note", "spai_tiny"]
    with open(csv_input) as fh:
        original = list(csv.DictReader(fh))
    assert [{k: r[k] for k in ("image", "class", "split", "note")} for r in rows] == original
    scores = {Path(r["image"]).name: r["spai_tiny"] for r in rows}
    logits = np.array(list(expected.values()))
    np.testing.assert_allclose([float(scores[n]) for n in expected], 1 / (1 + np.exp(-logits)), rtol=1e-5)
    assert [n for n, s in scores.items() if s == ""] == ["zero.jpg", "text.jpg", "cut.jpg", "gone.png"]
    with open(str(output) + ".errors.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4


def test_manifest_input_keeps_columns_and_renames_clashes(weights, corpus, expected, tmp_path):
    rows = [{"uri": str(p), "label": i % 2, "split": "test", "generator": "real" if i % 2 == 0 else "gen",
             "source": "demo", "group": p.stem, "score": "old"} for i, p in enumerate(sorted(corpus.iterdir()))]
    manifest = write_manifest(rows_to_table(rows, extras=["score"]), str(tmp_path / "manifest"), {"builder": "test"})
    out = run(weights, manifest, tmp_path / "scores.parquet", split="test")
    check_logits(out, expected)
    assert out.column("input_score").to_pylist() == ["old"] * len(rows)
    assert out.schema.field("label").type == pa.int8() and set(out.column("generator").to_pylist()) == {"real", "gen"}


def test_s3_input_weights_and_output(s3_server, weights, corpus, expected, tmp_path):
    source = upload_folder(s3_server, corpus, "spai-test", "corpus")
    upload_folder(s3_server, weights.parent, "spai-test", "weights")
    output = "s3://spai-test/runs/scores.parquet"
    out = run("s3://spai-test/weights/tiny.safetensors", source, output)
    check_logits(out, expected)
    assert set(out.column("model_id").to_pylist()) == {Detector.from_pretrained(weights, "cpu").model_id}
    assert Files().list("s3://spai-test/runs") == [output, output + ".config.yaml"]  # work dir removed


def test_killed_run_resumes_without_duplicates_or_gaps(weights, corpus, expected, tmp_path):
    """SIGKILL the driver of `spai score` once parts exist; the same command finishes the job exactly once per row."""
    images = sorted(corpus.iterdir())
    rows = [{"image": str(p), "class": 0, "split": "test"} for p in images * 3]  # each image three times
    source = write_csv(tmp_path / "input.csv", rows)
    output = tmp_path / "scores.parquet"
    command = [sys.executable, "-m", "spai_cli.main", "score", "-w", str(weights), "-i", str(source), "-o",
               str(output), "--batch-size", "1", "--part-rows", "1", "--device", "cpu"]
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    parts = Path(str(output) + ".parts")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(parts.glob("part-*.parquet"))) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_before = pq.read_table(list(parts.glob("part-*.parquet"))).num_rows if parts.exists() else 0
    assert not output.exists() and 3 <= done_before < len(rows), "the run must be killed half-way"

    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert f"scored {len(rows) - done_before} images" in finished.stdout
    assert f"{done_before} of {len(rows)} rows were scored before" in finished.stdout
    run_id = re.search(r"tracked as MLflow run (\w+)", finished.stdout).group(1)
    run = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(run_id)
    assert run.data.params["resumed_rows"] == str(done_before)
    assert run.data.metrics["scored_now"] == len(rows) - done_before
    # in a log (not a terminal) progress comes as whole lines, without Ray Data's routine INFO lines between them
    assert "scoring: 100%" in finished.stderr and "\r" not in finished.stderr
    assert "Execution plan of Dataset" not in finished.stderr, finished.stderr
    out = pq.read_table(output)
    assert out.num_rows == len(rows) and len(set(out.column("row_id").to_pylist())) == len(rows)
    assert [Path(u).name for u in out.column("uri").to_pylist()] == [p.name for p in images * 3]
    np.testing.assert_allclose(out.column("logit").to_numpy(), [expected[p.name] for p in images * 3],
                               rtol=1e-5, atol=1e-5)
    assert not parts.exists()


SWEEP = ["jpeg=50", "blur=2", "meme"]


def test_sweep_scores_every_variant_once_and_resumes_after_a_kill(weights, corpus, tmp_path):
    """`spai score --perturb`: one row per (image, variant), each the Detector's logit of that variant (seeded per
    image and variant); killed half-way, the same command finishes the pairs left, decoding only their images."""
    (tmp_path / "small").mkdir()
    images = [tmp_path / "small" / f.name for f in sorted(corpus.iterdir())[:3]]
    for source, small in zip(sorted(corpus.iterdir()), images):  # one or two tiles each: the test is about rows
        with Image.open(source) as image:
            image.convert("RGB").resize((240, 230)).save(small, quality=95)
    bad = bad_files(tmp_path / "bad", corpus / "img0.jpg")[1]  # not an image: every variant fails with its reason
    source = write_csv(tmp_path / "input.csv", [{"image": str(p), "class": 0, "split": "test"} for p in [*images, bad]])
    output = tmp_path / "sweep.parquet"
    command = [sys.executable, "-m", "spai_cli.main", "score", "-w", str(weights), "-i", str(source), "-o",
               str(output), "--batch-size", "1", "--part-rows", "1", "--device", "cpu", "--no-mlflow", "--perturb",
               *SWEEP]
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    parts = Path(str(output) + ".parts")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.monotonic() + 300  # a cap for a loaded machine: the parts usually come within seconds
    while len(list(parts.glob("part-*.parquet"))) < 5 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = pq.read_table(list(parts.glob("part-*.parquet")))
    pairs = 4 * (1 + len(SWEEP))
    assert not output.exists() and 5 <= before.num_rows < pairs, "the run must be killed half-way"
    unfinished = sum(n < 1 + len(SWEEP) for n in collections_counts(before.column("row_id").to_pylist(), 4))

    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert f"scored {pairs - before.num_rows} variants of {unfinished} images" in finished.stdout
    out = pq.read_table(output)
    labels = ["none", *SWEEP]
    assert out.num_rows == pairs and len(set(zip(out.column("row_id").to_pylist(),
                                                 out.column("variant").to_pylist()))) == pairs
    assert out.column("variant").to_pylist() == labels * 4  # image-major, in sweep order
    assert out.column("perturbation").to_pylist()[:4] == ["none", "jpeg", "blur", "meme"]
    assert out.column("strength").to_pylist()[:4] == [None, 50.0, 2.0, None]
    assert out.column("error").to_pylist()[-4:] == [out.column("error")[-1].as_py()] * 4
    assert out.column("error")[-1].as_py().startswith("not_an_image")
    detector = Detector.from_pretrained(weights, "cpu", "fp32")
    wanted = detector.logits([variant.apply(to_rgb_array(Image.open(p)), row_rng(0, f"{p}\n{variant.label}"))
                              for p in images for variant in parse_variants(SWEEP)])
    np.testing.assert_allclose(out.column("logit").to_numpy()[:12], wanted, rtol=1e-5, atol=1e-5)
    assert not parts.exists()


def collections_counts(ids: list[str], rows: int) -> list[int]:
    """How many results each of ``rows`` input rows has among ``ids`` (rows with none count 0)."""
    counts = list(collections.Counter(ids).values())
    return counts + [0] * (rows - len(counts))


def test_a_variant_that_fails_is_its_own_row_error():
    """WebP cannot hold a 17000-px panorama: that variant fails with its reason, the image's others are made."""
    wide = np.zeros((2, 17000, 3), np.uint8)
    batch = pa.table({"row_id": ["a"], "uri": ["wide.png"], "image": ArrowTensorArray.from_numpy(wide[None]),
                      "error": pa.array([None], pa.string()), "variants": [["webp=80", "none"]]})
    variants = {v.label: v for v in parse_variants(["webp=80"])}
    out = pa.concat_tables(variant_block(batch, variants, None, seed=0)).to_pydict()
    assert out["variant"] == ["webp=80", "none"] and out["error"][1] is None and out["uri"] == ["wide.png"] * 2
    assert out["error"][0].startswith("perturb_failed: webp=80: ValueError") and "WebP limit" in out["error"][0]


def test_scorer_isolates_an_image_the_model_cannot_take(weights, corpus, expected):
    """A batch that fails is retried image by image: the others are scored, the culprit gets the model's error."""
    plan = ActorPlan("cpu", "fp32", workers=1, num_cpus=1.0, num_gpus=0.0, threads=2)
    scorer = Scorer(str(weights), Detector.from_pretrained(weights, "cpu").model_id, plan, None, 16, StorageOptions())
    good = to_rgb_array(Image.open(corpus / "img0.jpg"))
    batch = {"row_id": np.array(["a", "b", "c"], object), "variant": np.array(["none"] * 3, object),
             "error": np.array([None, None, "zero_byte: empty"], object),
             "image": np.array([good, np.zeros((0, 300, 3), np.uint8), np.zeros((0, 0, 3), np.uint8)], object)}
    out = scorer(batch).to_pydict()
    assert out["logit"][0] == pytest.approx(expected["img0.jpg"], abs=1e-5) and out["logit"][1:] == [None, None]
    assert out["error"][1].startswith("model_failed: RuntimeError") and out["error"][2] == "zero_byte: empty"
    assert out["tiles"][0] >= 4 and out["tiles"][1:] == [None, None]


def test_resume_refuses_other_options_and_a_finished_output_needs_overwrite(weights, corpus, expected, tmp_path):
    work = WorkDir(str(tmp_path / "scores.parquet"), Files())
    work.start({"model_id": "abc", "precision": "fp32", "rows": 3})
    work.start({"model_id": "abc", "precision": "fp32", "rows": 3})  # the same job resumes
    with pytest.raises(UserError, match="precision: 'fp32' before, 'bf16' now.*delete"):
        work.start({"model_id": "abc", "precision": "bf16", "rows": 3})
    done = tmp_path / "done.parquet"
    done.write_bytes(b"x")
    with pytest.raises(UserError, match="already exists.*pass --overwrite"):
        score(ScoreConfig(weights=str(weights), input=str(corpus), output=str(done)))
    score(ScoreConfig(weights=str(weights), input=str(corpus / "img0.jpg"), output=str(done), overwrite=True),
          progress=False)
    assert pq.read_table(done).column("logit").to_pylist() == pytest.approx([expected["img0.jpg"]], abs=1e-5)


def test_a_job_nothing_could_score_is_a_failed_run_and_no_mlflow_records_none(weights, mlflow_store, tmp_path,
                                                                             monkeypatch):
    source = write_csv(tmp_path / "gone.csv", [{"image": str(tmp_path / "gone.png"), "class": 1, "split": "test"}])
    monkeypatch.chdir(tmp_path)
    result = score(ScoreConfig(weights=str(weights), input="gone.csv", output="s.parquet"), progress=False)
    client = MlflowClient(mlflow_store)
    run = client.get_run(result.run_id)
    assert result.all_failed and run.info.status == "FAILED" and run.data.metrics["failed_missing"] == 1
    # recorded as absolute paths, which say where they are from anywhere
    assert run.data.params["input"] == str(source) and run.data.tags["output"] == str(tmp_path / "s.parquet")
    runs = len(client.search_runs([run.info.experiment_id]))
    untracked = score(ScoreConfig(weights=str(weights), input=str(source), output=str(tmp_path / "t.parquet"),
                                  tracking=TrackingConfig(enabled=False)), progress=False)
    assert untracked.run_id is None and len(client.search_runs([run.info.experiment_id])) == runs


@pytest.mark.parametrize("bad", ["corrupt", "folder"])
def test_bad_weights_stop_the_job_before_it_starts(bad, corpus, tmp_path):
    """Found by the driver, not by each actor after the job (and its work folder, which would refuse the corrected
    weights as 'other weights') has begun."""
    weights = tmp_path / "weights.safetensors"
    if bad == "folder":
        weights.mkdir()
    else:
        weights.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(UserError, match="is a folder" if bad == "folder" else "weights.safetensors"):
        score(ScoreConfig(weights=str(weights), input=str(corpus), output=str(tmp_path / "scores.parquet")))
    assert not (tmp_path / "scores.parquet.parts").exists()


def test_a_saved_config_reruns_the_same_job(weights, corpus, tmp_path, monkeypatch):
    """`spai score --config <output>.config.yaml` is the job that wrote it (paths saved absolute, so from anywhere)."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(corpus, "images")
    argv = ["score", "-w", str(weights), "-i", "images", "-o", "first.parquet", "--batch-size", "3", "--seed", "7",
            "--no-mlflow", "--no-original", "--perturb", "noise=2"]
    assert spai(argv) == 0
    saved = tmp_path / "first.parquet.config.yaml"
    cfg = load_config(ScoreConfig, saved)
    assert (cfg.input, cfg.seed, cfg.perturb, cfg.original, cfg.tracking.enabled) == (
        str(tmp_path / "images"), 7, ["noise=2"], False, False)
    first = pq.read_table("first.parquet")
    monkeypatch.chdir(corpus)  # anywhere else
    assert spai(["score", "--config", str(saved), "--overwrite"]) == 0
    again = pq.read_table(tmp_path / "first.parquet")
    assert again.column("row_id").to_pylist() == first.column("row_id").to_pylist()
    np.testing.assert_array_equal(again.column("logit").to_numpy(), first.column("logit").to_numpy())
    assert again.column("options").to_pylist() == first.column("options").to_pylist()  # noise, seeded the same


def spai_subprocess(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """``spai`` in a process of its own, which would start its own local Ray (no RAY_ADDRESS)."""
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env
    return subprocess.run([sys.executable, "-m", "spai_cli.main", *argv], env=environ, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("problem", ["workers", "cuda", "resume", "s3"])
def test_what_can_be_checked_before_ray_starts_fails_before_it(problem, weights, corpus, tmp_path):
    """A wrong value, GPUs this machine lacks, a resume of another job, an S3 endpoint nobody answers at: each fails
    before a local Ray starts (which took 10-20 s of the 17-38 s these errors took), with one line naming the fix."""
    output = tmp_path / "scores.parquet"
    argv = ["score", "-w", str(weights), "-i", str(corpus / "img0.jpg"), "-o", str(output), "--no-mlflow"]
    env, message = {}, {
        "workers": "--workers (workers): must be a positive number (scoring actors), got 0",
        "cuda": "--device cuda needs 1 GPU(s) but this machine has 0",
        "resume": f"the unfinished run in {output}.parts was started with other settings than this command asks for: "
                  "max_tiles: None before, 4 now",
        "s3": "cannot reach the S3 endpoint"}[problem]
    if problem == "workers":
        argv += ["--workers", "0"]
    elif problem == "cuda":
        argv += ["--device", "cuda"]
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif problem == "resume":  # what a run stopped before its first results leaves behind, then another option
        cfg = load_config(ScoreConfig, flags={"weights": str(weights), "input": str(corpus / "img0.jpg"),
                                              "output": str(output)})
        record(prepare(cfg, StorageOptions()), plan_actors(cfg, {"CPU": 2}))
        argv += ["--max-tiles", "4"]
    else:
        argv[argv.index("-o") + 1] = "s3://spai-test/scores.parquet"
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    done = spai_subprocess(argv, **env)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and message in done.stderr, done.stderr
    assert "Started a local Ray instance" not in done.stderr and "starting a local Ray" not in done.stdout, done.stderr


def written(errors: list) -> Written:
    counts = Written()
    counts.add(pa.table({"error": pa.array(errors, pa.string())}))
    return counts


def test_summary_reports_start_up_apart_from_the_rate():
    table = written([None] * 9 + ["truncated: cut.jpg"])
    summary = ScoreResult("out.parquet", table, 10, 20.0, {}, first=(8.0, 1)).summary()
    assert "scored 10 images in 20.0 s (0.50 img/s; first results after 8.0 s, 0.75 img/s since)" in summary
    assert "9 scored, 1 failed (truncated: 1)" in summary
    assert "since" not in ScoreResult("out.parquet", table, 10, 20.0, {}, first=(20.0, 10)).summary()
    assert "since" not in ScoreResult("out.parquet", table, 10, 20.0, {}, first=(15.0, 8)).summary()  # a burst
    assert not ScoreResult("out.parquet", table, 10, 20.0, {}).all_failed and "error:" not in summary
    failed = ScoreResult("out.parquet", written(["missing: /x/a.jpg does not exist"] * 2), 2, 1.0, {})
    assert failed.all_failed and "error: none of the 2 rows could be scored, e.g. missing: /x/a.jpg" in failed.summary()


def test_actor_plan_follows_the_cluster():
    gpu = plan_actors(ScoreConfig(), {"CPU": 32, "GPU": 4})
    assert (gpu.device, gpu.precision, gpu.workers, gpu.num_gpus, gpu.batches_in_flight) == ("cuda", "bf16", 4, 1.0,
                                                                                             None)
    cpu = plan_actors(ScoreConfig(workers=2), {"CPU": 8})
    assert (cpu.device, cpu.precision, cpu.workers, cpu.threads, cpu.num_gpus) == ("cpu", "fp32", 2, 4, 0.0)
    assert cpu.batches_in_flight == 1  # no queue on the first actor up while the others load
    assert cpu.num_cpus * cpu.workers <= 7  # a CPU stays free for decoding
    # A 0-CPU head and two 2-CPU workers: one actor per worker node, each node keeps a CPU for decode tasks.
    spread = plan_actors(ScoreConfig(workers=2), {"CPU": 4}, node_cpus=[0.0, 2.0, 2.0])
    assert (spread.threads, spread.num_cpus) == (2, 1.0)
    crowded = plan_actors(ScoreConfig(workers=4), {"CPU": 4}, node_cpus=[0.0, 2.0, 2.0])
    assert (crowded.threads, crowded.num_cpus) == (1, 0.5)
    # Fixed actor size: one thread each, and a CPU still left for decoding.
    fixed = plan_actors(ScoreConfig(workers=1, cpus_per_worker=1), {"CPU": 2})
    assert (fixed.threads, fixed.num_cpus) == (1, 1.0)
    # GPUs asked for on a cluster with none yet (GPU nodes scale from zero): GPU actors, which check_gpus vets
    asked = plan_actors(ScoreConfig(gpus_per_worker=0.5, workers=8), {"CPU": 8})
    assert (asked.device, asked.workers, asked.num_gpus) == ("cuda", 8, 0.5)
    assert plan_actors(ScoreConfig(device="cuda"), {"CPU": 8}).workers == 1


def test_onnxruntime_plans_gpu_actors_only_when_it_has_a_cuda_provider(monkeypatch):
    import onnxruntime

    from pipelines.score.job import local_plan
    from spai_core.onnx_runtime import OnnxExportError

    monkeypatch.setattr("pipelines.score.job.local_capacity", lambda: (16, 1))  # a local Ray on a 1-GPU machine
    onnx = ScoreConfig(runtime="onnxruntime")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert local_plan(onnx).device == "cpu" and local_plan(ScoreConfig()).device == "cuda"
    with pytest.raises(OnnxExportError, match="--device cuda .* no CUDA provider"):
        local_plan(ScoreConfig(runtime="onnxruntime", device="cuda"))
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert local_plan(onnx).device == "cuda"


def test_gpus_a_local_ray_lacks_are_an_error_and_a_cluster_may_add_them(monkeypatch, caplog):
    import pipelines.infra.runtime

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    gpus = {"GPU": 2.0}
    monkeypatch.setattr(pipelines.infra.runtime.ray, "cluster_resources", lambda: gpus)
    check_gpus(2, "x")
    gpus["GPU"] = 0.0
    with pytest.raises(ClusterError, match="--gpus 1 needs 1 GPU.* local Ray has 0; ask for fewer, drop the GPU"):
        check_gpus(1, "--gpus 1")
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    check_gpus(4, "training")
    assert "waiting for its autoscaler to add GPU nodes" in caplog.text


def test_parity_images_reproduce_official_logits(tmp_path):
    """Full ViT-B/16 with the official-layout parity weights: `spai score` gives the official logits."""
    weights = write_official_checkpoint(tmp_path / "spai_parity.pth")
    out = run(weights, FIXTURE / "images", tmp_path / "parity.parquet", precision="fp32")
    got = dict(zip(out.column("image").to_pylist(), out.column("logit").to_pylist()))
    rows = expected_rows()
    np.testing.assert_allclose([got[r["image"]] for r in rows], [float(r["logit"]) for r in rows], rtol=1e-4,
                               atol=1e-5)
    assert out.column("tiles").to_pylist() == [int(r["n_patches"]) for r in sorted(rows, key=lambda r: r["image"])]


def test_onnxruntime_runtime_scores_as_the_detector(weights, corpus, expected, tmp_path):
    """`--runtime onnxruntime --weights EXPORT_DIR`: the same job on the exported graphs gives the Detector's logits
    and keeps bad files as row errors."""
    from spai_core.export import export_checkpoint

    export_checkpoint(weights, tmp_path / "onnx")
    folder = shutil.copytree(corpus, tmp_path / "images")
    bad_files(folder, next(corpus.iterdir()))
    out = run(tmp_path / "onnx", folder, tmp_path / "onnx.parquet", runtime="onnxruntime")
    check_logits(out, expected)
    errors = dict(zip((Path(u).name for u in out.column("uri").to_pylist()), out.column("error").to_pylist()))
    assert all(errors[name] for name in BAD_FILES) and not any(errors[name] for name in expected)
    assert set(out.column("model_id").to_pylist()) == {OnnxDetector(tmp_path / "onnx", "cpu").model_id}
    with pytest.raises(UserError, match="is a folder.*--runtime onnxruntime"):
        run(tmp_path / "onnx", folder, tmp_path / "pytorch.parquet")
