"""Fetch files identified by their sha256 from an ordered list of mirrors.

A *source* is a base location; a file's location is ``base + "/" + name``.
Supported bases: a local directory (plain path or ``file://`` URL), an
``http://``/``https://`` URL (via :mod:`urllib.request`) and an
``s3://bucket/prefix`` URI (via boto3, configured only through the standard
AWS environment/config: ``AWS_ENDPOINT_URL[_S3]``, ``AWS_ACCESS_KEY_ID``,
``AWS_DEFAULT_REGION``, ...).

Every download streams into a ``.partial-*`` temp file inside the cache
directory, is hashed on the way, and is moved into place with
:func:`os.replace` only once its sha256 matches, so the cache never holds a
half-written or unverified file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

CHUNK_SIZE = 1 << 20
PROGRESS_MIN_BYTES = 8 << 20  # files at least this big get progress lines
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_SCHEMES = {"": "local", "file": "local", "http": "http", "https": "http", "s3": "s3"}

Log = Callable[[str], object]


class FetchError(RuntimeError):
    """A file could not be fetched; ``str(e)`` is one line naming the cause."""


class ChecksumMismatch(FetchError):
    """Every source delivered bytes whose sha256 differs from the expected one."""


class SourceUnavailable(FetchError):
    """No source delivered the file (missing, unreachable, truncated, ...).

    ``transient`` is True when trying again later may succeed (a network failure, an HTTP 5xx,
    S3 throttling, a cut-off transfer) and False for what only a change of input fixes (a
    missing local file, HTTP 404, no such bucket, access denied)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def sha256_file(path: str | os.PathLike) -> str:
    """Return the hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_SIZE), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_files(
    sources: list[str],
    files: dict[str, str],
    cache_dir: str | os.PathLike,
    *,
    log: Log = print,
    timeout: float = 30.0,
) -> dict[str, Path]:
    """Make every file of ``files`` (name -> sha256) present and verified in ``cache_dir``.

    A cached copy with the right sha256 is used as is; otherwise ``sources``
    are tried in order and the first one delivering the right bytes wins.
    Returns name -> path in ``cache_dir``.  Raises :class:`ChecksumMismatch`
    if every source failed on the checksum, :class:`SourceUnavailable` if
    any failed otherwise, :class:`FetchError` for invalid arguments.
    """
    bases = _parse_sources(sources)
    expected = _validate_files(files)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    s3_client = functools.cache(lambda: _make_s3_client(timeout))
    fetcher = _Fetcher(bases, cache, log, timeout, s3_client)
    return {name: fetcher.fetch(name, sha) for name, sha in expected.items()}


# --- argument validation -------------------------------------------------------------


@dataclass(frozen=True)
class _Base:
    """One parsed source: ``kind`` is "local", "http" or "s3"."""

    kind: str
    root: str  # local directory, base URL, or bucket name
    prefix: str = ""  # S3 key prefix, without surrounding slashes

    def location(self, name: str) -> str:
        """Human-readable location of ``name`` under this base."""
        if self.kind == "local":
            return str(Path(self.root) / name)
        if self.kind == "http":
            return f"{self.root.rstrip('/')}/{urllib.parse.quote(name)}"
        return f"s3://{self.root}/{self.s3_key(name)}"

    def s3_key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name


def _parse_sources(sources: list[str]) -> list[_Base]:
    if isinstance(sources, (str, bytes, os.PathLike)) or not sources:
        raise FetchError(f"sources must be a non-empty list of locations, got {sources!r}")
    return [_parse_source(str(source)) for source in sources]


def _parse_source(source: str) -> _Base:
    parts = urllib.parse.urlsplit(source)
    kind = _SCHEMES.get(parts.scheme.lower())
    if kind is None:
        raise FetchError(f"unknown URL scheme {parts.scheme!r} in source {source!r}")
    if kind == "s3":
        if not parts.netloc:
            raise FetchError(f"S3 source {source!r} names no bucket")
        return _Base("s3", parts.netloc, parts.path.strip("/"))
    if kind == "http":
        return _Base("http", source)
    if parts.scheme:  # file:// URL
        if parts.netloc not in ("", "localhost"):
            raise FetchError(f"file URL {source!r} must not name a remote host")
        return _Base("local", urllib.request.url2pathname(parts.path))
    return _Base("local", source)


def _validate_files(files: dict[str, str]) -> dict[str, str]:
    if not isinstance(files, dict) or not files:
        raise FetchError(f"files must be a non-empty dict of name -> sha256, got {files!r}")
    for name, sha in files.items():
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise FetchError(f"invalid file name {name!r}: must be a plain file name")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise FetchError(f"invalid sha256 {sha!r} for {name}: expected 64 hex characters")
    return {name: sha.lower() for name, sha in files.items()}


# --- fetching ------------------------------------------------------------------------


@dataclass
class _Stream:
    """An open source: ``read(n)`` returns up to n bytes (b"" at the end)."""

    read: Callable[[int], bytes]
    total: int | None  # announced size, if any
    errors: tuple[type[BaseException], ...]  # what ``read`` raises on transport failure


@dataclass
class _Fetcher:
    """Fetches single files into ``cache`` from ``bases``, tried in order."""

    bases: list[_Base]
    cache: Path
    log: Log
    timeout: float
    s3_client: Callable[[], object]

    def fetch(self, name: str, sha: str) -> Path:
        """Return the verified cached path of ``name``, fetching it if needed."""
        target = self.cache / name
        if target.is_file():
            if sha256_file(target) == sha:
                self.log(f"{name}: cached")
                return target
            self.log(f"{name}: cached copy has the wrong sha256, fetching again")
        failures: list[tuple[str, FetchError]] = []
        for base in self.bases:
            location = base.location(name)
            try:
                self._download(base, name, sha, target)
            except (ChecksumMismatch, SourceUnavailable) as exc:
                self.log(f"{name}: {location}: {exc}")
                failures.append((location, exc))
            else:
                self.log(f"{name}: fetched from {location}")
                return target
        reasons = "; ".join(f"{location}: {exc}" for location, exc in failures)
        all_checksum = all(isinstance(exc, ChecksumMismatch) for _, exc in failures)
        if all_checksum:
            raise ChecksumMismatch(f"cannot fetch {name}: {reasons}")
        transient = any(getattr(exc, "transient", False) for _, exc in failures)
        raise SourceUnavailable(f"cannot fetch {name}: {reasons}", transient=transient)

    def _download(self, base: _Base, name: str, sha: str, target: Path) -> None:
        """Stream ``name`` from ``base`` into ``target``, atomically and only if verified."""
        fd, partial = tempfile.mkstemp(dir=self.cache, prefix=f".partial-{name}-")
        try:
            with os.fdopen(fd, "wb") as out, self._open(base, name) as stream:
                digest, size = _copy(stream, out, functools.partial(self._progress, name))
                out.flush()
                os.fsync(out.fileno())  # durable before the rename makes it visible
            if stream.total is not None and size != stream.total:
                raise SourceUnavailable(f"truncated download: got {size} of {stream.total} bytes", transient=True)
            if digest != sha:
                raise ChecksumMismatch(f"sha256 mismatch: got {digest[:12]}..., expected {sha[:12]}...")
            os.chmod(partial, 0o644)  # mkstemp creates 0600; cached files are plain data
            os.replace(partial, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)

    def _open(self, base: _Base, name: str) -> contextlib.AbstractContextManager[_Stream]:
        if base.kind == "local":
            return _open_local(Path(base.root) / name)
        if base.kind == "http":
            return _open_http(base.location(name), self.timeout)
        return _open_s3(self.s3_client, base.root, base.s3_key(name))

    def _progress(self, name: str, done: int, total: int) -> None:
        self.log(f"{name}: {done}/{total} bytes ({100 * done // total}%)")


def _copy(stream: _Stream, out, progress: Callable[[int, int], None]) -> tuple[str, int]:
    """Copy ``stream`` to ``out``; return (sha256 hex, byte count).

    Calls ``progress(done, total)`` about every 25% for big files of known size.
    """
    digest, done = hashlib.sha256(), 0
    # progress only for big files of known size
    total = stream.total if stream.total is not None and stream.total >= PROGRESS_MIN_BYTES else None
    next_mark = 1
    while True:
        try:
            chunk = stream.read(CHUNK_SIZE)
        except stream.errors as exc:
            raise SourceUnavailable(f"read failed after {done} bytes: {_reason(exc)}", transient=True) from None
        if not chunk:
            return digest.hexdigest(), done
        out.write(chunk)
        digest.update(chunk)
        done += len(chunk)
        if total is not None and done * 4 >= next_mark * total:
            progress(done, total)
            next_mark = done * 4 // total + 1


@contextlib.contextmanager
def _open_local(path: Path) -> Iterator[_Stream]:
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise SourceUnavailable(_reason(exc)) from None
    with f:
        yield _Stream(f.read, os.fstat(f.fileno()).st_size, (OSError,))


@contextlib.contextmanager
def _open_http(url: str, timeout: float) -> Iterator[_Stream]:
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise SourceUnavailable(f"HTTP {exc.code} {exc.reason}", transient=exc.code >= 500 or exc.code in (408, 429)) from None
    except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, DNS: the network
        raise SourceUnavailable(_reason(exc), transient=True) from None
    with response:
        length = response.headers.get("Content-Length", "")
        total = int(length) if length.isdigit() else None
        yield _Stream(response.read, total, (OSError, http.client.HTTPException))


@contextlib.contextmanager
def _open_s3(client: Callable[[], Any], bucket: str, key: str) -> Iterator[_Stream]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        obj = client().get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        raise SourceUnavailable(_s3_reason(exc, bucket, key), transient=s3_error_is_transient(exc)) from None
    except BotoCoreError as exc:
        raise SourceUnavailable(_one_line(str(exc)), transient=boto_error_is_transient(exc)) from None
    body = obj["Body"]
    try:
        yield _Stream(body.read, obj.get("ContentLength"), (BotoCoreError, OSError))
    finally:
        body.close()


def _make_s3_client(timeout: float):
    """An S3 client configured from the AWS environment, failing fast when unreachable."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=timeout)
    return boto3.client("s3", config=config)


# --- error messages ------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    """A short one-line reason for a transport/file error."""
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        return _reason(exc.reason)
    if isinstance(exc, urllib.error.URLError):
        return _one_line(str(exc.reason))
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return _one_line(str(exc)) or type(exc).__name__


def _s3_reason(exc, bucket: str, key: str) -> str:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    if code == "NoSuchBucket":
        return f"no such bucket {bucket!r}"
    if code in ("NoSuchKey", "404"):
        return f"no such key {key!r} in bucket {bucket!r}"
    if code in ("AccessDenied", "403"):
        return f"access denied to bucket {bucket!r}"
    return _one_line(f"S3 error {code}: {error.get('Message', '')}")


# S3 error codes that say "later", not "never" (AWS's throttling and server-side codes).
S3_TRANSIENT_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed",
    "RequestLimitExceeded", "TooManyRequests", "TooManyRequestsException", "InternalError", "ServiceUnavailable",
    "503", "500", "502", "504",
})


def s3_error_is_transient(exc) -> bool:
    """A botocore ClientError worth retrying: HTTP 5xx or a throttling code."""
    response = getattr(exc, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    code = str(response.get("Error", {}).get("Code", ""))
    return status >= 500 or status == 429 or code in S3_TRANSIENT_CODES


def boto_error_is_transient(exc) -> bool:
    """A botocore transport error (endpoint unreachable, timeouts, dropped connection); missing
    credentials or a bad configuration are not transient."""
    from botocore import exceptions as bx

    return isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionError, bx.ConnectTimeoutError,
                            bx.ReadTimeoutError, bx.ConnectionClosedError, bx.ResponseStreamingError))


def _one_line(text: str) -> str:
    return " ".join(text.split())
