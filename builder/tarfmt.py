"""Tar bytes: the one place that parses and writes tar headers.

Reading accepts what GNU tar (libguestfs' tar_out) and Python's tarfile
write: ustar and GNU headers, pax extended headers, GNU long names and pax
sparse 1.0.  Writing produces one canonical form, so the same member always
becomes the same bytes:

- names are ``./path`` (directories ``./path/``, the root ``./``); a pax
  ``path``/``linkpath`` record only when the ustar field cannot hold it;
- numeric owners, empty uname/gname, integer mtime, no atime/ctime;
- xattrs as ``SCHILY.xattr.*`` records, sorted; POSIX ACLs in one form only:
  ``SCHILY.acl.access``/``SCHILY.acl.default`` text with numeric ids
  (``user::rw-,user:1000:r--,group::r--,mask::r--,other::---``).  GNU tar
  (libguestfs' tar_out) records an ACL twice, as that text (with user
  names from the machine that ran tar) and as the raw
  ``system.posix_acl_*`` xattr: the reader keeps the raw xattr's numeric
  truth, as text, and drops the xattr;
- hard links carry no data and no xattrs (the inode's data is on the anchor);
- files with long zero runs are written as pax sparse 1.0 (decided from the
  content, not from the source filesystem, so every producer agrees).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import struct
import zlib
from collections.abc import Iterator
from typing import BinaryIO

from .errors import UserError
from .fileio import ShortRead, copy_exactly

BLOCK = 512
END_OF_ARCHIVE = bytes(2 * BLOCK)
_ZERO_BLOCK = bytes(BLOCK)
# How much a reader asks its stream for at a time.
READ_CHUNK = 1 << 20

REG, LNK, SYM, CHR, BLK, DIR, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
TYPES = {REG, LNK, SYM, CHR, BLK, DIR, FIFO}
TYPE_NAMES = {REG: "file", LNK: "hardlink", SYM: "symlink", CHR: "char", BLK: "block",
              DIR: "dir", FIFO: "fifo"}

# A hole is a run of all-zero, HOLE_GRAIN-aligned blocks; only files of at
# least SPARSE_MIN bytes are scanned.
HOLE_GRAIN = 64 * 1024
SPARSE_MIN = 2 * HOLE_GRAIN
ZERO_GRAIN = bytes(HOLE_GRAIN)
_ZERO_GRAIN = ZERO_GRAIN

_PAX_NAME = b"././@PaxHeader"
_LINK_PLACEHOLDER = b"././@LongLink"
_OCTAL_LIMITS = {7: 8**7, 11: 8**11}


@dataclasses.dataclass(slots=True)
class Member:
    """One normalized tar member.

    name: path without leading ``./`` or trailing slash (root is b"").
    size: logical size of a regular file (the real size when sparse).
    sparse: data segments (offset, length) when stored sparse, else None.
    acls: ACL records (``SCHILY.acl.access``/``.default`` -> canonical text).
    """

    name: bytes
    type: bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime: int = 0
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[bytes, bytes] = dataclasses.field(default_factory=dict)
    acls: dict[bytes, bytes] = dataclasses.field(default_factory=dict)
    sparse: list[tuple[int, int]] | None = None

    @property
    def stored_size(self) -> int:
        """Bytes of data in the archive after the header (before padding)."""
        if self.type != REG:
            return 0
        if self.sparse is None:
            return self.size
        return len(sparse_map_block(self.sparse)) + sum(n for _, n in self.sparse)


class TarFormatError(UserError):
    """A tar stream that cannot be read."""


# ---------------------------------------------------------------------------
# names


def normalize_name(raw: bytes, *, what: str = "tar member") -> bytes:
    """Strip ``./``, ``/`` and trailing slashes; refuse ``..`` components."""
    name = raw[2:] if raw.startswith(b"./") else raw
    if name.endswith(b"/"):
        name = name[:-1]
    if not (name.startswith((b"/", b".")) or b"/." in name or b"//" in name
            or name.endswith(b"/")):
        return name  # the usual form: no empty, "." or ".." component left
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise TarFormatError(
            f"{what} {raw.decode('utf-8', 'backslashreplace')!r} escapes the rootfs with '..'",
            hint="names inside a rootfs must stay inside it")
    return b"/".join(parts)


def sort_key(name: bytes) -> bytes:
    """Component-wise order: a directory's whole subtree follows it."""
    return name.replace(b"/", b"\0")


# ---------------------------------------------------------------------------
# writing


def _octal(value: int, width: int) -> bytes:
    """A NUL-terminated octal field of `width` bytes (width-1 digits)."""
    return b"%0*o\0" % (width - 1, value)


@functools.lru_cache(maxsize=64)
def _pax_record(key: bytes, value: bytes) -> bytes:
    """One pax record (cached: a tree repeats the same few SELinux labels;
    see drop_caches)."""
    payload = b" " + key + b"=" + value + b"\n"
    n = len(payload) + 1
    while len(b"%d" % n) + len(payload) != n:
        n += 1
    return b"%d" % n + payload


# name, mode, uid, gid, size, mtime, checksum, typeflag, linkname, magic+version,
# uname, gname, devmajor, devminor, prefix and the 12 bytes of padding: 512
_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12s")


def block_sum(block: bytes | memoryview) -> int:
    """The sum of a 512-byte block's bytes (the tar checksum arithmetic).

    adler32's low half is 1 + the byte sum modulo 65521; a 256-byte half
    sums to at most 65280, so each half's sum is exact, and zlib does the
    adding in C."""
    view = memoryview(block)
    return (zlib.adler32(view[:256]) & 0xFFFF) + (zlib.adler32(view[256:]) & 0xFFFF) - 2


def _ustar_block(name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
                 typeflag: bytes, linkname: bytes, devmajor: int, devminor: int) -> bytes:
    block = _USTAR.pack(name, _octal(mode, 8), _octal(uid, 8), _octal(gid, 8),
                        _octal(size, 12), _octal(mtime, 12), b"        ", typeflag, linkname,
                        b"ustar\x0000", b"", b"", _octal(devmajor, 8), _octal(devminor, 8),
                        b"", b"")
    return block[:148] + b"%06o\0 " % block_sum(block) + block[156:]


@functools.lru_cache(maxsize=256)
def _pax_header_block(length: int) -> bytes:
    """The ustar block announcing `length` bytes of pax records (the same
    for every member whose records are that long)."""
    return _ustar_block(_PAX_NAME, 0o644, 0, 0, length, 0, b"x", b"", 0, 0)


def _fits(field: bytes, width: int) -> bool:
    return len(field) <= width and field.isascii() and b"\0" not in field


_PADDING = [bytes(n) for n in range(BLOCK)]


def padding(n: int) -> bytes:
    """The zeros that follow `n` bytes of data up to a block boundary."""
    return _PADDING[-n % BLOCK]


def sparse_map_block(segments: list[tuple[int, int]]) -> bytes:
    text = b"%d\n" % len(segments) + b"".join(b"%d\n%d\n" % seg for seg in segments)
    return text + padding(len(text))


def encode_header(m: Member, *, for_libarchive: bool = False) -> bytes:
    """The canonical header blocks (pax header included) for `m`.

    `for_libarchive`: the variant mke2fs -d (libarchive 3.6) reads right,
    not canonical: atime and ctime records equal to the mtime (it sets them
    from the tar), ``hdrcharset=BINARY`` when a name is not ASCII (so it
    takes names as bytes in any locale), and a non-empty ustar linkname
    field for links whose target travels in a pax ``linkpath`` record (an
    empty one makes it file a symlink's target as a hard link's)."""
    arcname = b"./" + m.name + b"/" if m.type == DIR and m.name else b"./" + m.name
    if m.type == LNK:
        link = b"./" + m.linkname
    elif m.type == SYM:
        link = m.linkname
    else:
        link = b""
    records: list[tuple[bytes, bytes]] = []
    size = m.stored_size
    ustar_name = arcname
    if m.sparse is not None:
        head, _, base = arcname.rpartition(b"/")
        ustar_name = (head + b"/GNUSparseFile.0/" + base)[:100]
        if not _fits(ustar_name, 100):
            ustar_name = b"./GNUSparseFile.0/sparse"
        records += [(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"),
                    (b"GNU.sparse.name", arcname), (b"GNU.sparse.realsize", b"%d" % m.size)]
    elif not _fits(arcname, 100):
        records.append((b"path", arcname))
        ustar_name = b""
    if link and not _fits(link, 100):
        records.append((b"linkpath", link))
        link = b""
    uid, gid = m.uid, m.gid
    if uid >= _OCTAL_LIMITS[7]:
        records.append((b"uid", b"%d" % uid))
        uid = 0
    if gid >= _OCTAL_LIMITS[7]:
        records.append((b"gid", b"%d" % gid))
        gid = 0
    if size >= _OCTAL_LIMITS[11]:
        records.append((b"size", b"%d" % size))
    mtime = min(max(m.mtime, 0), _OCTAL_LIMITS[11] - 1)
    if for_libarchive:
        records += [(b"atime", b"%d" % mtime), (b"ctime", b"%d" % mtime)]
        if not (m.name.isascii() and m.linkname.isascii()):
            records.append((b"hdrcharset", b"BINARY"))
        if m.type in (SYM, LNK) and not link:
            link = _LINK_PLACEHOLDER
    if m.type != LNK:
        if m.acls:
            records += sorted(m.acls.items())
        if m.xattrs:
            records += [(b"SCHILY.xattr." + k, v) for k, v in sorted(m.xattrs.items())]
    out = b""
    if records:
        pax = b"".join(_pax_record(k, v) for k, v in records)
        out = _pax_header_block(len(pax)) + pax + padding(len(pax))
    ustar_size = size if size < _OCTAL_LIMITS[11] else 0
    if not ustar_name:
        ustar_name = arcname[:100] if arcname.isascii() else b"./@LongName"
    return out + _ustar_block(ustar_name, m.mode & 0o7777, uid, gid, ustar_size, mtime,
                              m.type, link, m.devmajor, m.devminor)


def spool_and_scan(read, size: int, spool: BinaryIO) -> list[tuple[int, int]] | None:
    """Copy `size` bytes from read(n) to `spool`, noting all-zero grains.

    Returns the data segments when the file has holes, else None.  This is
    the one sparse rule every producer goes through.
    """
    segments: list[tuple[int, int]] = []
    pos = 0
    start: int | None = None
    while pos < size:
        want = min(HOLE_GRAIN, size - pos)
        grain = read(want)
        while grain and len(grain) < want:  # readers may return short chunks:
            more = read(want - len(grain))  # grains must stay aligned to the file
            if not more:
                break
            grain += more
        if len(grain) != want:
            raise TarFormatError("file data ended early")
        spool.write(grain)
        if len(grain) == HOLE_GRAIN and grain == _ZERO_GRAIN:
            if start is not None:
                segments.append((start, pos - start))
                start = None
        elif start is None:
            start = pos
        pos += len(grain)
    if start is not None:
        segments.append((start, pos - start))
    if sum(n for _, n in segments) == size:
        return None
    if not segments or segments[-1][0] + segments[-1][1] != size:
        # readers take the real size from the map's end as well: say it.
        segments.append((size, 0))
    return segments


# ---------------------------------------------------------------------------
# reading


def _parse_number(field: bytes) -> int:
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        if field[0] & 0x40:
            value -= 1 << (8 * (len(field) - 1))
        return value
    end = field.find(b"\0")
    text = field if end < 0 else field[:end]
    try:
        return int(text, 8)   # int() skips the same surrounding whitespace strip() would
    except ValueError:
        if text.strip():
            raise
        return 0


@functools.lru_cache(maxsize=64)
def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    """The records of a pax header (cached, so callers must not change the
    dict: most members of a tree carry one of a few identical headers)."""
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= 0:
            raise ValueError("bad pax record length")
        record = data[space + 1:pos + length - 1]
        key, _, value = record.partition(b"=")
        out[key] = value
        pos += length
    return out


def drop_caches() -> None:
    """Empty the header caches once a whole stream is parsed
    (build_layer_from_tar).

    They are small, but their entries come and go all through a stream, so
    the ones left at its end sit among the stream's short-lived per-member
    objects, and each keeps the pymalloc arena (1 MiB) around it from
    going back to the system (heap.give_back).  With the collection in
    heap.give_back, the 1 GB bench base's cold build holds 15 arenas when
    its assembly starts instead of 21: as many as the 0.25 GB base."""
    for cached in (_pax_record, _pax_header_block, _parse_pax):
        cached.cache_clear()


def _truncated() -> TarFormatError:
    return TarFormatError("tar stream ends in the middle of a member",
                          hint="the input is truncated")


class TarReader:
    """Iterate members of a tar stream; data must be consumed via read_data()
    (or skipped) before asking for the next member.

    The stream is read in chunks of `chunk` bytes (any f.read(n) that returns
    at most n bytes and b"" at the end will do) and parsed from memory, so a
    header costs no read call.  Chunks are kept as immutable bytes: a view
    from read_view() stays valid after the reader moved on."""

    def __init__(self, f: BinaryIO, *, source: str, chunk: int = READ_CHUNK):
        self.f = f
        self.source = source
        self._chunk = chunk
        self._buf = b""
        self._view = memoryview(self._buf)
        self._pos = 0
        self._remaining = 0
        self._pad = 0
        self._global: dict[bytes, bytes] = {}
        self._what_member = f"{source}: member"
        self._what_link = f"{source}: hard link target"

    # -- the buffer ---------------------------------------------------------
    def _more(self) -> bool:
        """Append the next chunk of the stream to what is left; False at its end."""
        chunk = self.f.read(self._chunk)
        if not chunk:
            return False
        if not isinstance(chunk, bytes):
            chunk = bytes(chunk)
        if self._pos < len(self._buf):
            chunk = self._buf[self._pos:] + chunk
        self._buf, self._view, self._pos = chunk, memoryview(chunk), 0
        return True

    def _take(self, n: int) -> bytes:
        """Exactly n bytes (a copy), or TarFormatError at the stream's end."""
        end = self._pos + n
        if end <= len(self._buf):
            out = self._buf[self._pos:end]
            self._pos = end
            return out
        parts = [self._buf[self._pos:]]
        have = len(parts[0])
        self._buf, self._view, self._pos = b"", memoryview(b""), 0
        while have < n:
            if not self._more():
                raise _truncated()
            need = n - have
            if len(self._buf) > need:
                parts.append(self._buf[:need])
                self._pos = need
                have = n
            else:
                parts.append(self._buf)
                have += len(self._buf)
                self._buf, self._view, self._pos = b"", memoryview(b""), 0
        return b"".join(parts)

    def _skip(self, n: int) -> None:
        while n:
            if self._pos >= len(self._buf) and not self._more():
                raise _truncated()
            step = min(n, len(self._buf) - self._pos)
            self._pos += step
            n -= step

    # -- data of the current member -----------------------------------------
    def read_view(self, n: int = READ_CHUNK) -> memoryview:
        """Up to `n` bytes of the current member's stored data, without
        copying (possibly fewer, never none before its end); empty at its end."""
        if self._remaining <= 0:
            return memoryview(b"")
        if self._pos >= len(self._buf) and not self._more():
            raise _truncated()
        k = min(n, self._remaining, len(self._buf) - self._pos)
        view = self._view[self._pos:self._pos + k]
        self._pos += k
        self._remaining -= k
        return view

    def read_data(self, n: int = READ_CHUNK) -> bytes:
        """Up to `n` bytes of the current member's stored data (exactly n
        while that much is left); b"" at its end."""
        want = min(n, self._remaining)
        if want <= 0:
            return b""
        end = self._pos + want
        if end <= len(self._buf):
            out = self._buf[self._pos:end]
            self._pos = end
        else:
            out = self._take(want)
        self._remaining -= want
        return out

    def __iter__(self) -> Iterator[Member]:
        while True:
            self.skip_data()
            member = self._next()
            if member is None:
                return
            yield member

    def dense_reader(self, m: Member):
        """A read(n) over the current member's content with holes filled in."""
        if m.sparse is None:
            return self.read_view
        segments = list(m.sparse)
        pos = 0

        def read(n: int = READ_CHUNK) -> bytes | memoryview:
            nonlocal pos
            while segments and segments[0][1] == 0 and segments[0][0] <= pos:
                segments.pop(0)
            if pos >= m.size:
                return b""
            if segments and segments[0][0] <= pos:
                off, length = segments[0]
                chunk = self.read_view(min(n, off + length - pos))
                if not chunk:
                    raise TarFormatError(f"{self.source}: sparse member data ends early")
                pos += len(chunk)
                if pos == off + length:
                    segments.pop(0)
                return chunk
            next_data = segments[0][0] if segments else m.size
            hole = min(n, next_data - pos)
            pos += hole
            return bytes(hole)

        return read

    def skip_data(self) -> None:
        if self._remaining > 0:
            self._skip(self._remaining)
            self._remaining = 0
        if self._pad:
            self._skip(self._pad)
            self._pad = 0

    def _header(self) -> bytes | None:
        """The next 512-byte block; None at the stream's end."""
        end = self._pos + BLOCK
        if end <= len(self._buf):
            block = self._buf[self._pos:end]
            self._pos = end
            return block
        if self._pos >= len(self._buf) and not self._more():
            return None
        return self._take(BLOCK)

    def _next(self) -> Member | None:
        pax: dict[bytes, bytes] = {}
        longname = longlink = None
        while True:
            block = self._header()
            if block is None or block == _ZERO_BLOCK:
                return None
            try:
                checksum = _parse_number(block[148:156])
            except ValueError:
                checksum = -1
            if checksum != block_sum(block) - sum(block[148:156]) + 256:
                raise TarFormatError(f"{self.source}: not a tar stream (bad header checksum)",
                                     hint="is the input really a tar archive?")
            typeflag = block[156:157]
            size = _parse_number(block[124:136])
            if typeflag in (b"x", b"g", b"L", b"K"):
                if size < 0:
                    raise _truncated()
                payload = self._take(size + (-size % BLOCK))[:size]
                if typeflag == b"x":
                    pax.update(self._parse_pax(payload))
                elif typeflag == b"g":
                    self._global.update(self._parse_pax(payload))
                elif typeflag == b"L":
                    longname = payload.rstrip(b"\0")
                else:
                    longlink = payload.rstrip(b"\0")
                continue
            return self._member(block, typeflag, size,
                                {**self._global, **pax} if self._global else pax,
                                longname, longlink)

    def _parse_pax(self, payload: bytes) -> dict[bytes, bytes]:
        try:
            return _parse_pax(payload)
        except ValueError:
            raise TarFormatError(f"{self.source}: malformed pax header") from None

    def _member(self, block: bytes, typeflag: bytes, size: int, pax: dict[bytes, bytes],
                longname: bytes | None, longlink: bytes | None) -> Member:
        name = block[0:100].split(b"\0", 1)[0]
        if block[257:265] == b"ustar\x0000":
            prefix = block[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        name = pax.get(b"path", longname or name)
        linkname = pax.get(b"linkpath", longlink or block[157:257].split(b"\0", 1)[0])
        if typeflag in (b"\0", b"7"):
            typeflag = REG
        if typeflag not in TYPES:
            raise TarFormatError(
                f"{self.source}: member {name.decode('utf-8', 'replace')!r} has tar type "
                f"{typeflag!r}, which a rootfs cannot hold")
        try:
            size = int(pax[b"size"]) if b"size" in pax else size
            m = Member(
                name=b"",
                type=typeflag,
                mode=_parse_number(block[100:108]) & 0o7777,
                uid=int(pax[b"uid"]) if b"uid" in pax else _parse_number(block[108:116]),
                gid=int(pax[b"gid"]) if b"gid" in pax else _parse_number(block[116:124]),
                mtime=int(float(pax[b"mtime"])) if b"mtime" in pax
                else _parse_number(block[136:148]),
                devmajor=_parse_number(block[329:337]) if typeflag in (CHR, BLK) else 0,
                devminor=_parse_number(block[337:345]) if typeflag in (CHR, BLK) else 0,
            )
            # base-256 fields can hold what the canonical header cannot write back
            if not (size >= 0 and 0 <= m.uid < 1 << 32 and 0 <= m.gid < 1 << 32
                    and 0 <= m.devmajor < _OCTAL_LIMITS[7]
                    and 0 <= m.devminor < _OCTAL_LIMITS[7]):
                raise ValueError("out of range")
        except ValueError:
            raise TarFormatError(f"{self.source}: malformed numeric field in tar header") from None
        # Only regular files keep data; a hard link's optional copy is skipped.
        stored = size if typeflag in (REG, LNK) else 0
        if pax:
            xattrs = m.xattrs
            for key, value in pax.items():
                if key.startswith(b"SCHILY.xattr."):
                    xattrs[key[13:]] = value
                elif key in ACL_RECORDS:
                    m.acls[key] = value
            if xattrs:
                for key, xattr in ACL_RECORDS.items():
                    raw = xattrs.pop(xattr, None)
                    if raw is not None:
                        m.acls[key] = self._acl_text(raw, name)
            selinux = pax.get(b"RHT.security.selinux")
            if selinux is not None and b"security.selinux" not in xattrs:
                xattrs[b"security.selinux"] = selinux + b"\0"
        if pax and pax.get(b"GNU.sparse.major") == b"1" and pax.get(b"GNU.sparse.minor") == b"0":
            name = pax.get(b"GNU.sparse.name", name)
            self._remaining = stored
            self._pad = -stored % BLOCK
            try:
                m.size = int(pax[b"GNU.sparse.realsize"])
                m.sparse = self._read_sparse_map()
            except (KeyError, ValueError):
                raise TarFormatError(f"{self.source}: malformed pax sparse map") from None
        elif typeflag == b"S" or (pax and b"GNU.sparse.map" in pax):
            raise TarFormatError(f"{self.source}: old GNU sparse formats are not supported",
                                 hint="write the tar with --format=posix")
        else:
            m.size = size if typeflag == REG else 0
            self._remaining = stored
            self._pad = -stored % BLOCK
        m.name = normalize_name(name, what=self._what_member)
        if typeflag == LNK:
            m.linkname = normalize_name(linkname, what=self._what_link)
            m.xattrs.clear()  # inode data lives on the anchor
            m.acls.clear()
        elif typeflag == SYM:
            m.linkname = linkname
        return m

    def _acl_text(self, raw: bytes, name: bytes) -> bytes:
        try:
            return acl_text(raw)
        except ValueError as e:
            raise TarFormatError(f"{self.source}: member "
                                 f"{name.decode('utf-8', 'replace')!r}: bad ACL xattr: {e}"
                                 ) from None

    def _read_sparse_map(self) -> list[tuple[int, int]]:
        # The map is newline-separated decimals at the start of the data,
        # padded to a block boundary.
        text = b""
        numbers: list[int] = []
        count = None
        consumed = 0
        while count is None or len(numbers) < 1 + 2 * count:
            chunk = self._take(BLOCK)
            consumed += BLOCK
            text += chunk
            *complete, text = text.split(b"\n")
            for item in complete:
                numbers.append(int(item))
                if count is None:
                    count = numbers[0]
        self._remaining -= consumed
        return [(numbers[1 + 2 * i], numbers[2 + 2 * i]) for i in range(count)]


# ---------------------------------------------------------------------------
# POSIX ACLs: canonical text <-> the Linux xattr form (system.posix_acl_*:
# version 2, then (tag, perm, id) entries sorted by tag and id, the order the
# kernel itself returns)

ACL_RECORDS = {b"SCHILY.acl.access": b"system.posix_acl_access",
               b"SCHILY.acl.default": b"system.posix_acl_default"}
_ACL_TAGS = {b"user": 0x01, b"u": 0x01, b"group": 0x04, b"g": 0x04,
             b"mask": 0x10, b"m": 0x10, b"other": 0x20, b"o": 0x20}
_ACL_NAMED = {0x01: 0x02, 0x04: 0x08}
_ACL_WORDS = {0x01: b"user", 0x02: b"user", 0x04: b"group", 0x08: b"group", 0x10: b"mask",
              0x20: b"other"}
_ACL_UNDEFINED_ID = 0xFFFFFFFF


def acl_text(raw: bytes) -> bytes:
    """The canonical text of a system.posix_acl_* xattr value (numeric ids)."""
    if len(raw) < 4 or (len(raw) - 4) % 8 or int.from_bytes(raw[:4], "little") != 2:
        raise ValueError("not a version 2 POSIX ACL")
    parts = []
    for off in range(4, len(raw), 8):
        tag = int.from_bytes(raw[off:off + 2], "little")
        perm = int.from_bytes(raw[off + 2:off + 4], "little")
        ident = int.from_bytes(raw[off + 4:off + 8], "little")
        if tag not in _ACL_WORDS:
            raise ValueError(f"unknown ACL tag {tag:#x}")
        qualifier = b"%d" % ident if tag in (0x02, 0x08) else b""
        bits = bytes(ch if perm & bit else ord("-")
                     for ch, bit in ((ord("r"), 4), (ord("w"), 2), (ord("x"), 1)))
        parts.append(_ACL_WORDS[tag] + b":" + qualifier + b":" + bits)
    return b",".join(parts)


def acl_xattr(text: bytes, where: str) -> bytes:
    """The system.posix_acl_* xattr value for an ACL in tar text form
    (``user::rw-,user:1000:r--,group::r--,mask::r--,other::---``; a named
    entry may carry its numeric id as a 4th field, as star and libarchive
    write it)."""
    entries = []
    for raw in text.replace(b"\n", b",").split(b","):
        part = raw.split(b"#", 1)[0].strip()
        if not part:
            continue
        fields = part.split(b":")
        if len(fields) < 3 or fields[0] not in _ACL_TAGS:
            raise UserError(f"{where}: cannot read ACL entry {part.decode('utf-8', 'replace')!r}")
        tag = _ACL_TAGS[fields[0]]
        qualifier = fields[1]
        perm = 0
        for ch, bit in ((b"r", 4), (b"w", 2), (b"x", 1)):
            if ch in fields[2]:
                perm |= bit
        ident = _ACL_UNDEFINED_ID
        if qualifier:
            if tag not in _ACL_NAMED:
                raise UserError(f"{where}: ACL entry {part.decode('utf-8', 'replace')!r} "
                                "cannot name a user or group")
            tag = _ACL_NAMED[tag]
            if qualifier.isdigit():
                ident = int(qualifier)
            elif len(fields) > 3 and fields[3].isdigit():
                ident = int(fields[3])
            else:
                raise UserError(
                    f"{where}: ACL entry {part.decode('utf-8', 'replace')!r} names a user or "
                    "group without its numeric id",
                    hint="the id cannot be looked up outside the rootfs; use numeric ids")
        entries.append((tag, perm, ident))
    entries.sort(key=lambda e: (e[0], e[2]))
    out = bytearray((2).to_bytes(4, "little"))
    for tag, perm, ident in entries:
        out += tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + ident.to_bytes(4, "little")
    return bytes(out)


def member_data_size(m: Member) -> int:
    """Bytes of segment data (excluding the sparse map) stored for `m`."""
    if m.type != REG:
        return 0
    if m.sparse is None:
        return m.size
    return sum(n for _, n in m.sparse)


def write_member(out: BinaryIO, m: Member, data: BinaryIO | None, *,
                 for_libarchive: bool = False) -> int:
    """Write `m` with its data segments read from `data`; returns bytes written."""
    header = encode_header(m, for_libarchive=for_libarchive)
    out.write(header)
    written = len(header)
    if m.type == REG:
        if m.sparse is not None:
            block = sparse_map_block(m.sparse)
            out.write(block)
            written += len(block)
        remaining = member_data_size(m)
        if remaining:
            assert data is not None
            try:
                copy_exactly(data.read, out.write, remaining)
            except ShortRead:
                raise TarFormatError("file data ended early") from None
            written += remaining
        pad = padding(m.stored_size)
        out.write(pad)
        written += len(pad)
    return written


def read_all(data: bytes, source: str = "tar") -> list[tuple[Member, bytes]]:
    """Parse a whole in-memory tar (tests and small layers)."""
    reader = TarReader(io.BytesIO(data), source=source)
    out = []
    for m in reader:
        chunks = []
        while chunk := reader.read_data():
            chunks.append(chunk)
        out.append((m, b"".join(chunks)))
    return out
