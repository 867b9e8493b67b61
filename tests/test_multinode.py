"""``spai train`` and ``spai score`` on a real multi-node Ray cluster started with ``ray start``, data in S3.

A head with no CPUs (``ray start --head --num-cpus=0``, as on the cluster launcher and KubeRay) and 3-CPU worker
nodes, each ``ray start --block`` in its own process session so that a whole node can be killed. Training asks for
two workers of 2 CPUs, so no node can hold both and Ray must spread them; the node's third CPU runs the Ray Data
decode tasks. Images, manifest, checkpoints and scores live in a moto S3 server, so nothing is passed between nodes
through the local disk. A third node lets the run survive losing one of them.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import boto3
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray

from polling import free_port, wait_for
from pipelines.data.manifest import read_manifest
from pipelines.train.config import CONFIG_DIR
from s3server import upload_folder

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SPAI, RAY = str(BIN / "spai"), str(BIN / "ray")
LEARN = ["batch_size=2", "optim.lr=3e-3", "optim.warmup_epochs=0.25", "patience=null"]
BUCKET = "multinode"


EPOCH_LINE = re.compile(r"\[spai train\] epoch (\d+):")
STORE = 100 * 1024 * 1024  # object store per node; the jobs move little through it
NODE_CPUS = 3


@dataclass
class RayNodes:
    """Nodes started by ``ray start --block``: the GCS address, each node's process and, once up, its node id."""

    address: str
    processes: dict[str, subprocess.Popen]
    node_ids: dict[str, str]

    def kill(self, name: str) -> None:
        """Lose a node the hard way: SIGKILL its raylet, object store and workers (the node's process group)."""
        os.killpg(self.processes[name].pid, signal.SIGKILL)
        self.processes[name].wait(timeout=30)


@contextlib.contextmanager
def ray_cluster(names: tuple[str, ...], log_dir: Path):
    """A 0-CPU head + one ``NODE_CPUS`` node per name (custom resource ``name``), all via the ``ray start`` CLI.

    Call it inside the ``s3_server`` fixture so that every raylet inherits the AWS variables. The test process
    connects as a driver only to read node and actor tables; the ``spai`` commands run as their own drivers.
    """
    # Ray's own choice of this machine's address: nodes register under it, so the GCS is reached there too.
    address = f"{ray.util.get_node_ip_address()}:{free_port()}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    common = ["--block", f"--object-store-memory={STORE}", "--disable-usage-stats"]
    processes: dict[str, subprocess.Popen] = {}
    temp_dirs: list[str] = []

    def start(name: str, *args: str) -> None:
        # Own temp dir per node: raylets of one machine otherwise share a session folder and its socket names.
        # Short (under /tmp), as Unix socket paths inside it are limited to 107 characters.
        temp_dir = tempfile.mkdtemp(prefix=f"ray-{name}-", dir="/tmp")
        temp_dirs.append(temp_dir)
        with (log_dir / f"ray-{name}.log").open("w") as log:
            processes[name] = subprocess.Popen([RAY, "start", *common, f"--temp-dir={temp_dir}",
                                                f"--resources={json.dumps({name: 1})}", *args],
                                               env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(name: str) -> list[str]:
        return [node["NodeID"] for node in ray.nodes() if node["Alive"] and name in node["Resources"]]

    try:
        start("head", "--head", f"--port={address.rsplit(':', 1)[1]}", "--num-cpus=0", "--include-dashboard=false")
        wait_for(lambda: _reachable(address), 60, "the head's GCS")
        ray.shutdown()  # a Ray another test left up (one that failed before its own shutdown) is not this cluster
        ray.init(address=address)
        for name in names:  # one at a time: each node registers before the next starts
            start(name, f"--address={address}", f"--num-cpus={NODE_CPUS}")
            wait_for(lambda: alive(name), 90, f"node {name} up")
        node_ids = {name: alive(name)[0] for name in names}
        yield RayNodes(address, processes, node_ids)
    finally:
        ray.shutdown()
        for process in processes.values():  # SIGTERM: `ray start --block` stops the processes it started
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _reachable(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
        return True
    return False


def actors(class_name: str, state: str | None = None) -> list[dict]:
    """Actors whose class name contains ``class_name``, finished ones included, from the connected cluster's GCS."""
    return [a for a in ray._private.state.actors().values()
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
    """Two workers of 2 CPUs: no node holds both (the head has none, the others 3), so they must spread."""
    return ["train", "--config", str(CONFIG_DIR / "tiny.yaml"), "--manifest", manifest, "--output",
            f"s3://{BUCKET}/runs", "--name", name, "--workers", "2", "cpus_per_worker=2", *LEARN, *overrides]


def node_of(actor: dict) -> str:
    return actor["Address"]["NodeID"]


def test_train_and_score_across_nodes(small_corpus, s3_server, tmp_path):
    manifest, rows = s3_manifest(s3_server, small_corpus, tmp_path)
    with ray_cluster(("node_a", "node_b"), tmp_path) as cluster:
        done = run_cli(train_args(manifest, "mn", "epochs=1"), cluster.address, tmp_path, timeout=480)
        assert done.returncode == 0, done.stdout[-6000:]
        keys = s3_keys(s3_server, "runs/mn/")
        assert "runs/mn/best.safetensors" in keys, keys
        assert any("/checkpoint_" in key and key.endswith("model.safetensors") for key in keys), keys
        assert not (tmp_path / "runs").exists()

        # The GCS still lists the finished workers: one on each worker node, none on the head.
        workers = actors("RayTrainWorker")
        assert len(workers) == 2, workers
        assert {node_of(a) for a in workers} == set(cluster.node_ids.values())

        # Weights by a path relative to the driver's folder, which the cluster's workers do not share (nodes started
        # elsewhere, as on a real cluster with a shared file system); s3:// weights are covered in test_score.
        s3_client(s3_server).download_file(BUCKET, "runs/mn/best.safetensors", str(tmp_path / "best.safetensors"))
        scored = run_cli(["score", "--weights", "best.safetensors", "--input", manifest,
                          "--output", f"s3://{BUCKET}/scores.parquet", "--workers", "2"], cluster.address, tmp_path,
                         timeout=300)
        assert scored.returncode == 0, scored.stdout[-6000:]
        # Two scoring actors, one per worker node (the head has no CPU), each leaving its node a CPU for decoding.
        scorers = actors("MapWorker")
        assert {node_of(a) for a in scorers} == set(cluster.node_ids.values()), scorers
    s3_client(s3_server).download_file(BUCKET, "scores.parquet", str(tmp_path / "scores.parquet"))
    out = pq.read_table(tmp_path / "scores.parquet")
    assert sorted(out.column("uri").to_pylist()) == sorted(read_manifest(manifest).column("uri").to_pylist())
    assert out.num_rows == rows and out.column("error").null_count == rows


def test_training_survives_losing_a_node(small_corpus, s3_server, tmp_path):
    """A worker node is killed after the first committed checkpoint; the run restarts on the spare node and ends."""
    manifest, _ = s3_manifest(s3_server, small_corpus, tmp_path)
    epochs = 2
    snapshot = "runs/lost/checkpoint_manager_snapshot.json"
    with ray_cluster(("node_a", "node_b", "node_c"), tmp_path) as cluster:
        log = tmp_path / "train.log"  # a file, not a pipe: nobody reads while we wait
        with log.open("w") as sink, subprocess.Popen([SPAI, *train_args(manifest, "lost", f"epochs={epochs}",
                                                                         "max_failures=2")],
                                                     cwd=tmp_path, env=cli_env(cluster.address), stdout=sink,
                                                     stderr=subprocess.STDOUT) as proc:
            wait_for(lambda: snapshot in s3_keys(s3_server, "runs/lost/") or proc.poll() is not None, 400,
                     "the first committed checkpoint")
            assert proc.poll() is None, log.read_text()[-4000:]
            first = {node_of(a) for a in actors("RayTrainWorker", "ALIVE")}
            (victim,) = [name for name, node_id in cluster.node_ids.items() if node_id == min(first)]
            cluster.kill(victim)
            proc.wait(timeout=400)
        out = log.read_text()
        assert proc.returncode == 0, out[-4000:]
        assert "runs/lost/best.safetensors" in s3_keys(s3_server, "runs/lost/")
        # Another worker group ran, and it used the spare node, not the lost one. Under load a restart can itself
        # fail once (a group placed before the lost node is declared dead) and take one more of max_failures.
        workers = actors("RayTrainWorker")
        assert len(workers) >= 4 and len(workers) % 2 == 0, workers
        later = {node_of(a) for a in workers} - first
        assert later == set(cluster.node_ids.values()) - first, (later, first)
    epochs_seen = [int(m.group(1)) for m in map(EPOCH_LINE.search, out.splitlines()) if m]
    assert sorted(set(epochs_seen)) == list(range(epochs)), epochs_seen
