"""Layers: a normalized tar plus a sorted index, as the cache stores them.

A layer's ``layer.tar`` holds canonical members (see tarfmt) in the order
they arrived; ``index.json`` lists them in rootfs order with their byte
ranges, so assembly can merge layers and copy unchanged members verbatim
without parsing them again.  Deletions (paths a layer removes from the
layers below it) live in the index.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from . import tarfmt
from .errors import UserError
from .fileio import ShortRead, copy_exactly, read_exactly
from .hashing import HashingFile
from .tarfmt import CHR, LNK, REG, SYM, Member

LAYER_TAR = "layer.tar"
INDEX = "index.json"
INDEX_VERSION = 1

# How mtimes of a layer's members reach the output: "clamp" keeps them up to
# the epoch (base image, run steps); "epoch" sets them all to the epoch
# (files from the build host, whose mtimes say nothing).
MTIME_POLICIES = ("clamp", "epoch")

Reader = Callable[[int], bytes]


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

    def to_json(self) -> list:
        return [self.name.decode("latin-1"), self.type.decode(), self.offset, self.header_len,
                self.length, self.mtime, self.linkname.decode("latin-1"), int(self.weak)]

    @classmethod
    def from_json(cls, row: list) -> IndexEntry:
        return cls(row[0].encode("latin-1"), row[1].encode(), row[2], row[3], row[4], row[5],
                   row[6].encode("latin-1"), bool(row[7]))


class LayerWriter:
    """Build one layer in `directory` (which must exist and be empty)."""

    def __init__(self, directory: Path, *, mtime_policy: str, source: str):
        assert mtime_policy in MTIME_POLICIES
        self.directory = directory
        self.mtime_policy = mtime_policy
        self.source = source
        self._out = HashingFile(directory / LAYER_TAR)
        self._entries: dict[bytes, IndexEntry] = {}
        self._deletions: set[bytes] = set()
        self._spool: BinaryIO | None = None
        self.newest_mtime = 0
        self.data_bytes = 0

    def add(self, m: Member, read: Reader | None = None, *, weak: bool = False,
            opaque: bool = False) -> None:
        """Add member `m`; for a regular file `read(n)` yields m.size bytes of content.
        An opaque directory first removes what the layers below hold there."""
        if m.type == LNK:
            target = self._entries.get(m.linkname)
            if target is None or target.type != REG:
                raise UserError(
                    f"{self.source}: hard link {m.name.decode('utf-8', 'replace')!r} points to "
                    f"{m.linkname.decode('utf-8', 'replace')!r}, which is not a regular file "
                    "earlier in the stream")
        start = self._out.size
        if m.type == REG and m.size:
            assert read is not None
            if m.size >= tarfmt.SPARSE_MIN:
                spool = self._get_spool()
                m.sparse = tarfmt.spool_and_scan(read, m.size, spool)
                spool.seek(0)
                header = tarfmt.encode_header(m)
                self._out.write(header)
                if m.sparse is None:
                    self._copy(spool.read, m.size)
                else:
                    self._out.write(tarfmt.sparse_map_block(m.sparse))
                    for off, length in m.sparse:
                        spool.seek(off)
                        self._copy(spool.read, length)
            else:
                m.sparse = None
                data = _read_exactly(read, m.size, self.source, m.name)
                header = tarfmt.encode_header(m)
                self._out.write(header)
                self._out.write(data)
            self._out.write(tarfmt.padding(m.stored_size))
            self.data_bytes += m.size
        else:
            m.sparse = None
            if m.type == REG:
                m.size = 0
            header = tarfmt.encode_header(m)
            self._out.write(header)
        self.newest_mtime = max(self.newest_mtime, m.mtime)
        self._entries[m.name] = IndexEntry(m.name, m.type, start, len(header),
                                           self._out.size - start, m.mtime,
                                           m.linkname if m.type in (LNK, SYM) else b"", weak)
        if opaque:
            self._deletions.add(m.name)
        else:
            self._deletions.discard(m.name)

    def delete(self, name: bytes) -> None:
        """Remove `name` (and its subtree) from the layers below this one."""
        self._deletions.add(name)

    def _get_spool(self) -> BinaryIO:
        if self._spool is None:
            self._spool = tempfile.TemporaryFile(dir=self.directory)  # noqa: SIM115
        self._spool.seek(0)
        self._spool.truncate()
        return self._spool

    def _copy(self, read: Reader, n: int) -> None:
        try:
            copy_exactly(read, self._out.write, n)
        except ShortRead:
            raise UserError(f"{self.source}: file data ended early") from None

    def finish(self) -> dict:
        """Write the index; returns the layer's summary (also in index.json)."""
        self._out.write(tarfmt.END_OF_ARCHIVE)
        self._out.close()
        if self._spool is not None:
            self._spool.close()
        entries = sorted(self._entries.values(), key=lambda e: tarfmt.sort_key(e.name))
        summary = {
            "entries": len(entries),
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
            "entries": [e.to_json() for e in entries],
        }
        with open(self.directory / INDEX, "w") as f:
            json.dump(index, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        return summary

    def abort(self) -> None:
        self._out.abort()
        if self._spool is not None:
            self._spool.close()


def _read_exactly(read: Reader, n: int, source: str, name: bytes) -> bytes:
    try:
        return read_exactly(read, n)
    except ShortRead:
        raise UserError(f"{source}: data of {name.decode('utf-8', 'replace')!r} ends early"
                        ) from None


class Layer:
    """A finished layer, opened for reading."""

    def __init__(self, directory: Path, label: str):
        self.directory = directory
        self.label = label
        with open(directory / INDEX) as f:
            index = json.load(f)
        if index.get("version") != INDEX_VERSION:
            raise ValueError(f"{directory}: index version {index.get('version')}")
        self.mtime_policy: str = index["mtime_policy"]
        self.summary: dict = index["summary"]
        self.deletions = [d.encode("latin-1") for d in index["deletions"]]
        self.entries = [IndexEntry.from_json(row) for row in index["entries"]]
        self._file: BinaryIO | None = None

    @property
    def tar_path(self) -> Path:
        return self.directory / LAYER_TAR

    def file(self) -> BinaryIO:
        if self._file is None:
            self._file = open(self.tar_path, "rb")  # noqa: SIM115 - closed in close()
        return self._file

    def member(self, entry: IndexEntry) -> Member:
        """Parse the member at `entry` (header and, when sparse, its map)."""
        f = self.file()
        f.seek(entry.offset)
        reader = tarfmt.TarReader(f, source=str(self.tar_path))
        return next(iter(reader))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


OVERLAY_XATTR_PREFIX = b"trusted.overlay."


def build_layer_from_tar(stream: BinaryIO, directory: Path, *, mtime_policy: str,
                         source: str, on_bytes: Callable[[int], None] | None = None,
                         overlay_upper: bool = False) -> dict:
    """Normalize a whole tar stream into a layer in `directory`.

    With `overlay_upper`, the stream is an overlayfs upper directory: a 0/0
    character device is a deletion, a directory marked opaque replaces the
    one below, overlayfs' own xattrs are dropped, and the upper root itself
    says nothing about the rootfs root.
    """
    writer = LayerWriter(directory, mtime_policy=mtime_policy, source=source)
    counted: BinaryIO = _CountingReader(stream, on_bytes) if on_bytes else stream  # type: ignore[assignment]
    reader = tarfmt.TarReader(counted, source=source)
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
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


class _CountingReader:
    def __init__(self, f: BinaryIO, on_bytes: Callable[[int], None]):
        self.f = f
        self.on_bytes = on_bytes

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if data:
            self.on_bytes(len(data))
        return data
