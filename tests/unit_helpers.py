"""Helpers for the unit tests of tarfmt, layer, assemble, recipe and elements.

Three independent ways to look at a tar, all reduced to the same `Entry`
view so tests can compare them:

- ``model_view``: what a list of `Spec` members should become after
  normalization (the rules of DESIGN.md, computed here from scratch);
- ``tarfile_view``: the tar as Python's tarfile reads it;
- ``fs_view``: a directory tree (GNU tar's extraction), by os.lstat & co.

plus writers (Python tarfile PAX, builder.tarfmt with a GNU-style 4 KiB
sparse map), the normalization pipeline (build_layer_from_tar + assemble)
and small LayerWriter layers for merge tests.
"""

from __future__ import annotations

import dataclasses
import io
import os
import random
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

from builder import assemble, layer, tarfmt
from builder.layer import Layer, LayerWriter
from builder.tarfmt import BLK, CHR, DIR, FIFO, LNK, REG, SYM, Member

EPOCH = 1_700_000_000

KINDS = ("reg", "dir", "sym", "lnk", "chr", "blk", "fifo")
CODES = {"reg": REG, "dir": DIR, "sym": SYM, "lnk": LNK, "chr": CHR, "blk": BLK, "fifo": FIFO}
KIND_OF = {v: k for k, v in CODES.items()}
TARFILE_TYPES = {"reg": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE,
                 "lnk": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE,
                 "fifo": tarfile.FIFOTYPE}
KIND_OF_TARFILE = {v: k for k, v in TARFILE_TYPES.items()}
KIND_OF_TARFILE[tarfile.AREGTYPE] = "reg"


def b(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else os.fsencode(text)


def s(raw: bytes) -> str:
    """bytes -> str the way tarfile (utf-8, surrogateescape) round-trips them."""
    return raw.decode("utf-8", "surrogateescape")


def order_key(name: bytes) -> list[bytes]:
    """Component-wise rootfs order, written independently of tarfmt.sort_key."""
    return name.split(b"/") if name else []


def norm(name: bytes) -> bytes:
    return b"/".join(p for p in name.split(b"/") if p not in (b"", b"."))


def pseudo_random(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


# ---------------------------------------------------------------------------
# members as tests describe them


@dataclasses.dataclass
class Spec:
    """One input member; `name` normalized (no ./, no trailing slash)."""

    name: bytes
    kind: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int | float = 0
    content: bytes = b""
    link: bytes = b""
    major: int = 0
    minor: int = 0
    xattrs: dict[bytes, bytes] = dataclasses.field(default_factory=dict)
    noise: bool = False  # add uname/gname and atime/ctime records on input


def write_with_tarfile(specs: Iterable[Spec], prefix: str = "") -> bytes:
    """A PAX tar written by Python's tarfile; `prefix` ('', './' or '/') starts names."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tf:
        for sp in specs:
            ti = tarfile.TarInfo(prefix + s(sp.name) if sp.name else "./")
            ti.type = TARFILE_TYPES[sp.kind]
            ti.mode = sp.mode
            ti.uid, ti.gid = sp.uid, sp.gid
            ti.mtime = sp.mtime
            ti.uname = ti.gname = ""
            if sp.kind == "lnk":
                ti.linkname = prefix + s(sp.link)
            elif sp.kind == "sym":
                ti.linkname = s(sp.link)
            ti.devmajor, ti.devminor = sp.major, sp.minor
            pax = {f"SCHILY.xattr.{s(k)}": s(v) for k, v in sp.xattrs.items()}
            if sp.noise:
                ti.uname, ti.gname = "someone", "somegroup"
                pax.update({"atime": "1234567.25", "ctime": "7654321"})
            ti.pax_headers = pax
            if sp.kind == "reg":
                ti.size = len(sp.content)
                tf.addfile(ti, io.BytesIO(sp.content))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def gnu_style_map(content: bytes, block: int = 4096) -> list[tuple[int, int]] | None:
    """Data segments at `block` granularity, as `tar --sparse` would store them."""
    segments: list[tuple[int, int]] = []
    start = None
    for off in range(0, len(content), block):
        zero = content[off:off + block].count(0) == len(content[off:off + block])
        if zero and start is not None:
            segments.append((start, off - start))
            start = None
        elif not zero and start is None:
            start = off
    if start is not None:
        segments.append((start, len(content) - start))
    if sum(n for _, n in segments) == len(content):
        return None
    if not segments or sum(segments[-1]) != len(content):
        segments.append((len(content), 0))
    return segments


def write_with_tarfmt(specs: Iterable[Spec], *, sparse: bool = True) -> bytes:
    """A tar written by builder.tarfmt, files with zero blocks stored sparse
    at 4 KiB granularity (not the 64 KiB grain normalization uses)."""
    out = io.BytesIO()
    for sp in specs:
        m = Member(sp.name, CODES[sp.kind], sp.mode, sp.uid, sp.gid, mtime=int(sp.mtime),
                   linkname=sp.link, devmajor=sp.major, devminor=sp.minor,
                   xattrs=dict(sp.xattrs))
        data = b""
        if sp.kind == "reg":
            m.size = len(sp.content)
            m.sparse = gnu_style_map(sp.content) if sparse else None
            data = (b"".join(sp.content[o:o + n] for o, n in m.sparse) if m.sparse
                    else sp.content)
        tarfmt.write_member(out, m, io.BytesIO(data))
    out.write(tarfmt.END_OF_ARCHIVE)
    return out.getvalue()


# ---------------------------------------------------------------------------
# the normalization pipeline


def scratch_dir() -> str | None:
    """/dev/shm when there is one (layers fsync; on tmpfs that costs nothing)."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def normalize(data: bytes, *, epoch: int = EPOCH, overlay_upper: bool = False,
              mtime_policy: str = "clamp") -> bytes:
    """tar bytes -> layer (build_layer_from_tar) -> assemble -> tar bytes."""
    work = Path(tempfile.mkdtemp(prefix="unit-normalize-", dir=scratch_dir()))
    try:
        layer.build_layer_from_tar(io.BytesIO(data), work, mtime_policy=mtime_policy,
                                   source="input.tar", overlay_upper=overlay_upper)
        lay = Layer(work, "input.tar")
        try:
            out = io.BytesIO()
            assemble.assemble([lay], epoch, out)
        finally:
            lay.close()
        return out.getvalue()
    finally:
        shutil.rmtree(work)


@dataclasses.dataclass
class Item:
    member: Member
    data: bytes = b""
    weak: bool = False
    opaque: bool = False


def reg(name: str | bytes, data: bytes = b"", **kw: object) -> Item:
    return Item(Member(b(name), REG, size=len(data), **kw), data)  # type: ignore[arg-type]


def dir_(name: str | bytes, *, weak: bool = False, opaque: bool = False, mode: int = 0o755,
         **kw: object) -> Item:
    return Item(Member(b(name), DIR, mode, **kw), weak=weak, opaque=opaque)  # type: ignore[arg-type]


def sym(name: str | bytes, target: str | bytes, **kw: object) -> Item:
    return Item(Member(b(name), SYM, 0o777, linkname=b(target), **kw))  # type: ignore[arg-type]


def hardlink(name: str | bytes, target: str | bytes, **kw: object) -> Item:
    return Item(Member(b(name), LNK, linkname=b(target), **kw))  # type: ignore[arg-type]


class Stack:
    """Layers made with LayerWriter under one directory, applied in order."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.layers: list[Layer] = []

    def layer(self, items: Iterable[Item], *, deletions: Iterable[str | bytes] = (),
              mtime_policy: str = "epoch", label: str | None = None) -> Layer:
        d = self.directory / f"layer{len(self.layers)}"
        d.mkdir(parents=True)
        label = label or f"layer {len(self.layers)}"
        w = LayerWriter(d, mtime_policy=mtime_policy, source=label)
        for name in deletions:
            w.delete(b(name))
        for it in items:
            w.add(it.member, io.BytesIO(it.data).read if it.member.type == REG else None,
                  weak=it.weak, opaque=it.opaque)
        w.finish()
        lay = Layer(d, label)
        self.layers.append(lay)
        return lay

    def from_tar(self, data: bytes, *, overlay_upper: bool = False,
                 mtime_policy: str = "clamp") -> Layer:
        d = self.directory / f"layer{len(self.layers)}"
        d.mkdir(parents=True)
        layer.build_layer_from_tar(io.BytesIO(data), d, mtime_policy=mtime_policy,
                                   source=f"layer {len(self.layers)}",
                                   overlay_upper=overlay_upper)
        lay = Layer(d, f"layer {len(self.layers)}")
        self.layers.append(lay)
        return lay

    def tree(self) -> assemble.Tree:
        tree = assemble.Tree()
        for lay in self.layers:
            tree.apply(lay)
        return tree

    def output(self, epoch: int = EPOCH) -> tuple[bytes, assemble.AssemblyStats]:
        out = io.BytesIO()
        stats = assemble.write_tree(self.tree(), epoch, out)
        return out.getvalue(), stats

    def close(self) -> None:
        for lay in self.layers:
            lay.close()


# ---------------------------------------------------------------------------
# views


@dataclasses.dataclass(frozen=True)
class Entry:
    """What a path is; hard links say only which name they share an inode with."""

    kind: str
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    content: bytes | None = None
    link: bytes = b""
    dev: tuple[int, int] = (0, 0)
    xattrs: tuple[tuple[bytes, bytes], ...] = ()

    def short(self) -> str:
        size = "" if self.content is None else f" {len(self.content)}B"
        return f"{self.kind} {self.mode if self.mode is None else oct(self.mode)} " \
               f"{self.uid}:{self.gid}{size} {self.link!r} {self.dev} {self.xattrs}"


def _entry(kind: str, mode: int, uid: int, gid: int, content: bytes | None, link: bytes,
           dev: tuple[int, int], xattrs: dict[bytes, bytes]) -> Entry:
    if kind == "lnk":
        return Entry("lnk", link=link)
    return Entry(kind, mode & 0o7777, uid, gid, content if kind == "reg" else None,
                 link if kind == "sym" else b"", dev if kind in ("chr", "blk") else (0, 0),
                 tuple(sorted(xattrs.items())))


def model_view(specs: Iterable[Spec], epoch: int = EPOCH
               ) -> tuple[dict[bytes, Entry], dict[bytes, int]]:
    """(entries, mtimes) the normalized tar of `specs` must hold."""
    by_name = {sp.name: sp for sp in specs}
    entries: dict[bytes, Entry] = {}
    mtimes: dict[bytes, int] = {}
    for name in list(by_name):
        parts = name.split(b"/") if name else []
        for i in range(len(parts)):
            parent = b"/".join(parts[:i])
            if parent not in by_name:
                entries[parent] = Entry("dir", 0o755, 0, 0)
                mtimes[parent] = epoch
    groups: dict[bytes, list[bytes]] = {}
    for sp in by_name.values():
        if sp.kind == "lnk":
            groups.setdefault(sp.link, [sp.link]).append(sp.name)
    anchor_of = {}
    for members in groups.values():
        anchor = min(members, key=order_key)
        for n in members:
            anchor_of[n] = anchor
    for name, sp in by_name.items():
        mtimes[name] = max(0, min(int(sp.mtime), epoch))
        if name in anchor_of and anchor_of[name] != name:
            entries[name] = Entry("lnk", link=anchor_of[name])
            continue
        data = by_name[sp.link] if sp.kind == "lnk" else sp
        entries[name] = _entry(data.kind, data.mode, data.uid, data.gid, data.content,
                               data.link, (data.major, data.minor), data.xattrs)
    return entries, mtimes


@dataclasses.dataclass
class TarView:
    entries: dict[bytes, Entry]
    order: list[bytes]
    mtimes: dict[bytes, int]
    infos: dict[bytes, tarfile.TarInfo]


def tarfile_view(data: bytes) -> TarView:
    """The tar as Python's tarfile reads it (sparse files made dense)."""
    view = TarView({}, [], {}, {})
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8",
                      errors="surrogateescape") as tf:
        for ti in tf:
            name = norm(ti.name.encode("utf-8", "surrogateescape"))
            kind = KIND_OF_TARFILE[ti.type]
            content = None
            if kind == "reg":
                f = tf.extractfile(ti)
                assert f is not None
                content = f.read()
            link = ti.linkname.encode("utf-8", "surrogateescape")
            if kind == "lnk":
                link = norm(link)
            xattrs = {k[len("SCHILY.xattr."):].encode("utf-8", "surrogateescape"):
                      v.encode("utf-8", "surrogateescape")
                      for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")}
            view.entries[name] = _entry(kind, ti.mode, ti.uid, ti.gid, content, link,
                                        (ti.devmajor, ti.devminor), xattrs)
            view.order.append(name)
            view.mtimes[name] = int(ti.mtime)
            view.infos[name] = ti
    return view


def raw_names(data: bytes) -> list[str]:
    """Member names as Python's tarfile reports them."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return [ti.name for ti in tf]


def fs_view(root: Path) -> dict[bytes, Entry]:
    """A directory tree seen through lstat/readlink/listxattr, hard links
    anchored to the first name in rootfs order."""
    found: dict[bytes, tuple[os.stat_result, Path]] = {}

    def walk(path: Path, rel: bytes) -> None:
        for child in sorted(os.listdir(path), key=os.fsencode):
            p = path / child
            r = rel + b"/" + os.fsencode(child) if rel else os.fsencode(child)
            st = os.lstat(p)
            found[r] = (st, p)
            if stat.S_ISDIR(st.st_mode):
                walk(p, r)

    found[b""] = (os.lstat(root), root)
    walk(root, b"")
    first_of_inode: dict[tuple[int, int], bytes] = {}
    out: dict[bytes, Entry] = {}
    for name in sorted(found, key=order_key):
        st, p = found[name]
        ino = (st.st_dev, st.st_ino)
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            if ino in first_of_inode:
                out[name] = Entry("lnk", link=first_of_inode[ino])
                continue
            first_of_inode[ino] = name
        fmt = stat.S_IFMT(st.st_mode)
        kind = {stat.S_IFREG: "reg", stat.S_IFDIR: "dir", stat.S_IFLNK: "sym",
                stat.S_IFCHR: "chr", stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo"}[fmt]
        xattrs = {}
        if kind in ("reg", "dir"):
            for key in os.listxattr(p, follow_symlinks=False):
                xattrs[os.fsencode(key)] = os.getxattr(p, key, follow_symlinks=False)
        entry = _entry(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                       p.read_bytes() if kind == "reg" else None,
                       os.fsencode(os.readlink(p)) if kind == "sym" else b"",
                       (os.major(st.st_rdev), os.minor(st.st_rdev)), xattrs)
        if kind == "sym":  # a symlink's mode means nothing on Linux
            entry = dataclasses.replace(entry, mode=None)
        out[name] = entry
    return out


def without_symlink_modes(entries: dict[bytes, Entry]) -> dict[bytes, Entry]:
    return {n: dataclasses.replace(e, mode=None) if e.kind == "sym" else e
            for n, e in entries.items()}


# ---------------------------------------------------------------------------
# GNU tar


def gnu_extract(data: bytes, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner",
                    "--same-permissions", "--same-owner", "-xf", "-", "-C", str(dest)],
                   input=data, check=True, capture_output=True)


_PERM_TYPES = {"-": "reg", "d": "dir", "l": "sym", "h": "lnk", "c": "chr", "b": "blk",
               "p": "fifo"}
_ESCAPES = {"\\": "\\", "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
            "v": "\v", "?": "?", " ": " "}


def _unescape(text: str) -> bytes:
    """Undo GNU tar's --quoting-style=escape (C escapes and \\ooo octal)."""
    out = bytearray()
    i = 0
    raw = text.encode("utf-8", "surrogateescape")
    while i < len(raw):
        c = raw[i]
        if c != 0x5C:
            out.append(c)
            i += 1
            continue
        nxt = chr(raw[i + 1])
        if nxt in "01234567":
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out += _ESCAPES[nxt].encode()
            i += 2
    return bytes(out)


def _perm_mode(perms: str) -> int:
    mode = 0
    for i, ch in enumerate(perms):
        shift = 8 - i
        if ch in "rwxst":
            mode |= 1 << shift
    special = {2: 0o4000, 5: 0o2000, 8: 0o1000}
    for i, bit in special.items():
        if perms[i] in "sStT":
            mode |= bit
            if perms[i] in "ST":
                mode &= ~(1 << (8 - i))
    return mode


def gnu_list(data: bytes) -> dict[bytes, Entry]:
    """`tar -tv` of the archive, parsed (content is not listed; size is)."""
    r = subprocess.run(["tar", "--xattrs", "--numeric-owner", "--quoting-style=escape",
                        "-tvf", "-"], input=data, check=True, capture_output=True,
                       env={**os.environ, "LC_ALL": "C", "TZ": "UTC"})
    out: dict[bytes, Entry] = {}
    for line in r.stdout.decode("utf-8", "surrogateescape").splitlines():
        perms, owner, size, _date, _time, rest = line.split(None, 5)
        kind = _PERM_TYPES[perms[0]]
        uid, gid = (int(x) for x in owner.split("/"))
        link = b""
        if kind == "sym":
            rest, _, target = rest.partition(" -> ")
            link = _unescape(target)
        elif kind == "lnk":
            rest, _, target = rest.partition(" link to ")
            link = norm(_unescape(target))
        dev = (0, 0)
        if kind in ("chr", "blk"):
            major, minor = size.split(",")
            dev = (int(major), int(minor))
        name = norm(_unescape(rest))
        entry = _entry(kind, _perm_mode(perms[1:10].rstrip("+.")), uid, gid, None, link,
                       dev, {})
        if kind == "reg":
            entry = dataclasses.replace(entry, content=bytes(int(size)))  # size only
        out[name] = entry
    return out


def pax_records(data: bytes) -> list[dict[bytes, bytes]]:
    """The raw pax records ('x' headers) of a tar, one dict per member."""
    out = []
    pos = 0
    while pos + 512 <= len(data):
        block = data[pos:pos + 512]
        if block == bytes(512):
            break
        size = int(block[124:136].split(b"\0")[0] or b"0", 8)
        typeflag = block[156:157]
        body = data[pos + 512:pos + 512 + size]
        pos += 512 + size + (-size % 512)
        if typeflag == b"x":
            records = {}
            i = 0
            while i < len(body):
                length = int(body[i:body.index(b" ", i)])
                key, _, value = body[body.index(b" ", i) + 1:i + length - 1].partition(b"=")
                records[key] = value
                i += length
            out.append(records)
    return out


def zero_grains(content: bytes) -> int:
    """All-zero 64 KiB grains of `content`, aligned to the file's start."""
    grain = tarfmt.HOLE_GRAIN
    return sum(content[o:o + grain] == bytes(grain)
               for o in range(0, len(content) - grain + 1, grain))


def sparse_sizes_ok(content: bytes) -> bool:
    """Whether normalization must store `content` sparse: it is at least
    128 KiB and has at least one zero grain."""
    return len(content) >= 2 * tarfmt.HOLE_GRAIN and zero_grains(content) > 0


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text



# ---------------------------------------------------------------------------
# elements


def make_element(elements_dir: Path, name: str, *, deps: Iterable[str] = (),
                 provides: Iterable[str] = (), spec: str | None = None,
                 files: dict[str, str | bytes] | None = None) -> Path:
    """An element directory: element-deps, element-provides, element.yaml, files."""
    d = elements_dir / name
    d.mkdir(parents=True, exist_ok=True)
    if deps:
        (d / "element-deps").write_text("".join(f"{x}\n" for x in deps))
    if provides:
        (d / "element-provides").write_text("".join(f"{x}\n" for x in provides))
    if spec is not None:
        (d / "element.yaml").write_text(spec)
    for rel, content in (files or {}).items():
        write_file(d / rel, content)
    return d


def write_file(path: Path, content: str | bytes) -> Path:
    """`content` at `path`, parent directories made as needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def make_recipe(directory: Path, elements: Iterable[str], params: str = "",
                extra: str = "") -> Path:
    """recipe.yaml in `directory` (whose elements/ is searched first)."""
    directory.mkdir(parents=True, exist_ok=True)
    text = "name: test\nbase:\n  image: base.qcow2\n"
    text += f"elements: [{', '.join(elements)}]\n"
    if params:
        text += "params:\n" + "".join(f"  {line}\n" for line in params.strip().splitlines())
    path = directory / "recipe.yaml"
    path.write_text(text + extra)
    return path
