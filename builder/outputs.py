"""Output files: compressed tar sinks, SHA256SUMS, and atomic publishing.

Compression is fixed so the bytes depend only on the tar: gzip level 6 with
no name and mtime 0; zstd level 3 with a worker thread pool (libzstd writes
the same bytes for any number of workers >= 1, and for any write chunking)
and no content size in the frame header.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import gzip
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zstandard

from .errors import UserError
from .hashing import HashingFile, sha256_file

GZIP_LEVEL = 6
ZSTD_LEVEL = 3
ZSTD_WORKERS = 2
BUFFER = 1 << 20


def zstd_compressor() -> zstandard.ZstdCompressor:
    """The project's zstd settings (see the module docstring): the same bytes
    for the same input on every machine."""
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=ZSTD_WORKERS,
                                    write_content_size=False, write_checksum=True)


def compression_versions() -> dict[str, str]:
    return {"zlib": zlib.ZLIB_RUNTIME_VERSION, "zstd": ".".join(map(str, zstandard.ZSTD_VERSION)),
            "python-zstandard": zstandard.__version__}


class TarSink:
    """One output file for one tar format."""

    def __init__(self, path: Path, fmt: str):
        self.fmt = fmt
        self.file = HashingFile(path)
        self._writer: Any
        if fmt == "tar":
            self._writer = self.file
        elif fmt == "tar.gz":
            self._writer = gzip.GzipFile(filename="", mode="wb", compresslevel=GZIP_LEVEL,
                                         fileobj=self.file, mtime=0)
        elif fmt == "tar.zst":
            self._writer = zstd_compressor().stream_writer(
                self.file, closefd=False)  # type: ignore[arg-type]
        else:
            raise ValueError(fmt)

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    def close(self) -> None:
        if self._writer is not self.file:
            self._writer.close()
        self.file.close()


class Tee:
    """Buffers small writes and hands 1 MiB blocks to every sink."""

    def __init__(self, sinks: list[TarSink]):
        self.sinks = sinks
        self._buf = bytearray()

    def write(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= BUFFER:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            block = bytes(self._buf)
            for s in self.sinks:
                s.write(block)
            self._buf.clear()

    def close(self) -> None:
        self._flush()
        for s in self.sinks:
            s.close()


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


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


# -- output directory -------------------------------------------------------

_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); False if unsupported."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = getattr(libc, "renameat2", None)
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


class OutputDir:
    """Staging and publishing `<root>/<name>/`: holds an exclusive lock on the
    name for the whole build so two builds of one recipe into one output
    directory never interleave; the finished directory replaces the old one
    in one rename."""

    def __init__(self, root: Path, name: str, *, wait: bool = True):
        self.root = root
        self.name = name
        self.final = root / name
        try:
            root.mkdir(parents=True, exist_ok=True)
            self._lock = os.open(root / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{root}: output directory is not writable: {e.strerror}",
                            hint="choose another with -o DIR") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(self._lock)
                raise UserError(f"{self.final}: another build of '{name}' is writing here",
                                hint="wait for it, or use another -o DIR") from None
            from . import ui
            ui.step(f"waiting for another build of '{name}' in {root}")
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        self._clean_stale()
        self.staging = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=root))
        self._extra: list[tuple[Path, Path]] = []

    def _clean_stale(self) -> None:
        # Leftovers of killed builds of this name; safe because we hold the lock.
        for p in self.root.glob(f".{self.name}.*-*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()

    def sibling(self, filename: str) -> Path:
        """A staging path for a file published next to the directory
        (`<root>/<filename>`), e.g. the bundle."""
        tmp = self.root / f".{self.name}.file-{len(self._extra)}-{os.getpid()}"
        self._extra.append((tmp, self.root / filename))
        return tmp

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
                old = self.root / f".{self.name}.old-{os.getpid()}"
                os.rename(self.final, old)
                os.rename(self.staging, self.final)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.staging, self.final)
        for tmp, final in self._extra:
            if tmp.exists():
                os.replace(tmp, final)
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
        """Drop what was not published and release the lock."""
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        for tmp, _ in self._extra:
            with contextlib.suppress(OSError):
                tmp.unlink()
        os.close(self._lock)

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def open_sinks(directory: Path, formats: list[str]) -> Iterator[Tee]:
    sinks = [TarSink(directory / f"rootfs.{fmt}", fmt) for fmt in formats]
    tee = Tee(sinks)
    yield tee
    tee.close()
