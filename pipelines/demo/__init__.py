"""The offline demo: a corpus of committed photos and CPU generators, and the corpus -> train -> score -> evaluate run."""
