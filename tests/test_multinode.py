"""``spai train`` and ``spai score`` on a real multi-node Ray cluster (three raylets on this machine), data in S3.

A head with one CPU (it runs Ray Data's decode tasks while scoring) and two 2-CPU worker nodes. Training asks for
two workers of 2 CPUs each, so Ray must place them on the two worker nodes; images, manifest, checkpoints and scores
live in a moto S3 server, so nothing is passed between nodes through the local disk.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from corpus import small_corpus  # noqa: F401  (the session fixture)
from pipelines.manifest import read_manifest
from pipelines.train import CONFIG_DIR
from s3server import s3_server, upload_folder  # noqa: F401  (the module fixture)

pytestmark = pytest.mark.slow

SPAI = str(Path(sys.executable).with_name("spai"))
LEARN = ["batch_size=2", "optim.lr=3e-3", "optim.warmup_epochs=0.25", "patience=null"]
BUCKET = "multinode"


@pytest.fixture
def cluster(s3_server, monkeypatch):  # noqa: F811
    """Head (1 CPU) + node_a + node_b (2 CPUs each); started after moto so every raylet inherits the AWS variables."""
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    small = {"object_store_memory": 100 * 1024 * 1024, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head": 1}, **small})
    try:
        nodes = {name: cluster.add_node(num_cpus=2, resources={name: 1}, object_store_memory=small[
            "object_store_memory"]) for name in ("node_a", "node_b")}
        cluster.wait_for_nodes()
        yield cluster, nodes
    finally:
        cluster.shutdown()


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


def run_cli(args: list[str], address: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([SPAI, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


def test_train_and_score_across_nodes(small_corpus, s3_server, cluster, tmp_path):  # noqa: F811
    ray_cluster, nodes = cluster
    manifest, rows = s3_manifest(s3_server, small_corpus, tmp_path)

    done = run_cli(["train", "--config", str(CONFIG_DIR / "tiny.yaml"), "--manifest", manifest, "--output",
                    f"s3://{BUCKET}/runs", "--name", "mn", "--workers", "2", "cpus_per_worker=2", "epochs=1",
                    *LEARN], ray_cluster.address, tmp_path, timeout=480)
    assert done.returncode == 0, done.stdout[-6000:]
    keys = s3_keys(s3_server, "runs/mn/")
    assert "runs/mn/best.safetensors" in keys, keys
    assert any("/checkpoint_" in key and key.endswith("model.safetensors") for key in keys), keys
    assert not (tmp_path / "runs").exists()

    # The GCS still lists the finished workers: one on each worker node, none on the head.
    workers = [a for a in ray_cluster.global_state.actor_table(None).values()
               if a["ActorClassName"] == "RayTrainWorker"]
    assert len(workers) == 2, workers
    assert {a["Address"]["NodeID"] for a in workers} == {node.node_id for node in nodes.values()}

    scored = run_cli(["score", "--weights", f"s3://{BUCKET}/runs/mn/best.safetensors", "--input", manifest,
                      "--output", f"s3://{BUCKET}/scores.parquet", "--workers", "2"], ray_cluster.address, tmp_path,
                     timeout=300)
    assert scored.returncode == 0, scored.stdout[-6000:]
    s3_client(s3_server).download_file(BUCKET, "scores.parquet", str(tmp_path / "scores.parquet"))
    out = pq.read_table(tmp_path / "scores.parquet")
    assert out.num_rows == rows
    assert isinstance(out, pa.Table)
