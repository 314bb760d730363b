"""Work beside the main thread: files written (and hashed) on a thread of
their own, streams read ahead on a thread of their own.

The main thread parses and normalizes (Python, holding the GIL); reading a
pipe, hashing and writing are C work that releases the GIL, so on a thread
of their own they overlap the parsing instead of following it.  Nothing here
changes a byte: only where and when the work happens.

Invariants:
- BackgroundFile: the file's bytes and `sha` are exactly the bytes given to
  write(), in order.  write() takes the buffer over: the caller must not
  change it afterwards (bytes, memoryviews of bytes, or a bytearray the
  caller forgets).  An error on the worker (a full disk) is raised, as the
  same exception, by the next call on the caller's side.
- ReadAhead: read() returns the stream's bytes in order, at most `depth`
  blocks ahead of the reader, and b"" once at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from .fileio import libc_function

BATCH = 256 << 10             # small writes are gathered up to this before a hand-over
DEPTH = 4                     # hand-overs in flight (each at most ~1 MiB: bounded memory)
WRITEBACK_EVERY = 16 << 20    # start the disk writing every this many bytes
READ_BLOCK = 1 << 20

_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any = None


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk now, without waiting
    (sync_file_range(SYNC_FILE_RANGE_WRITE)), so the fsync at the end finds
    little left to do: the disk works while the stream is still arriving."""
    global _sync_file_range
    if _sync_file_range is None:
        fn = libc_function("sync_file_range")
        if fn is not None:
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            fn.restype = ctypes.c_int
        _sync_file_range = fn or False
    if _sync_file_range:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


# Digests of files this process wrote whole, by path, with the stat they had
# when closed: the cache records an entry's files without reading them again.
_written: dict[str, tuple[tuple[int, int, int, int, int], str]] = {}


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def written_digest(path: Path) -> str | None:
    """sha256 of `path` if this process wrote it with a BackgroundFile and it
    has not changed since (same device, inode, size, mtime and ctime)."""
    known = _written.get(os.path.abspath(path))
    if known is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return known[1] if known[0] == _stat_key(st) else None


class _Mark:
    """A position in a BackgroundFile and the hash state there."""

    def __init__(self, size: int):
        self.size = size
        self.sha: Any = None


class BackgroundFile:
    """A new file, written once, hashed and written on a worker thread.

    `size` counts what was handed over (so callers know offsets at once);
    `sha` is complete after close().  mark()/rollback() take the file back
    to an earlier point (the layer writer's sparse-file case)."""

    def __init__(self, path: Path, *, name: str = "writer"):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        self.size = 0
        self.sha = hashlib.sha256()
        self.busy = 0.0          # seconds of CPU the worker used (for -v)
        self._batch = bytearray()
        self._queue: queue.Queue[Any] = queue.Queue(DEPTH)
        self._error: BaseException | None = None
        self._written = 0        # bytes on the file (worker side)
        self._synced = 0         # bytes asked to be written back
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"rb-{name}", daemon=True)
        self._thread.start()

    # -- the worker ---------------------------------------------------------
    def _work(self) -> None:
        cpu0 = time.thread_time()
        q = self._queue
        while True:
            item = q.get()
            try:
                if item is None:
                    return
                if self._error is not None:
                    continue   # keep draining so the caller never blocks
                if isinstance(item, _Mark):
                    item.sha = self.sha.copy()
                    continue
                self.sha.update(item)
                view = memoryview(item)
                while view:
                    n = os.write(self.fd, view)
                    view = view[n:]
                self._written += len(item)
                if self._written - self._synced >= WRITEBACK_EVERY:
                    _start_writeback(self.fd, self._synced, self._written - self._synced)
                    self._synced = self._written
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._error = e
            finally:
                q.task_done()
                self.busy = time.thread_time() - cpu0

    def _put(self, item: Any) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(item)

    # -- the caller's side ------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = len(data)
        if not n:
            return 0
        self.size += n
        if n >= BATCH:
            if self._batch:
                self._put(self._batch)
                self._batch = bytearray()
            self._put(data)
        else:
            self._batch += data
            if len(self._batch) >= BATCH:
                self._put(self._batch)
                self._batch = bytearray()
        return n

    def flush(self) -> None:
        if self._batch:
            self._put(self._batch)
            self._batch = bytearray()

    def _drain(self) -> None:
        self.flush()
        self._queue.join()
        if self._error is not None:
            raise self._error

    def mark(self) -> _Mark:
        """The current end of the file, to roll back to."""
        self.flush()
        m = _Mark(self.size)
        self._put(m)
        return m

    def rollback(self, m: _Mark, spool: BinaryIO | None = None, keep_from: int = 0) -> None:
        """Cut the file back to mark `m`; what was written from `keep_from`
        (an offset after the mark) on goes to `spool` first, copied in the
        kernel, never through Python."""
        self._drain()
        if spool is not None:
            spool.flush()
            offset = max(m.size, keep_from)
            left = self.size - offset
            while left:
                n = os.copy_file_range(self.fd, spool.fileno(), left, offset)
                if n <= 0:
                    raise OSError(f"{self.path}: copy_file_range made no progress")
                offset += n
                left -= n
            spool.seek(0, os.SEEK_END)
        os.ftruncate(self.fd, m.size)
        os.lseek(self.fd, m.size, os.SEEK_SET)
        self.size = self._written = m.size
        self._synced = min(self._synced, m.size)
        self.sha = m.sha

    def close(self) -> None:
        """Write what is left, fsync and close; `sha` is then complete."""
        if self._closed:
            return
        try:
            self._drain()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        try:
            os.fsync(self.fd)
            _written[os.path.abspath(self.path)] = (_stat_key(os.fstat(self.fd)),
                                                    self.sha.hexdigest())
        finally:
            os.close(self.fd)

    def abort(self) -> None:
        """Stop and close; the file is left as it is (its owner removes it)."""
        if self._closed:
            return
        self._closed = True
        self._batch = bytearray()
        self._queue.put(None)
        self._thread.join()
        os.close(self.fd)


_EOF = object()


class ReadAhead:
    """Reads `f` on a worker thread, up to `depth` blocks ahead.

    For a pipe fed by another process: the producer keeps writing while the
    consumer parses.  `on_block(n)` is called on the consumer's thread for
    every block it takes.  close() stops the worker (it may still be blocked
    in a read of `f` until the producer writes or closes)."""

    def __init__(self, f: BinaryIO, *, block: int = READ_BLOCK, depth: int = 4,
                 on_block: Callable[[int], None] | None = None):
        self.f = f
        self.block = block
        self.on_block = on_block
        self.busy = 0.0
        self.waited = 0.0          # seconds the consumer waited for data
        self.first_data: float | None = None   # monotonic time the first block arrived
        self.last_data: float | None = None    # ... and the last one
        self._queue: queue.Queue[Any] = queue.Queue(depth)
        self._stop = threading.Event()
        self._rest = b""
        self._done = False
        self._thread = threading.Thread(target=self._work, name="rb-read-ahead", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        cpu0 = time.thread_time()
        try:
            while not self._stop.is_set():
                data = self.f.read(self.block)
                self.busy = time.thread_time() - cpu0
                if not data:
                    break
                now = time.monotonic()
                if self.first_data is None:
                    self.first_data = now
                self.last_data = now
                self._put(data)
            self._put(_EOF)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(e)

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def read(self, n: int = -1) -> bytes:
        if self._rest:
            data, self._rest = self._rest, b""
        elif self._done:
            return b""
        else:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                t0 = time.monotonic()
                item = self._queue.get()
                self.waited += time.monotonic() - t0
            if item is _EOF:
                self._done = True
                return b""
            if isinstance(item, BaseException):
                self._done = True
                raise item
            data = item
            if self.on_block is not None:
                self.on_block(len(data))
        if 0 <= n < len(data):
            data, self._rest = data[:n], data[n:]
        return data

    def drain(self) -> None:
        """Read to the end of the stream (what follows a tar's end marker)."""
        while self.read(self.block):
            pass

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
