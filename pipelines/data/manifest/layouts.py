"""Manifest rows from dataset layouts: GenImage trees, official SPAI CSVs, and real/fake folders (local or S3)."""
from __future__ import annotations

import collections
import csv
import io
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.infra.storage import Files, StorageOptions, basename, is_s3, join, parent, relative_to

from .schema import REAL, SPLITS, ManifestError, rows_to_table
from .splits import assign_splits, check_fractions, file_stem, stem_group

logger = logging.getLogger(__name__)

# What the builders take for an image by name (listing by content would read every file of a remote dataset);
# `spai validate` then rejects any that do not decode.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".avif")
_GENIMAGE_SPLITS = {"train": "train", "val": "test"}  # GenImage's val set is the benchmark's test set
_GENIMAGE_CLASSES = {"ai": 1, "nature": 0}
HIDDEN_WHY = "whose name or folder starts with '.' (hidden: system metadata such as .DS_Store, not images)"


def _list_images(uri: str, files: Files, recursive: bool = True) -> tuple[list[str], list[str], list[str]]:
    """(image files by suffix, other files, hidden files) under a folder or prefix; no image there is an error."""
    listing = files.listing(uri, recursive=recursive)
    images = [u for u in listing.files if u.lower().endswith(IMAGE_SUFFIXES)]
    if not images:
        raise ManifestError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {uri}; check the path")
    return images, [u for u in listing.files if not u.lower().endswith(IMAGE_SUFFIXES)], listing.hidden


def skipped_note(uris: Sequence[str], why: str, key: str = "skipped") -> dict[str, Any]:
    """Log and describe files a builder did not take (each once: overlapping folders list a file twice), so nothing
    is dropped without a trace; ``{key: {count, why, examples}}``, or ``{}`` for none."""
    uris = list(dict.fromkeys(uris))
    if not uris:
        return {}
    logger.warning("skipped %d file(s) %s, e.g. %s", len(uris), why, ", ".join(uris[:3]))
    return {key: {"count": len(uris), "why": why, "examples": uris[:20]}}


def genimage_generator(folder: str) -> str:
    """Normalised generator name of a GenImage folder: ``imagenet_ai_0419_sdv4`` -> ``sdv4``,
    ``imagenet_glide`` -> ``glide``; other names are lower-cased unchanged."""
    return re.sub(r"^imagenet_(ai_\d{4}_)?", "", folder.lower())


def _picks(name: str, folder: str) -> bool:
    """Whether a ``--generators`` name picks a GenImage folder: by folder name or normalised generator name."""
    return name.lower() == folder.lower() or genimage_generator(name) == genimage_generator(folder)


def genimage_group(folder: str, uri: str) -> str:
    """The ImageNet class of a GenImage file, prefixed by its generator folder (the unit of a prompt).

    Nature images carry a synset (``n01440764_10026.JPEG``), generated ones the class number before
    ``_<generator>_<n>`` (``014_sdv4_00021.png``, ``GLIDE_1000_200_08_014_glide_00021.png``); anything else is
    its own group (its file stem).
    """
    stem = file_stem(uri)
    found = re.search(r"(n\d{8})", stem) or re.search(r"(?:^|_)(\d+)_[A-Za-z][A-Za-z0-9]*_\d+$", stem)
    return f"{folder}/{found.group(1) if found else stem}"


def from_genimage(root: str, generators: Sequence[str] | None = None, val_fraction: float = 0.0, seed: int = 0,
                  options: StorageOptions | None = None, source: str | None = None) -> pa.Table:
    """Manifest rows for a GenImage tree: ``<root>/[...]/<generator folder>/{train,val}/{ai,nature}/...``.

    Works for the full benchmark (``imagenet_ai_0419_sdv4``, ``imagenet_ai_0424_wukong``, ``imagenet_ai_0508_adm``,
    ``imagenet_ai_0419_vqdm``, ``imagenet_ai_0424_sdv5``, ``imagenet_glide``, ``imagenet_midjourney``,
    ``imagenet_biggan`` / ``imagenet_ai_0419_biggan``, also when nested in a per-generator download folder) and for
    subsets like the ``mini_gen`` fork. ``ai`` images get label 1 and the normalised generator name (``sdv4``),
    ``nature`` images label 0 and generator ``real``; every row's source is ``<source or genimage>/<folder>``.
    GenImage's ``val`` becomes split ``test`` (it is the benchmark's test set); ``val_fraction`` moves that share
    of each generator folder's ``train`` rows to ``val``, whole ImageNet classes at a time (see
    :func:`genimage_group`). ``generators`` keeps only these folders (folder or normalised names).
    """
    if not 0 <= val_fraction < 1:  # checked before listing, which can take minutes on S3
        raise ManifestError(f"--val-fraction must be at least 0 and below 1, got {val_fraction}")
    files = Files(options)
    images, others, hidden = _list_images(root, files)
    rows, unmatched, folders = [], list(others), set()
    for uri in images:
        parts = relative_to(uri, root).split("/")
        hit = next((i for i in range(1, len(parts) - 2)
                    if parts[i] in _GENIMAGE_SPLITS and parts[i + 1] in _GENIMAGE_CLASSES), None)
        if hit is None:
            unmatched.append(uri)
            continue
        folder = parts[hit - 1]
        folders.add(folder)
        if generators is not None and not any(_picks(name, folder) for name in generators):
            continue
        label = _GENIMAGE_CLASSES[parts[hit + 1]]
        rows.append({"uri": uri, "label": label, "split": _GENIMAGE_SPLITS[parts[hit]],
                     "generator": genimage_generator(folder) if label else REAL,
                     "source": f"{source or 'genimage'}/{folder}", "group": genimage_group(folder, uri)})
    unknown = [name for name in generators or () if not any(_picks(name, folder) for folder in folders)]
    if unknown:  # a typo would otherwise silently leave a generator out
        raise ManifestError(f"--generators {' '.join(unknown)}: no such generator folder under {root}; it has "
                            f"{', '.join(sorted(folders)) or 'none'}")
    if not rows:
        raise ManifestError(f"no GenImage images under {root} (expected <generator>/train|val/ai|nature/<file>"
                            + (f" for generators {sorted(generators)}" if generators else "") + ")")
    if val_fraction:
        _carve_val(rows, val_fraction, seed)
    notes = {**skipped_note(unmatched, "outside <generator>/{train,val}/{ai,nature}"),
             **skipped_note(hidden, HIDDEN_WHY, "hidden")}
    return rows_to_table(rows, notes=notes)


def _carve_val(rows: list[dict[str, Any]], val_fraction: float, seed: int) -> None:
    """Move ``val_fraction`` of each source's train rows to val, by group (in place)."""
    by_source = collections.defaultdict(list)
    for row in rows:
        if row["split"] == "train":
            by_source[row["source"]].append(row)
    for members in by_source.values():
        splits = assign_splits([r["group"] for r in members], (1 - val_fraction, val_fraction, 0.0), seed)
        for row, split in zip(members, splits):
            row["split"] = split


def _resolve_path(image: str, root: str) -> str:
    """An image path of a CSV as a full URI: absolute paths and s3:// URIs as they are, others under ``root``."""
    if is_s3(image) or os.path.isabs(image):
        return image
    return join(root, image) if is_s3(root) else os.path.normpath(os.path.join(os.path.abspath(root), image))


def _parse_csv_row(line: int, row: Mapping[str, str], errors: list[str],
                   labelled: bool) -> tuple[int | None, str] | None:
    """(label, split) of an official CSV row, or None with a message appended to ``errors``. Unless ``labelled``, an
    empty class is an unknown label and an empty split is ``test``."""
    text, split = (row.get("class") or "").strip(), (row.get("split") or "").strip()
    if not (row.get("image") or "").strip():
        errors.append(f"line {line}: empty image path")
    elif text not in ("0", "1") and (labelled or text):
        errors.append(f"line {line}: class {text!r} is not 0 (real) or 1 (AI-generated)")
    elif split not in SPLITS and (labelled or split):
        errors.append(f"line {line}: split {split!r} is not one of {'/'.join(SPLITS)}")
    else:
        return (int(text) if text else None), split or "test"
    return None


def from_spai_csv(csv_uri: str, root: str | None = None, generator: str | None = None,
                  options: StorageOptions | None = None, source: str | None = None, labelled: bool = True) -> pa.Table:
    """Manifest rows for an official SPAI CSV (``image,class,split``; extra columns kept as strings).

    Relative image paths resolve against ``root`` (default: the CSV's folder), as the official code does. Real rows
    get generator ``real``; fake rows ``generator``, else a ``generator`` column, else ``unknown``. Source is
    ``source``, else a ``source`` column, else the CSV's name (``fake_dalle2``); group is a ``group`` column, else the
    file stem. The original ``image`` value is kept as an extra column so outputs can be written back in the
    official layout. Unless ``labelled`` (scoring needs no labels), only the ``image`` column is required: rows
    without a class have an unknown label and generator, rows without a split are ``test``.
    """
    text = Files(options).read(csv_uri).decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    missing = [c for c in (("image", "class", "split") if labelled else ("image",)) if c not in header]
    if missing:
        raise ManifestError(f"{csv_uri} lacks column(s) {missing}; official SPAI CSVs have a header with image,class,"
                            f"split (found {header})")
    root = root or parent(csv_uri)
    dataset = source or os.path.splitext(basename(csv_uri))[0]
    consumed = {"class", "split", "generator", "source", "group", "label", "uri"}
    extras = ["image"] + [c for c in header if c not in consumed and c != "image"]
    rows, errors = [], []
    for line, row in enumerate(reader, start=2):
        parsed = _parse_csv_row(line, row, errors, labelled)
        if parsed is None:
            continue
        label, split = parsed
        image = row["image"].strip()
        rows.append({
            **{name: row.get(name) for name in extras},
            "uri": _resolve_path(image, root), "label": label, "split": split,
            "generator": REAL if label == 0 else (generator or row.get("generator") or
                                                  ("unknown" if label == 1 else None)),
            "source": source or row.get("source") or dataset, "group": row.get("group") or file_stem(image),
        })
    if errors:
        raise ManifestError(f"{csv_uri}: {len(errors)} bad row(s): " + "; ".join(errors[:5]) + " - fix these rows")
    if not rows:
        raise ManifestError(f"{csv_uri} has a header but no rows")
    return rows_to_table(rows, extras=extras)


def _folder_group(uri: str, folder: str, tags: Iterable[str], group_by: str) -> str:
    if group_by == "folder":
        relative = relative_to(uri, folder)
        if "/" in relative:
            return relative.rsplit("/", 1)[0]
    return stem_group(uri, tags)


def from_folders(real: Sequence[str], fake: Sequence[str] | Mapping[str, str | Sequence[str]], balance: bool = False,
                 fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, options: StorageOptions | None = None,
                 source: str | None = None, group_by: str = "stem") -> pa.Table:
    """Manifest rows for folders of real and generated images, searched recursively, split by group.

    ``fake`` is a list of folders (the generator is the folder name; folders of one name are one generator) or
    ``{generator: folder or folders}``. ``balance``
    subsamples reals (seeded) to the number of fakes, as the SVD fork's ``create_true_fake_csv`` does.
    Groups (``group_by``): ``stem`` (default) is the file stem with trailing generator names stripped
    (``beach_waifu2x.png`` -> ``beach``; see :func:`stem_group`), so a fake made from a real photo joins its source;
    ``folder`` is the parent folder relative to the real/fake folder (class or source-photo folders), falling back
    to the stem rule for files directly inside it. Splits follow ``fractions`` (train, val, test) by group.
    """
    if group_by not in ("stem", "folder"):
        raise ManifestError(f"group_by must be 'stem' or 'folder', got {group_by!r}")
    check_fractions(fractions)  # before listing, which can take minutes on S3
    fakes = _folders_by_generator(fake)
    if REAL in fakes:
        raise ManifestError(f"a fake folder is named {REAL!r}, which means real images here; name it with NAME=PATH")
    rows, notes = _folder_rows([(REAL, f) for f in real] + [(n, f) for n, folders in fakes.items() for f in folders],
                               set(fakes) | {REAL, "fake"}, Files(options), source, group_by)
    reals = [r for r in rows if r["label"] == 0]
    n_fake = len(rows) - len(reals)
    if balance and len(reals) > n_fake:
        keep = set(np.random.default_rng(seed).choice(len(reals), size=n_fake, replace=False).tolist())
        dropped = {r["uri"] for i, r in enumerate(reals) if i not in keep}
        rows = [r for r in rows if r["uri"] not in dropped]
        notes["balanced"] = {"reals_found": len(reals), "reals_kept": n_fake}
    for row, split in zip(rows, assign_splits([r["group"] for r in rows], fractions, seed)):
        row["split"] = split
    return rows_to_table(rows, notes=notes)


def _folder_rows(folders: Sequence[tuple[str, str]], tags: Iterable[str], files: Files, source: str | None,
                 group_by: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (split not set yet) for ``(generator, folder)`` pairs, and notes on what was skipped. A file that two
    folders of one class hold (a folder given twice, or inside another) is one row; one that a real and a fake folder
    both hold stays twice, for :func:`check_values` to refuse."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    others, hidden = [], []
    for name, folder in folders:
        images, other, hid = _list_images(folder, files)
        others += other
        hidden += hid
        for uri in images:
            rows.setdefault((uri, int(name != REAL)), {
                "uri": uri, "label": int(name != REAL), "generator": name, "source": source or basename(folder),
                "group": _folder_group(uri, folder, tags, group_by)})
    notes = {**skipped_note(others, "without an image suffix"), **skipped_note(hidden, HIDDEN_WHY, "hidden")}
    return list(rows.values()), notes


def _folders_by_generator(fake: Sequence[str] | Mapping[str, str | Sequence[str]]) -> dict[str, list[str]]:
    """``{generator: [folders]}`` from folders (named after themselves) or a mapping to a folder or folders."""
    if not isinstance(fake, Mapping):
        return _group_folders((basename(f), f) for f in fake)
    return _group_folders((name, folder) for name, value in fake.items()
                          for folder in ([value] if isinstance(value, str) else value))


def _group_folders(named: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """``(generator, folder)`` pairs -> ``{generator: [folders]}``, in order; a name given twice gathers its folders."""
    folders: dict[str, list[str]] = {}
    for name, folder in named:
        folders.setdefault(name, []).append(folder)
    return folders


def parse_fakes(items: Sequence[str]) -> dict[str, list[str]]:
    """``NAME=PATH`` or ``PATH`` (named after its folder) -> {generator: folders}; a name given twice gathers its
    folders into one generator."""
    def named(item: str) -> tuple[str, str]:
        name, sep, path = item.partition("=")
        if not sep or "/" in name or ":" in name:  # a plain path, which may itself hold '=' (s3://b/gen=x/)
            return basename(item), item
        return name, path

    return _group_folders(named(item) for item in items)
