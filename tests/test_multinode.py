"""``spai train`` and ``spai score`` on a real multi-node Ray cluster (three raylets on this machine), data in S3.

A head with one CPU (it runs Ray Data's decode tasks while scoring) and 2-CPU worker nodes (``ray.cluster_utils``).
Training asks for two workers of 2 CPUs each, so Ray must place them on two worker nodes; images, manifest,
checkpoints and scores live in a moto S3 server, so nothing is passed between nodes through the local disk. A third
node lets the run survive losing one of them.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import boto3
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from corpus import small_corpus  # noqa: F401  (the session fixture)
from polling import wait_for
from pipelines.manifest import read_manifest
from pipelines.train import CONFIG_DIR
from s3server import s3_server, upload_folder  # noqa: F401  (the module fixture)

pytestmark = pytest.mark.slow

SPAI = str(Path(sys.executable).with_name("spai"))
LEARN = ["batch_size=2", "optim.lr=3e-3", "optim.warmup_epochs=0.25", "patience=null"]
BUCKET = "multinode"


EPOCH_LINE = re.compile(r"\[spai train\] epoch (\d+):")
STORE = 100 * 1024 * 1024  # object store per node; the jobs move little through it


@contextlib.contextmanager
def ray_cluster(names: tuple[str, ...]):
    """Head (1 CPU) + one 2-CPU node per name (custom resource ``name``); yields the cluster and {name: node}.

    Call it inside the ``s3_server`` fixture so that every raylet inherits the AWS variables.
    """
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head": 1},
                                                                "object_store_memory": STORE,
                                                                "include_dashboard": False})
        try:
            nodes = {name: cluster.add_node(num_cpus=2, resources={name: 1}, object_store_memory=STORE)
                     for name in names}
            cluster.wait_for_nodes()
            yield cluster, nodes
        finally:
            cluster.shutdown()


def actors(cluster, class_name: str, state: str | None = None) -> list[dict]:
    """Actors whose class name contains ``class_name``, finished ones included, from the cluster's GCS."""
    return [a for a in cluster.global_state.actor_table(None).values()
            if class_name in a["ActorClassName"] and (state is None or a["State"] == state)]


def s3_client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def s3_keys(endpoint: str, prefix: str) -> list[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def s3_manifest(endpoint: str, local_manifest: str, tmp_path: Path) -> tuple[str, int]:
    """Upload the corpus images and a copy of its manifest whose uris are s3://; return that manifest and its rows."""
    table = read_manifest(local_manifest)
    root = os.path.commonpath(table.column("uri").to_pylist())
    prefix = upload_folder(endpoint, root, BUCKET, "corpus")
    uris = pc.replace_substring(table.column("uri"), root, prefix)
    table = table.set_column(table.schema.get_field_index("uri"), "uri", uris)
    pq.write_table(table, tmp_path / "manifest.parquet")
    s3_client(endpoint).upload_file(str(tmp_path / "manifest.parquet"), BUCKET, "manifest.parquet")
    return f"s3://{BUCKET}/manifest.parquet", table.num_rows


def cli_env(address: str) -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def run_cli(args: list[str], address: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([SPAI, *args], cwd=cwd, env=cli_env(address), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def train_args(manifest: str, name: str, *overrides: str) -> list[str]:
    """Two workers of 2 CPUs: no node holds both (the head has 1 CPU, the others 2), so they must spread."""
    return ["train", "--config", str(CONFIG_DIR / "tiny.yaml"), "--manifest", manifest, "--output",
            f"s3://{BUCKET}/runs", "--name", name, "--workers", "2", "cpus_per_worker=2", *LEARN, *overrides]


def test_train_and_score_across_nodes(small_corpus, s3_server, tmp_path):  # noqa: F811
    manifest, rows = s3_manifest(s3_server, small_corpus, tmp_path)
    with ray_cluster(("node_a", "node_b")) as (cluster, nodes):
        train_and_score(cluster, nodes, s3_server, manifest, rows, tmp_path)


def train_and_score(cluster, nodes, s3_server, manifest, rows, tmp_path):  # noqa: F811
    done = run_cli(train_args(manifest, "mn", "epochs=1"), cluster.address, tmp_path, timeout=480)
    assert done.returncode == 0, done.stdout[-6000:]
    keys = s3_keys(s3_server, "runs/mn/")
    assert "runs/mn/best.safetensors" in keys, keys
    assert any("/checkpoint_" in key and key.endswith("model.safetensors") for key in keys), keys
    assert not (tmp_path / "runs").exists()

    # The GCS still lists the finished workers: one on each worker node, none on the head.
    workers = actors(cluster, "RayTrainWorker")
    assert len(workers) == 2, workers
    assert {a["Address"]["NodeID"] for a in workers} == {node.node_id for node in nodes.values()}

    scored = run_cli(["score", "--weights", f"s3://{BUCKET}/runs/mn/best.safetensors", "--input", manifest,
                      "--output", f"s3://{BUCKET}/scores.parquet", "--workers", "2"], cluster.address, tmp_path,
                     timeout=300)
    assert scored.returncode == 0, scored.stdout[-6000:]
    # Two scoring actors of 2 CPUs (the plan for 5 cluster CPUs): again one per worker node.
    scorers = actors(cluster, "MapWorker")
    assert {a["Address"]["NodeID"] for a in scorers} == {node.node_id for node in nodes.values()}, [
        a["ActorClassName"] for a in cluster.global_state.actor_table(None).values()]
    s3_client(s3_server).download_file(BUCKET, "scores.parquet", str(tmp_path / "scores.parquet"))
    out = pq.read_table(tmp_path / "scores.parquet")
    assert sorted(out.column("uri").to_pylist()) == sorted(read_manifest(manifest).column("uri").to_pylist())
    assert out.num_rows == rows and out.column("error").null_count == rows


def test_training_survives_losing_a_node(small_corpus, s3_server, tmp_path):  # noqa: F811
    """A worker node vanishes after the first committed checkpoint; the run restarts on the spare node and finishes."""
    manifest, _ = s3_manifest(s3_server, small_corpus, tmp_path)
    epochs = 2
    snapshot = "runs/lost/checkpoint_manager_snapshot.json"
    with ray_cluster(("node_a", "node_b", "node_c")) as (cluster, nodes):
        log = tmp_path / "train.log"  # a file, not a pipe: nobody reads while we wait
        with log.open("w") as sink, subprocess.Popen([SPAI, *train_args(manifest, "lost", f"epochs={epochs}",
                                                                         "max_failures=2")],
                                                     cwd=tmp_path, env=cli_env(cluster.address), stdout=sink,
                                                     stderr=subprocess.STDOUT) as proc:
            wait_for(lambda: snapshot in s3_keys(s3_server, "runs/lost/") or proc.poll() is not None, 400,
                     "the first committed checkpoint")
            assert proc.poll() is None, log.read_text()[-4000:]
            alive = actors(cluster, "RayTrainWorker", "ALIVE")
            victim_id = alive[0]["Address"]["NodeID"]
            (victim,) = [name for name, node in nodes.items() if node.node_id == victim_id]
            cluster.remove_node(nodes[victim], allow_graceful=False)
            proc.wait(timeout=400)
        out = log.read_text()
        assert proc.returncode == 0, out[-4000:]
        assert "runs/lost/best.safetensors" in s3_keys(s3_server, "runs/lost/")
        # A second worker group ran, and it used the spare node, not the lost one.
        workers = actors(cluster, "RayTrainWorker")
        assert len(workers) == 4, workers
        later = {a["Address"]["NodeID"] for a in workers} - {a["Address"]["NodeID"] for a in alive}
        spare = {node.node_id for name, node in nodes.items() if name != victim} - {a["Address"]["NodeID"]
                                                                                     for a in alive}
        assert later == spare, (later, spare)
    epochs_seen = [int(m.group(1)) for m in map(EPOCH_LINE.search, out.splitlines()) if m]
    assert sorted(set(epochs_seen)) == list(range(epochs)), epochs_seen
