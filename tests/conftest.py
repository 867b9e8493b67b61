"""Shared test fixtures: real photos and the parity fixtures, all from inside the repository."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

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
