"""Assembly: merge layers into one tree and write it as one canonical tar.

Layers apply bottom to top.  A member of an upper layer replaces the member
at the same path; a non-directory over a directory removes that subtree;
an upper path is resolved through the symlinks already in the tree (so a
file for ``/lib/x`` lands in ``/usr/lib/x`` on a usr-merged base, and a
directory entry never replaces a symlink to a directory); missing parents
are created as root-owned 0755 directories.  Hard links are re-anchored to
the first name of their group in rootfs order.  Members nobody changed are
copied from the layer byte for byte.

Memory: the first layer (the base image, nearly all of a rootfs) is never
turned into a Python object per path.  Its sorted index is the tree's
backbone; a bytearray marks its entries that upper layers replaced or
removed, and only the upper layers' paths (and made-up parents) are Node
objects.  Writing merges the backbone with the sorted upper paths, and
copies runs of unchanged members in as few reads as their offsets allow.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Protocol

from . import confined, tarfmt
from .errors import UserError
from .fileio import ShortRead, copy_exactly
from .layer import IndexEntry, Layer
from .tarfmt import DIR, LNK, REG, SYM, Member

_REG, _LNK, _SYM = REG[0], LNK[0], SYM[0]


class Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


@dataclasses.dataclass(slots=True)
class Node:
    """One path of the final tree; layer/entry are None for a made-up parent."""

    name: bytes
    type: bytes
    layer: Layer | None
    entry: IndexEntry | None
    linkname: bytes = b""
    group: tuple[int, bytes] | None = None


@dataclasses.dataclass
class AssemblyStats:
    entries: int = 0
    tar_bytes: int = 0
    copied_verbatim: int = 0


def _show(name: bytes) -> str:
    return "/" + name.decode("utf-8", "backslashreplace")


class Tree:
    """The merged view of a stack of layers.

    Invariant: a path is either in `_over` or a live (not `_gone`) entry of
    the backbone `_base`, never both."""

    def __init__(self) -> None:
        self.layers: list[Layer] = []
        self._base: Layer | None = None
        self._base_index = -1
        self._gone = bytearray()
        self._over: dict[bytes, Node] = {}

    @property
    def nodes(self) -> Mapping[bytes, Node]:
        """Every path of the tree (a read-only view; a backbone path becomes
        a Node only when looked up)."""
        return _NodesView(self)

    # -- lookups ----------------------------------------------------------
    def _base_pos(self, name: bytes) -> int | None:
        """The backbone position of live path `name`, or None."""
        base = self._base
        if base is None:
            return None
        i = base.find(name)
        return i if i is not None and not self._gone[i] else None

    def _base_node(self, i: int) -> Node:
        assert self._base is not None
        return _node(self._base.name(i), self._base_index, self._base, self._base.entry(i))

    def _get(self, name: bytes) -> Node | None:
        node = self._over.get(name)
        if node is not None:
            return node
        i = self._base_pos(name)
        return None if i is None else self._base_node(i)

    def _type(self, name: bytes) -> bytes | None:
        node = self._over.get(name)
        if node is not None:
            return node.type
        i = self._base_pos(name)
        return None if i is None else self._base.type(i)  # type: ignore[union-attr]

    def _live_base(self) -> int:
        return self._gone.count(0)

    # -- path resolution ------------------------------------------------
    def resolve(self, name: bytes, *, follow_last: bool = False) -> bytes:
        """`name` with symlinks in its parents (and last part if asked) resolved,
        confined to the rootfs the way a chroot would."""
        def readlink(candidate: bytes) -> bytes | None:
            node = self._over.get(candidate)
            if node is not None:
                return node.linkname if node.type == SYM else None
            i = self._base_pos(candidate)
            if i is None or self._base.types[i] != _SYM:  # type: ignore[union-attr]
                return None
            return self._base.linkname(i)  # type: ignore[union-attr]

        try:
            return confined.resolve(name, readlink, follow_last=follow_last)
        except confined.SymlinkLoop:
            raise UserError(f"{_show(name)}: too many levels of symbolic links in the rootfs",
                            hint="a symlink on that path loops; change the destination or "
                                 "fix the link") from None

    # -- mutation ---------------------------------------------------------
    def _put(self, name: bytes, node: Node) -> None:
        i = self._base_pos(name)
        if i is not None:
            self._gone[i] = 1
        self._over[name] = node

    def _remove(self, name: bytes) -> None:
        if self._over.pop(name, None) is None:
            i = self._base_pos(name)
            if i is not None:
                self._gone[i] = 1

    def _remove_subtree(self, name: bytes) -> None:
        kind = self._type(name)
        if kind is None:
            return
        self._remove(name)
        if kind != DIR:
            return
        if not name:
            self._over.clear()
            self._gone[:] = b"\1" * len(self._gone)
            return
        prefix = name + b"/"
        for key in [k for k in self._over if k.startswith(prefix)]:
            del self._over[key]
        if self._base is not None:
            below = self._base.subtree(name)
            self._gone[below.start:below.stop] = b"\1" * len(below)

    def _ensure_parents(self, name: bytes, what: str) -> None:
        parent = name.rpartition(b"/")[0]
        missing = []
        while True:
            kind = self._type(parent)
            if kind is not None:
                if kind != DIR:
                    raise UserError(
                        f"{what} places {_show(name)}, but {_show(parent)} is a "
                        f"{tarfmt.TYPE_NAMES[kind]} in the rootfs",
                        hint="change the destination or remove the conflicting path first")
                break
            missing.append(parent)
            if not parent:
                break
            parent = parent.rpartition(b"/")[0]
        for p in reversed(missing):
            self._over[p] = Node(p, DIR, None, None)

    def apply(self, layer: Layer) -> None:
        index = len(self.layers)
        self.layers.append(layer)
        what = layer.label
        if not self._over and not self._live_base() and not layer.deletions:
            self._apply_first(index, layer)
            return
        for deleted in layer.deletions:
            self._remove_subtree(self.resolve(deleted))
        for e in layer.entries:
            final = self.resolve(e.name)
            existing = self._get(final)
            if e.type == DIR:
                if existing is not None and existing.type == SYM:
                    target = self.resolve(final, follow_last=True)
                    if (t := self._get(target)) is not None and t.type == DIR:
                        final, existing = target, t
                if existing is not None and existing.type == DIR:
                    if not e.weak:
                        existing.layer, existing.entry = layer, e
                        self._put(final, existing)
                    continue
            elif existing is not None and existing.type == DIR:
                self._remove_subtree(final)
            if existing is not None and existing.type != DIR:
                self._remove(final)
            if final:
                self._ensure_parents(final, what)
            self._put(final, _node(final, index, layer, e))

    def read_file(self, name: bytes, limit: int = 1 << 20) -> bytes | None:
        """Content of a small regular file of the merged tree (symlinks
        followed inside the rootfs), or None."""
        node = self._get(self.resolve(name, follow_last=True))
        if node is None or node.layer is None or node.entry is None:
            return None
        layer, entry = node.layer, node.entry
        if node.type == LNK:
            i = layer.find(entry.linkname)
            if i is not None:
                entry = layer.entry(i)
        if entry.type != REG:
            return None
        m = layer.member(entry)
        if m.size > limit or m.sparse is not None:
            return None
        return os.pread(layer.file().fileno(), m.size, entry.offset + entry.header_len)

    def layer_of(self, name: bytes) -> Layer | None:
        node = self._get(name)
        return node.layer if node is not None else None

    def _apply_first(self, index: int, layer: Layer) -> None:
        """The first layer becomes the backbone as it is: its index is
        sorted, and what its entries need besides themselves (made-up
        parents, or the first entry under a non-directory) was worked out
        when the layer was written."""
        self._base, self._base_index = layer, index
        self._gone = bytearray(layer.count)
        self._over = {}
        if layer.parent_conflict is not None:
            name, parent, kind = layer.parent_conflict
            raise UserError(f"{layer.label} places {_show(name)}, but {_show(parent)} is a "
                            f"{tarfmt.TYPE_NAMES[kind]} in the rootfs",
                            hint="change the destination or remove the conflicting path first")
        for p in layer.made_parents:
            self._over[p] = Node(p, DIR, None, None)
        if b"" not in self._over and not (layer.count and layer.name(0) == b""):
            self._over[b""] = Node(b"", DIR, None, None)


class _NodesView(Mapping[bytes, Node]):
    def __init__(self, tree: Tree):
        self._tree = tree

    def __getitem__(self, name: bytes) -> Node:
        node = self._tree._get(name)
        if node is None:
            raise KeyError(name)
        return node

    def __contains__(self, name: object) -> bool:
        return isinstance(name, bytes) and self._tree._type(name) is not None

    def __len__(self) -> int:
        return len(self._tree._over) + self._tree._live_base()

    def __iter__(self) -> Iterator[bytes]:
        tree = self._tree
        if tree._base is not None:
            gone = tree._gone
            for i in range(tree._base.count):
                if not gone[i]:
                    yield tree._base.name(i)
        yield from list(tree._over)


def _node(final: bytes, index: int, layer: Layer, e: IndexEntry) -> Node:
    """The tree node for entry `e` of layer number `index`, placed at `final`.
    A hard link group is named by the layer and the name of its data holder."""
    node = Node(final, e.type, layer, e)
    if e.type == LNK:
        node.group = (index, e.linkname)
    elif e.type == REG:
        node.group = (index, e.name)
    elif e.type == SYM:
        node.linkname = e.linkname
    return node


def _copy_range(layer: Layer, offset: int, length: int, write: Callable[[bytes], None]) -> None:
    fd = layer.file().fileno()
    pos = offset

    def read(n: int) -> bytes:
        nonlocal pos
        chunk = os.pread(fd, n, pos)
        pos += len(chunk)
        return chunk

    try:
        copy_exactly(read, write, length)
    except ShortRead:
        raise UserError(f"{layer.tar_path}: cache entry is shorter than its index",
                        hint="run again with --no-cache or prune the cache") from None


class _Groups:
    """Hard link groups that still have a link: who anchors each (its first
    surviving name in rootfs order) and which entry holds its data."""

    def __init__(self, tree: Tree):
        self.anchor_of: dict[tuple[int, bytes], bytes] = {}
        self.data_of: dict[tuple[int, bytes], tuple[Layer, IndexEntry]] = {}
        self.base_positions: set[int] = set()   # backbone entries in a group
        base, gone, bi = tree._base, tree._gone, tree._base_index
        members: dict[tuple[int, bytes], list[bytes]] = {}
        if base is not None:
            types = base.types
            i = types.find(LNK)
            while i >= 0:
                if not gone[i]:
                    members.setdefault((bi, base.linkname(i)), []).append(base.name(i))
                    self.base_positions.add(i)
                i = types.find(LNK, i + 1)
        for node in tree._over.values():
            if node.type == LNK and node.group is not None:
                members.setdefault(node.group, []).append(node.name)
        if not members:
            return
        for node in tree._over.values():
            if node.type == REG and node.group in members:
                members[node.group].append(node.name)
        for group in members:
            index, target = group
            if index == bi and base is not None:
                at = base.find(target)
                if at is not None and not gone[at] and base.types[at] == _REG:
                    members[group].append(target)
                    self.base_positions.add(at)
            layer = tree.layers[index]
            at = layer.find(target)
            if at is not None and layer.types[at] == _REG:
                self.data_of[group] = (layer, layer.entry(at))
        for group, names in members.items():
            self.anchor_of[group] = min(names, key=tarfmt.sort_key)


# Entries written between two drops of the layers' index pages: writing
# walks index.bin once, in order, and the pages it passed would otherwise
# stay in the process's memory to the end (4-5 MB of the 1 GB bench base's
# 65,000 entries, against ~1 MB per drop interval).
RELEASE_INDEX_EVERY = 8192


def write_tree(tree: Tree, epoch: int, sink: Sink) -> AssemblyStats:
    """Write the merged tree as a canonical tar to `sink`."""
    stats = AssemblyStats()
    groups = _Groups(tree)
    anchor_of, data_of = groups.anchor_of, groups.data_of
    next_release = RELEASE_INDEX_EVERY

    def write(data: bytes) -> None:
        sink.write(data)
        stats.tar_bytes += len(data)

    def walked(entries: int) -> None:
        """`entries` more entries are written (or on their way to the sink)."""
        nonlocal next_release
        stats.entries += entries
        if stats.entries >= next_release:
            next_release = stats.entries + RELEASE_INDEX_EVERY
            for layer in tree.layers:
                layer.release_index_pages()

    def node_out(name: bytes, node: Node) -> None:
        walked(1)
        if node.layer is None or node.entry is None:
            write(tarfmt.encode_header(Member(name, DIR, 0o755, mtime=epoch)))
            return
        layer, entry = node.layer, node.entry
        data_layer, data_entry = layer, entry
        link_to = None
        if node.group is not None and node.group in anchor_of:
            anchor = anchor_of[node.group]
            if anchor == name:
                data_layer, data_entry = data_of[node.group]
            else:
                link_to = anchor
        policy_mtime = epoch if layer.mtime_policy == "epoch" else min(entry.mtime, epoch)
        verbatim = (
            data_layer is layer and data_entry.offset == entry.offset
            and name == entry.name
            and policy_mtime == entry.mtime
            and (link_to == entry.linkname if entry.type == LNK else link_to is None)
        )
        if verbatim:
            stats.copied_verbatim += 1
            _copy_range(layer, entry.offset, entry.length, write)
            return
        m = layer.member(data_entry)
        m.name = name
        m.mtime = policy_mtime
        if link_to is not None:
            m = dataclasses.replace(m, type=LNK, linkname=link_to, size=0, sparse=None,
                                    xattrs={})
            write(tarfmt.encode_header(m))
            return
        write(tarfmt.encode_header(m))
        data_start = data_entry.offset + data_entry.header_len
        _copy_range(layer, data_start, data_entry.offset + data_entry.length - data_start, write)

    base = tree._base
    over_names = sorted(tree._over, key=tarfmt.sort_key)
    if base is None:
        for name in over_names:
            node_out(name, tree._over[name])
    else:
        stops = _stops(tree, base, groups.base_positions, epoch)
        backbone = _Backbone(base, tree, stops, stats, write, node_out, walked)
        at = 0
        for name in over_names:
            pos = base.bisect(tarfmt.sort_key(name))
            backbone.out(at, pos)
            node_out(name, tree._over[name])
            at = pos
        backbone.out(at, base.count)
    write(tarfmt.END_OF_ARCHIVE)
    return stats


def _stops(tree: Tree, base: Layer, grouped: set[int], epoch: int) -> list[int]:
    """Backbone positions that cannot be copied as they are: gone, in a hard
    link group, or with an mtime the policy changes."""
    gone = tree._gone
    stops = set(grouped)
    i = gone.find(1)
    while i >= 0:
        stops.add(i)
        i = gone.find(1, i + 1)
    mtimes = base.mtimes
    if base.count:
        if base.mtime_policy == "epoch":
            if not (min(mtimes) == max(mtimes) == epoch):
                stops.update(i for i in range(base.count) if mtimes[i] != epoch)
        elif max(mtimes) > epoch:
            stops.update(i for i in range(base.count) if mtimes[i] > epoch)
    return sorted(stops)


class _Backbone:
    """Writes runs of backbone entries: unchanged ones by their byte ranges
    (adjacent ranges read together), the others one by one as nodes."""

    def __init__(self, base: Layer, tree: Tree, stops: list[int], stats: AssemblyStats,
                 write: Callable[[bytes], None],
                 node_out: Callable[[bytes, Node], None], walked: Callable[[int], None]):
        self.base, self.tree, self.stops = base, tree, stops
        self.stats, self.write, self.node_out, self.walked = stats, write, node_out, walked
        self._next_stop = 0

    def out(self, lo: int, hi: int) -> None:
        stops, k = self.stops, self._next_stop
        while lo < hi:
            while k < len(stops) and stops[k] < lo:
                k += 1
            stop = stops[k] if k < len(stops) and stops[k] < hi else hi
            if lo < stop:
                self._verbatim(lo, stop)
            if stop < hi:
                if not self.tree._gone[stop]:
                    self.node_out(self.base.name(stop), self.tree._base_node(stop))
                lo = stop + 1
            else:
                lo = hi
        self._next_stop = k

    def _verbatim(self, lo: int, hi: int) -> None:
        offsets, lengths = self.base.offsets, self.base.lengths
        gather = _Gather(self.base, self.write)
        start = end = offsets[lo]
        # in pieces, so that a run over the whole base still drops the
        # index pages it walked as it goes (a read may go on across pieces)
        for piece in range(lo, hi, RELEASE_INDEX_EVERY):
            piece_end = min(hi, piece + RELEASE_INDEX_EVERY)
            for i in range(piece, piece_end):
                off = offsets[i]
                if off != end:
                    gather.copy(start, end - start)
                    start = end = off
                end += lengths[i]
            self.walked(piece_end - piece)
        gather.copy(start, end - start)
        gather.flush()
        self.stats.copied_verbatim += hi - lo


class _Gather:
    """Reads byte ranges of a layer straight into 1 MiB blocks (one pread
    each, no intermediate bytes objects) and hands each block over whole;
    ranges longer than a block go out in their own reads."""

    BLOCK = 1 << 20

    def __init__(self, layer: Layer, write: Callable[[bytes], None]):
        self.layer = layer
        self.fd = layer.file().fileno()
        self.write = write
        self.buf = bytearray(self.BLOCK)
        self.used = 0

    def copy(self, offset: int, length: int) -> None:
        if length > self.BLOCK // 2:
            self.flush()
            _copy_range(self.layer, offset, length, self.write)
            return
        if self.used + length > self.BLOCK:
            self.flush()
        view = memoryview(self.buf)[self.used:self.used + length]
        got = os.preadv(self.fd, [view], offset)
        if got != length:
            raise UserError(f"{self.layer.tar_path}: cache entry is shorter than its index",
                            hint="run again with --no-cache or prune the cache")
        self.used += length

    def flush(self) -> None:
        if self.used:
            block, self.buf = self.buf, bytearray(self.BLOCK)
            del block[self.used:]
            self.used = 0
            self.write(block)  # type: ignore[arg-type]


def assemble(layers: Iterable[Layer], epoch: int, sink: Sink) -> AssemblyStats:
    tree = Tree()
    for layer in layers:
        tree.apply(layer)
    return write_tree(tree, epoch, sink)
