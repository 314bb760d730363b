"""Install times in an exported rpm database (`rpmdb --exportdb`), clamped.

rpm < 4.18 records the clock as each package's RPMTAG_INSTALLTIME and the
transaction's RPMTAG_INSTALLTID, so two builds of the same rootfs differ in
their rpm database.  The rootfs's own rpm exports its database as a sequence
of headers (8-byte magic, index entry count, data size, index, data), this
module sets those two INT32 values to the epoch where they are later than
it, in place, and the rootfs's rpm imports the result into a new database.

In place: only the 4 bytes of each value change, so every other byte of
every header (its immutable region and signatures included) is what rpm
wrote.  python3-rpm cannot do this: it refuses to serialize an installed
header after a tag was changed ("can't unload bad header").
"""

from __future__ import annotations

import struct

from .errors import UserError

HEADER_MAGIC = b"\x8e\xad\xe8\x01\x00\x00\x00\x00"
RPMTAG_INSTALLTIME = 1008
RPMTAG_INSTALLTID = 1128
RPM_INT32_TYPE = 4
_INDEX_ENTRY = struct.Struct(">IIiI")  # tag, type, offset into the data, count


def clamp_install_times(export: bytes, epoch: int) -> bytes:
    """`export` with every INSTALLTIME and INSTALLTID later than `epoch` set
    to `epoch`."""
    data = bytearray(export)
    pos = 0
    while pos < len(data):
        if data[pos:pos + 8] != HEADER_MAGIC or pos + 16 > len(data):
            raise UserError(f"the rpm database export is damaged at byte {pos} "
                            "(no header magic)")
        count, store_size = struct.unpack_from(">II", data, pos + 8)
        store = pos + 16 + _INDEX_ENTRY.size * count
        end = store + store_size
        if end > len(data):
            raise UserError(f"the rpm database export is truncated at byte {pos}")
        for i in range(count):
            tag, kind, offset, n = _INDEX_ENTRY.unpack_from(data, pos + 16 + 16 * i)
            if tag not in (RPMTAG_INSTALLTIME, RPMTAG_INSTALLTID) or kind != RPM_INT32_TYPE:
                continue
            for j in range(n):
                at = store + offset + 4 * j
                if not store <= at <= end - 4:
                    raise UserError(f"the rpm database export has a bad tag {tag} at byte {pos}")
                (value,) = struct.unpack_from(">I", data, at)
                if value > epoch:
                    struct.pack_into(">I", data, at, epoch)
        pos = end
    return bytes(data)

