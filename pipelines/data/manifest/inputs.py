"""What a scoring job may point at (an official CSV, a manifest, a folder or prefix of images, one image) as
manifest rows."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.data.decode import SNIFF_BYTES, sniff_image_format
from pipelines.infra.storage import Files, StorageError, StorageOptions, basename, parent, relative_to

from .io import SIDECAR, read_manifest, read_sidecar
from .layouts import IMAGE_SUFFIXES, from_spai_csv, skipped_note
from .schema import ManifestError, rows_to_table
from .splits import file_stem


def _image_folder(uri: str, files: Files, recursive: bool) -> pa.Table:
    """Rows for every file under a folder named or sniffed as an image (label unknown, split test).

    A file with an image suffix is a row whatever its content, so a zero-byte or corrupt ``x.jpg`` comes back as a
    failed row with its reason; other files are rows only when their first bytes say they are images.
    """
    candidates = files.list(uri, recursive=recursive)
    files.resolve(uri)  # build the file system once, before the threads share it

    def is_image(path: str) -> bool:
        if path.lower().endswith(IMAGE_SUFFIXES):
            return True
        try:
            return sniff_image_format(files.head(path, SNIFF_BYTES)) is not None
        except StorageError:  # unreadable here means unreadable later: keep it so scoring records the failure
            return True

    with ThreadPoolExecutor(max_workers=16) as pool:
        flags = list(pool.map(is_image, candidates))
    images = [u for u, ok in zip(candidates, flags) if ok]
    others = [u for u, ok in zip(candidates, flags) if not ok]
    if not images:
        deeper = "" if recursive else " only its top level was searched: add --recursive for its subfolders, or"
        raise ManifestError(f"no images in {uri} ({len(candidates)} file(s), none named or sniffed as an image);"
                            f"{deeper} point --input at images, a folder of images, an official CSV or a manifest "
                            f"({SIDECAR})")
    folder = parent(uri) if candidates == [uri] else uri  # one image file: a folder of one
    rows = [{"uri": u, "label": None, "split": "test", "generator": None, "source": basename(folder),
             "group": file_stem(u), "image": relative_to(u, folder)} for u in images]
    return rows_to_table(rows, extras=["image"], notes=skipped_note(others, "that are not images by name or content"))


def resolve_input(uri: str, root: str | None = None, options: StorageOptions | None = None,
                  recursive: bool = False) -> pa.Table:
    """Rows for anything a user may point a scoring job at: an official CSV (paths against ``root``), a manifest
    (directory or .parquet), a folder / S3 prefix of images, or one image file. Images are files with an image
    suffix (a bad one becomes a failed row) or other files whose first bytes say they are images.

    Folder input matches the official directory mode: not recursive unless asked, label unknown, split ``test``,
    generator unknown, and an ``image`` column with the path relative to the folder.
    """
    files = Files(options)
    if uri.lower().endswith(".csv"):
        return from_spai_csv(uri, root=root, options=options, labelled=False)
    info = files.info(uri)
    if info.type == pafs.FileType.NotFound:
        raise files.missing(uri)
    if uri.lower().endswith(".parquet") or read_sidecar(uri, options) is not None:
        return read_manifest(uri, options)
    return _image_folder(uri, files, recursive)
