"""The merge as it was before the backbone representation (commit 1577645's
builder/assemble.py, one Node object per path), kept as a reference model:
tests/test_assemble_model.py checks that builder.assemble writes the same
bytes, or raises the same error, for random stacks of layers.  Not used by
the tool.
"""
# ruff: noqa
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from typing import Protocol

from builder import confined, tarfmt
from builder.errors import UserError
from builder.fileio import ShortRead, copy_exactly
from builder.layer import IndexEntry, Layer
from builder.tarfmt import DIR, LNK, REG, SYM, Member


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
    """The merged view of a stack of layers."""

    def __init__(self) -> None:
        self.nodes: dict[bytes, Node] = {}
        self.layers: list[Layer] = []

    # -- path resolution ------------------------------------------------
    def resolve(self, name: bytes, *, follow_last: bool = False) -> bytes:
        """`name` with symlinks in its parents (and last part if asked) resolved,
        confined to the rootfs the way a chroot would."""
        def readlink(candidate: bytes) -> bytes | None:
            node = self.nodes.get(candidate)
            return node.linkname if node is not None and node.type == SYM else None

        try:
            return confined.resolve(name, readlink, follow_last=follow_last)
        except confined.SymlinkLoop:
            raise UserError(f"{_show(name)}: too many levels of symbolic links in the rootfs",
                            hint="a symlink on that path loops; change the destination or "
                                 "fix the link") from None

    # -- mutation ---------------------------------------------------------
    def _remove_subtree(self, name: bytes) -> None:
        node = self.nodes.pop(name, None)
        if node is None or node.type != DIR:
            return
        if not name:
            self.nodes.clear()
            return
        prefix = name + b"/"
        for key in [k for k in self.nodes if k.startswith(prefix)]:
            del self.nodes[key]

    def _ensure_parents(self, name: bytes, what: str) -> None:
        parent = name.rpartition(b"/")[0]
        missing = []
        while True:
            node = self.nodes.get(parent)
            if node is not None:
                if node.type != DIR:
                    raise UserError(
                        f"{what} places {_show(name)}, but {_show(parent)} is a "
                        f"{tarfmt.TYPE_NAMES[node.type]} in the rootfs",
                        hint="change the destination or remove the conflicting path first")
                break
            missing.append(parent)
            if not parent:
                break
            parent = parent.rpartition(b"/")[0]
        for p in reversed(missing):
            self.nodes[p] = Node(p, DIR, None, None)

    def apply(self, layer: Layer) -> None:
        index = len(self.layers)
        self.layers.append(layer)
        what = layer.label
        if not self.nodes and not layer.deletions:
            self._apply_first(index, layer)
            return
        for deleted in layer.deletions:
            self._remove_subtree(self.resolve(deleted))
        for e in layer.entries:
            final = self.resolve(e.name)
            existing = self.nodes.get(final)
            if e.type == DIR:
                if existing is not None and existing.type == SYM:
                    target = self.resolve(final, follow_last=True)
                    if (t := self.nodes.get(target)) is not None and t.type == DIR:
                        final, existing = target, t
                if existing is not None and existing.type == DIR:
                    if not e.weak:
                        existing.layer, existing.entry = layer, e
                    continue
            elif existing is not None and existing.type == DIR:
                self._remove_subtree(final)
            if existing is not None and existing.type != DIR:
                del self.nodes[final]
            if final:
                self._ensure_parents(final, what)
            self.nodes[final] = _node(final, index, layer, e)

    def read_file(self, name: bytes, limit: int = 1 << 20) -> bytes | None:
        """Content of a small regular file of the merged tree (symlinks
        followed inside the rootfs), or None."""
        node = self.nodes.get(self.resolve(name, follow_last=True))
        if node is None or node.layer is None or node.entry is None:
            return None
        layer, entry = node.layer, node.entry
        if node.type == LNK:
            entry = next((e for e in layer.entries if e.name == entry.linkname), entry)
        if entry.type != REG:
            return None
        m = layer.member(entry)
        if m.size > limit or m.sparse is not None:
            return None
        return os.pread(layer.file().fileno(), m.size, entry.offset + entry.header_len)

    def layer_of(self, name: bytes) -> Layer | None:
        node = self.nodes.get(name)
        return node.layer if node is not None else None

    def _apply_first(self, index: int, layer: Layer) -> None:
        nodes = self.nodes
        for e in layer.entries:
            node = _node(e.name, index, layer, e)
            if e.name:
                parent = nodes.get(e.name.rpartition(b"/")[0])
                if parent is None or parent.type != DIR:
                    self._ensure_parents(e.name, layer.label)
            nodes[e.name] = node
        if b"" not in nodes:
            nodes[b""] = Node(b"", DIR, None, None)


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


def write_tree(tree: Tree, epoch: int, sink: Sink) -> AssemblyStats:
    """Write the merged tree as a canonical tar to `sink`."""
    stats = AssemblyStats()
    order = sorted(tree.nodes, key=tarfmt.sort_key)

    # Hard link groups: the first surviving name (in order) carries the data.
    linked = {n.group for n in tree.nodes.values() if n.type == LNK}
    anchor_of: dict[tuple[int, bytes], bytes] = {}
    for name in order:
        g = tree.nodes[name].group
        if g is not None and g in linked and g not in anchor_of:
            anchor_of[g] = name
    data_entries: dict[tuple[int, bytes], IndexEntry] = {}
    if anchor_of:
        for i, layer in enumerate(tree.layers):
            wanted = {g[1] for g in anchor_of if g[0] == i}
            for e in layer.entries:
                if e.name in wanted and e.type == REG:
                    data_entries[(i, e.name)] = e

    def write(data: bytes) -> None:
        sink.write(data)
        stats.tar_bytes += len(data)

    for name in order:
        node = tree.nodes[name]
        stats.entries += 1
        if node.layer is None or node.entry is None:
            write(tarfmt.encode_header(Member(name, DIR, 0o755, mtime=epoch)))
            continue
        layer, entry = node.layer, node.entry
        data_entry = entry
        link_to = None
        if node.group is not None and node.group in anchor_of:
            anchor = anchor_of[node.group]
            if anchor == name:
                data_entry = data_entries[node.group]
            else:
                link_to = anchor
        policy_mtime = epoch if layer.mtime_policy == "epoch" else min(entry.mtime, epoch)
        verbatim = (
            data_entry is entry
            and name == entry.name
            and policy_mtime == entry.mtime
            and (link_to == entry.linkname if entry.type == LNK else link_to is None)
        )
        if verbatim:
            stats.copied_verbatim += 1
            _copy_range(layer, entry.offset, entry.length, write)
            continue
        m = layer.member(data_entry)
        m.name = name
        m.mtime = policy_mtime
        if link_to is not None:
            m = dataclasses.replace(m, type=LNK, linkname=link_to, size=0, sparse=None,
                                    xattrs={})
            write(tarfmt.encode_header(m))
            continue
        write(tarfmt.encode_header(m))
        data_start = data_entry.offset + data_entry.header_len
        _copy_range(layer, data_start, data_entry.offset + data_entry.length - data_start, write)
    write(tarfmt.END_OF_ARCHIVE)
    return stats


def assemble(layers: Iterable[Layer], epoch: int, sink: Sink) -> AssemblyStats:
    tree = Tree()
    for layer in layers:
        tree.apply(layer)
    return write_tree(tree, epoch, sink)
