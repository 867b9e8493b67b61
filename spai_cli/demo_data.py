"""`spai demo-data`: the corpus recipe's flags (derived from DemoCorpusConfig), where it goes, and the library call."""
from __future__ import annotations

import argparse

DESCRIPTION = ("Real photos (committed, licensed) and fakes made from down-scaled copies of them "
               "by GAN up-samplers (ncnn, CPU) and a small transposed-convolution autoencoder; every image "
               "JPEG re-compressed alike; split by photo; some generators held out for test. A corpus "
               "built with the same config is reused; its config is saved as <output>/manifest/_config.yaml "
               "(--config rebuilds it). Needs `pip install -e .[demo]`.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipelines.demo.corpus import DemoCorpusConfig
    from spai_cli.options import add_config_options

    p.add_argument("--output", "-o", default="demo_out/corpus", help="corpus folder (images/ and manifest/)")
    p.add_argument("--rebuild", action="store_true", help="rebuild even if a corpus with this config exists")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    add_config_options(p, DemoCorpusConfig, config_help="DemoCorpusConfig YAML (default: the built-in recipe), e.g. "
                       "the manifest/_config.yaml of a corpus built before")


def run(args: argparse.Namespace) -> int:
    from pipelines.demo.corpus import DemoCorpusConfig, make_demo_corpus
    from spai_cli.options import config_from_args

    make_demo_corpus(args.output, config_from_args(DemoCorpusConfig, args), progress=not args.quiet,
                     rebuild=args.rebuild)
    return 0
