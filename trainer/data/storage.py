"""Where a dataset lives: a local directory, or a URL that an fsspec filesystem serves.

``s3://bucket/prefix`` (s3fs), ``gs://`` (gcsfs), ``az://`` / ``abfs://`` (adlfs), ``http(s)://`` (fsspec's HTTP,
read-only). Credentials and endpoints come the way each ecosystem expects them (AWS_* variables, profiles and
instance roles; GOOGLE_APPLICATION_CREDENTIALS; AZURE_STORAGE_*), never from a config; ``redact`` removes any
that a URL carries before it is saved or printed.

A remote dataset is read with range reads (:func:`read_range`), never downloaded whole: a shard's sample index
(``ShardInfo.index``) gives each sample's byte offset, so a loader worker starts at its exact sample each epoch
and after a resume. The small side files (item counts, sample lengths and indices) are copied once into a local
cache, keyed by their sha256 (:func:`local_copy`), because the loader memory-maps them; whole shards only with
``data.cache_bytes`` (:func:`cached_shard`, LRU within a bound). Transient failures (connection resets, timeouts,
5xx, throttling; see :func:`transient`) are retried with exponential backoff and counted (:data:`RETRIES`).
``pipe:CMD`` (WebDataset's convention, :class:`PipeLocation`) reads through a shell command, sequentially.

Paths are `pathlib.Path` for local data and `upath.UPath` (universal_pathlib: the pathlib API over fsspec) for
URLs, so the code that joins and opens them is the same for both.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import shlex
import signal
import subprocess
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, TypeVar

REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https", "memory")  # memory: tests
EXTRAS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}
# pyproject's optional-dependencies: s3, gs, az, http
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s'\"]*@")  # user:password@, anywhere in a text
# Query parameters that carry credentials in the stores' URL forms (pre-signed S3, SAS tokens, GCS signed URLs).
_SECRET_QUERY = re.compile(
    r"(?i)([?&](?:x-amz-[a-z-]*|sig|signature|se|sp|sv|sr|st|token|key|x-goog-[a-z-]*)=)[^&\s'\"]*"
)

RETRY_ATTEMPTS = int(os.environ.get("ARGUS_IO_RETRIES", 8))
RETRY_BASE_S = float(os.environ.get("ARGUS_IO_BACKOFF_S", 0.2))
RETRY_MAX_S = 10.0
RETRIES = {"count": 0}  # transient failures retried in this process (the loader reports its workers' deltas)

T = TypeVar("T")
Location = Any  # Path (local) or upath.UPath (remote): the same pathlib API


def is_url(path: str | os.PathLike[str]) -> bool:
    """A URL with a scheme argus reads through fsspec (``file://`` is a local path), or a ``pipe:`` command."""
    m = _URL.match(str(path))
    return (bool(m) and m.group(1).lower() != "file") or str(path).startswith(PIPE)


PIPE = "pipe:"


class PipeLocation:
    """``pipe:CMD`` (WebDataset's convention): a shell command whose standard output is an object's bytes, ``{}`` in
    CMD standing for the object's path relative to the dataset root, e.g. ``pipe:curl -sf https://host/ds/{}``.
    Sequential reads only: a reader that wants a shard's later samples streams it from the start (no range reads),
    so a resume re-reads each shard up to its sample. Read-only; a failing command is not retried."""

    protocol = "pipe"

    def __init__(self, template: str, rel: str = "") -> None:
        if "{}" not in template:
            raise ValueError(f"{PIPE}{template}: the command needs {{}} where the object's relative path goes")
        self.template, self.path = template, rel

    def __truediv__(self, rel: str) -> "PipeLocation":
        return PipeLocation(self.template, f"{self.path}/{rel}".lstrip("/"))

    def __str__(self) -> str:
        return f"{PIPE}{self.template}" + (f" [{self.path}]" if self.path else "")

    __repr__ = __str__

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.path).suffix

    @property
    def suffixes(self) -> list[str]:
        return PurePosixPath(self.path).suffixes

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    def command(self) -> str:
        return self.template.replace("{}", shlex.quote(self.path))

    def read(self, limit: int = -1) -> bytes:
        """The command's output (its first ``limit`` bytes: the command is stopped there); a non-zero exit is an
        error naming the command and the end of its stderr."""
        # stderr goes to a file (an undrained pipe would block a chatty command); the command gets its own process
        # group, so that stopping it early stops every process of a pipeline (`curl ... | zstd -d`)
        with tempfile.TemporaryFile() as err_file:
            proc = subprocess.Popen(
                self.command(), shell=True, stdout=subprocess.PIPE, stderr=err_file, start_new_session=True
            )
            assert proc.stdout is not None
            try:
                data = proc.stdout.read() if limit < 0 else proc.stdout.read(limit)
                if limit >= 0 and len(data) == limit:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    return data
            finally:
                proc.stdout.close()
                proc.wait()
            if proc.returncode != 0:
                err_file.seek(0)
                err = err_file.read()[-200:].decode(errors="replace").strip()
                raise PipeError(redact(f"{self.command()}: exit {proc.returncode}" + (f" ({err})" if err else "")))
        return data


class PipeError(OSError):
    """A ``pipe:`` command that failed: not retried (a command may not be safe to repeat, nor quick to fail)."""


def scheme(path: str | os.PathLike[str]) -> str:
    m = _URL.match(str(path))
    return m.group(1).lower() if m else ""


def redact(text: str | os.PathLike[str]) -> str:
    """``text`` with a URL's user:password@ and credential-bearing query parameters replaced by ``***``."""
    s = _USERINFO.sub(r"\1***@", str(text))
    return _SECRET_QUERY.sub(r"\1***", s)


def location(path: str | os.PathLike[str]) -> Location:
    """A dataset location: a ``Path``, or a ``UPath`` for a URL. An unknown scheme or a missing filesystem package is
    one line naming the URL (and the extra to install)."""
    if not is_url(path):
        s = str(path)
        return Path(s[len("file://") :] if s.startswith("file://") else s)
    if str(path).startswith(PIPE):
        return PipeLocation(str(path)[len(PIPE) :])
    sch = scheme(path)
    if sch not in REMOTE_SCHEMES:
        raise ValueError(f"{redact(path)}: unsupported URL scheme {sch!r} (supported: {', '.join(REMOTE_SCHEMES)})")
    try:
        import fsspec
        from upath import UPath

        fsspec.get_filesystem_class(sch)  # a missing package: this one line now, not a traceback later
        return UPath(str(path))
    except ImportError as e:
        package = "universal_pathlib" if e.name == "upath" else EXTRAS.get(sch) or e.name
        group = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az", "https": "http"}.get(sch, sch)
        hint = f"; install it with: pip install 'argus-trainer[{group}]'" if group != "memory" else ""
        raise ValueError(f"{redact(path)}: reading {sch}:// needs the {package} package{hint}") from None


def absolute(path: str | os.PathLike[str]) -> str:
    """A local path made absolute (for processes started elsewhere: Ray workers); a URL unchanged."""
    return str(path) if is_url(path) else str(Path(path).resolve())


def is_remote(path: Location) -> bool:
    return not isinstance(path, Path)


def filesystem(path: Location) -> Any:
    """``path``'s fsspec filesystem, from fsspec's instance cache, which is per process. Never ``path.fs``: a UPath
    keeps the instance it first made, and an async filesystem (s3fs, gcsfs) made before a fork (the DataLoader's
    workers, verify's processes) refuses to run in the child."""
    import fsspec

    return fsspec.filesystem(path.protocol, **path.storage_options)


def open_read(path: Location) -> Any:
    """A binary file object: a local file, or a remote object read sequentially."""
    if isinstance(path, PipeLocation):
        return io.BytesIO(path.read())
    return open(path, "rb") if not is_remote(path) else filesystem(path).open(path.path, "rb")


# errno values s3fs/gcsfs/adlfs give permanent failures (bad range or argument, wrong region, refused method): these
# are not retried; an OSError with another errno, or none, is a connection or server-side failure and is.
_PERMANENT_ERRNO = {errno.EINVAL, errno.EPERM, errno.EACCES, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EREMCHG}


def transient(e: BaseException) -> bool:
    """Worth retrying: a connection or server-side failure (reset, timeout, 5xx, throttling), not a missing object,
    a refused permission, a bad request or a certificate that does not verify."""
    import ssl

    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, PipeError)):
        return False
    if isinstance(e, ssl.SSLCertVerificationError):
        return False
    try:
        import aiohttp

        if isinstance(e, aiohttp.ClientResponseError):
            return e.status in (408, 429) or e.status >= 500
    except ImportError:
        pass
    if isinstance(e, OSError):
        return e.errno not in _PERMANENT_ERRNO
    if isinstance(e, (TimeoutError, ConnectionError)):
        return True
    try:
        import aiohttp

        if isinstance(e, aiohttp.ClientError):
            return True
    except ImportError:
        pass
    try:  # what s3fs re-raises untranslated once its own retries are spent: resets, timeouts (not OSErrors)
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        if isinstance(e, (BotoConnectionError, HTTPClientError)):
            return True
    except ImportError:
        pass
    return False


def with_retries(fn: Callable[[], T], what: str) -> T:
    """``fn()``, retried with exponential backoff (0.2 s doubling, at most 10 s apart, ``ARGUS_IO_RETRIES`` tries in
    all) while it fails transiently; the last failure is raised as ``OSError`` naming ``what``."""
    delay = RETRY_BASE_S
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified by transient()
            if not transient(e):
                raise
            if attempt == RETRY_ATTEMPTS:
                raise OSError(redact(f"{what}: {type(e).__name__}: {e} (gave up after {attempt} tries)")) from None
            RETRIES["count"] += 1
            time.sleep(delay)
            delay = min(2 * delay, RETRY_MAX_S)
    raise AssertionError("unreachable")


def read_range(path: Location, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a remote object (one range request, retried; a ``pipe:`` streams from the start)."""
    if isinstance(path, PipeLocation):
        return path.read(end)[start:]
    fs, p = filesystem(path), path.path
    return with_retries(lambda: fs.cat_file(p, start=start, end=end), f"{path}")


def read_bytes(path: Location) -> bytes:
    if not is_remote(path):
        return Path(path).read_bytes()
    if isinstance(path, PipeLocation):
        return path.read()
    fs, p = filesystem(path), path.path
    return with_retries(lambda: fs.cat_file(p), f"{path}")


def exists(path: Location) -> bool:
    if not is_remote(path):
        return Path(path).is_file()
    if isinstance(path, PipeLocation):  # whether the command succeeds: it reads the object (manifests, verify)
        try:
            path.read()
            return True
        except PipeError:
            return False
    fs, p = filesystem(path), path.path
    return with_retries(lambda: fs.isfile(p), f"{path}")


def cache_dir() -> Path:
    """Where remote side files are copied: ``ARGUS_CACHE`` or ``~/.cache/argus``."""
    return Path(os.environ.get("ARGUS_CACHE") or Path.home() / ".cache" / "argus")


def local_copy(path: Location, sha256: str = "") -> Path:
    """A local file with ``path``'s bytes: ``path`` itself when local, else a cached copy. With ``sha256`` (the
    manifest's) the cache is keyed by content and checked, so a changed object is never read stale; without, by the
    URL (re-fetched each time)."""
    if not is_remote(path):
        return Path(path)
    key = sha256 or hashlib.sha256(str(path).encode()).hexdigest()
    dest = cache_dir() / "objects" / key[:2] / f"{key}{Path(path.path).suffix}"
    if sha256 and dest.is_file():
        return dest
    _publish(read_bytes(path), dest, path, sha256)
    return dest


def _publish(data: bytes, dest: Path, source: Location, sha256: str) -> None:
    """``data`` (``source``'s bytes, checked against the manifest's ``sha256`` when given) written to ``dest`` whole
    or not at all: concurrent workers may fetch the same object."""
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise OSError(f"{redact(source)}: sha256 differs from the manifest's (changed since the dataset was written?)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # a full disk leaves nothing behind outside the cache's bound
        raise


def cached_shard(path: Location, sha256: str, bound: int) -> BinaryIO:
    """The shard at ``path``, opened from the shard cache (``ARGUS_CACHE``/shards, named by the manifest's sha256, so
    a copy is never stale), fetched whole on first use; then the least recently used copies are removed until the
    cache holds at most ``bound`` bytes. The copy is opened before anything is removed, so a copy another worker
    removes meanwhile stays readable through the open file (POSIX); one removed between use and open is fetched
    again."""
    root = cache_dir() / "shards"
    dest = root / f"{sha256}.tar"
    for _ in range(3):
        if not dest.is_file():
            _publish(read_bytes(path), dest, path, sha256)
        try:
            f = open(dest, "rb")
            os.utime(dest)  # recently used
            break
        except FileNotFoundError:  # removed by another worker's eviction after we looked
            continue
    else:
        raise OSError(f"{redact(path)}: the shard cache lost this shard 3 times: cache_bytes smaller than a shard?")
    held = []  # every other copy, oldest use first (another process may remove one meanwhile)
    for p in root.glob("*.tar"):
        with contextlib.suppress(FileNotFoundError):
            if p != dest:
                st = p.stat()
                held.append((st.st_mtime, st.st_size, p))
    total = os.fstat(f.fileno()).st_size + sum(size for _, size, _ in held)
    for _, size, old in sorted(held, key=lambda t: t[0]):
        if total <= bound:
            break
        total -= size
        old.unlink(missing_ok=True)
    return f


def upload_tree(local: Path, dest: Location, last: str) -> None:
    """Copy every file under ``local`` to ``dest`` (retried per file), ``last`` (the manifest) after all others, so a
    half-uploaded dataset is never taken for a whole one."""
    files = sorted(p for p in local.rglob("*") if p.is_file())
    fs = filesystem(dest)
    for p in [*(f for f in files if f.name != last), *(f for f in files if f.name == last)]:
        target = dest / p.relative_to(local).as_posix()
        with_retries(lambda p=p, target=target: fs.put_file(str(p), target.path), str(target))
