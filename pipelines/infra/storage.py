"""One way to read, write and list files on local disk and S3 (AWS or any S3-compatible endpoint).

Every pipeline goes through these functions so that ``s3://bucket/key`` and local paths behave the same, and so
that S3 failures reach the user as a :class:`StorageError` that says what is wrong and what to do (missing bucket,
wrong credentials, unreachable endpoint, missing path) instead of a bare SDK message. pyarrow does the I/O; boto3 is
used only to resolve credentials and, after a failure, to ask the bucket why (pyarrow reports a missing bucket as a
missing file).
"""
from __future__ import annotations

import dataclasses
import os
import posixpath
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

import boto3
import botocore.config
import botocore.exceptions
import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.infra.net import connect_error
from spai_core.errors import UserError

T = TypeVar("T")

S3_PREFIX = "s3://"
_DENIED_CODES = frozenset({"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                           "InvalidToken", "AllAccessDisabled"})
# Seconds to open a connection to S3. The SDKs wait longer and retry with back-off, so a dead endpoint took 15-40 s
# to fail; a live one answers a connect in milliseconds, even across regions.
S3_CONNECT_TIMEOUT_S = 3.0


class StorageError(UserError, OSError):
    """A file or bucket that cannot be used, with a message that says what to do.

    ``reason`` is one of ``not_found``, ``missing_bucket``, ``access_denied``, ``no_credentials``, ``unreachable``,
    ``not_s3`` (the endpoint answers, but not as S3), ``invalid_uri`` or ``io_error``, so callers can record it per
    row; ``uri`` is the path that failed.
    """

    def __init__(self, reason: str, uri: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.uri = uri

    def __reduce__(self):
        # Exceptions pickle as ``cls(*args)`` by default, which misses two arguments: Ray, which pickles an error
        # raised in a task to re-raise it in the caller, then showed "Failed to deserialize exception" instead.
        return type(self), (self.reason, self.uri, str(self))


@dataclasses.dataclass(frozen=True)
class StorageOptions:
    """Where and how to reach S3. Credentials are not stored here: boto3's usual chain finds them where they run."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    max_attempts: int = 5

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StorageOptions:
        """Options from the standard AWS variables (the S3-specific endpoint variable wins, as in boto3)."""
        env = os.environ if environ is None else environ
        return cls(
            endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            profile=env.get("AWS_PROFILE") or None,
        )


def is_s3(uri: str) -> bool:
    """True for ``s3://`` URIs."""
    return uri.startswith(S3_PREFIX)


def absolute(uri: str) -> str:
    """A local path made absolute (``~`` expanded), an ``s3://`` URI as it is: for paths that other processes (Ray
    workers, a resumed run) read from another working directory."""
    return uri if is_s3(uri) else os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an ``s3://`` URI (always with ``/`` on S3)."""
    if is_s3(uri):
        pieces = [uri.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
        return "/".join(pieces)
    return os.path.join(uri, *parts)


def parent(uri: str) -> str:
    """The folder holding ``uri`` (``s3://bucket/a/b`` -> ``s3://bucket/a``)."""
    if is_s3(uri):
        return S3_PREFIX + posixpath.dirname(uri[len(S3_PREFIX):].rstrip("/"))
    return os.path.dirname(os.path.abspath(uri.rstrip(os.sep)))


def basename(uri: str) -> str:
    """The last path component (file or folder name) of a local path or ``s3://`` URI."""
    return posixpath.basename(uri.rstrip("/")) if is_s3(uri) else os.path.basename(uri.rstrip(os.sep))


def relative_to(uri: str, root: str) -> str:
    """The ``/``-separated path of ``uri`` below folder ``root`` (a listing result relative to what was listed)."""
    if is_s3(uri):
        return uri[len(root.rstrip("/")) + 1:]
    return os.path.relpath(uri, os.path.abspath(os.path.expanduser(root))).replace(os.sep, "/")


def _split_s3(uri: str) -> tuple[str, str]:
    path = uri[len(S3_PREFIX):]
    bucket = path.split("/", 1)[0]
    if not bucket:
        raise StorageError("invalid_uri", uri, f"{uri!r} has no bucket; S3 URIs look like s3://bucket/path/to/file")
    return bucket, path.rstrip("/")


def _boto_session(options: StorageOptions, uri: str) -> boto3.Session:
    try:
        return boto3.Session(profile_name=options.profile, region_name=options.region)
    except botocore.exceptions.ProfileNotFound as exc:
        raise StorageError("no_credentials", uri, f"AWS profile {options.profile!r} is not defined: add it to "
                           "~/.aws/config or ~/.aws/credentials, or set AWS_PROFILE to an existing one") from exc


def _check_endpoint(options: StorageOptions, uri: str) -> None:
    """Fail in seconds on a custom endpoint nothing answers on (AWS's own endpoints are left to the SDK)."""
    if not options.endpoint_url:
        return
    parsed = urllib.parse.urlparse(options.endpoint_url if "://" in options.endpoint_url
                                   else f"https://{options.endpoint_url}")
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    if parsed.hostname and (exc := connect_error(parsed.hostname, port, S3_CONNECT_TIMEOUT_S)):
        raise StorageError("unreachable", uri, f"cannot reach the S3 endpoint {options.endpoint_url} to read {uri} "
                           f"({exc}); check AWS_ENDPOINT_URL, that the server is running and that "
                           "this machine can reach it")


def _s3_filesystem(options: StorageOptions, uri: str) -> pafs.S3FileSystem:
    """A pyarrow S3 file system with credentials from boto3's chain (env, profile, SSO, instance role...)."""
    _check_endpoint(options, uri)
    session = _boto_session(options, uri)
    kwargs: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=options.max_attempts),
                    "connect_timeout": S3_CONNECT_TIMEOUT_S}
    region = options.region or session.region_name
    if region:
        kwargs["region"] = region
    if options.endpoint_url:
        scheme, _, host = options.endpoint_url.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme="http" if scheme == "http" else "https")
    credentials = session.get_credentials()
    if credentials is not None:  # otherwise pyarrow tries its own default chain (e.g. an EC2 instance role)
        frozen = credentials.get_frozen_credentials()
        kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key, session_token=frozen.token)
    return pafs.S3FileSystem(**kwargs)


def _endpoint_name(options: StorageOptions) -> str:
    return options.endpoint_url or "AWS S3"


def _diagnose_bucket(bucket: str, uri: str, options: StorageOptions) -> StorageError | None:
    """Ask S3 once why ``bucket`` is unusable; None when the bucket is fine.

    A one-key listing, not ``head_bucket``: an S3 server answers a GET with a named error (``NoSuchBucket``), while
    a HEAD's bare 404 is what any web server (or a proxy standing in for an unreachable host) answers too.
    """
    config = botocore.config.Config(retries={"total_max_attempts": 1, "mode": "standard"},
                                    connect_timeout=S3_CONNECT_TIMEOUT_S, read_timeout=10)
    where = _endpoint_name(options)
    try:
        client = _boto_session(options, uri).client("s3", endpoint_url=options.endpoint_url, config=config)
        client.list_objects_v2(Bucket=bucket, MaxKeys=1)
    except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError) as exc:
        return StorageError("unreachable", uri, f"cannot reach the S3 endpoint {where} to read {uri} ({exc}); check "
                            "AWS_ENDPOINT_URL, that the server is running and that this machine can reach it")
    except botocore.exceptions.NoCredentialsError:
        return StorageError("no_credentials", uri, f"no AWS credentials found to read {uri}; set "
                            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    except botocore.exceptions.ClientError as exc:
        return _client_error(exc, bucket, uri, where)
    except botocore.exceptions.BotoCoreError as exc:
        return StorageError("io_error", uri, f"S3 at {where} failed for {uri}: {exc}")
    return None


def _client_error(exc: botocore.exceptions.ClientError, bucket: str, uri: str, where: str) -> StorageError:
    """The StorageError for an error answer about ``bucket``."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    if code == "NoSuchBucket":
        return StorageError("missing_bucket", uri, f"bucket {bucket!r} does not exist at {where}: create it "
                            f"(aws s3 mb s3://{bucket}) or fix the URI {uri}")
    if code.isdigit() and code not in ("403", "301"):  # an HTTP status with no S3 error in the body
        return StorageError("not_s3", uri, f"{where} answered HTTP {code} without an S3 error to a listing of "
                            f"bucket {bucket!r}: it does not look like an S3 server (a web server or proxy?); check "
                            "AWS_ENDPOINT_URL (scheme, host and port)")
    if code in _DENIED_CODES:
        return StorageError("access_denied", uri, f"access to bucket {bucket!r} at {where} was denied ({code}): "
                            "check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) "
                            "and the bucket policy")
    return StorageError("io_error", uri, f"S3 refused bucket {bucket!r} at {where} ({code}: {exc}); check "
                        "the bucket name, the region (AWS_REGION) and the endpoint (AWS_ENDPOINT_URL)")


def _translate(exc: OSError, uri: str, action: str, options: StorageOptions) -> StorageError:
    """Turn a pyarrow/OS error into a StorageError that names the cause and the fix."""
    if isinstance(exc, StorageError):
        return exc
    if is_s3(uri):
        diagnosis = _diagnose_bucket(_split_s3(uri)[0], uri, options)
        if diagnosis is not None:
            return diagnosis
    if isinstance(exc, FileNotFoundError) and action == "write":  # a folder on the way is missing and cannot be made
        return StorageError("io_error", uri, f"could not write {uri}: {exc}; check that its folder exists or can be "
                            "created")
    if isinstance(exc, FileNotFoundError) and os.path.islink(uri):
        return StorageError("not_found", uri, f"{uri} is a broken symbolic link (to {os.readlink(uri)}, which does "
                            "not exist); fix or remove the link")
    if isinstance(exc, FileNotFoundError) and is_s3(uri):
        return StorageError("not_found", uri, f"{uri} does not exist (bucket {_split_s3(uri)[0]!r} has no such key "
                            "or prefix); check the path")
    if isinstance(exc, FileNotFoundError):
        return StorageError("not_found", uri, f"{uri} does not exist; check the path (and the working directory "
                            "for relative paths)")
    if isinstance(exc, PermissionError):
        return StorageError("access_denied", uri, f"permission denied to {action} {uri}; check its permissions")
    return StorageError("io_error", uri, f"could not {action} {uri}: {exc}")


class Files:
    """Reads, writes and lists many URIs, building each file system once and translating errors.

    Building an S3 file system resolves credentials (~20 ms), so loops over many files (a batch of images) should
    share one instance; it is cheap to create and holds no global state.
    """

    def __init__(self, options: StorageOptions | None = None):
        self.options = options if options is not None else StorageOptions.from_env()
        self._s3: pafs.S3FileSystem | None = None
        self._local = pafs.LocalFileSystem()

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The file system for ``uri`` and the path inside it (``bucket/key`` on S3, an absolute local path)."""
        if is_s3(uri):
            _, path = _split_s3(uri)
            if self._s3 is None:
                self._s3 = _s3_filesystem(self.options, uri)
            return self._s3, path
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return self._local, os.path.abspath(os.path.expanduser(path))

    def call(self, uri: str, action: str, fn: Callable[[pafs.FileSystem, str], T]) -> T:
        """``fn(filesystem, path)`` for ``uri``, with OS errors turned into a :class:`StorageError` about ``action``."""
        fs, path = self.resolve(uri)
        try:
            return fn(fs, path)
        except OSError as exc:
            raise _translate(exc, uri, action, self.options) from exc

    def read(self, uri: str) -> bytes:
        """All bytes of one file."""
        return self.call(uri, "read", lambda fs, path: _read(fs, path, None))

    def head(self, uri: str, size: int) -> bytes:
        """The first ``size`` bytes of a file (for magic-byte sniffing without downloading it)."""
        return self.call(uri, "read", lambda fs, path: _read(fs, path, size))

    def write(self, uri: str, data: bytes) -> None:
        """Write ``data`` to ``uri``, creating local parent folders."""
        def _write(fs: pafs.FileSystem, path: str) -> None:
            with _output_stream(fs, path) as stream:
                stream.write(data)
        self.call(uri, "write", _write)

    def open_output(self, uri: str) -> pa.NativeFile:
        """A stream writing ``uri`` (on S3 a multipart upload: the object appears when it is closed), creating local
        parent folders."""
        return self.call(uri, "write", _output_stream)

    def remove(self, uri: str) -> None:
        """Delete one file."""
        self.call(uri, "delete", lambda fs, path: fs.delete_file(path))

    def info(self, uri: str) -> pafs.FileInfo:
        """Type and size of ``uri``: ``FileType.NotFound`` when absent (an S3 prefix with keys is a directory)."""
        return self.call(uri, "inspect", lambda fs, path: fs.get_file_info(path))

    def missing(self, uri: str) -> StorageError:
        """The error for a path that is absent, naming a missing bucket or bad credentials when that is why."""
        return _translate(FileNotFoundError(uri), uri, "read", self.options)

    def list(self, uri: str, recursive: bool = True, suffixes: Iterable[str] | None = None) -> list[str]:
        """Full URIs of the files under ``uri`` (sorted), or ``[uri]`` when it is a file; see :meth:`listing`."""
        return self.listing(uri, recursive, suffixes).files

    def listing(self, uri: str, recursive: bool = True, suffixes: Iterable[str] | None = None) -> Listing:
        """The files under ``uri`` (sorted full URIs, or ``[uri]`` when it is a file), and the hidden ones left out.

        Names starting with ``.`` (``.DS_Store``, macOS ``._x.jpg`` forks, hidden folders) are metadata, not data:
        they are left out, and listed in :attr:`Listing.hidden` (a hidden local folder as itself, unopened) so that
        a caller can say so. ``suffixes`` keeps only names ending with one of them (case-insensitive).
        """
        info = self.info(uri)
        if info.type == pafs.FileType.File:
            return Listing([uri], [])
        if info.type == pafs.FileType.NotFound:
            raise self.missing(uri)
        base = self.resolve(uri)[1].rstrip("/")
        if is_s3(uri):
            entries = self.call(uri, "list", lambda fs, path: fs.get_file_info(
                pafs.FileSelector(path, recursive=recursive)))
            paths = [entry.path for entry in entries if entry.type == pafs.FileType.File]
        else:
            paths = self.call(uri, "list", lambda fs, path: list(_local_files(path, recursive)))
        wanted = tuple(s.lower() for s in suffixes) if suffixes is not None else None
        found, hidden = [], []
        for path in paths:
            full = S3_PREFIX + path if is_s3(uri) else path
            if any(p.startswith(".") for p in path[len(base):].lstrip("/").split("/")):
                hidden.append(full)
            elif wanted is None or path.lower().endswith(wanted):
                found.append(full)
        return Listing(sorted(found), sorted(hidden))


@dataclasses.dataclass(frozen=True)
class Listing:
    """What :meth:`Files.listing` found: the files, and the hidden entries it left out."""

    files: list[str]
    hidden: list[str]


def _local_files(folder: str, recursive: bool) -> Iterator[str]:
    """Files under a local folder (symlinked folders followed), broken symlinks included: pyarrow's listing leaves
    those out, so their rows would vanish without a trace; listed, they fail later as ``missing``."""
    def fail(exc: OSError) -> None:  # os.walk skips unreadable folders silently by default
        raise exc

    for directory, folders, names in os.walk(folder, onerror=fail, followlinks=True):
        # A hidden folder is not opened (a .git folder alone can hold thousands of files); the caller reports it.
        yield from (os.path.join(directory, f) for f in folders if f.startswith("."))
        folders[:] = [f for f in folders if not f.startswith(".")]
        for name in names:
            path = os.path.join(directory, name)
            if os.path.isfile(path) or not os.path.exists(path):  # not sockets or FIFOs
                yield path
        if not recursive:
            break


def _output_stream(fs: pafs.FileSystem, path: str) -> pa.NativeFile:
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(os.path.dirname(path), recursive=True)
    return fs.open_output_stream(path)


def _read(fs: pafs.FileSystem, path: str, size: int | None) -> bytes:
    """The first ``size`` bytes of a file, or all of them for ``None``."""
    with fs.open_input_stream(path) as stream:
        return stream.read(size)


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow file system for ``uri`` and the path inside it (for pyarrow/Ray readers and writers)."""
    return Files(options).resolve(uri)


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    """All bytes of one local or S3 file."""
    return Files(options).read(uri)


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write one local or S3 file (local parent folders are created)."""
    Files(options).write(uri, data)


def list_files(uri: str, options: StorageOptions | None = None, recursive: bool = True,
               suffixes: Iterable[str] | None = None) -> list[str]:
    """Sorted full URIs of the files under a folder or S3 prefix; see :meth:`Files.list`."""
    return Files(options).list(uri, recursive=recursive, suffixes=suffixes)


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    """True if ``uri`` is an existing file or folder (an S3 prefix with keys under it)."""
    return Files(options).info(uri).type != pafs.FileType.NotFound

