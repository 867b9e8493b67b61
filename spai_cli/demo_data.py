"""`spai demo-data`: its flags, and the call into the library."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("demo-data", help="build only the offline demo corpus (photos + CPU generators)",
                       description="Real photos (committed, licensed) and fakes made from down-scaled copies of them "
                       "by GAN up-samplers (ncnn, CPU) and a small transposed-convolution autoencoder; every image "
                       "JPEG re-compressed alike; split by photo; some generators held out for test. A corpus "
                       "built with the same config is reused. Needs `pip install -e .[demo]`.")
    p.add_argument("--output", "-o", default="demo_out/corpus", help="corpus folder (images/ and manifest/)")
    p.add_argument("--seed", type=int, default=None, help="corpus seed (default: the config's, 0)")
    p.add_argument("--config", "-c", default=None, help="DemoCorpusConfig YAML (default: the built-in recipe)")
    p.add_argument("--rebuild", action="store_true", help="rebuild even if a corpus with this config exists")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. max_photos=12 autoencoder_iterations=3000")
    return p


def run(args: argparse.Namespace) -> int:
    from pipelines.demo.corpus import main

    return int(main(args) or 0)
