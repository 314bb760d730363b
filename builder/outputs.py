"""Output files: compressed tar sinks, SHA256SUMS, and atomic publishing.

Compression is fixed so the bytes depend only on the tar: gzip level 6 with
no name and mtime 0; zstd level 3 with a worker thread pool (libzstd writes
the same bytes for any number of workers >= 1, and for any write chunking)
and no content size in the frame header.

Every sink works beside the assembling thread: it is fed from a queue on a
thread of its own, which compresses (gzip and zstd release the GIL while
they work, and zstd has its own workers besides) and writes the file; the
file is hashed behind the writing on one more (pipeline.HashedFile), and
its disk writing starts early, so publishing's fsync finds little left to
do.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gzip
import os
import queue
import shutil
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zstandard

from . import ui
from .errors import UserError
from .fileio import libc_function
from .hashing import sha256_file
from .pipeline import HashedFile

GZIP_LEVEL = 6
ZSTD_LEVEL = 3
ZSTD_WORKERS = 2
BUFFER = 1 << 20
_DIRECT = BUFFER // 4       # writes at least this large skip the Tee's buffer
_FEED_DEPTH = 3             # blocks queued for a sink's feeder


def zstd_compressor() -> zstandard.ZstdCompressor:
    """The project's zstd settings (see the module docstring): the same bytes
    for the same input on every machine."""
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=ZSTD_WORKERS,
                                    write_content_size=False, write_checksum=True)


def compression_versions() -> dict[str, str]:
    return {"zlib": zlib.ZLIB_RUNTIME_VERSION, "zstd": ".".join(map(str, zstandard.ZSTD_VERSION)),
            "python-zstandard": zstandard.__version__}


class TarSink:
    """One output file for one tar format.  `file.sha` and `file.size` are
    the file's sha256 and length once closed."""

    def __init__(self, path: Path, fmt: str):
        self.fmt = fmt
        self.file = HashedFile(path, name=f"sink-{fmt}")
        self._writer: Any
        if fmt == "tar":
            self._writer = self.file
        elif fmt == "tar.gz":
            self._writer = gzip.GzipFile(filename="", mode="wb", compresslevel=GZIP_LEVEL,
                                         fileobj=self.file, mtime=0)
        elif fmt == "tar.zst":
            # Output is taken from libzstd up to BUFFER bytes per call, not
            # its default ~128 KiB: the writer takes output only while input
            # remains, so when a block's output is more than one call takes,
            # finished jobs wait in libzstd with their buffers (the 1 GB bench
            # base, host side only, four runs each: 72-105 MB of mapped heap
            # at the peak against 64-72; the output bytes are the same).
            self._writer = zstd_compressor().stream_writer(
                self.file, closefd=False, write_size=BUFFER)  # type: ignore[arg-type]
        else:
            raise ValueError(fmt)
        # Every format, plain tar too, is written by this feeder: the
        # assembling thread only queues blocks.
        self._queue: queue.Queue[Any] | None = queue.Queue(_FEED_DEPTH)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._feed, name=f"rb-{fmt}", daemon=True)
        self._thread.start()

    def _feed(self) -> None:
        assert self._queue is not None
        while True:
            block = self._queue.get()
            if block is None:
                return
            if self._error is None:
                try:
                    self._writer.write(block)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    self._error = e

    def write(self, data: bytes | bytearray) -> None:
        """Hand `data` over (it must not change afterwards)."""
        if self._error is not None:
            raise self._error
        assert self._queue is not None, "written after close()"
        self._queue.put(data)

    def _stop_feeding(self) -> None:
        if self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._queue = None

    def close(self) -> None:
        self._stop_feeding()
        if self._error is not None:
            self.file.abort()
            raise self._error
        if self._writer is not self.file:
            self._writer.close()
        self.file.close()

    def abort(self) -> None:
        with contextlib.suppress(BaseException):
            self._stop_feeding()
        self.file.abort()


class Tee:
    """Gathers small writes into 1 MiB blocks and hands every block (and
    every large write as it is) to each sink."""

    def __init__(self, sinks: list[TarSink]):
        self.sinks = sinks
        self._buf = bytearray()

    def write(self, data: bytes) -> None:
        if len(data) >= _DIRECT:
            self._flush()
            for s in self.sinks:
                s.write(data)
            return
        self._buf += data
        if len(self._buf) >= BUFFER:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            block, self._buf = self._buf, bytearray()
            for s in self.sinks:
                s.write(block)

    def close(self) -> None:
        self._flush()
        for s in self.sinks:
            s.close()

    def abort(self) -> None:
        for s in self.sinks:
            s.abort()


def sha256sums(directory: Path, known: dict[str, str] | None = None) -> str:
    """`sha256sum` lines for every file under `directory`, sorted by path;
    `known` gives digests already computed while writing (relative path ->
    sha256), so large artifacts are not read again."""
    lines = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(directory).as_posix()
        if rel == "SHA256SUMS":
            continue
        digest = (known or {}).get(rel) or sha256_file(path)
        lines.append(f"{digest}  {rel}\n")
    return "".join(lines)


# -- output directory -------------------------------------------------------

_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); False if unsupported."""
    fn = libc_function("renameat2")
    if fn is None:
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS):
            return False
        raise OSError(err, os.strerror(err), str(b))
    return True


def check_output_root(root: Path) -> None:
    """Refuse an output root that cannot be written, before any work and
    without creating anything."""
    probe = Path(os.path.abspath(root))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{root}: output directory is not writable",
                        hint="choose another with -o DIR")


class OutputDir:
    """Staging and publishing `<root>/<name>/`.

    Holds an exclusive lock on the name while it exists, so two builds of one
    recipe into one output directory never interleave; the finished
    directory replaces the old one in one rename.  Everything it keeps in
    `<root>` while working is named `.<name>~...` (`~` cannot occur in a
    recipe name, so no other name's files ever match), and close() removes
    all of it, the lock included, and `<root>` itself when this build made it
    and published nothing: a failed build leaves `<root>` as it found it.
    """

    def __init__(self, root: Path, name: str):
        self.root = root
        self.name = name
        self.final = root / name
        self._made_root = not root.exists()
        self._published = False
        try:
            root.mkdir(parents=True, exist_ok=True)
            self._lock, self._lock_path = self._take_lock()
        except OSError as e:
            raise UserError(f"{root}: output directory is not writable: {e.strerror}",
                            hint="choose another with -o DIR") from None
        self._clean_stale()
        self.staging = Path(tempfile.mkdtemp(prefix=f".{name}~staging-", dir=root))
        self._files = Path(tempfile.mkdtemp(prefix=f".{name}~files-", dir=root))
        self._extra: list[tuple[Path, Path]] = []

    def _take_lock(self) -> tuple[int, Path]:
        """flock on `.<name>~lock`, retried when the file we locked was
        unlinked meanwhile by the build that held it (close() unlinks it)."""
        path = self.root / f".{self.name}~lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                ui.step(f"waiting for another build of '{self.name}' in {self.root}")
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    return fd, path
            except FileNotFoundError:
                pass
            os.close(fd)

    def _clean_stale(self) -> None:
        # Leftovers of killed builds of this name; safe because we hold the lock.
        for p in self.root.glob(f".{self.name}~*"):
            if p == self._lock_path:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()

    def sibling(self, filename: str) -> Path:
        """A staging path for a file published next to the directory
        (`<root>/<filename>`), e.g. the bundle."""
        tmp = self._files / filename
        self._extra.append((tmp, self.root / filename))
        return tmp

    def published(self, rel: Path) -> Path:
        """Where a file given as `sibling(rel)` was published."""
        return self.root / rel

    def publish(self) -> Path:
        self._fsync_tree(self.staging)
        os.chmod(self.staging, 0o755)
        if self.final.exists() or self.final.is_symlink():
            if not self.final.is_dir() or self.final.is_symlink():
                raise UserError(f"{self.final}: exists and is not a directory",
                                hint="remove it or choose another -o DIR")
            if _exchange(self.staging, self.final):
                shutil.rmtree(self.staging, ignore_errors=True)
            else:
                old = self.root / f".{self.name}~old-{os.getpid()}"
                os.rename(self.final, old)
                os.rename(self.staging, self.final)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.staging, self.final)
        for tmp, final in self._extra:
            if tmp.exists():
                os.replace(tmp, final)
        self._published = True
        return self.final

    @staticmethod
    def _fsync_tree(top: Path) -> None:
        for dirpath, _dirs, files in os.walk(top):
            for f in files:
                fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def close(self) -> None:
        """Drop what was not published, release and remove the lock."""
        for p in (self.staging, self._files):
            if p.exists():
                shutil.rmtree(p, ignore_errors=True)
        with contextlib.suppress(OSError):
            self._lock_path.unlink()
        os.close(self._lock)
        if self._made_root and not self._published:
            with contextlib.suppress(OSError):
                self.root.rmdir()  # only when empty

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def open_sinks(directory: Path, formats: list[str]) -> Iterator[Tee]:
    sinks: list[TarSink] = []
    try:
        for fmt in formats:
            sinks.append(TarSink(directory / f"rootfs.{fmt}", fmt))
    except BaseException:
        Tee(sinks).abort()
        raise
    tee = Tee(sinks)
    names = ", ".join(f"rootfs.{fmt}" for fmt in formats)
    ui.info(f"writing {names}")
    start = time.monotonic()
    try:
        yield tee
    except BaseException:
        tee.abort()
        raise
    fed = time.monotonic()
    tee.close()
    done = time.monotonic()
    ui.info(f"wrote {names} in {done - start:.2f} s ({done - fed:.2f} s of it finishing "
            "the compression and the disk writes after the last byte)")
