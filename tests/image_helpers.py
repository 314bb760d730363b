"""Helpers for the image tests: a fixture tree with every hard case, and
listings of that tree from the tar (Python's tarfile, independent of
builder.tarfmt), from a mounted directory (os.*) and from libguestfs
(per-file calls).

Run as a script, ``image_helpers.py mount-list IMAGE MOUNTPOINT`` mounts
IMAGE read-only on MOUNTPOINT (call it inside ``unshare -m``) and prints
the listing as JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EPOCH = 1_700_000_000
OLD = EPOCH - 86400  # mtime of most fixture members

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


# ---------------------------------------------------------------------------
# the fixture


def _bytes(seed: str, n: int) -> bytes:
    """Deterministic incompressible bytes."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


def _s(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


SELINUX_BIN = b"system_u:object_r:bin_t:s0\0"
CAPABILITY = b"\x01\x00\x00\x02\x00\x20\x00\x00" + bytes(12)  # cap_net_raw, v2
ACL_TEXT = "user::rw-,user:1000:r--,group::r--,group:27:rw-,mask::rw-,other::---"
DEFAULT_ACL_TEXT = "user::rwx,group::r-x,other::---"


def _source_tar(acls: bool) -> bytes:
    buf = io.BytesIO()
    tf = tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,  # noqa: SIM115
                      encoding="utf-8", errors="surrogateescape")

    def add(name: str | bytes, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, *,
            uid: int = 0, gid: int = 0, data: bytes | None = None, link: str | bytes = "",
            xattrs: dict[str, bytes] | None = None, pax: dict[str, str] | None = None,
            dev: tuple[int, int] = (0, 0), mtime: int = OLD) -> None:
        t = tarfile.TarInfo(_s(name) if isinstance(name, bytes) else name)
        t.type = kind
        t.mode = mode
        t.uid, t.gid = uid, gid
        t.mtime = mtime
        t.linkname = _s(link) if isinstance(link, bytes) else link
        t.devmajor, t.devminor = dev
        headers = dict(pax or {})
        for key, value in (xattrs or {}).items():
            headers["SCHILY.xattr." + key] = _s(value)
        t.pax_headers = headers
        if kind == tarfile.REGTYPE:
            data = data or b""
            t.size = len(data)
            tf.addfile(t, io.BytesIO(data))
        else:
            tf.addfile(t)

    label = {"security.selinux": SELINUX_BIN}
    add("./", tarfile.DIRTYPE, 0o751,
        xattrs={"security.selinux": b"system_u:object_r:root_t:s0\0"})
    add("etc", tarfile.DIRTYPE, 0o755, xattrs={"security.selinux": b"u:r:etc_t:s0\0"})
    add("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n",
        xattrs={"security.selinux": b"system_u:object_r:passwd_file_t:s0\0",
                "user.comment": b"hello", "trusted.overlay.opaque": b"\x00\x01\xff",
                "user.big": _bytes("xattr", 1500)})
    add("etc/shadow", mode=0o000, data=b"root:!:19000::::::\n")
    add("tmp", tarfile.DIRTYPE, 0o1777)
    add("usr", tarfile.DIRTYPE, 0o755)
    add("usr/bin", tarfile.DIRTYPE, 0o755, xattrs=label)
    add("usr/bin/ping", mode=0o4755, data=b"\x7fELF" + _bytes("ping", 9000),
        xattrs={"security.capability": CAPABILITY, **label})
    # A link header whose own metadata disagrees with its target: the inode's
    # (the target's) metadata must win.
    add("usr/bin/ping6", tarfile.LNKTYPE, 0o644, link="usr/bin/ping")
    add("usr/bin/wall", mode=0o2755, gid=5, data=b"#!/bin/sh\n")
    add("usr/bin/sh", tarfile.SYMTYPE, 0o777, link="bash")
    add("usr/bin/abs", tarfile.SYMTYPE, 0o777, link="/usr/bin/wall")
    add("usr/bin/dangling", tarfile.SYMTYPE, 0o777, link="../nowhere/at/all")
    add("usr/bin/longlink", tarfile.SYMTYPE, 0o777, link="../" + "x" * 70 + "/target")
    add("usr/lib", tarfile.DIRTYPE, 0o755)
    add("usr/lib/deep", tarfile.DIRTYPE, 0o755, xattrs=label)
    add("usr/lib/deep/er", tarfile.DIRTYPE, 0o755, xattrs=label)
    add("usr/lib/deep/er/lib.so", data=_bytes("lib", 70000), xattrs=label)
    add("usr/lib/deep/er/lib.so.1", tarfile.LNKTYPE, link="usr/lib/deep/er/lib.so")
    add("usr/lib/many", tarfile.DIRTYPE, 0o755)
    for i in range(150):
        add(f"usr/lib/many/module-with-a-rather-long-name-{i:04d}.ko", mode=0o600,
            data=_bytes(f"m{i}", i * 37), xattrs={"security.selinux": b"u:r:mod_t:s0\0"}
            if i % 3 == 0 else None)
    add("dev", tarfile.DIRTYPE, 0o755)
    add("dev/null", tarfile.CHRTYPE, 0o666, dev=(1, 3))
    add("dev/sda", tarfile.BLKTYPE, 0o660, gid=6, dev=(8, 0))
    add("dev/big", tarfile.CHRTYPE, 0o600, dev=(260, 70000))
    add("dev/initctl", tarfile.FIFOTYPE, 0o600)
    add("home", tarfile.DIRTYPE, 0o755)
    add("home/user", tarfile.DIRTYPE, 0o700, uid=1000, gid=1000)
    add("home/user/.profile", mode=0o600, uid=1000, gid=1000, data=b"")
    deep = "home/user/" + "d" * 200
    add(deep, tarfile.DIRTYPE, 0o755, uid=1000, gid=1000)
    add(deep + "/" + "f" * 250, uid=1000, gid=1000, data=b"long")
    add("home/user/zz-link-to-long", tarfile.LNKTYPE, link=deep + "/" + "f" * 250)
    add(b"home/user/caf\xe9-\xff.txt", uid=1000, gid=1000, data=b"latin1",
        xattrs={"user.origin": b"iso-8859-1", **label})
    add(b"home/user/bad-target", tarfile.SYMTYPE, 0o777, link=b"caf\xe9-\xff.txt")
    add("home/user/ünïcödé", data=b"u")
    add('home/user/we"ird name', data=b"q", xattrs={"user.q": b'"'})
    add("home/user/<5>", data=b"angle", xattrs={"user.a": b"b"})
    add("home/user/#hash", data=b"h", xattrs={"user.h": b"#"})
    add("var", tarfile.DIRTYPE, 0o755)
    sparse = bytearray(6 << 20)
    sparse[0:5] = b"start"
    sparse[3 << 20:(3 << 20) + 10] = b"middle...."
    sparse[-3:] = b"end"
    add("var/sparse.img", data=bytes(sparse))
    add(b"var/sp\xe4rse-name.img", data=bytes(sparse), mtime=EPOCH + 999)  # clamped
    holes_only = bytes(1 << 20)
    add("var/zeros", data=holes_only)
    add("var/big.bin", data=_bytes("big", 300000))
    add("var/bigid", uid=3_000_000, gid=3_000_001, data=b"id")
    add("var/empty", tarfile.DIRTYPE, 0o755, uid=65534, gid=65534)
    if acls:
        add("lost+found", tarfile.DIRTYPE, 0o700)
        add("var/acl", mode=0o660, data=b"acl", pax={"SCHILY.acl.access": ACL_TEXT})
        add("var/acldir", tarfile.DIRTYPE, 0o750,
            pax={"SCHILY.acl.access": "user::rwx,group::r-x,other::---",
                 "SCHILY.acl.default": DEFAULT_ACL_TEXT})
    tf.close()
    return buf.getvalue()


def build_fixture(out: Path, *, acls: bool) -> Path:
    """The fixture as the pipeline's canonical tar (normalized by builder.layer
    and builder.assemble).  acls=True adds ACLs and a /lost+found."""
    return canonical_tar(out, _source_tar(acls))


def canonical_tar(out: Path, source: bytes) -> Path:
    """Normalize a tar (bytes) the way the pipeline does."""
    from builder import assemble, layer

    with tempfile.TemporaryDirectory(dir=out.parent) as td:
        d = Path(td) / "layer"
        d.mkdir()
        layer.build_layer_from_tar(io.BytesIO(source), d, mtime_policy="clamp",
                                   source="fixture")
        lay = layer.Layer(d, "fixture")
        try:
            with open(out, "wb") as f:
                assemble.assemble([lay], EPOCH, f)
        finally:
            lay.close()
    return out


# ---------------------------------------------------------------------------
# listings


@dataclasses.dataclass(frozen=True)
class Entry:
    type: str
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    mtime: int
    size: int | None = None
    sha256: str | None = None
    target: bytes | None = None
    rdev: tuple[int, int] | None = None
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    link: bytes | None = None  # hard links: the group's first name

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["target"] = self.target.hex() if self.target is not None else None
        d["link"] = self.link.hex() if self.link is not None else None
        d["xattrs"] = [[k.hex(), v.hex()] for k, v in self.xattrs]
        return d

    @classmethod
    def from_json(cls, d: dict) -> Entry:
        d = dict(d)
        d["target"] = bytes.fromhex(d["target"]) if d["target"] is not None else None
        d["link"] = bytes.fromhex(d["link"]) if d["link"] is not None else None
        d["xattrs"] = tuple((bytes.fromhex(k), bytes.fromhex(v)) for k, v in d["xattrs"])
        d["rdev"] = tuple(d["rdev"]) if d["rdev"] is not None else None
        return cls(**d)


Tree = dict[bytes, Entry]

_TAGS = {"user": 1, "group": 4, "mask": 0x10, "other": 0x20}


def acl_to_xattr(text: str) -> bytes:
    """ACL text with numeric ids -> Linux system.posix_acl_* value."""
    entries = []
    for part in text.split(","):
        tag_name, qualifier, perms = part.split(":")[:3]
        tag = _TAGS[tag_name]
        ident = 0xFFFFFFFF
        if qualifier:
            tag *= 2
            ident = int(qualifier)
        perm = sum(bit for ch, bit in (("r", 4), ("w", 2), ("x", 1)) if ch in perms)
        entries.append((tag, perm, ident))
    entries.sort(key=lambda e: (e[0], e[2]))
    return (2).to_bytes(4, "little") + b"".join(
        t.to_bytes(2, "little") + p.to_bytes(2, "little") + i.to_bytes(4, "little")
        for t, p, i in entries)


def _name(raw: str) -> bytes:
    name = raw.encode("utf-8", "surrogateescape")
    if name.startswith(b"./"):
        name = name[2:]
    return name.strip(b"/") if name not in (b".", b"./") else b""


def _link_groups(inodes: dict[bytes, tuple[int, int]]) -> dict[bytes, bytes]:
    """name -> first name (rootfs order) of its hard link group."""
    by_inode: dict[tuple[int, int], list[bytes]] = {}
    for name, key in inodes.items():
        by_inode.setdefault(key, []).append(name)
    out = {}
    for names in by_inode.values():
        if len(names) > 1:
            first = min(names, key=lambda n: n.replace(b"/", b"\0"))
            for n in names:
                out[n] = first
    return out


def tar_tree(path: Path) -> Tree:
    """The tree a tar describes, read with Python's tarfile."""
    tree: Tree = {}
    anchors: dict[bytes, bytes] = {}
    with tarfile.open(path, encoding="utf-8", errors="surrogateescape") as tf:
        members = tf.getmembers()
        for m in members:
            name = _name(m.name)
            if m.islnk():
                target = _name(m.linkname)
                anchors[name] = anchors[target] = target
                continue
            xattrs = {k[len("SCHILY.xattr."):].encode(): v.encode("utf-8", "surrogateescape")
                      for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
            if "SCHILY.acl.access" in m.pax_headers:
                xattrs[b"system.posix_acl_access"] = acl_to_xattr(
                    m.pax_headers["SCHILY.acl.access"])
            if "SCHILY.acl.default" in m.pax_headers:
                xattrs[b"system.posix_acl_default"] = acl_to_xattr(
                    m.pax_headers["SCHILY.acl.default"])
            common: dict[str, Any] = {"mode": m.mode & 0o7777, "uid": m.uid, "gid": m.gid,
                      "mtime": int(m.mtime), "xattrs": tuple(sorted(xattrs.items()))}
            if m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                digest = hashlib.sha256(f.read()).hexdigest()
                tree[name] = Entry("file", size=m.size, sha256=digest, **common)
            elif m.isdir():
                tree[name] = Entry("dir", **common)
            elif m.issym():
                tree[name] = Entry("symlink", target=m.linkname.encode("utf-8", "surrogateescape"),
                                   **common)
            elif m.ischr() or m.isblk():
                tree[name] = Entry("char" if m.ischr() else "block",
                                   rdev=(m.devmajor, m.devminor), **common)
            elif m.isfifo():
                tree[name] = Entry("fifo", **common)
            else:
                raise AssertionError(f"unexpected member {m.name!r}")
    for name, anchor in anchors.items():
        tree[name] = dataclasses.replace(tree[anchor], link=anchor)
    return tree


def _entry_from_stat(st_mode: int, uid: int, gid: int, mtime: int, size: int, rdev: int,
                     xattrs: dict[bytes, bytes], sha256: str | None,
                     target: bytes | None) -> Entry:
    common: dict[str, Any] = {"mode": stat.S_IMODE(st_mode), "uid": uid, "gid": gid, "mtime": mtime,
              "xattrs": tuple(sorted(xattrs.items()))}
    if stat.S_ISREG(st_mode):
        return Entry("file", size=size, sha256=sha256, **common)
    if stat.S_ISDIR(st_mode):
        return Entry("dir", **common)
    if stat.S_ISLNK(st_mode):
        return Entry("symlink", target=target, **common)
    if stat.S_ISCHR(st_mode) or stat.S_ISBLK(st_mode):
        return Entry("char" if stat.S_ISCHR(st_mode) else "block",
                     rdev=(os.major(rdev), os.minor(rdev)), **common)
    if stat.S_ISFIFO(st_mode):
        return Entry("fifo", **common)
    raise AssertionError(f"unexpected file type {st_mode:o}")


def dir_tree(root: Path) -> Tree:
    """The tree under a mounted directory (bytes paths, no following)."""
    top = os.fsencode(root)
    tree: Tree = {}
    inodes: dict[bytes, tuple[int, int]] = {}

    def walk(rel: bytes) -> Iterator[bytes]:
        yield rel
        full = top + (b"/" + rel if rel else b"")
        if stat.S_ISDIR(os.lstat(full).st_mode):
            for child in sorted(os.listdir(full)):
                yield from walk(rel + b"/" + child if rel else child)

    for rel in walk(b""):
        full = top + (b"/" + rel if rel else b"")
        st = os.lstat(full)
        xattrs = {k.encode(): os.getxattr(full, k, follow_symlinks=False)
                  for k in os.listxattr(full, follow_symlinks=False)}
        sha = None
        if stat.S_ISREG(st.st_mode):
            h = hashlib.sha256()
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):  # noqa: B023
                    h.update(chunk)
            sha = h.hexdigest()
            if st.st_nlink > 1:
                inodes[rel] = (st.st_dev, st.st_ino)
        target = os.readlink(full) if stat.S_ISLNK(st.st_mode) else None
        tree[rel] = _entry_from_stat(st.st_mode, st.st_uid, st.st_gid, int(st.st_mtime),
                                     st.st_size, st.st_rdev, xattrs, sha, target)
    for name, first in _link_groups(inodes).items():
        tree[name] = dataclasses.replace(tree[name], link=first)
    return tree


def _guestfs_sha256(g, path: str, size: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while offset < size:
        chunk = g.pread(path, min(1 << 20, size - offset), offset)
        if not chunk:
            raise AssertionError(f"{path}: short read at {offset} of {size}")
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def guestfs_tree(g, scratch: Path) -> tuple[Tree, dict[bytes, int]]:
    """The tree mounted at / in a libguestfs handle, read with per-file calls
    (lstatns, lgetxattrs, readlink, pread).  The Python binding passes
    paths as UTF-8 str, so names (or link targets) that are not UTF-8 are
    read from a tar_out of their parent directory instead.  Also returns
    allocated bytes per regular file (st_blocks * 512)."""
    listing = scratch / "find0"
    g.find0("/", str(listing))
    names = [b""] + [n for n in listing.read_bytes().split(b"\0") if n]
    tree: Tree = {}
    allocated: dict[bytes, int] = {}
    inodes: dict[bytes, tuple[int, int]] = {}
    awkward: dict[bytes, list[bytes]] = {}
    for name in names:
        try:
            path = "/" + name.decode("utf-8")
        except UnicodeDecodeError:
            awkward.setdefault(name.rpartition(b"/")[0], []).append(name)
            continue
        st = g.lstatns(path)
        mode = st["st_mode"]
        target = None
        if stat.S_ISLNK(mode):
            try:
                target = g.readlink(path).encode("utf-8")
            except UnicodeDecodeError:
                awkward.setdefault(name.rpartition(b"/")[0], []).append(name)
                continue
        xattrs = {x["attrname"].encode(): bytes(x["attrval"]) for x in g.lgetxattrs(path)}
        sha = _guestfs_sha256(g, path, st["st_size"]) if stat.S_ISREG(mode) else None
        if stat.S_ISREG(mode):
            allocated[name] = st["st_blocks"] * 512
            if st["st_nlink"] > 1:
                inodes[name] = (st["st_dev"], st["st_ino"])
        tree[name] = _entry_from_stat(mode, st["st_uid"], st["st_gid"], st["st_mtime_sec"],
                                      st["st_size"], st["st_rdev"], xattrs, sha, target)
    for parent, members in awkward.items():
        local = scratch / "parent.tar"
        g.tar_out("/" + parent.decode("utf-8"), str(local), numericowner=True, xattrs=True)
        sub = tar_tree(local)
        for name in members:
            tree[name] = sub[name[len(parent) + 1:] if parent else name]
    for name, first in _link_groups(inodes).items():
        tree[name] = dataclasses.replace(tree[name], link=first)
    return tree, allocated


def _short(value: object, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def diff_trees(expected: Tree, actual: Tree, limit: int = 10) -> list[str]:
    """Human-readable differences; empty when the trees are the same."""
    out = []
    for name in sorted(set(expected) | set(actual)):
        e, a = expected.get(name), actual.get(name)
        if e == a:
            continue
        shown = "/" + name.decode("utf-8", "backslashreplace")
        if e is None:
            out.append(f"{shown}: only in the image: {a}")
        elif a is None:
            out.append(f"{shown}: missing from the image")
        else:
            fields = [f.name for f in dataclasses.fields(Entry)
                      if getattr(e, f.name) != getattr(a, f.name)]
            out.append(f"{shown}: " + "; ".join(
                f"{f}: tar {_short(getattr(e, f))} image {_short(getattr(a, f))}"
                for f in fields))
        if len(out) >= limit:
            out.append("...")
            break
    return out


def _mount_list(image: str, mountpoint: str) -> None:
    subprocess.run(["mount", "-o", "loop,ro", image, mountpoint], check=True)
    try:
        tree = dir_tree(Path(mountpoint))
    finally:
        subprocess.run(["umount", mountpoint], check=True)
    json.dump({k.hex(): v.to_json() for k, v in tree.items()}, sys.stdout)


def load_listing(text: str) -> Tree:
    return {bytes.fromhex(k): Entry.from_json(v) for k, v in json.loads(text).items()}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "mount-list":
        _mount_list(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: image_helpers.py mount-list IMAGE MOUNTPOINT")
