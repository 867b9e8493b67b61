"""Robustness perturbations: a registry of named, seeded degradations and derivative images (:mod:`.registry`),
their text forms for sweeps and training augments (:mod:`.spec`). Importing the package registers every kind."""
from pipelines.perturb import degrade, derivatives, filters  # each registers its perturbations
from pipelines.perturb.registry import NONE, Perturbation, Variant, get, perturbations
from pipelines.perturb.spec import RandomPerturb, parse_augment, parse_variants

__all__ = ["degrade", "derivatives", "filters", "NONE", "Perturbation", "RandomPerturb", "Variant", "get",
           "parse_augment", "parse_variants", "perturbations"]
