"""Small file and stream primitives every module uses the same way.

- `read_exactly` / `copy_exactly`: pipes and sockets return fewer bytes than
  asked; these loop until `n` bytes arrived or the stream ended (ShortRead).
- `atomic_path` / `write_atomic`: a file appears at its path whole or not at
  all: it is written under a temporary name in the same directory, fsynced,
  given its mode and renamed over the path.
- `libc_function`: a call of the C library that Python's os module lacks
  (sync_file_range, renameat2, mallopt, malloc_trim), loaded in one place.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


class ShortRead(Exception):
    """The stream ended `missing` bytes before the count asked for."""

    def __init__(self, missing: int):
        super().__init__(f"{missing} bytes missing")
        self.missing = missing


def read_exactly(read: Callable[[int], bytes], n: int) -> bytes:
    """Exactly `n` bytes from read(k), or ShortRead."""
    parts = []
    while n:
        chunk = read(n)
        if not chunk:
            raise ShortRead(n)
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts) if len(parts) != 1 else bytes(parts[0])


def copy_exactly(read: Callable[[int], bytes], write: Callable[[bytes], object], n: int) -> None:
    """Copy exactly `n` bytes from read(k) to write(), in CHUNK pieces, or ShortRead."""
    while n:
        chunk = read(min(n, CHUNK))
        if not chunk:
            raise ShortRead(n)
        write(chunk)
        n -= len(chunk)


@contextlib.contextmanager
def atomic_path(path: Path, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside `path` to write; renamed to `path` (with
    `mode`, contents fsynced) when the block completes, removed otherwise."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """`data` at `path`, whole or not at all."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(raw)


_libc: Any = None


def libc_function(name: str) -> Any:
    """The C library's function `name` (a ctypes function whose errno
    ctypes.get_errno() reads), or None where the library has none."""
    global _libc
    if _libc is None:
        # The process's own symbols (dlopen(NULL)), which include the C
        # library Python runs on.  Not ctypes.util.find_library: it runs
        # ldconfig, and cli.main gets here before its signal handlers exist.
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _libc = False
    return getattr(_libc, name, None) if _libc else None
