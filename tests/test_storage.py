"""Local and S3 (moto server) file access, and errors that tell the user what is wrong and what to do."""
from __future__ import annotations

import functools
import http.server
import pickle
import threading
import time
from collections.abc import Iterator

import pyarrow.fs as pafs
import pytest

from pipelines.infra import storage
from pipelines.data.decode import DecodeError
from pipelines.infra.storage import StorageError, StorageOptions
from polling import free_port
from s3server import running_moto, upload_folder


@pytest.fixture()
def tree(tmp_path):
    for name in ("a/one.JPG", "a/b/two.png", "three.txt", ".DS_Store", "a/._one.jpg", ".hidden/four.png"):
        path = tmp_path / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())
    return tmp_path / "data"


def test_options_from_env_prefer_s3_specific_endpoint():
    env = {"AWS_ENDPOINT_URL": "http://generic:9000", "AWS_ENDPOINT_URL_S3": "http://s3only:9000",
           "AWS_DEFAULT_REGION": "eu-west-1", "AWS_PROFILE": "lab"}
    assert StorageOptions.from_env(env) == StorageOptions("http://s3only:9000", "eu-west-1", "lab")
    assert StorageOptions.from_env({"AWS_REGION": "us-west-2", "AWS_DEFAULT_REGION": "x"}).region == "us-west-2"
    assert StorageOptions.from_env({}) == StorageOptions()


def test_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "/home/someone")
    assert storage.absolute("runs/a") == f"{tmp_path}/runs/a" and storage.absolute("~/w.pth") == "/home/someone/w.pth"
    assert storage.absolute("s3://b/runs") == "s3://b/runs"
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/x")
    assert storage.join("s3://b/p/", "q", "r.png") == "s3://b/p/q/r.png"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"
    assert storage.parent("s3://b/p/q.csv") == "s3://b/p" and storage.basename("s3://b/p/q/") == "q"
    assert storage.relative_to("s3://b/p/q/r.png", "s3://b/p/") == "q/r.png"
    with pytest.raises(StorageError, match="no bucket"):
        storage.read_bytes("s3:///key")


def test_local_roundtrip_listing_and_missing(tree, tmp_path):
    target = tmp_path / "out" / "deep" / "f.bin"
    storage.write_bytes(str(target), b"\x00data")
    assert storage.read_bytes(str(target)) == b"\x00data"
    (tree / "a" / "gone.png").symlink_to(tmp_path / "moved.png")  # a broken link is listed, to fail as missing
    (tree / "linked").symlink_to(tree / "a" / "b")  # a linked folder is followed
    images = [str(tree / name) for name in ("a/b/two.png", "a/gone.png", "a/one.JPG", "linked/two.png")]
    assert storage.list_files(str(tree)) == images + [str(tree / "three.txt")]  # hidden files and folders skipped
    assert storage.list_files(str(tree), recursive=False) == [str(tree / "three.txt")]
    assert storage.list_files(str(tree), suffixes=(".jpg", ".png")) == images
    assert storage.exists(str(tree / "a")) and storage.exists(str(target))
    assert not storage.exists(str(tree / "nope"))
    fs, path = storage.filesystem(str(tree))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tree)
    with pytest.raises(StorageError, match="could not write /proc/spai/out.csv: .*check that its folder exists"):
        storage.write_bytes("/proc/spai/out.csv", b"x")  # a folder that cannot be made: not 'does not exist'
    for call in (lambda: storage.read_bytes(str(tree / "nope.jpg")), lambda: storage.list_files(str(tree / "nope"))):
        with pytest.raises(StorageError, match="does not exist; check the path") as caught:
            call()
        assert caught.value.reason == "not_found" and isinstance(caught.value, OSError)
    with pytest.raises(StorageError, match=f"gone.png is a broken symbolic link \\(to {tmp_path}/moved.png") as caught:
        storage.read_bytes(str(tree / "a" / "gone.png"))
    assert caught.value.reason == "not_found"


def test_s3_roundtrip_and_listing(s3_server, tree):
    prefix = upload_folder(s3_server, tree, "store", "data")
    fs, path = storage.filesystem(prefix)
    assert isinstance(fs, pafs.S3FileSystem) and path == "store/data"
    assert storage.list_files(prefix) == [f"{prefix}/a/b/two.png", f"{prefix}/a/one.JPG", f"{prefix}/three.txt"]
    assert storage.list_files(prefix, recursive=False, suffixes=(".txt",)) == [f"{prefix}/three.txt"]
    assert storage.read_bytes(f"{prefix}/a/one.JPG") == b"a/one.JPG"
    storage.write_bytes(f"{prefix}/new/x.bin", b"xyz")
    assert storage.read_bytes(f"{prefix}/new/x.bin") == b"xyz"
    assert storage.exists(f"{prefix}/a") and not storage.exists(f"{prefix}/zz")
    with pytest.raises(StorageError, match="does not exist") as caught:
        storage.read_bytes(f"{prefix}/missing.jpg")
    assert caught.value.reason == "not_found"


def test_s3_missing_bucket_says_create_it(s3_server):
    for call in (lambda: storage.read_bytes("s3://no-such-bucket/a.jpg"),
                 lambda: storage.list_files("s3://no-such-bucket/prefix"),
                 lambda: storage.write_bytes("s3://no-such-bucket/a.bin", b"x")):
        with pytest.raises(StorageError, match=r"bucket 'no-such-bucket' does not exist .*aws s3 mb") as caught:
            call()
        assert caught.value.reason == "missing_bucket"


def test_s3_unreachable_endpoint_names_it_quickly(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    options = StorageOptions(endpoint_url=endpoint, region="us-east-1", max_attempts=1)
    start = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach the S3 endpoint {endpoint}.*AWS_ENDPOINT_URL") as caught:
        storage.read_bytes("s3://bucket/key.jpg", options)
    assert caught.value.reason == "unreachable"
    assert time.monotonic() - start < 20


def test_s3_wrong_credentials_say_check_them(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with running_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as endpoint:  # this server checks credentials
        options = StorageOptions(endpoint_url=endpoint, region="us-east-1", max_attempts=1)
        with pytest.raises(StorageError, match="denied.*check the credentials") as caught:
            storage.read_bytes("s3://bucket/key.jpg", options)
    assert caught.value.reason == "access_denied"


def test_errors_survive_pickling_with_their_fields():
    """Ray pickles an error raised in a task; before ``__reduce__`` these arrived as "Failed to deserialize"."""
    error = pickle.loads(pickle.dumps(StorageError("missing_bucket", "s3://b/k", "bucket 'b' does not exist")))
    assert (type(error), error.reason, error.uri, str(error)) == (StorageError, "missing_bucket", "s3://b/k",
                                                                   "bucket 'b' does not exist")
    decode = pickle.loads(pickle.dumps(DecodeError("truncated", "image file is truncated")))
    assert (decode.reason, decode.message, str(decode)) == ("truncated", "image file is truncated",
                                                            "truncated: image file is truncated")


@pytest.fixture()
def web_server(tmp_path) -> Iterator[str]:
    """A plain HTTP file server on loopback (an empty folder): it answers 404 to every S3 request."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_endpoint_that_is_not_s3_is_not_called_a_missing_bucket(web_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    options = StorageOptions(endpoint_url=web_server, region="us-east-1", max_attempts=1)
    with pytest.raises(StorageError, match=f"{web_server} answered HTTP 404 without an S3 error.*does not look like "
                       "an S3 server.*AWS_ENDPOINT_URL") as caught:
        storage.list_files("s3://bucket/prefix", options)
    assert caught.value.reason == "not_s3" and "aws s3 mb" not in str(caught.value)


def test_a_missing_s3_key_says_nothing_of_the_working_directory(s3_server, tmp_path):
    prefix = upload_folder(s3_server, tmp_path, "keys")  # an empty bucket
    with pytest.raises(StorageError, match="s3://keys/gone.jpg does not exist") as caught:
        storage.read_bytes(f"{prefix}/gone.jpg")
    assert caught.value.reason == "not_found" and "working directory" not in str(caught.value)


def test_a_dead_endpoint_fails_in_seconds_with_the_default_retries(monkeypatch):
    """Before, the SDK's five attempts with back-off took 3-15 s on a closed port (38 s on an unreachable address)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    endpoint = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach the S3 endpoint {endpoint}") as caught:
        storage.list_files("s3://bucket/prefix", StorageOptions(endpoint_url=endpoint, region="us-east-1"))
    assert caught.value.reason == "unreachable" and time.monotonic() - start < 2
    assert "\n" not in str(caught.value)
