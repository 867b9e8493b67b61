"""A small real-vs-generated demo corpus shared by the training tests (built once per pytest session).

Import the fixture into a test module with ``from corpus import small_corpus  # noqa: F401`` (tests/ is on sys.path).
"""
from __future__ import annotations


import pytest

from pipelines.demo.corpus import DemoCorpusConfig, build_demo_corpus

NCNN_GENERATOR = "waifu2x_upconv7"  # the fastest ncnn generator on CPU


def small_corpus_config() -> DemoCorpusConfig:
    """12 photos -> ~48 images. Both generators are seen, so train, val and test all hold both of them.

    Sides stay at 256-384 px so validation and scoring need at most a few 224-px tiles per image; 300 autoencoder
    iterations already leave the lattice artifacts the detector learns (see DemoCorpusConfig).
    """
    return DemoCorpusConfig(seed=1, max_photos=12, reals_per_photo=2, fakes_per_generator=1, max_side=384,
                            generators=["autoencoder", NCNN_GENERATOR],
                            seen_generators=["autoencoder", NCNN_GENERATOR], autoencoder_iterations=300)


def learning_corpus_config() -> DemoCorpusConfig:
    """The demo corpus restricted to its three seen generators: 84 training and 54 held-out test images.

    The tiny recipe needs about this much data to generalise to unseen photos (on the 24 training images of the
    small corpus it fits them and stays at chance on the test split).
    """
    seen = DemoCorpusConfig().seen_generators
    return DemoCorpusConfig(generators=list(seen), seen_generators=list(seen))


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Manifest URI of the small corpus, built once per session under pytest's temporary folder."""
    return _session_corpus(tmp_path_factory, "small_corpus", small_corpus_config())


@pytest.fixture(scope="session")
def learning_corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Manifest URI of the learning corpus (see ``learning_corpus_config``), built once per session."""
    return _session_corpus(tmp_path_factory, "learning_corpus", learning_corpus_config())


def _session_corpus(tmp_path_factory: pytest.TempPathFactory, name: str, cfg: DemoCorpusConfig) -> str:
    pytest.importorskip("ncnn", reason="the demo generators need the `ncnn` package (pip install -e .[dev])")
    return build_demo_corpus(tmp_path_factory.getbasetemp() / name, cfg, progress=False)
