"""Layers: a normalized tar plus a sorted index, as the cache stores them.

A layer's ``layer.tar`` holds canonical members (see tarfmt) in the order
they arrived; its index lists them in rootfs order with their byte ranges,
so assembly can merge layers and copy unchanged members verbatim without
parsing them again.  Deletions (paths a layer removes from the layers below
it) live in the index.

The index is two files: ``index.json`` (the summary, deletions, mtime
policy, and what assembly needs to know about parents) and ``index.bin``,
the entries as little-endian columns, so that loading 65,000 entries is a
map and a few memoryview casts, and an entry costs at most its ~113 bytes
on disk in memory (less: only the pages a build touches are read), not a
Python object per field:

    magic  b"RBIDX\0\0\2", count, len(names), len(links)     (4 x u64)
    name_end, offset, length (u64), mtime (i64), link_end (u64),
    header_len (u32), type, weak (u8)                          (count each)
    names, links (the entries' names and link targets, concatenated)

every part padded to 8 bytes.  Entries are sorted by tarfmt.sort_key.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import mmap
import os
import struct
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, overload

from . import heap, tarfmt
from .errors import UserError
from .pipeline import HashedFile, ReadAhead
from .tarfmt import CHR, DIR, LNK, REG, SYM, Member

LAYER_TAR = "layer.tar"
INDEX = "index.json"
INDEX_BIN = "index.bin"
INDEX_VERSION = 2
_MAGIC = b"RBIDX\0\0\2"
_HEAD = struct.Struct("<8sQQQ")

# How mtimes of a layer's members reach the output: "clamp" keeps them up to
# the epoch (base image, run steps); "epoch" sets them all to the epoch
# (files from the build host, whose mtimes say nothing).
MTIME_POLICIES = ("clamp", "epoch")

Reader = Callable[[int], "bytes | memoryview"]


@dataclasses.dataclass(slots=True)
class IndexEntry:
    """Where one member sits in layer.tar.

    length covers header, data and padding.  weak: a directory that only
    fills a gap and never overrides an existing directory's metadata.
    """

    name: bytes
    type: bytes
    offset: int
    header_len: int
    length: int
    mtime: int
    linkname: bytes = b""  # symlink target, or a hard link's target name
    weak: bool = False


def _pad8(n: int) -> int:
    return -n % 8


class LayerWriter:
    """Build one layer in `directory` (which must exist and be empty).

    Data is written by the caller's thread and hashed behind it on a thread
    of its own (pipeline.HashedFile); the entries are kept as columns keyed
    by their sort key, so a layer of N members costs ~190 bytes per member
    until finish() (measured by bench/build.py), not a Python object per
    field."""

    def __init__(self, directory: Path, *, mtime_policy: str, source: str):
        assert mtime_policy in MTIME_POLICIES
        self.directory = directory
        self.mtime_policy = mtime_policy
        self.source = source
        self._out = HashedFile(directory / LAYER_TAR, name="layer")
        self._rows: dict[bytes, int] = {}       # sort key -> row of the columns
        self._type = bytearray()
        self._weak = bytearray()
        self._offset = array("Q")
        self._length = array("Q")
        self._mtime = array("q")
        self._header_len = array("I")
        self._links: dict[int, bytes] = {}      # row -> symlink or hard link target
        self._link_targets: set[bytes] = set()  # sort keys hard links point to
        self._deletions: set[bytes] = set()
        self._spool: BinaryIO | None = None
        self.newest_mtime = 0
        self.data_bytes = 0

    @property
    def write_cpu(self) -> float:
        """CPU seconds the caller's thread spent writing layer.tar so far."""
        return self._out.write_cpu

    @property
    def hash_cpu(self) -> float:
        """CPU seconds the thread hashing layer.tar used so far."""
        return self._out.hash_cpu

    def add(self, m: Member, read: Reader | None = None, *, weak: bool = False,
            opaque: bool = False) -> None:
        """Add member `m`; for a regular file `read(n)` yields m.size bytes of content
        (in pieces of at most n bytes, bytes or memoryviews of bytes).
        An opaque directory first removes what the layers below hold there."""
        if b"\0" in m.name:
            raise UserError(f"{self.source}: the name {m.name!r} holds a NUL byte, which no "
                            "path in a rootfs can")
        key = m.name.replace(b"/", b"\0")   # tarfmt.sort_key
        if m.type == LNK:
            target = tarfmt.sort_key(m.linkname)
            row = self._rows.get(target)
            if target == key:
                raise UserError(
                    f"{self.source}: hard link {m.name.decode('utf-8', 'replace')!r} points to "
                    "itself")
            if row is None or self._type[row] != REG[0]:
                raise UserError(
                    f"{self.source}: hard link {m.name.decode('utf-8', 'replace')!r} points to "
                    f"{m.linkname.decode('utf-8', 'replace')!r}, which is not a regular file "
                    "earlier in the stream")
        # a link's target stays the regular file it linked to (a hard link
        # over it included: the group would be left without its data)
        if self._link_targets and m.type != REG and key in self._link_targets:
            raise UserError(
                f"{self.source}: {m.name.decode('utf-8', 'replace')!r} is the target of a hard "
                f"link earlier in the stream, and a later member makes it a "
                f"{tarfmt.TYPE_NAMES.get(m.type, 'non-file')}")
        if m.type == LNK:
            self._link_targets.add(target)
        out = self._out
        start = out.size
        if m.type == REG and m.size:
            assert read is not None
            if m.size >= tarfmt.SPARSE_MIN:
                header_len = self._add_scanned(m, read)
            else:
                m.sparse = None
                header = tarfmt.encode_header(m)
                header_len = len(header)
                out.write(header)
                data = read(m.size)
                if len(data) == m.size:      # the usual case: all of it at once
                    out.write(data)
                else:
                    out.write(data)
                    self._copy(read, m.size - len(data), m.name)
                out.write(tarfmt.padding(m.size))
            self.data_bytes += m.size
        else:
            m.sparse = None
            if m.type == REG:
                m.size = 0
            header = tarfmt.encode_header(m)
            header_len = len(header)
            out.write(header)
        if m.mtime > self.newest_mtime:
            self.newest_mtime = m.mtime
        row = len(self._type)
        self._rows[key] = row
        self._type.append(m.type[0])
        self._weak.append(1 if weak else 0)
        self._offset.append(start)
        self._length.append(out.size - start)
        self._mtime.append(m.mtime)
        self._header_len.append(header_len)
        if m.type in (LNK, SYM):
            self._links[row] = m.linkname
        if opaque:
            self._deletions.add(m.name)
        else:
            self._deletions.discard(m.name)

    def _copy(self, read: Reader, n: int, name: bytes) -> None:
        write = self._out.write
        while n:
            chunk = read(n)
            if not chunk:
                raise UserError(f"{self.source}: data of {name.decode('utf-8', 'replace')!r} "
                                "ends early")
            write(chunk)
            n -= len(chunk)

    def _add_scanned(self, m: Member, read: Reader) -> int:
        """Write a file that may have holes; returns its header's length.

        The common case, no all-zero grain, streams straight into layer.tar
        behind a dense header.  At the first all-zero grain the file is taken
        back out of layer.tar (into a spool) and written again the way
        tarfmt.spool_and_scan, the one sparse rule, decides."""
        out = self._out
        mark = out.mark()
        m.sparse = None
        header = tarfmt.encode_header(m)
        out.write(header)
        data_start = out.size
        grain = tarfmt.HOLE_GRAIN
        zero = tarfmt.ZERO_GRAIN
        pos = 0
        grain_zero = True      # the grain being read is all zeros so far
        size = m.size
        while pos < size:
            chunk = read(min(tarfmt.READ_CHUNK, size - pos))
            if not chunk:
                raise UserError(f"{self.source}: file data ended early")
            n = len(chunk)
            # every grain of this chunk, or the part of it the chunk holds
            at = 0
            hole = False
            while at < n:
                into = (pos + at) % grain
                take = min(grain - into, n - at)
                if grain_zero:
                    grain_zero = zero.startswith(chunk[at:at + take])
                at += take
                if into + take == grain:           # the grain is complete
                    if grain_zero:
                        hole = True
                        break
                    grain_zero = True
            if hole:
                return self._rewrite_sparse(m, mark, data_start, chunk, read)
            out.write(chunk)
            pos += n
        out.write(tarfmt.padding(size))
        out.release(mark)
        return len(header)

    def _rewrite_sparse(self, m: Member, mark: Any, data_start: int,
                        chunk: bytes | memoryview, read: Reader) -> int:
        prefix = tempfile.TemporaryFile(dir=self.directory)  # noqa: SIM115
        try:
            self._out.rollback(mark, spool=prefix, keep_from=data_start)
            prefix.write(chunk)
            prefix.seek(0)
            size = m.size

            def read_again(n: int) -> bytes:
                return prefix.read(n) or bytes(read(n))

            spool = self._get_spool()
            m.sparse = tarfmt.spool_and_scan(read_again, size, spool)
        finally:
            prefix.close()
        spool.seek(0)
        header = tarfmt.encode_header(m)
        out = self._out
        out.write(header)
        if m.sparse is None:
            self._copy_spool(spool, size)
        else:
            out.write(tarfmt.sparse_map_block(m.sparse))
            for off, length in m.sparse:
                spool.seek(off)
                self._copy_spool(spool, length)
        out.write(tarfmt.padding(m.stored_size))
        return len(header)

    def _copy_spool(self, spool: BinaryIO, n: int) -> None:
        while n:
            data = spool.read(min(n, tarfmt.READ_CHUNK))
            if not data:
                raise UserError(f"{self.source}: file data ended early")
            self._out.write(data)
            n -= len(data)

    def delete(self, name: bytes) -> None:
        """Remove `name` (and its subtree) from the layers below this one."""
        self._deletions.add(name)

    def _get_spool(self) -> BinaryIO:
        if self._spool is None:
            self._spool = tempfile.TemporaryFile(dir=self.directory)  # noqa: SIM115
        self._spool.seek(0)
        self._spool.truncate()
        return self._spool

    def finish(self) -> dict:
        """Write the index; returns the layer's summary (also in index.json)."""
        self._out.write(tarfmt.END_OF_ARCHIVE)
        self._out.close()
        if self._spool is not None:
            self._spool.close()
        keys = sorted(self._rows)
        summary = {
            "entries": len(keys),
            "data_bytes": self.data_bytes,
            "tar_bytes": self._out.size,
            "tar_sha256": self._out.sha.hexdigest(),
            "newest_mtime": self.newest_mtime,
        }
        index = {
            "version": INDEX_VERSION,
            "mtime_policy": self.mtime_policy,
            "summary": summary,
            "deletions": sorted(d.decode("latin-1") for d in self._deletions),
            "parents": self._parents(keys),
        }
        self._write_columns(keys)
        del keys
        self._forget_entries()
        with open(self.directory / INDEX, "w") as f:
            json.dump(index, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        return summary

    def _forget_entries(self) -> None:
        """Drop the per-entry tables (they are in index.bin now), so that
        heap.give_back can hand their memory back while the caller still
        holds the writer."""
        self._rows, self._links = {}, {}
        self._link_targets, self._deletions = set(), set()
        self._type, self._weak = bytearray(), bytearray()
        self._offset, self._length, self._mtime = array("Q"), array("Q"), array("q")
        self._header_len = array("I")

    def _parents(self, keys: list[bytes]) -> dict[str, Any]:
        """What placing the entries in rootfs order needs besides them: the
        parent directories nobody listed (made up, root-owned 0755), and the
        first entry whose nearest listed ancestor is not a directory (an
        error when the layer is applied)."""
        rows, types, dir_type = self._rows, self._type, DIR[0]
        made: set[bytes] = set()
        conflict = None
        for k in keys:
            if not k:
                continue
            p = k.rpartition(b"\0")[0]
            row = rows.get(p)
            if (row is not None and types[row] == dir_type) or p in made:
                continue
            missing = []
            while True:
                row = rows.get(p)
                if row is not None:
                    if types[row] != dir_type:
                        conflict = [_latin(k), _latin(p), bytes([types[row]]).decode()]
                    break
                if p in made:
                    break
                missing.append(p)
                if not p:
                    break
                p = p.rpartition(b"\0")[0]
            if conflict is not None:
                break
            made.update(missing)
        return {"made": sorted(_latin(p) for p in made), "conflict": conflict}

    def _write_columns(self, keys: list[bytes]) -> None:
        rows = self._rows
        n = len(keys)
        name_end, link_end = array("Q"), array("Q")
        offset, length, mtime = array("Q"), array("Q"), array("q")
        header_len = array("I")
        types, weak = bytearray(n), bytearray(n)
        names, links = bytearray(), bytearray()
        for i, k in enumerate(keys):
            row = rows[k]
            names += k.replace(b"\0", b"/")   # the key's name (no name holds a NUL)
            name_end.append(len(names))
            link = self._links.get(row)
            if link:
                links += link
            link_end.append(len(links))
            offset.append(self._offset[row])
            length.append(self._length[row])
            mtime.append(self._mtime[row])
            header_len.append(self._header_len[row])
            types[i] = self._type[row]
            weak[i] = self._weak[row]
        with open(self.directory / INDEX_BIN, "wb") as f:
            f.write(_HEAD.pack(_MAGIC, n, len(names), len(links)))
            for col in (name_end, offset, length, mtime, link_end, header_len):
                if sys.byteorder != "little":
                    col.byteswap()
                f.write(col)
                f.write(bytes(_pad8(len(col) * col.itemsize)))
            for raw in (types, weak, names, links):
                f.write(raw)
                f.write(bytes(_pad8(len(raw))))
            f.flush()
            os.fsync(f.fileno())

    def abort(self) -> None:
        self._out.abort()
        if self._spool is not None:
            self._spool.close()


def _latin(key: bytes) -> str:
    """A sort key as the name it stands for, in index.json's text form."""
    return key.replace(b"\0", b"/").decode("latin-1")


class LayerFormatError(ValueError):
    """An index this version cannot read (another layout or damaged)."""


class _Columns:
    """index.bin, parsed: zero-copy views on a read-only map of the file.

    Mapped, not read, so that only the columns a build touches take memory:
    copying runs of the base touches offsets and lengths, while names are
    read only where a lookup lands (assembling the bench's 1 GB base touched
    2 of index.bin's 7.4 MB), and the pages a walk has passed can be dropped
    (Layer.release_index_pages).  A cache entry's files are never rewritten
    in place (entries are renamed into the cache whole), so the map cannot
    shrink under it."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            try:
                data: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:      # an empty file cannot be mapped
                raise LayerFormatError(f"{path}: truncated index") from None
        try:
            magic, n, names_len, links_len = _HEAD.unpack_from(data)
        except struct.error:
            raise LayerFormatError(f"{path}: truncated index") from None
        if magic != _MAGIC:
            raise LayerFormatError(f"{path}: not a version {INDEX_VERSION} layer index")
        view = memoryview(data)
        pos = _HEAD.size

        def part(count: int, fmt: Any, width: int) -> Any:
            nonlocal pos
            size = count * width
            if pos + size > len(data):
                raise LayerFormatError(f"{path}: truncated index")
            raw = view[pos:pos + size]
            pos += size + _pad8(size)
            if fmt == "B":
                return raw
            if sys.byteorder == "little":
                return raw.cast(fmt)
            col = array(fmt)
            col.frombytes(raw)
            col.byteswap()
            return col

        self.count = n
        self.map = data
        self.name_end = part(n, "Q", 8)
        self.offset = part(n, "Q", 8)
        self.length = part(n, "Q", 8)
        self.mtime = part(n, "q", 8)
        self.link_end = part(n, "Q", 8)
        self.header_len = part(n, "I", 4)
        self.types = bytes(part(n, "B", 1))
        self.weak = part(n, "B", 1)
        self.names = part(names_len, "B", 1)    # views: the file's bytes are held once
        self.links = part(links_len, "B", 1)


class _Entries(Sequence[IndexEntry]):
    """A layer's entries in rootfs order, made into IndexEntry objects only
    when asked for."""

    def __init__(self, layer: Layer):
        self._layer = layer

    def __len__(self) -> int:
        return self._layer.count

    @overload
    def __getitem__(self, i: int) -> IndexEntry: ...

    @overload
    def __getitem__(self, i: slice) -> list[IndexEntry]: ...

    def __getitem__(self, i: int | slice) -> IndexEntry | list[IndexEntry]:
        if isinstance(i, slice):
            return [self._layer.entry(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._layer.entry(i)

    def __iter__(self) -> Iterator[IndexEntry]:
        entry = self._layer.entry
        for i in range(len(self)):
            yield entry(i)


class Layer:
    """A finished layer, opened for reading."""

    def __init__(self, directory: Path, label: str):
        self.directory = directory
        self.label = label
        with open(directory / INDEX) as f:
            index = json.load(f)
        if index.get("version") != INDEX_VERSION:
            raise LayerFormatError(f"{directory}: index version {index.get('version')}")
        self.mtime_policy: str = index["mtime_policy"]
        self.summary: dict = index["summary"]
        self.deletions = [d.encode("latin-1") for d in index["deletions"]]
        parents = index["parents"]
        self.made_parents = [p.encode("latin-1") for p in parents["made"]]
        conflict = parents["conflict"]
        self.parent_conflict: tuple[bytes, bytes, bytes] | None = (
            (conflict[0].encode("latin-1"), conflict[1].encode("latin-1"), conflict[2].encode())
            if conflict else None)
        cols = _Columns(directory / INDEX_BIN)
        self.count = cols.count
        self._cols = cols
        self.types = cols.types
        self.offsets = cols.offset
        self.lengths = cols.length
        self.mtimes = cols.mtime
        self.entries = _Entries(self)
        self._file: BinaryIO | None = None

    def release_index_pages(self) -> None:
        """Take the pages of index.bin this process touched out of its memory.
        They stay in the page cache, and the views stay valid: a later access
        faults its page back in.  A walk over the whole index that calls this
        now and then holds a few pages at a time, not every page it passed."""
        self._cols.map.madvise(mmap.MADV_DONTNEED)

    # -- entries by position --------------------------------------------------
    def name(self, i: int) -> bytes:
        end = self._cols.name_end
        return bytes(self._cols.names[end[i - 1] if i else 0:end[i]])

    def linkname(self, i: int) -> bytes:
        end = self._cols.link_end
        return bytes(self._cols.links[end[i - 1] if i else 0:end[i]])

    def type(self, i: int) -> bytes:
        return self.types[i:i + 1]

    def entry(self, i: int) -> IndexEntry:
        c = self._cols
        return IndexEntry(self.name(i), self.types[i:i + 1], c.offset[i], c.header_len[i],
                          c.length[i], c.mtime[i], self.linkname(i), bool(c.weak[i]))

    # -- entries by name ---------------------------------------------------------
    def _key(self, i: int) -> bytes:
        return tarfmt.sort_key(self.name(i))

    def bisect(self, key: bytes) -> int:
        """The position of the first entry whose sort key is >= `key`."""
        return bisect.bisect_left(_Keys(self), key)

    def find(self, name: bytes) -> int | None:
        """The position of entry `name`, or None."""
        i = self.bisect(tarfmt.sort_key(name))
        return i if i < self.count and self.name(i) == name else None

    def subtree(self, name: bytes) -> range:
        """The positions of the entries below directory `name` (not itself)."""
        if not name:
            return range(1 if self.count and self.name(0) == b"" else 0, self.count)
        key = tarfmt.sort_key(name)
        return range(self.bisect(key + b"\0"), self.bisect(key + b"\1"))

    # -- the tar ------------------------------------------------------------------
    @property
    def tar_path(self) -> Path:
        return self.directory / LAYER_TAR

    def file(self) -> BinaryIO:
        if self._file is None:
            self._file = open(self.tar_path, "rb")  # noqa: SIM115 - closed in close()
        return self._file

    def member(self, entry: IndexEntry) -> Member:
        """Parse the member at `entry` (header and, when sparse, its map)."""
        reader = tarfmt.TarReader(
            _Range(self.file().fileno(), entry.offset, entry.length),  # type: ignore[arg-type]
            source=str(self.tar_path), chunk=max(entry.header_len, 4096))
        return next(iter(reader))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _Keys(Sequence[bytes]):
    """A layer's sort keys, for bisect."""

    def __init__(self, layer: Layer):
        self._layer = layer

    def __len__(self) -> int:
        return self._layer.count

    def __getitem__(self, i):
        return self._layer._key(i)


class _Range:
    """read(n) over `length` bytes of a file from `offset`, by pread."""

    def __init__(self, fd: int, offset: int, length: int):
        self.fd, self.pos, self.left = fd, offset, length

    def read(self, n: int = -1) -> bytes:
        k = self.left if n < 0 else min(n, self.left)
        data = os.pread(self.fd, k, self.pos) if k else b""
        self.pos += len(data)
        self.left -= len(data)
        return data


OVERLAY_XATTR_PREFIX = b"trusted.overlay."


def build_layer_from_tar(stream: BinaryIO, directory: Path, *, mtime_policy: str,
                         source: str, on_bytes: Callable[[int], None] | None = None,
                         overlay_upper: bool = False,
                         stats: dict[str, float] | None = None) -> dict:
    """Normalize a whole tar stream into a layer in `directory`.

    Three threads share the work: one reads the stream ahead (so a producer
    such as the appliance never waits on a full pipe), this one parses,
    normalizes and writes layer.tar, and one hashes layer.tar behind the
    writing.  `stats`, when given, receives where the time went (seconds:
    the stream's first and last block, time spent waiting for data; CPU
    seconds of the reading, of the parsing and normalizing, of the writing
    on this thread, of the hashing).

    With `overlay_upper`, the stream is an overlayfs upper directory: a 0/0
    character device is a deletion, a directory marked opaque replaces the
    one below, overlayfs' own xattrs are dropped, and the upper root itself
    says nothing about the rootfs root.
    """
    cpu0, wall0 = time.thread_time(), time.monotonic()
    writer = LayerWriter(directory, mtime_policy=mtime_policy, source=source)
    ahead = ReadAhead(stream, on_block=on_bytes)
    reader = tarfmt.TarReader(ahead, source=source)  # type: ignore[arg-type]
    try:
        for m in reader:
            read = reader.dense_reader(m) if m.type == REG else None
            if not overlay_upper:
                writer.add(m, read)
                continue
            if m.type == CHR and m.devmajor == 0 and m.devminor == 0:
                writer.delete(m.name)
                continue
            opaque = m.xattrs.get(OVERLAY_XATTR_PREFIX + b"opaque") == b"y"
            m.xattrs = {k: v for k, v in m.xattrs.items()
                        if not k.startswith(OVERLAY_XATTR_PREFIX)}
            writer.add(m, read, weak=not m.name, opaque=opaque and bool(m.name))
        ahead.drain()
        parsed = time.monotonic()
        thread_cpu = time.thread_time() - cpu0
        write_cpu = writer.write_cpu
        summary = writer.finish()
    except BaseException:
        ahead.close()
        writer.abort()
        raise
    finally:
        tarfmt.drop_caches()
    heap.give_back()
    if stats is not None:
        stats.update(
            started=wall0, first_data=ahead.first_data or parsed,
            last_data=ahead.last_data or parsed, parsed=parsed, finished=time.monotonic(),
            read_cpu=ahead.busy, parse_cpu=thread_cpu - write_cpu, write_cpu=write_cpu,
            hash_cpu=writer.hash_cpu, waited=ahead.waited,
            index_cpu=time.thread_time() - cpu0 - thread_cpu)
    return summary
