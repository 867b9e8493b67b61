"""What a scoring job is asked to do (:class:`ScoreConfig`, the ``spai score`` flags), and where its actors run
(:class:`ActorPlan`, resolved from the config and the cluster's resources)."""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pipelines.data.decode import DEFAULT_MAX_PIXELS
from pipelines.data.transforms import ScoreTransformConfig
from pipelines.infra.settings import TrackingConfig
from pipelines.perturb import Variant, parse_variants
from spai_core.config import ConfigError, option
from spai_core.detector import PRECISIONS, resolve_precision
from spai_core.errors import UserError
from spai_core.onnx_runtime import RUNTIMES, onnx_device

GPU_ACTOR_THREADS = 2  # a GPU actor only pads and tiles on the CPU
DEVICES = ("auto", "cpu", "cuda")
# Positive when set; what each one counts, for the error.
_POSITIVE = {"batch_size": "images per model call", "workers": "scoring actors",
             "cpus_per_worker": "torch threads per CPU actor", "feature_batch": "tiles encoded at once",
             "max_tiles": "tiles per image", "part_rows": "rows per part file", "max_pixels": "pixels per image"}


class ScoreError(UserError, RuntimeError):
    """A scoring job that cannot start or finish; the message says what to do."""


@dataclasses.dataclass
class ScoreConfig:
    """Options of one scoring job; saved next to the output as ``<output>.config.yaml`` (``spai score --config`` of
    it reruns the job) and checked on resume."""

    weights: str = option("", flag="--weights", short="-w", help="official spai.pth or our checkpoint "
                          "(.safetensors); local path or s3://")
    runtime: str = option("pytorch", flag="--runtime", choices=RUNTIMES, help="pytorch: --weights is a checkpoint; "
                          "onnxruntime: a local folder of `spai export onnx` (fp32 graphs), scored the same way")
    input: str = option("", flag="--input", short="-i", help="image, folder, official CSV, manifest or s3:// prefix")
    recursive: bool = option(False, flag="--recursive", short="-r", help="score a folder's subfolders too (default: "
                             "its top level, like the official tool)")
    output: str = option("", flag="--output", short="-o", help="PATH.parquet, PATH.csv or s3:// URI")
    overwrite: bool = option(False, flag="--overwrite", help="score again and replace an existing --output (it stays "
                             "until the new one is complete; an interrupted run is still continued, not restarted)")
    device: str = option("auto", flag="--device", choices=DEVICES,
                         help="where the model runs (auto: GPUs when the Ray cluster has them)")
    precision: str = option("auto", flag="--precision", choices=("auto", *PRECISIONS),
                            help="fp32 reproduces the official scores; bf16 is faster on GPUs and bf16-capable CPUs "
                            "(auto: bf16 on GPU, fp32 on CPU)")
    batch_size: int = option(8, flag="--batch-size", help="images per model call; their tiles are encoded together")
    workers: int | None = option(None, flag="--workers", help="scoring actors (default: one per GPU, else 1)")
    gpus_per_worker: float | None = option(None, flag="--gpus-per-worker", help="GPUs per scoring actor (default: 1 "
                                           "with --device cuda, or auto on a GPU cluster)")
    cpus_per_worker: int | None = option(None, flag="--cpus-per-worker", help="torch threads of each CPU scoring "
                                         "actor (default: the node's CPUs split between the actors)")
    feature_batch: int | None = option(None, flag="--feature-batch", help="tiles encoded at once, bounds memory "
                                       "(default: the Detector's, 4 on CPU, the model's on GPU)")
    max_tiles: int | None = option(None, flag="--max-tiles", help="cap on 224-px tiles per image (huge images)")
    perturb: list[str] = option(default_factory=list, flag="--perturb", help="robustness sweep: score every "
                                "variant of each image in this one job, e.g. --perturb jpeg=95,75,50 webp=80 blur=1,3 "
                                "resize=0.5 meme filter=all (NAME[=S1,S2,...]; the perturbations are listed in "
                                "README, pipelines/perturb); output rows get variant, perturbation and strength. Put "
                                "KEY=VALUE overrides before it")
    original: bool = option(True, flag="--original", help="with --perturb, also score each image as it is (variant "
                            "none)")
    transform: ScoreTransformConfig = dataclasses.field(default_factory=ScoreTransformConfig)
    root: str | None = option(None, flag="--root", help="root dir for relative paths of a CSV input")
    split: str | None = option(None, flag="--split", help="score only rows of this split")
    seed: int = option(0, flag="--seed", help="seeds the random perturbations (noise, random crop, captions...), per "
                       "image and variant")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, flag="--max-pixels", help="larger images are rows with a "
                             "decompression_bomb error")
    tag: str = option("spai", flag="--tag", help="score column name in the official CSV layout")
    official_csv: bool = option(False, flag="--official-csv", help="write the official CSV layout (input columns + "
                                "--tag column) instead of ours")
    part_rows: int = option(1000, flag="--part-rows", help="finished rows per part file of the resumable work dir "
                            "<output>.parts/ (a kill redoes at most this many rows, or one minute of work)")
    tracking: TrackingConfig = dataclasses.field(
        default_factory=functools.partial(TrackingConfig, experiment="spai-score"))

    def validate(self) -> None:
        for name in ("weights", "input", "output"):
            if not getattr(self, name):
                raise ConfigError("is required", name)
        if self.runtime == "onnxruntime" and self.precision == "bf16":
            raise ConfigError("needs --runtime pytorch: an ONNX export runs in fp32", "precision")
        if not self.output.lower().endswith((".parquet", ".csv")):
            raise ConfigError(f"{self.output!r} must end with .parquet or .csv", "output")
        if self.official_csv and not self.output.lower().endswith(".csv"):
            raise ConfigError("writes a CSV: give an --output ending with .csv", "official_csv")
        if self.official_csv and self.perturb:
            raise ConfigError("has one score per image, a --perturb sweep several: drop one of them", "official_csv")
        self.variants()  # the sweep parses
        for name, what in _POSITIVE.items():
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"must be a positive number ({what}), got {value}", name)
        if self.gpus_per_worker is not None:
            if not self.gpus_per_worker > 0:
                raise ConfigError(f"must be > 0 (GPUs per scoring actor), got {self.gpus_per_worker}",
                                  "gpus_per_worker")
            if self.device == "cpu":
                raise ConfigError("asks for GPUs but --device is cpu; drop one of them", "gpus_per_worker")

    @property
    def sweep(self) -> bool:
        """Whether this job scores variants (its output has the variant columns)."""
        return bool(self.perturb)

    def variants(self) -> list[Variant]:
        """What each image is scored as: the original alone, or the sweep's variants."""
        return parse_variants(self.perturb, self.original) if self.perturb else parse_variants([])

    def options(self, precision: str) -> dict[str, Any]:
        """Every option that changes scores (with the resolved precision); what a resume must match."""
        return {"precision": precision, "max_tiles": self.max_tiles, "seed": self.seed, "max_pixels": self.max_pixels,
                "variants": [v.label for v in self.variants()], **dataclasses.asdict(self.transform)}


@dataclasses.dataclass(frozen=True)
class ActorPlan:
    """Where and how the scoring actors run, resolved from the config and the cluster's resources."""

    device: str
    precision: str
    workers: int
    num_cpus: float  # CPUs each actor reserves (fractional on CPU so decode tasks keep a slot)
    num_gpus: float
    threads: int  # torch threads per actor

    @property
    def gpus(self) -> float:
        """GPUs the whole pool needs."""
        return self.workers * self.num_gpus

    @property
    def batches_in_flight(self) -> int | None:
        """Batches queued on one actor (None: Ray Data's default, 4). A CPU actor takes one at a time: a batch there
        is seconds to minutes of work, and with a queue the first actor to load its model took every batch of a small
        job while the others idled (14 images on 2 one-thread workers ran as long as on one). A GPU actor keeps a
        queue, so the next batch is fetched while the GPU works."""
        return 1 if self.device == "cpu" else None


def plan_actors(cfg: ScoreConfig, resources: Mapping[str, float], node_cpus: Sequence[float] | None = None
                ) -> ActorPlan:
    """One actor per GPU (or ``workers`` x ``gpus_per_worker``) on GPU clusters, else ``workers`` CPU actors sharing
    the CPUs.

    ``node_cpus`` (CPUs of each alive node; default: one node with all of ``resources``) sizes CPU actors per node:
    actors are spread over the nodes that have CPUs, and each node keeps one CPU unreserved for decode tasks.
    ``cpus_per_worker`` fixes each CPU actor's torch threads instead (e.g. to measure scaling at a fixed size).
    """
    gpus_total = float(resources.get("GPU", 0.0))
    # GPUs asked for mean GPU actors even while an autoscaling cluster has no GPU node yet (see runtime.check_gpus)
    device = ("cuda" if cfg.device == "cuda" or cfg.gpus_per_worker or (cfg.device == "auto" and gpus_total > 0)
              else "cpu")
    if device == "cuda" and cfg.runtime == "onnxruntime":
        # A CPU-only onnxruntime would make GPU actors that fail at start; the driver's build stands for the actors'
        # (one environment), so auto falls back to CPU here and GPUs asked for are refused before Ray starts.
        device = onnx_device("cuda" if cfg.device == "cuda" or cfg.gpus_per_worker else "auto")
    precision = resolve_precision(cfg.precision, torch.device(device))
    if device == "cuda":
        gpus = cfg.gpus_per_worker or 1.0
        workers = cfg.workers or max(1, int(gpus_total // gpus))
        return ActorPlan(device, precision, workers, 1.0, gpus, GPU_ACTOR_THREADS)
    workers = cfg.workers or 1
    cpu_nodes = [c for c in (node_cpus or [float(resources.get("CPU", 1.0))]) if c >= 1] or [1.0]
    per_node = math.ceil(workers / len(cpu_nodes))  # actors sharing the smallest node in the worst case
    smallest = min(cpu_nodes)
    threads = cfg.cpus_per_worker or max(1, int(smallest // per_node))
    # Actors use all their cores through torch threads but reserve less, so Ray can still schedule decode tasks.
    num_cpus = min(float(threads), max(smallest - 1.0, 1.0) / per_node)
    return ActorPlan(device, precision, workers, num_cpus, 0.0, threads)
