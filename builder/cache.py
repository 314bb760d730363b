"""The layer cache: content-addressed entries that appear atomically.

Layout under the cache directory::

    entries/<key>/     a finished entry: its files plus entry.json (size,
                       sha256 and stat of each file, checked before every use)
    tmp/<random>/      entries being built; the builder holds tmp/<random>.lock
    locks/<key>.lock   exclusive while an entry is built, shared while it is used
    hashes/<stat key>  remembered sha256 of large input files, keyed by path and
                       stat (device, inode, size, mtime, ctime)

An entry is built in tmp/ and renamed into entries/ in one step, so a killed
build leaves at most an orphan in tmp/ (removed by the next build or prune).
Two builds that need the same entry serialize on its lock; the second reuses
the first one's result.

Verification.  entry.json records, for every file, its size and sha256 and
the stat it had when hashed (inode, mtime and ctime in nanoseconds).  Before
every use a build compares sizes and stats: when they all match, the recorded
hash stands; when any differs, the file is hashed again, and either the entry
is damaged (rebuilt, with a warning) or the new stat is recorded.  So a
normal build catches every change made through the filesystem -- a write,
truncation, replacement or copy, and a write whose mtime was set back
afterwards, since setting a time changes the ctime, which no one can set
back -- at the cost of a stat per file.  What it cannot see is a change that
bypasses the filesystem: bit rot on the disk, writes to the block device, a
restore that keeps the inodes' times.  `rootfs-build cache verify` (verify())
hashes every file of every entry regardless of the stats, removes damaged
entries and says which.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from . import ui
from .errors import UserError
from .fileio import write_atomic
from .hashing import sha256_file
from .pipeline import written_digest

ENTRY_META = "entry.json"
# What the files of an entry look like (the layer index format among them);
# entries of another layout are rebuilt, not read.
ENTRY_LAYOUT = 2


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rootfs-build"


class RemoteSource(Protocol):
    """Where a missing entry may be fetched from instead of built (e.g.
    remote_cache.RemoteCache, a registry)."""

    def fetch(self, key: str, directory: Path) -> dict[str, Any] | None:
        """Put entry `key`'s files into the empty `directory`, each checked
        against the size and sha256 it is listed with, and return
        {"files": {name: {"size", "sha256"}}, "info": ...}; or None (then
        `directory` is empty again).  Never raises for a registry problem."""
        ...


@dataclasses.dataclass
class EntryInfo:
    key: str
    path: Path
    meta: dict[str, Any]
    size: int
    last_used: float


class Cache:
    """A cache directory; `enabled=False` builds every entry in a private
    temporary directory that is removed at close()."""

    def __init__(self, directory: Path | None, *, enabled: bool = True):
        self.enabled = enabled
        self.root = Path(directory) if directory else default_dir()
        self._private: Path | None = None
        self._held: list[int] = []
        self.remote: RemoteSource | None = None   # consulted on a miss, before building
        self.used: list[str] = []      # keys get_or_build returned, in order
        self.fetched: list[str] = []   # of those, the ones the remote supplied
        if not enabled:
            self._private = Path(tempfile.mkdtemp(prefix="rootfs-build-nocache-"))
            self.root = self._private
        try:
            for sub in ("entries", "tmp", "locks", "hashes"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{self.root}: cache directory is not usable: {e.strerror}",
                            hint="pass --cache-dir DIR (a writable directory) or --no-cache"
                            ) from None
        if not os.access(self.root / "entries", os.W_OK):
            raise UserError(f"{self.root}: cache directory is not writable",
                            hint="pass --cache-dir DIR (a writable directory) or --no-cache")

    def close(self) -> None:
        for fd in self._held:
            os.close(fd)
        self._held.clear()
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)

    # -- locking --------------------------------------------------------
    def _lock_fd(self, key: str) -> int:
        return os.open(self.root / "locks" / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)

    def _hit_or_exclusive(self, fd: int, key: str) -> bool:
        """True with a shared lock on `fd` when entry `key` is there and
        whole; False with the exclusive lock, to build (or discard) it.
        While another build holds it exclusively (building it), wait, then
        look again."""
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                if not told:
                    ui.step(f"waiting for another build to finish cache entry {key[:12]}")
                    told = True
                fcntl.flock(fd, fcntl.LOCK_SH)
            if self.entry_dir(key).exists() and self._check(key) is None:
                return True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # converts the shared lock
                return False
            except BlockingIOError:
                # Others hold it shared: users of a damaged entry, or builds
                # that, like this one, found it missing.  Let go and retry.
                fcntl.flock(fd, fcntl.LOCK_UN)
                time.sleep(0.1)

    def _keep_shared(self, fd: int) -> None:
        """Downgrade our lock to shared and keep it until close(), so a
        concurrent prune leaves the entry alone while we read it."""
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._held.append(fd)

    # -- entries --------------------------------------------------------------
    def entry_dir(self, key: str) -> Path:
        return self.root / "entries" / key

    def _check(self, key: str, *, rehash: bool = False) -> str | None:
        """None when entry `key` can be used; otherwise why not, as the warning
        says it.  With `rehash`, every file is hashed whatever its stat says;
        a file whose stat changed but whose content did not gets its new stat
        recorded."""
        d = self.entry_dir(key)
        damaged = "is damaged (its files do not match their checksums)"
        try:
            meta = json.loads((d / ENTRY_META).read_text())
            if meta.get("layout") != ENTRY_LAYOUT:
                return (f"was written by another version of rootfs-build (layout "
                        f"{meta.get('layout', 1)}, this one reads {ENTRY_LAYOUT})")
            changed = False
            for name, want in meta["files"].items():
                p = d / name
                st = p.stat()
                if st.st_size != want["size"]:
                    return damaged
                if not rehash and want.get("stat") == _file_stat(st):
                    continue
                if sha256_file(p) != want["sha256"]:
                    return damaged
                if want.get("stat") != _file_stat(st):
                    want["stat"] = _file_stat(st)
                    changed = True
            if changed:
                write_atomic(d / ENTRY_META, json.dumps(meta, indent=1, sort_keys=True))
        except (OSError, ValueError, KeyError, TypeError):
            return damaged
        return None

    def _describe_files(self, directory: Path) -> dict[str, dict[str, Any]]:
        """Size, sha256 and stat of the files of a new entry (the digest
        computed while a file was written is reused when it is still that
        file)."""
        files = {}
        for p in sorted(directory.iterdir()):
            if p.is_file():
                st = p.stat()
                files[p.name] = {"size": st.st_size,
                                 "sha256": written_digest(p) or sha256_file(p),
                                 "stat": _file_stat(st)}
        return files

    def _discard(self, key: str, why: str) -> None:
        ui.warn(f"cache entry {key[:12]} {why}; rebuilding it")
        self._remove_entry(key)

    def _remove_entry(self, key: str) -> None:
        trash = Path(tempfile.mkdtemp(prefix="trash-", dir=self.root / "tmp"))
        with contextlib.suppress(OSError):
            os.rename(self.entry_dir(key), trash / key)
        shutil.rmtree(trash, ignore_errors=True)

    def get_or_build(self, key: str, build: Callable[[Path], dict[str, Any]],
                     *, kind: str, label: str) -> tuple[Path, bool]:
        """The directory of entry `key`, building it with build(tmpdir) when
        absent or damaged (unless the remote has it).  Returns (directory,
        was_built)."""
        d = self.entry_dir(key)
        # A hit needs only a shared lock, so builds that share entries (the
        # base layer, say) run side by side; building or discarding takes
        # the exclusive one, and the entry is looked at again under it.
        fd = self._lock_fd(key)
        try:
            if self._hit_or_exclusive(fd, key):
                self._touch(key)
                self._held.append(fd)
                self.used.append(key)
                return d, False
            if d.exists():
                problem = self._check(key)
                if problem is None:
                    self._touch(key)
                    self._keep_shared(fd)
                    self.used.append(key)
                    return d, False
                self._discard(key, problem)
            with self.staging(f"{kind}-") as tmp:
                fetched = self.remote.fetch(key, tmp) if self.remote is not None else None
                if fetched is not None:
                    # no stat recorded: the first use hashes the fetched files
                    # again and records it
                    files, info = fetched["files"], fetched["info"]
                    self.fetched.append(key)
                else:
                    info = build(tmp)
                    files = self._describe_files(tmp)
                meta = {"key": key, "kind": kind, "label": label, "created": int(time.time()),
                        "layout": ENTRY_LAYOUT, "files": files, "info": info}
                with open(tmp / ENTRY_META, "w") as f:
                    json.dump(meta, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                _fsync_dir(tmp)
                os.rename(tmp, d)
                _fsync_dir(d.parent)
            self._touch(key)
            self._keep_shared(fd)
            self.used.append(key)
            return d, fetched is None
        except BaseException:
            os.close(fd)
            raise

    def meta(self, key: str) -> dict[str, Any]:
        return json.loads((self.entry_dir(key) / ENTRY_META).read_text())

    def _touch(self, key: str) -> None:
        with contextlib.suppress(OSError):
            os.utime(self.entry_dir(key) / ENTRY_META)

    @contextlib.contextmanager
    def staging(self, prefix: str) -> Iterator[Path]:
        """A private temporary directory under tmp/, removed unless renamed away."""
        # The lock exists and is held before the directory does, so
        # clean_orphans() never finds the directory unlocked.
        lock, lock_path = tempfile.mkstemp(prefix=prefix, suffix=".lock", dir=self.root / "tmp")
        fcntl.flock(lock, fcntl.LOCK_EX)
        tmp = Path(lock_path.removesuffix(".lock"))
        try:
            tmp.mkdir(mode=0o700)
            yield tmp
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            os.unlink(lock_path)
            os.close(lock)

    def clean_orphans(self) -> int:
        """Remove tmp/ directories whose builder is gone; returns how many."""
        removed = 0
        for p in (self.root / "tmp").iterdir():
            if p.suffix == ".lock" or not p.is_dir():
                continue
            lock_path = Path(f"{p}.lock")
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            shutil.rmtree(p, ignore_errors=True)
            with contextlib.suppress(OSError):
                lock_path.unlink()
            os.close(fd)
            removed += 1
        return removed

    # -- listing and pruning ------------------------------------------------
    def entries(self) -> list[EntryInfo]:
        out = []
        for d in sorted((self.root / "entries").iterdir()):
            try:
                meta = json.loads((d / ENTRY_META).read_text())
                used = (d / ENTRY_META).stat().st_mtime
            except (OSError, ValueError):
                meta, used = {"kind": "?", "label": "(damaged)"}, 0.0
            size = sum(p.stat().st_size for p in d.iterdir() if p.is_file())
            out.append(EntryInfo(d.name, d, meta, size, used))
        return out

    def prune(self, max_size: int | None = None) -> tuple[int, int]:
        """Remove entries not in use, least recently used first, until the
        cache holds at most `max_size` bytes (all of them when None).
        Returns (entries removed, bytes freed)."""
        entries = sorted(self.entries(), key=lambda e: e.last_used)
        total = sum(e.size for e in entries)
        removed = freed = 0
        for e in entries:
            if max_size is not None and total <= max_size:
                break
            fd = self._lock_fd(e.key)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                trash = Path(tempfile.mkdtemp(prefix="trash-", dir=self.root / "tmp"))
                os.rename(e.path, trash / e.key)
                shutil.rmtree(trash, ignore_errors=True)
                total -= e.size
                freed += e.size
                removed += 1
            finally:
                os.close(fd)
        self.clean_orphans()
        return removed, freed

    def verify(self) -> list[dict[str, Any]]:
        """Hash every file of every entry, whatever its stat says.  A damaged
        entry (or one of another layout) is removed unless a running build
        holds it, which is then said.  One row per entry: key, kind, label,
        status ("ok", "damaged", "stale", "damaged, in use"), why."""
        rows = []
        for e in self.entries():
            fd = self._lock_fd(e.key)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    exclusive = True
                except BlockingIOError:
                    fcntl.flock(fd, fcntl.LOCK_SH)   # in use: read it all the same
                    exclusive = False
                if not self.entry_dir(e.key).exists():
                    continue   # pruned meanwhile
                problem = self._check(e.key, rehash=True)
                status = "ok"
                if problem is not None:
                    status = "damaged" if "damaged" in problem else "stale"
                    if exclusive:
                        self._remove_entry(e.key)
                    else:
                        status += ", in use"
                rows.append({"key": e.key, "kind": e.meta.get("kind", "?"),
                             "label": e.meta.get("label", ""), "status": status,
                             "why": problem or ""})
            finally:
                os.close(fd)
        return rows

    # -- input hashes -------------------------------------------------------------
    def file_sha256(self, path: Path, *, label: str = "") -> str:
        """sha256 of a build input, remembered by its stat so a large base
        image is read once, not on every build."""
        st = path.stat()
        stat_key = hashlib.sha256(
            f"{path.resolve()}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0"
            f"{st.st_mtime_ns}\0{st.st_ctime_ns}".encode()).hexdigest()
        memo = self.root / "hashes" / stat_key
        with contextlib.suppress(OSError):
            text = memo.read_text().strip()
            if len(text) == 64:
                return text
        if st.st_size > (64 << 20):
            with ui.bar(f"hashing {label or path.name}", st.st_size) as bar:
                digest = sha256_file(path, progress=bar.update)
        else:
            digest = sha256_file(path)
        with contextlib.suppress(OSError):
            write_atomic(memo, digest + "\n")
        return digest


def _file_stat(st: os.stat_result) -> list[int]:
    """What must stay the same for a file's recorded hash to stand."""
    return [st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
