"""RPM packages installed by unpacking, in pure Python, on the build host.

The rootfs is usually another architecture than the build host, so the
guest's ``rpm`` cannot run.  Instead each package's payload (a compressed
cpio "newc" archive) is streamed into a FilePlan.  Everything about a file
except its content comes from the package header, as rpm itself does:
names, modes, owners (by name, mapped through the rootfs's /etc/passwd and
/etc/group), symlink targets, device numbers, %ghost flags, file
capabilities and hard links (files sharing an inode number).  Nothing from
a package is executed: scriptlets and triggers are listed in the report.

Supported: RPM v3/v4 leads with v4 headers, payloads compressed with gzip,
xz, lzma, zstd or bzip2 (or none).  Refused: source packages, other payload
formats, the stripped cpio form rpm uses for files of 4 GiB or more.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import hashlib
import lzma
import re
import stat
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

import zstandard

from . import tarfmt
from .errors import UserError
from .filelayers import FilePlan, Item
from .tarfmt import BLK, CHR, DIR, FIFO, LNK, REG, SYM, Member

# Files up to this size are kept in memory; larger ones go to the workdir.
SMALL_FILE = 64 * 1024
_CHUNK = 1 << 20

_LEAD_MAGIC = b"\xed\xab\xee\xdb"
_HEADER_MAGIC = b"\x8e\xad\xe8\x01"
_LEAD_SIZE = 96
_MAX_INDEX = 1 << 20
_MAX_STORE = 256 << 20

# header tags
T_NAME, T_VERSION, T_RELEASE, T_EPOCH = 1000, 1001, 1002, 1003
T_FILESIZES, T_FILEMODES, T_FILERDEVS = 1028, 1030, 1033
T_FILEDIGESTS, T_FILELINKTOS, T_FILEFLAGS = 1035, 1036, 1037
T_FILEUSERNAME, T_FILEGROUPNAME = 1039, 1040
T_ARCH = 1022
T_OLDFILENAMES = 1027
T_FILEDEVICES, T_FILEINODES = 1095, 1096
T_SOURCEPACKAGE = 1106
T_DIRINDEXES, T_BASENAMES, T_DIRNAMES = 1116, 1117, 1118
T_PAYLOADFORMAT, T_PAYLOADCOMPRESSOR = 1124, 1125
T_LONGFILESIZES = 5008
T_FILECAPS = 5010
T_FILEDIGESTALGO = 5011
T_PAYLOADDIGEST, T_PAYLOADDIGESTALGO = 5092, 5093

# Scriptlets an install would run (uninstall ones never matter here):
# report name -> (script tag, program tag).
_SCRIPTLETS = {
    "pretrans": (1151, 1153),
    "pre": (1023, 1085),
    "post": (1024, 1086),
    "posttrans": (1152, 1154),
    "triggers": (1065, 1092),
    "filetriggers": (5066, 5067),
    "transfiletriggers": (5076, 5077),
}

# header value types
_CHAR, _INT8, _INT16, _INT32, _INT64 = 1, 2, 3, 4, 5
_STRING, _BIN, _STRING_ARRAY, _I18NSTRING = 6, 7, 8, 9
_INT_SIZES = {_CHAR: 1, _INT8: 1, _INT16: 2, _INT32: 4, _INT64: 8}
_INT_FORMATS = {1: "B", 2: "H", 4: "I", 8: "Q"}

RPMFILE_GHOST = 1 << 6

# PGPHASHALGO numbers (FILEDIGESTALGO, PAYLOADDIGESTALGO) -> hashlib names
_HASHES = {1: "md5", 2: "sha1", 8: "sha256", 9: "sha384", 10: "sha512", 11: "sha224"}

_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


@dataclasses.dataclass
class RpmPackage:
    nevra: str  # name-version-release.arch
    file: str
    sha256: str
    files: int
    scriptlets: list[str]  # install-time scriptlets that were not run

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RpmReport:
    packages: list[RpmPackage] = dataclasses.field(default_factory=list)

    @property
    def files(self) -> int:
        return sum(p.files for p in self.packages)

    @property
    def scriptlets_skipped(self) -> list[str]:
        """Packages (name-version-release.arch) whose scriptlets were not run."""
        return [p.nevra for p in self.packages if p.scriptlets]

    def warning(self) -> str | None:
        if not self.scriptlets_skipped:
            return None
        return ("rpm scriptlets were not run (they would need the target's rpm): "
                + ", ".join(f"{p.nevra} ({' '.join(p.scriptlets)})"
                            for p in self.packages if p.scriptlets))

    def to_json(self) -> dict[str, Any]:
        return {"packages": [p.to_json() for p in self.packages],
                "scriptlets_not_run": self.scriptlets_skipped,
                "files": self.files}


# ---------------------------------------------------------------------------
# /etc/passwd and /etc/group


def read_user_maps(passwd_text: str, group_text: str) -> tuple[dict[str, int], dict[str, int]]:
    """name -> uid and name -> gid from /etc/passwd and /etc/group content.

    Comments, blank, NIS (+/-) and malformed lines are skipped; the first
    line for a name wins, as getpwnam() does.
    """

    def parse(text: str, id_field: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in text.splitlines():
            fields = line.split(":")
            if len(fields) <= id_field or not fields[0] or fields[0][0] in "#+-":
                continue
            try:
                number = int(fields[id_field])
            except ValueError:
                continue
            out.setdefault(fields[0], number)
        return out

    return parse(passwd_text, 2), parse(group_text, 2)


# ---------------------------------------------------------------------------
# file capabilities

CAP_NAMES = (
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid",
    "setuid", "setpcap", "linux_immutable", "net_bind_service", "net_broadcast", "net_admin",
    "net_raw", "ipc_lock", "ipc_owner", "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace",
    "sys_pacct", "sys_admin", "sys_boot", "sys_nice", "sys_resource", "sys_time",
    "sys_tty_config", "mknod", "lease", "audit_write", "audit_control", "setfcap",
    "mac_override", "mac_admin", "syslog", "wake_alarm", "block_suspend", "audit_read",
    "perfmon", "bpf", "checkpoint_restore",
)
_CAP_NUMBERS = {f"cap_{n}": i for i, n in enumerate(CAP_NAMES)}
_ALL_CAPS = (1 << len(CAP_NAMES)) - 1
VFS_CAP_REVISION_2 = 0x02000000
VFS_CAP_FLAGS_EFFECTIVE = 0x000001
_CLAUSE_RE = re.compile(r"([a-z0-9_,]*)((?:[=+-][eip]*)+)")
_OP_RE = re.compile(r"([=+-])([eip]*)")


def caps_xattr(text: str) -> bytes | None:
    """`security.capability` (VFS_CAP_REVISION_2) for a cap_from_text() string.

    Takes libcap's grammar: whitespace-separated clauses of a comma list of
    capability names (or "all", or nothing, meaning all, before "=")
    followed by operations =, + or - with flags e, i, p; e.g. "=ep",
    "cap_net_admin,cap_net_raw+ep", "cap_sys_admin=eip".  Returns None when
    no capability ends up set.  Raises ValueError for anything else, and,
    as libcap does, when the effective set is neither empty nor the union of
    the permitted and inheritable sets (the kernel stores one effective bit).
    """
    sets = {"e": 0, "i": 0, "p": 0}
    clauses = text.lower().split()
    if not clauses:
        raise ValueError("empty capability text")
    for clause in clauses:
        m = _CLAUSE_RE.fullmatch(clause)
        if m is None:
            raise ValueError(f"cannot parse {clause!r}")
        names, ops = m.groups()
        if not names:
            if not ops.startswith("="):
                raise ValueError(f"{clause!r}: no capability names before {ops[0]!r}")
            mask = _ALL_CAPS
        else:
            mask = 0
            for name in names.split(","):
                if name == "all":
                    mask |= _ALL_CAPS
                elif name in _CAP_NUMBERS:
                    mask |= 1 << _CAP_NUMBERS[name]
                elif name.isdigit() and int(name) < len(CAP_NAMES):
                    mask |= 1 << int(name)
                else:
                    raise ValueError(f"unknown capability {name!r}")
        for op, flags in _OP_RE.findall(ops):
            if op == "=":
                for k in sets:
                    sets[k] &= ~mask
            for flag in flags:
                if op == "-":
                    sets[flag] &= ~mask
                else:
                    sets[flag] |= mask
    raised = sets["p"] | sets["i"]
    if sets["e"] and sets["e"] != raised:
        raise ValueError("effective capabilities must be empty or match permitted and "
                         "inheritable exactly")
    if not raised:
        return None
    magic = VFS_CAP_REVISION_2 | (VFS_CAP_FLAGS_EFFECTIVE if sets["e"] else 0)
    low, high = 0xFFFFFFFF, 32
    return struct.pack("<5I", magic, sets["p"] & low, sets["i"] & low,
                       sets["p"] >> high, sets["i"] >> high)


# ---------------------------------------------------------------------------
# reading the package


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _RpmFile:
    """The package file, read once from start to end, hashing every byte."""

    def __init__(self, f: BinaryIO, source: str):
        self.f = f
        self.source = source
        self.sha = hashlib.sha256()
        self.payload_hash: Any = None
        self.pushback = b""

    def read(self, n: int = -1) -> bytes:
        head, self.pushback = self.pushback, b""
        if n >= 0:
            if n <= len(head):
                self.pushback = head[n:]
                return head[:n]
            n -= len(head)
        data = self.f.read(n)
        self.sha.update(data)
        if self.payload_hash is not None:
            self.payload_hash.update(data)
        return head + data

    def read_exact(self, n: int, what: str) -> bytes:
        buf = self.read(n)
        while len(buf) < n:
            more = self.read(n - len(buf))
            if not more:
                raise UserError(f"{self.source}: truncated rpm (file ends in the {what})",
                                hint="download the package again")
            buf += more
        return buf

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


class _Header:
    """One header structure: tag -> (type, offset, count) over a data store."""

    def __init__(self, index: bytes, store: bytes, source: str, what: str):
        self.source = source
        self.what = what
        self.store = store
        self.entries: dict[int, tuple[int, int, int]] = {}
        for i in range(0, len(index), 16):
            tag, typ, offset, count = struct.unpack(">iIiI", index[i:i + 16])
            self.entries.setdefault(tag, (typ, offset, count))

    def _bad(self, tag: int) -> UserError:
        return UserError(f"{self.source}: bad rpm {self.what} (tag {tag} is malformed)",
                         hint="the file is corrupt; download the package again")

    def has(self, tag: int) -> bool:
        return tag in self.entries

    def _strings(self, tag: int) -> list[bytes]:
        typ, offset, count = self.entries[tag]
        if typ not in (_STRING, _STRING_ARRAY, _I18NSTRING) or offset < 0:
            raise self._bad(tag)
        if typ == _STRING:
            count = 1
        out = []
        pos = offset
        for _ in range(count):
            end = self.store.find(b"\0", pos)
            if end < 0:
                raise self._bad(tag)
            out.append(self.store[pos:end])
            pos = end + 1
        return out

    def string(self, tag: int, default: str | None = None) -> str | None:
        if tag not in self.entries:
            return default
        values = self._strings(tag)
        return values[0].decode("utf-8", "replace") if values else default

    def strings(self, tag: int) -> list[bytes]:
        return self._strings(tag) if tag in self.entries else []

    def ints(self, tag: int) -> list[int]:
        if tag not in self.entries:
            return []
        typ, offset, count = self.entries[tag]
        size = _INT_SIZES.get(typ)
        if size is None or offset < 0 or offset + size * count > len(self.store):
            raise self._bad(tag)
        return list(struct.unpack_from(f">{count}{_INT_FORMATS[size]}", self.store, offset))

    def first_int(self, tag: int, default: int) -> int:
        values = self.ints(tag)
        return values[0] if values else default

    def per_file(self, tag: int, n: int, kind: str) -> list[Any]:
        values: list[Any] = self.strings(tag) if kind == "s" else self.ints(tag)
        if tag in self.entries and len(values) != n:
            raise self._bad(tag)
        return values


def _read_header(f: _RpmFile, what: str, *, pad: bool) -> _Header:
    intro = f.read_exact(16, what)
    if intro[:4] != _HEADER_MAGIC:
        raise UserError(f"{f.source}: bad rpm {what} (wrong magic)",
                        hint="only RPM v4 headers are supported")
    nindex, hsize = struct.unpack(">II", intro[8:16])
    if nindex > _MAX_INDEX or hsize > _MAX_STORE:
        raise UserError(f"{f.source}: bad rpm {what} (implausible size)",
                        hint="the file is corrupt; download the package again")
    index = f.read_exact(16 * nindex, what)
    store = f.read_exact(hsize, what)
    if pad:
        f.read_exact(-(16 + 16 * nindex + hsize) % 8, what)
    return _Header(index, store, f.source, what)


class _Cpio:
    """Exact reads over the decompressed payload, tracking the offset."""

    def __init__(self, stream: _Readable, source: str):
        self.stream = stream
        self.source = source
        self.pos = 0

    def read(self, n: int) -> bytes:
        parts = []
        while n:
            try:
                chunk = self.stream.read(min(n, _CHUNK))
            except (OSError, EOFError, lzma.LZMAError, zlib.error, zstandard.ZstdError) as e:
                raise UserError(f"{self.source}: corrupt rpm payload ({e})",
                                hint="download the package again") from None
            if not chunk:
                raise UserError(f"{self.source}: truncated rpm payload",
                                hint="download the package again")
            parts.append(chunk)
            n -= len(chunk)
            self.pos += len(chunk)
        return b"".join(parts)

    def align(self) -> None:
        self.read(-self.pos % 4)


def _decompressor(f: _RpmFile, compressor: str) -> _Readable:
    magic = f.read(6)
    f.pushback = magic
    src = cast(BinaryIO, f)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=src, mode="rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(src, format=lzma.FORMAT_XZ)
    if magic.startswith(b"\x5d\x00\x00"):
        return lzma.LZMAFile(src, format=lzma.FORMAT_ALONE)
    if magic.startswith(b"\x28\xb5\x2f\xfd"):
        return zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(
            src, read_size=_CHUNK, read_across_frames=True)
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(src)
    if magic.startswith(b"07070"):
        return f
    raise UserError(f"{f.source}: rpm payload compressed with {compressor!r}, which is not "
                    "supported", hint="gzip, xz, lzma, zstd and bzip2 are")


@dataclasses.dataclass
class _Content:
    size: int
    sha256: str
    path: Path | None = None
    data: bytes | None = None


@dataclasses.dataclass
class _Package:
    rpm: Path
    sha256: str
    nevra: str
    name: str
    scriptlets: list[str]
    items: list[Item]


class _Reader:
    """Plans one package."""

    def __init__(self, path: Path, number: int, *, arch: str, passwd: dict[str, int],
                 group: dict[str, int], workdir: Path):
        self.path = path
        self.source = str(path)
        self.number = number
        self.arch = arch
        self.passwd = passwd
        self.group = group
        self.workdir = workdir

    def plan(self) -> _Package:
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed below
        except OSError as e:
            raise UserError(f"{self.path}: cannot read rpm: {e.strerror}") from None
        with f:
            rf = _RpmFile(f, self.source)
            lead = rf.read(_LEAD_SIZE)
            if len(lead) < _LEAD_SIZE or lead[:4] != _LEAD_MAGIC:
                raise UserError(f"{self.path}: not an rpm package (no rpm lead)",
                                hint="rpms must be binary .rpm packages")
            if lead[4] not in (3, 4):
                raise UserError(f"{self.path}: rpm format version {lead[4]} is not supported",
                                hint="only RPM v3/v4 packages are")
            _read_header(rf, "signature header", pad=True)
            hdr = _read_header(rf, "header", pad=False)
            pkg = self._check_package(lead, hdr)
            rf.payload_hash = self._payload_hash(hdr)
            items = self._files(rf, hdr, pkg)
            rf.drain()
            self._check_payload_digest(rf, hdr)
            pkg.items = items
            pkg.sha256 = rf.sha.hexdigest()
            return pkg

    # -- package level

    def _check_package(self, lead: bytes, hdr: _Header) -> _Package:
        name = hdr.string(T_NAME)
        if not name:
            raise UserError(f"{self.path}: bad rpm header (no package name)",
                            hint="the file is corrupt; download the package again")
        nevra = (f"{name}-{hdr.string(T_VERSION, '')}-{hdr.string(T_RELEASE, '')}"
                 f".{hdr.string(T_ARCH, '')}")
        if struct.unpack(">H", lead[6:8])[0] == 1 or hdr.has(T_SOURCEPACKAGE):
            raise UserError(f"{self.path}: {nevra} is a source package",
                            hint="give binary rpms (built for the rootfs's architecture)")
        pkg_arch = hdr.string(T_ARCH, "") or ""
        if pkg_arch not in ("noarch", self.arch):
            raise UserError(f"{self.path}: package architecture is {pkg_arch}, but the rootfs "
                            f"is {self.arch}",
                            hint=f"use the {self.arch} (or noarch) build of {name}")
        fmt = hdr.string(T_PAYLOADFORMAT, "cpio")
        if fmt != "cpio":
            raise UserError(f"{self.path}: rpm payload format {fmt!r} is not supported",
                            hint="only cpio payloads are (delta rpms must be rebuilt first)")
        scriptlets = [kind for kind, tags in _SCRIPTLETS.items()
                      if any(hdr.has(t) for t in tags)]
        return _Package(self.path, "", nevra, name, scriptlets, [])

    def _payload_hash(self, hdr: _Header) -> Any:
        algo = _HASHES.get(hdr.first_int(T_PAYLOADDIGESTALGO, 8))
        if not hdr.has(T_PAYLOADDIGEST) or algo is None:
            return None
        return hashlib.new(algo)

    def _check_payload_digest(self, rf: _RpmFile, hdr: _Header) -> None:
        if rf.payload_hash is None:
            return
        want = [d.decode("ascii", "replace").lower() for d in hdr.strings(T_PAYLOADDIGEST)]
        if rf.payload_hash.hexdigest() not in want:
            raise UserError(f"{self.path}: rpm payload does not match its digest",
                            hint="the file is truncated or corrupt; download it again")

    # -- files

    def _names(self, hdr: _Header) -> list[bytes]:
        if hdr.has(T_BASENAMES):
            base = hdr.strings(T_BASENAMES)
            dirs = hdr.strings(T_DIRNAMES)
            index = hdr.per_file(T_DIRINDEXES, len(base), "i")
            if len(index) != len(base) or any(i >= len(dirs) for i in index):
                raise hdr._bad(T_DIRINDEXES)
            raw = [dirs[i] + b for i, b in zip(index, base, strict=True)]
        else:
            raw = hdr.strings(T_OLDFILENAMES)
        return [tarfmt.normalize_name(n, what=f"{self.path}: file") for n in raw]

    def _owner(self, names: dict[str, int], name: bytes, file: bytes, what: str) -> int:
        text = name.decode("utf-8", "replace")
        number = names.get(text)
        if number is None and text == "root":
            return 0
        if number is None:
            table = "/etc/passwd" if what == "user" else "/etc/group"
            raise UserError(
                f"{self.path}: /{file.decode('utf-8', 'replace')} belongs to {what} {text!r}, "
                f"which the rootfs's {table} does not have",
                hint=f"put the package that creates {what} {text} into the base image")
        return number

    def _files(self, rf: _RpmFile, hdr: _Header, pkg: _Package) -> list[Item]:
        names = self._names(hdr)
        n = len(names)
        modes = hdr.per_file(T_FILEMODES, n, "i")
        if len(modes) != n:
            raise hdr._bad(T_FILEMODES)
        sizes = (hdr.per_file(T_LONGFILESIZES, n, "i") if hdr.has(T_LONGFILESIZES)
                 else hdr.per_file(T_FILESIZES, n, "i")) or [0] * n
        flags = hdr.per_file(T_FILEFLAGS, n, "i") or [0] * n
        users = hdr.per_file(T_FILEUSERNAME, n, "s") or [b"root"] * n
        groups = hdr.per_file(T_FILEGROUPNAME, n, "s") or [b"root"] * n
        links = hdr.per_file(T_FILELINKTOS, n, "s") or [b""] * n
        rdevs = hdr.per_file(T_FILERDEVS, n, "i") or [0] * n
        inodes = hdr.per_file(T_FILEINODES, n, "i") or list(range(1, n + 1))
        devices = hdr.per_file(T_FILEDEVICES, n, "i") or [1] * n
        caps = hdr.per_file(T_FILECAPS, n, "s") or [b""] * n
        digests = hdr.per_file(T_FILEDIGESTS, n, "s") or [b""] * n
        digest_algo = _HASHES.get(hdr.first_int(T_FILEDIGESTALGO, 1))

        wanted = [i for i in range(n) if not flags[i] & RPMFILE_GHOST and names[i]]
        # hard links: regular files sharing an inode; the first name carries the data
        inode_of: dict[int, tuple[int, int]] = {}
        members: dict[tuple[int, int], list[int]] = {}
        for i in wanted:
            if stat.S_ISREG(modes[i]):
                key = (devices[i], inodes[i])
                inode_of[i] = key
                members.setdefault(key, []).append(i)
        anchor = {key: min(ix, key=lambda i: tarfmt.sort_key(names[i]))
                  for key, ix in members.items()}

        # owners first: an unknown user should not wait for the whole payload
        owners = {i: (self._owner(self.passwd, users[i], names[i], "user"),
                      self._owner(self.group, groups[i], names[i], "group")) for i in wanted}
        contents = self._read_payload(rf, hdr, names, modes, sizes, flags, inode_of,
                                      members, digests, digest_algo)

        items: list[Item] = []
        for i in wanted:
            name, mode = names[i], modes[i]
            where = name.decode("utf-8", "replace")
            uid, gid = owners[i]
            perm = stat.S_IMODE(mode)
            if stat.S_ISREG(mode):
                key = inode_of[i]
                first = anchor[key]
                if first != i:
                    items.append(Item(Member(name, LNK, perm, linkname=names[first],
                                             uid=uid, gid=gid)))
                    continue
                content = contents.get(key)
                if content is None:
                    if sizes[i]:
                        raise UserError(f"{self.path}: payload lacks /{where}",
                                        hint="the file is corrupt; download the package again")
                    content = _Content(0, hashlib.sha256(b"").hexdigest(), data=b"")
                member = Member(name, REG, perm, size=content.size, uid=uid, gid=gid)
                cap_text = next((caps[j] for j in members[key] if caps[j]), b"")
                if cap_text:
                    xattr = self._caps(cap_text, where)
                    if xattr is not None:
                        member.xattrs[b"security.capability"] = xattr
                items.append(Item(member, path=content.path, data=content.data,
                                  digest=content.sha256))
            elif stat.S_ISDIR(mode):
                items.append(Item(Member(name, DIR, perm, uid=uid, gid=gid)))
            elif stat.S_ISLNK(mode):
                if not links[i]:
                    raise UserError(f"{self.path}: symlink /{where} has no target",
                                    hint="the file is corrupt; download the package again")
                items.append(Item(Member(name, SYM, perm, linkname=links[i], uid=uid, gid=gid)))
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                rdev = rdevs[i]
                items.append(Item(Member(name, CHR if stat.S_ISCHR(mode) else BLK, perm,
                                         devmajor=(rdev >> 8) & 0xFFF,
                                         devminor=(rdev & 0xFF) | ((rdev >> 12) & ~0xFF),
                                         uid=uid, gid=gid)))
            elif stat.S_ISFIFO(mode):
                items.append(Item(Member(name, FIFO, perm, uid=uid, gid=gid)))
            else:
                raise UserError(f"{self.path}: /{where} is a socket or unknown file type "
                                f"(mode {mode:o}), which a rootfs cannot hold")
        return items

    def _caps(self, text: bytes, where: str) -> bytes | None:
        caps = text.decode("utf-8", "replace")
        try:
            return caps_xattr(caps)
        except ValueError as e:
            raise UserError(f"{self.path}: /{where} has file capabilities {caps!r} that "
                            f"cannot be converted: {e}",
                            hint="use forms like 'cap_net_raw=ep' or "
                                 "'cap_net_admin,cap_net_raw+ep'") from None

    def _read_payload(self, rf: _RpmFile, hdr: _Header, names: list[bytes], modes: list[int],
                      sizes: list[int], flags: list[int],
                      inode_of: dict[int, tuple[int, int]],
                      members: dict[tuple[int, int], list[int]],
                      digests: list[bytes], digest_algo: str | None
                      ) -> dict[tuple[int, int], _Content]:
        by_name = {name: i for i, name in enumerate(names)}
        contents: dict[tuple[int, int], _Content] = {}
        compressor = hdr.string(T_PAYLOADCOMPRESSOR, "gzip") or "gzip"
        cpio = _Cpio(_decompressor(rf, compressor), self.source)
        while True:
            header = cpio.read(110)
            magic = header[:6]
            if magic == b"07070X":
                raise UserError(f"{self.path}: holds files of 4 GiB or more (a stripped cpio "
                                "payload), which is not supported")
            if magic not in (b"070701", b"070702"):
                raise UserError(f"{self.path}: rpm payload is not a cpio 'newc' archive",
                                hint="the file is corrupt or uses an unsupported format")
            try:
                fields = [int(header[6 + 8 * k:14 + 8 * k], 16) for k in range(13)]
            except ValueError:
                raise UserError(f"{self.path}: corrupt cpio header in the rpm payload") from None
            filesize, namesize = fields[6], fields[11]
            raw_name = cpio.read(namesize)
            cpio.align()
            if raw_name[:-1] == b"TRAILER!!!":
                break
            name = tarfmt.normalize_name(raw_name.rstrip(b"\0"), what=f"{self.path}: payload")
            i = by_name.get(name)
            if i is None:
                raise UserError(f"{self.path}: payload holds /{name.decode('utf-8', 'replace')}"
                                ", which the header does not list",
                                hint="the file is corrupt; download the package again")
            key = inode_of.get(i)
            linked = key is not None and len(members[key]) > 1
            if key is None or (filesize == 0 and sizes[i] and linked):
                cpio.read(filesize)  # not a file, or a hard link without the data
            elif filesize != sizes[i]:
                raise UserError(f"{self.path}: /{name.decode('utf-8', 'replace')} has "
                                f"{filesize} bytes in the payload but {sizes[i]} in the header",
                                hint="the file is corrupt; download the package again")
            else:
                contents[key] = self._store(cpio, filesize, i, name, digests[i], digest_algo)
            cpio.align()
        return contents

    def _store(self, cpio: _Cpio, size: int, i: int, name: bytes, digest: bytes,
               algo: str | None) -> _Content:
        sha = hashlib.sha256()
        check = hashlib.new(algo) if algo and digest and algo != "sha256" else None
        if size <= SMALL_FILE:
            data = cpio.read(size)
            sha.update(data)
            if check is not None:
                check.update(data)
            content = _Content(size, sha.hexdigest(), data=data)
        else:
            path = self.workdir / f"{self.number}-{i}"
            with open(path, "xb") as out:
                remaining = size
                while remaining:
                    chunk = cpio.read(min(remaining, _CHUNK))
                    out.write(chunk)
                    sha.update(chunk)
                    if check is not None:
                        check.update(chunk)
                    remaining -= len(chunk)
            content = _Content(size, sha.hexdigest(), path=path)
        got = check.hexdigest() if check is not None else content.sha256
        if digest and algo and got != digest.decode("ascii", "replace").lower():
            raise UserError(f"{self.path}: /{name.decode('utf-8', 'replace')} does not match "
                            "its digest in the rpm header",
                            hint="the file is corrupt; download the package again")
        return content


# ---------------------------------------------------------------------------


def plan_rpms(paths: list[Path], *, arch: str, passwd: dict[str, int], group: dict[str, int],
              workdir: Path, label: str = "rpms") -> tuple[FilePlan, RpmReport]:
    """Plan a layer holding the files of the rpm packages at `paths`.

    `arch` is the rootfs's architecture as uname names it; `passwd` and
    `group` map the rootfs's user and group names to numbers (see
    read_user_maps).  Contents of files larger than SMALL_FILE are written
    to `workdir`, an empty directory that must outlive the plan's write().
    """
    arch = _ARCH_ALIASES.get(arch, arch)
    plan = FilePlan("rpms", label)
    report = RpmReport()
    owners: dict[bytes, tuple[Item, str]] = {}
    names: dict[str, Path] = {}
    for number, path in enumerate(paths):
        pkg = _Reader(Path(path), number, arch=arch, passwd=passwd, group=group,
                      workdir=workdir).plan()
        if pkg.name in names:
            raise UserError(f"{path}: package {pkg.name} is also given as {names[pkg.name]}",
                            hint="give each package once")
        names[pkg.name] = pkg.rpm
        plan.inputs[str(path)] = pkg.sha256
        for item in pkg.items:
            seen = owners.get(item.member.name)
            if seen is None:
                owners[item.member.name] = (item, pkg.nevra)
                plan.add(item)
            elif _identity(seen[0]) != _identity(item):
                raise UserError(
                    f"{path}: /{item.member.name.decode('utf-8', 'replace')} of {pkg.nevra} "
                    f"conflicts with the one of {seen[1]}",
                    hint="both packages install it, differently; give only one of them")
        report.packages.append(RpmPackage(pkg.nevra, str(path), pkg.sha256, len(pkg.items),
                                          pkg.scriptlets))
    return plan, report


def _identity(item: Item) -> list[Any]:
    return item.describe() + [sorted(item.member.xattrs.items())]


__all__ = ["RpmPackage", "RpmReport", "caps_xattr", "plan_rpms", "read_user_maps"]
