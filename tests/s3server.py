"""A real S3 endpoint for tests: moto in server mode on a free loopback port, plus a folder uploader.

``conftest.py`` serves it as the ``s3_server`` fixture: one moto process for the session, emptied after each module,
and while a module uses it the standard AWS variables point at it (endpoint, dummy credentials, region), so code
under test configures itself exactly as it would against AWS.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import boto3
import pytest

from polling import free_port

STARTUP_TIMEOUT_S = 30


def _wait_until_up(endpoint: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with code {process.returncode}; is moto[server] installed?")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not answer on {endpoint} within {STARTUP_TIMEOUT_S}s")


@contextlib.contextmanager
def running_moto(extra_env: Mapping[str, str] | None = None) -> Iterator[str]:
    """Run moto's S3 server on a free loopback port while the block runs; yield its endpoint URL.

    ``extra_env`` configures moto itself, e.g. ``{"INITIAL_NO_AUTH_ACTION_COUNT": "0"}`` to check credentials.
    """
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               env={**os.environ, **(extra_env or {})}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        _wait_until_up(endpoint, process)
        yield endpoint
    finally:
        process.kill()
        process.wait()


def reset_moto(endpoint: str) -> None:
    """Forget every bucket and key, so the next module starts from an empty server."""
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10).close()


@contextlib.contextmanager
def aws_env_for(endpoint: str) -> Iterator[None]:
    """The standard AWS variables pointing at ``endpoint`` with dummy credentials, while the block runs."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
            env.delenv(name, raising=False)
        yield


def upload_folder(endpoint: str, folder: str | os.PathLike, bucket: str, prefix: str = "") -> str:
    """Upload every file under ``folder`` to ``s3://bucket/prefix/...`` (creating the bucket); return that URI."""
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=bucket)
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = "/".join(part for part in (prefix.strip("/"), path.relative_to(root).as_posix()) if part)
        client.upload_file(str(path), bucket, key)
    return f"s3://{bucket}/{prefix.strip('/')}".rstrip("/")
