"""Work beside the main thread: files hashed on a thread of their own
behind the writing, streams read ahead on a thread of their own.

The main thread parses and normalizes (Python, holding the GIL); reading a
pipe and hashing are C work that releases the GIL, so on a thread of their
own they overlap the parsing instead of following it.  Writing stays on
the thread that produces the bytes: handing it to a thread of its own cost
more in GIL switches than the writes themselves (HashedFile).  Nothing here
changes a byte: only where and when the work happens.

Invariants:
- HashedFile: the file's bytes and `sha` are exactly the bytes given to
  write(), in order.  write() takes the buffer over: the caller must not
  change it afterwards (bytes, memoryviews of bytes, or a bytearray the
  caller forgets).  A write's error is raised by that write (or the flush
  that does it); the hasher's error, as the same exception, by the next
  write's flush or by close().
- Bytes are hashed from the file, behind the writing, and never past a live
  mark: what a rollback cuts off was never hashed.
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

BATCH = 256 << 10             # writes are gathered up to this for one writev
WRITEBACK_EVERY = 16 << 20    # start the disk writing every this many bytes
HASH_EVERY = 8 << 20          # the hasher wakes when this much more is written
HASH_PIECE = 1 << 20          # ... and reads it back in pieces of this size (heap.BLOCK_MAX)
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


Buffer = bytes | bytearray | memoryview
_IOV_MAX = os.sysconf("SC_IOV_MAX")


def _write_all(fd: int, buffers: list[Buffer], size: int) -> None:
    """Write `buffers` (`size` bytes in all) at the file's position, in as
    few system calls as the kernel takes: a batch of many small pieces
    (a member's header, data, padding) costs one call, not one a piece,
    and no copy into one buffer first."""
    for i in range(0, len(buffers), _IOV_MAX):
        group = buffers[i:i + _IOV_MAX]
        want = size if len(group) == len(buffers) else sum(map(len, group))
        n = os.writev(fd, group)
        if n != want:        # a short write (rare): the rest piece by piece
            for b in group:
                view = memoryview(b)
                if n >= len(view):
                    n -= len(view)
                    continue
                view, n = view[n:], 0
                while view:
                    view = view[os.write(fd, view):]


# Digests of files this process wrote whole, by path, with the stat they had
# when closed: the cache records an entry's files without reading them again.
_written: dict[str, tuple[tuple[int, int, int, int, int], str]] = {}


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def written_digest(path: Path) -> str | None:
    """sha256 of `path` if this process wrote it with a HashedFile and it
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
    """A position in a HashedFile to roll back to."""

    def __init__(self, size: int):
        self.size = size


class HashedFile:
    """A new file, written once by the threads that call write(), hashed
    behind the writing on a thread of its own.

    `size` counts what was given to write(); `sha` is complete after
    close().  mark()/rollback()/release() take the file back to an earlier
    point (the layer writer's sparse-file case).  Writes are gathered up to
    BATCH bytes and written by one writev, the pieces not copied together
    first.  One thread writes at a time (the caller's, or a sink's feeder).

    Why the caller writes, not a writer thread: the caller's thread runs
    Python nearly all the time, and a worker coming back from C code waits
    for the GIL, so every hand-over to a writer thread cost the parsing
    thread a switch each way.  bench/host_only.py on the bench's 1 GB
    stream, three runs each, alternating: the stream took 2.75-2.98 s with
    a writer thread and 2.21-2.40 s with the writes on the parsing thread,
    which cost that thread 0.3 s more CPU.

    Why the hash is taken from the file and not from the writes: for the
    same reason a hasher fed each write fell behind and held the caller up;
    reading the written bytes back from the page cache, 1 MiB at a time
    into one buffer (4 MiB measured no faster and held 1-3 MB more), it
    comes back for the GIL twice per MiB, and its waits only delay the
    hash, which nobody reads before close()."""

    def __init__(self, path: Path, *, name: str = "file"):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        self.size = 0
        self.sha = hashlib.sha256()
        self._batch: list[Buffer] = []   # the buffers given to write(), not copied
        self._batch_bytes = 0
        self._error: BaseException | None = None   # the hasher's; flush() and close() raise it
        self._written = 0        # bytes on the file
        self._synced = 0         # bytes asked to be written back
        self._closed = False
        self.write_cpu = 0.0     # CPU seconds the writing threads spent in flush() (for -v)
        # the hasher's state, under _progress
        self._progress = threading.Condition()
        self._hashed = 0         # bytes of the file in `sha`
        self._hold: int | None = None   # a live mark's offset: nothing past it is hashed
        self._told = 0           # _written when the hasher was last woken
        self._to_end = False     # close(): hash to the end of the file, then stop
        self._stop = False       # abort(): stop now
        self.hash_cpu = 0.0      # CPU seconds the hasher used so far (for -v)
        self._hasher = threading.Thread(target=self._hash_work, name=f"rb-{name}-hash",
                                        daemon=True)
        self._hasher.start()

    # -- the hasher ---------------------------------------------------------
    def _hashable(self) -> int:
        """How far the hasher may go now (called under _progress)."""
        if self._to_end or self._hold is None:
            return self._written
        return min(self._written, self._hold)

    def _hash_work(self) -> None:
        cpu0 = time.thread_time()
        piece = memoryview(bytearray(HASH_PIECE))
        try:
            while True:
                with self._progress:
                    while not self._stop and not (
                            self._to_end or self._hashable() - self._hashed >= HASH_EVERY):
                        self._progress.wait()
                    if self._stop:
                        return
                    limit, last = self._hashable(), self._to_end
                while self._hashed < limit and not self._stop:
                    n = os.preadv(self.fd, [piece[:min(HASH_PIECE, limit - self._hashed)]],
                                  self._hashed)
                    if n <= 0:
                        raise OSError(f"{self.path}: shorter than what was written to it")
                    self.sha.update(piece[:n])
                    self._hashed += n
                    self.hash_cpu = time.thread_time() - cpu0
                if last:
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            self._error = e
        finally:
            self.hash_cpu = time.thread_time() - cpu0

    # -- the writing side ---------------------------------------------------
    def write(self, data: Buffer) -> int:
        n = len(data)
        if not n:
            return 0
        self.size += n
        self._batch.append(data)
        self._batch_bytes += n
        if self._batch_bytes >= BATCH:
            self.flush()
        return n

    def flush(self) -> None:
        """Write what is gathered; start the disk writing and wake the
        hasher when enough has piled up since they last were."""
        if self._error is not None:
            raise self._error
        if not self._batch:
            return
        cpu0 = time.thread_time()
        _write_all(self.fd, self._batch, self._batch_bytes)
        self._written += self._batch_bytes
        self._batch = []
        self._batch_bytes = 0
        if self._written - self._synced >= WRITEBACK_EVERY:
            _start_writeback(self.fd, self._synced, self._written - self._synced)
            self._synced = self._written
        if self._written - self._told >= HASH_EVERY:
            with self._progress:
                self._told = self._written
                self._progress.notify()
        self.write_cpu += time.thread_time() - cpu0

    def mark(self) -> _Mark:
        """The current end of the file, to roll back to; until rollback() or
        release(), nothing past it is hashed.  One mark at a time."""
        assert self._hold is None, "a HashedFile holds one mark at a time"
        m = _Mark(self.size)
        with self._progress:
            self._hold = m.size
        return m

    def release(self, m: _Mark) -> None:
        """The bytes after mark `m` stay: the hasher may go on."""
        assert self._hold == m.size
        with self._progress:
            self._hold = None
            self._progress.notify()

    def rollback(self, m: _Mark, spool: BinaryIO | None = None, keep_from: int = 0) -> None:
        """Cut the file back to mark `m` (and release it); what was written
        from `keep_from` (an offset after the mark) on goes to `spool`
        first, copied in the kernel, never through Python."""
        assert self._hold == m.size
        self.flush()
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
        # The hasher stays below the mark (it may be reading there now), so
        # the cut takes nothing it has hashed.
        os.ftruncate(self.fd, m.size)
        os.lseek(self.fd, m.size, os.SEEK_SET)
        self.size = m.size
        self._synced = min(self._synced, m.size)
        with self._progress:
            self._written = self._told = m.size
            self._hold = None
            self._progress.notify()

    def _stop_hasher(self, *, to_end: bool) -> None:
        with self._progress:
            if to_end:
                self._to_end = True
            else:
                self._stop = True
            self._progress.notify()
        self._hasher.join()

    def close(self) -> None:
        """Write what is left, hash it, fsync and close; `sha` is then complete."""
        if self._closed:
            return
        try:
            self.flush()
            self._stop_hasher(to_end=True)
            if self._error is not None:
                raise self._error
        except BaseException:
            self.abort()
            raise
        self._closed = True
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
        self._batch = []
        if self._hasher.is_alive():
            self._stop_hasher(to_end=False)
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
