"""Small real-vs-generated demo corpora shared by the training tests; ``conftest.py`` serves them as the session
fixtures ``small_corpus`` and ``learning_corpus`` (each built once per pytest session)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported where used: the demo corpus module imports torch, which every session need not pay
    from pipelines.demo.corpus import DemoCorpusConfig

NCNN_GENERATOR = "waifu2x_upconv7"  # the fastest ncnn generator on CPU


def small_corpus_config() -> DemoCorpusConfig:
    """12 photos -> ~48 images. Both generators are seen, so train, val and test all hold both of them.

    Sides stay at 256-384 px so validation and scoring need at most a few 224-px tiles per image; 300 autoencoder
    iterations already leave the lattice artifacts the detector learns (see DemoCorpusConfig).
    """
    from pipelines.demo.corpus import DemoCorpusConfig

    return DemoCorpusConfig(seed=1, max_photos=12, reals_per_photo=2, fakes_per_generator=1, max_side=384,
                            generators=["autoencoder", NCNN_GENERATOR],
                            seen_generators=["autoencoder", NCNN_GENERATOR], autoencoder_iterations=300)


def learning_corpus_config() -> DemoCorpusConfig:
    """The demo corpus restricted to its three seen generators: 84 training and 54 held-out test images.

    The tiny recipe needs about this much data to generalise to unseen photos (on the 24 training images of the
    small corpus it fits them and stays at chance on the test split).
    """
    from pipelines.demo.corpus import DemoCorpusConfig

    seen = DemoCorpusConfig().seen_generators
    return DemoCorpusConfig(generators=list(seen), seen_generators=list(seen))


def session_corpus(tmp_path_factory: pytest.TempPathFactory, name: str, cfg: DemoCorpusConfig) -> str:
    """Manifest URI of corpus ``cfg``, built under pytest's temporary folder (skipped without ``ncnn``)."""
    pytest.importorskip("ncnn", reason="the demo generators need the `ncnn` package (pip install -e .[dev])")
    from pipelines.demo.corpus import build_demo_corpus

    return build_demo_corpus(tmp_path_factory.getbasetemp() / name, cfg, progress=False)
