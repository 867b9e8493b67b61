"""Shared test fixtures: real photos and the parity fixtures from inside the repository, the demo corpora, an S3
server, a local Ray shared by the tests that ask for it, and MLflow stores of the tests' own."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corpus import learning_corpus_config, session_corpus, small_corpus_config
from fusion_features import extract, save_tiny_spai
from s3server import aws_env_for, reset_moto, running_moto

# Ray's token authentication is for shared clusters; the local test clusters (and their subprocesses) skip it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
PARITY_DIR = REPO / "tests" / "fixtures" / "spai-parity"
COMMITTED_PHOTOS = REPO / "pipelines" / "assets" / "photos"
# The committed demo photos are the source of truth; the shared folder is only a development fallback.
SHARED_PHOTOS = REPO.parent / "shared" / "data" / "photos"


def photo_files() -> list[Path]:
    folder = COMMITTED_PHOTOS if COMMITTED_PHOTOS.is_dir() else SHARED_PHOTOS
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise RuntimeError(f"no photos found in {folder}")
    return files


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    """Real licensed photos (JPEG/PNG) of various sizes."""
    return photo_files()


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return PARITY_DIR


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Manifest URI of the small corpus (see ``corpus.small_corpus_config``), built once per session."""
    return session_corpus(tmp_path_factory, "small_corpus", small_corpus_config())


@pytest.fixture(scope="session")
def learning_corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Manifest URI of the learning corpus (see ``corpus.learning_corpus_config``), built once per session."""
    return session_corpus(tmp_path_factory, "learning_corpus", learning_corpus_config())


# ---------------------------------------------------------------------------------------------------------------
# S3 and Ray


@pytest.fixture(scope="session")
def _moto() -> Iterator[str]:
    """One moto server for the session (each start costs seconds); see ``s3_server``."""
    with running_moto() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def s3_server(_moto: str) -> Iterator[str]:
    """An S3 endpoint (moto on 127.0.0.1) that the standard AWS variables point at while the module runs; empty
    when the module starts. Yields its URL."""
    with aws_env_for(_moto):
        yield _moto
    reset_moto(_moto)


SHARED_RAY = pytest.StashKey["SharedRay"]()


class SharedRay:
    """The local Ray of the tests that ask for ``ray_session``: started on first use, kept for the next test that
    asks, stopped before any other test (which may start a Ray of its own, sized for itself) and at the end."""

    def __init__(self) -> None:
        self.running = False

    def start(self) -> None:
        import ray

        if self.running or ray.is_initialized():
            return
        with pytest.MonkeyPatch.context() as env:
            # Workers unpickle functions defined in test modules by module name, so they must import from tests/.
            env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                   os.getenv("PYTHONPATH")])))
            ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False
        self.running = True

    def stop(self) -> None:
        if self.running:
            import ray

            ray.shutdown()
            self.running = False


@pytest.fixture(scope="session")
def _shared_ray(request: pytest.FixtureRequest) -> Iterator[SharedRay]:
    shared = request.config.stash[SHARED_RAY] = SharedRay()
    yield shared
    shared.stop()


@pytest.fixture(scope="module")
def ray_session(s3_server: str, _shared_ray: SharedRay) -> None:
    """A local 2-CPU Ray, started after the S3 server so that its workers see the S3 settings."""
    _shared_ray.start()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the modules that use the shared Ray last, one after another, each with its Ray tests at its end, so that
    one Ray start serves them all (every other test stops it: a Ray start costs seconds on 2 cores). Stable: the
    order inside each group is kept, and each module stays contiguous for its module-scoped fixtures."""
    ray_modules = {item.module for item in items if "ray_session" in item.fixturenames}
    first_index = {}
    for index, item in enumerate(items):
        first_index.setdefault(item.module, index)
    items.sort(key=lambda item: (item.module in ray_modules, first_index[item.module],
                                 "ray_session" in item.fixturenames))


def pytest_runtest_setup(item: pytest.Item) -> None:
    shared = item.config.stash.get(SHARED_RAY, None)
    if shared is not None and "ray_session" not in item.fixturenames:
        shared.stop()


# ---------------------------------------------------------------------------------------------------------------
# Sem-SPAI


@pytest.fixture(scope="session")
def tiny_spai_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny SPAI checkpoint (random weights from a fixed seed): the frozen spectral model of the fusion tests."""
    return save_tiny_spai(tmp_path_factory.mktemp("spai") / "tiny.safetensors")


@pytest.fixture(scope="session")
def _session_features(tmp_path_factory: pytest.TempPathFactory, small_corpus: str,
                      tiny_spai_file: str) -> Callable[[], Path]:
    """The small corpus's feature table, extracted the first time a module asks (on the shared Ray it needs)."""
    output = tmp_path_factory.mktemp("features")

    @functools.cache
    def extracted() -> Path:
        result = extract(small_corpus, tiny_spai_file, output)
        assert (result.rows, result.failed, result.done_before) == (48, 0, 0)
        return output
    return extracted


@pytest.fixture(scope="module")
def fusion_features(ray_session: None, _session_features: Callable[[], Path]) -> Path:
    """The small corpus's Sem-SPAI feature table (tiny SPAI, a small random ViT), one extraction per session: tests
    may redo parts of it, but must leave it as they found it."""
    return _session_features()


# ---------------------------------------------------------------------------------------------------------------
# MLflow


@contextlib.contextmanager
def _tracking_store(folder: Path) -> Iterator[str]:
    """``$MLFLOW_TRACKING_URI`` pointing at a SQLite store in ``folder`` while the block runs (not ./mlruns of the
    checkout, where every tracked job would otherwise log)."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture()
def mlflow_store(tmp_path: Path) -> Iterator[str]:
    """A store of the test's own, in its ``tmp_path``."""
    with _tracking_store(tmp_path) as uri:
        yield uri


@pytest.fixture(scope="module")
def module_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A store of the module's own, for module-scoped fixtures that run tracked jobs."""
    with _tracking_store(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri
