"""One read-only pass over the canonical tar: what the image builders need
to know before they start (sizes, hard link targets, ACLs) and the checks
that would otherwise fail half-way through a tool run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import tarfmt
from ..errors import UserError
from ..tarfmt import DIR, LNK, REG, SYM

FS_BLOCK = 4096
# ext4 keeps a symlink target of up to 59 bytes inside the inode.
FAST_SYMLINK_MAX = 59
# An ext4 extent covers at most 32768 blocks; the inode holds 4 extents.
EXTENT_MAX_BLOCKS = 32768
EXTENTS_IN_INODE = 4
EXTENTS_PER_BLOCK = (FS_BLOCK - 12) // 12
# Room for xattrs inside a 256-byte inode (128 base + 32 extra + 4 magic).
INODE_XATTR_ROOM = 256 - 128 - 32 - 4 - 4
XATTR_PREFIXES = (b"security.", b"trusted.", b"user.")
NAME_MAX = 255


def show(name: bytes) -> str:
    return "/" + name.decode("utf-8", "backslashreplace")


def _round4(n: int) -> int:
    return (n + 3) & ~3


def _blocks(n: int) -> int:
    return -(-n // FS_BLOCK)


@dataclasses.dataclass
class TreeScan:
    """Facts about one canonical tar (see scan_tar)."""

    entries: int = 0
    inodes: int = 0  # members with an inode of their own (all but hard links)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    data_bytes: int = 0  # logical size of all regular files
    data_blocks: int = 0  # 4 KiB blocks of non-hole data, an upper bound
    extent_blocks: int = 0
    symlink_blocks: int = 0
    xattr_blocks: int = 0
    dir_blocks: int = 0
    link_targets: set[bytes] = dataclasses.field(default_factory=set)
    acl_paths: list[bytes] = dataclasses.field(default_factory=list)
    root_seen: bool = False
    lost_found: bool = False  # the tree has /lost+found
    # Names ext4 fix-ups cannot address through debugfs (newline, CR).
    awkward_names: list[bytes] = dataclasses.field(default_factory=list)

    @property
    def content_blocks(self) -> int:
        """Blocks the tree's content needs in ext4, metadata tables aside."""
        return (self.data_blocks + self.extent_blocks + self.symlink_blocks + self.xattr_blocks
                + self.dir_blocks)


def xattr_set_size(m: tarfmt.Member) -> int:
    """Approximate bytes the member's xattrs (ACLs included) take in ext4."""
    size = 0
    for name, value in m.xattrs.items():
        suffix = name.split(b".", 1)[1] if b"." in name else name
        size += 16 + _round4(len(suffix)) + _round4(len(value))
    for text in m.acls.values():
        size += 16 + _round4(4 + 8 * (text.count(b",") + 1))
    return size


def scan_tar(tar_path: Path) -> TreeScan:
    """Read `tar_path` once; raise UserError for a tree no image can hold."""
    s = TreeScan()
    dir_bytes: dict[bytes, int] = {}
    with open(tar_path, "rb") as f:
        reader = tarfmt.TarReader(f, source=str(tar_path))
        for m in reader:
            s.entries += 1
            kind = tarfmt.TYPE_NAMES[m.type]
            s.counts[kind] = s.counts.get(kind, 0) + 1
            if not m.name:
                s.root_seen = True
            base = m.name.rpartition(b"/")[2]
            if len(base) > NAME_MAX:
                raise UserError(f"{show(m.name)}: a name of {len(base)} bytes is longer than "
                                f"filesystem images allow ({NAME_MAX})")
            if m.name:
                parent = m.name.rpartition(b"/")[0]
                dir_bytes[parent] = dir_bytes.get(parent, 0) + 8 + _round4(len(base))
            if m.name == b"lost+found":
                s.lost_found = m.type == DIR
            if m.type == LNK:
                s.link_targets.add(m.linkname)
                continue
            s.inodes += 1
            for key in m.xattrs:
                if not key.startswith(XATTR_PREFIXES):
                    raise UserError(
                        f"{show(m.name)}: xattr {key.decode('utf-8', 'backslashreplace')!r} "
                        "has a namespace filesystem images cannot hold",
                        hint="only security.*, trusted.* and user.* xattrs (and ACLs) are kept")
            acls = list(m.acls)
            if acls:
                s.acl_paths.append(m.name)
            if m.xattrs or acls:
                if b"\n" in m.name or b"\r" in m.name:
                    s.awkward_names.append(m.name)
                if xattr_set_size(m) > INODE_XATTR_ROOM:
                    s.xattr_blocks += 1
            if m.type == DIR:
                dir_bytes.setdefault(m.name, 0)
            elif m.type == SYM:
                if len(m.linkname) > FAST_SYMLINK_MAX:
                    s.symlink_blocks += 1
            elif m.type == REG:
                s.data_bytes += m.size
                if m.sparse is None:
                    blocks = _blocks(m.size)
                    runs = -(-blocks // EXTENT_MAX_BLOCKS)
                else:
                    blocks = runs = 0
                    for off, length in m.sparse:
                        if length:
                            blocks += _blocks(off + length) - off // FS_BLOCK
                            runs += -(-_blocks(length) // EXTENT_MAX_BLOCKS)
                s.data_blocks += blocks
                if runs > EXTENTS_IN_INODE:
                    s.extent_blocks += -(-runs // EXTENTS_PER_BLOCK)
    if not s.root_seen:
        raise UserError(f"{tar_path}: the tar has no root entry './'",
                        hint="image outputs take the canonical tar the pipeline assembles")
    # '.' and '..' take 12 bytes each; every block ends with a 12-byte checksum tail.
    for used in dir_bytes.values():
        s.dir_blocks += max(1, -(-(used + 24) // (FS_BLOCK - 12)))
    return s


def member_xattrs(m: tarfmt.Member) -> dict[bytes, bytes]:
    """Every xattr the member's inode carries, ACLs included (Linux form)."""
    out = dict(m.xattrs)
    for key, name in tarfmt.ACL_RECORDS.items():
        if key in m.acls:
            out[name] = tarfmt.acl_xattr(m.acls[key], show(m.name))
    return out
