"""openEuler-shaped sample images, for the demo and the test suite.

The image has the layout of the openEuler 22.03 LTS qcow2: an MBR disk,
p1 = /boot (ext4), p2 = / (ext4, usr-merged), openEuler's os-release, and
a working bash (copied from the build host with the libraries it needs)
so steps can run inside it.  With `fidelity=True` it also holds every
case the output must carry unchanged: all file types, setuid/setgid/sticky
modes, owners with no passwd entry, large uids, hard links across
directories, devices, fifos, sparse files, xattrs (security.selinux,
security.capability, user.*, trusted.*), an ACL, long, non-ASCII and
non-UTF-8 names, relative, absolute and dangling symlinks.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

from . import guestfs_io, runner, tarfmt
from .tarfmt import BLK, CHR, DIR, FIFO, LNK, REG, SYM, Member

MTIME = 1650000000  # files get fixed times, so only mkfs-made dirs carry "now"

OS_RELEASE = b"""NAME="openEuler"
VERSION="22.03 LTS"
ID="openEuler"
VERSION_ID="22.03"
PRETTY_NAME="openEuler 22.03 LTS"
ANSI_COLOR="0;31"
"""

# Enough of a userland for element scripts (diskimage-builder's included).
HOST_TOOLS = ("bash", "env", "cat", "ls", "mkdir", "touch", "rm", "sleep", "id", "sed", "dirname",
              "grep", "install")

SPARSE_SIZE = 48 << 20
SPARSE_DATA = [(4 << 20, b"middle"), (SPARSE_SIZE - 5, b"tail\n")]


class TarStream:
    """A tar written member by member to `f`, each missing parent directory
    added before its first child."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.names: set[bytes] = set()

    def _parents(self, name: bytes) -> None:
        parts = name.split(b"/")[:-1]
        for i in range(1, len(parts) + 1):
            d = b"/".join(parts[:i])
            if d not in self.names:
                self.add(Member(d, DIR, 0o755, mtime=MTIME))

    def add(self, m: Member, data: BinaryIO | None = None) -> None:
        self._parents(m.name)
        self.names.add(m.name)
        tarfmt.write_member(self.f, m, data)

    def close(self) -> None:
        self.f.write(tarfmt.END_OF_ARCHIVE)


class _TarBuilder(TarStream):
    """A small TarStream in memory."""

    def __init__(self) -> None:
        super().__init__(io.BytesIO())

    def data(self, m: Member, data: bytes) -> None:
        if m.sparse is None:
            m.size = len(data)
        self.add(m, io.BytesIO(data))

    def file(self, name: str | bytes, data: bytes, mode: int = 0o644, **kw: object) -> None:
        n = name if isinstance(name, bytes) else name.encode()
        self.data(Member(n, REG, mode, mtime=MTIME, **kw), data)  # type: ignore[arg-type]

    def getvalue(self) -> bytes:
        self.close()
        return self.f.getvalue()  # type: ignore[attr-defined]


def _host_libs(binary: str) -> list[str]:
    out = runner.run([runner.find_tool("ldd", needed_for="the sample image"), binary],
                     env=None, what="ldd", check=False).stdout.decode("utf-8", "replace")
    libs = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            libs.append(parts[2])
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])
    return libs


def fake_elf(machine: int) -> bytes:
    """A 64-byte little-endian ELF64 executable header for `machine` (not runnable)."""
    ident = b"\x7fELF\x02\x01\x01" + bytes(9)
    return (ident + (2).to_bytes(2, "little") + machine.to_bytes(2, "little")
            + (1).to_bytes(4, "little") + bytes(24) + (64).to_bytes(2, "little") + bytes(12))


ELF_MACHINES = {"x86_64": 62, "aarch64": 183}


def fake_module(name: str, kernel: str, machine: int = 62) -> bytes:
    """A minimal ELF64 relocatable object whose .modinfo section names
    `kernel` in its vermagic, like a kernel module's (not loadable)."""
    import struct

    modinfo = (f"license=GPL\0description=stand-in, not a kernel module\0name={name}\0"
               f"vermagic={kernel} SMP mod_unload modversions \0").encode()
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    data = modinfo + shstrtab
    shoff = (64 + len(data) + 7) & ~7
    header = (b"\x7fELF\x02\x01\x01" + bytes(9)
              + struct.pack("<HHIQQQIHHHHHH", 1, machine, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2))

    def section(name_off: int, kind: int, offset: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name_off, kind, 0, 0, offset, size, 0, 0, 1, 0)

    sections = (bytes(64) + section(1, 1, 64, len(modinfo))
                + section(10, 3, 64 + len(modinfo), len(shstrtab)))
    return header + data + bytes(shoff - 64 - len(data)) + sections


def root_tree(*, fidelity: bool, arch: str | None = None) -> bytes:
    """The tar of the root filesystem.  For an `arch` other than the build
    host's, the programs are ELF headers of that arch, not working binaries."""
    t = _TarBuilder()
    for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "usr/libexec", "etc", "var/lib",
              "var/run", "var/cache", "var/log", "home", "root", "tmp", "boot", "dev", "proc",
              "sys", "run", "mnt", "opt"):
        mode = 0o1777 if d == "tmp" else 0o555 if d in ("proc", "sys") else 0o755
        t.add(Member(d.encode(), DIR, mode, mtime=MTIME))
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"),
                         ("lib64", "usr/lib64")):
        t.add(Member(link.encode(), SYM, 0o777, mtime=MTIME, linkname=target.encode()))
    t.file("etc/os-release", OS_RELEASE)
    t.file("etc/fstab", b"/dev/sda2 / ext4 defaults 0 1\n/dev/sda1 /boot ext4 defaults 0 2\n")
    t.file("etc/passwd", b"root:x:0:0:root:/root:/bin/bash\n")
    t.file("etc/group", b"root:x:0:\n")
    t.file("etc/hostname", b"openeuler-demo\n")
    copied: set[str] = set()
    if arch is not None and arch != os.uname().machine:
        for tool in HOST_TOOLS:
            t.file(f"usr/bin/{tool}", fake_elf(ELF_MACHINES[arch]), 0o755)
    for tool in HOST_TOOLS if arch is None or arch == os.uname().machine else ():
        host = f"/usr/bin/{tool}"
        if not os.path.exists(host):
            continue
        real = os.path.realpath(host)
        if os.path.basename(real) != tool:
            t.add(Member(f"usr/bin/{tool}".encode(), SYM, 0o777, mtime=MTIME,
                         linkname=os.path.basename(real).encode()))
            continue
        with open(real, "rb") as f:
            t.file(f"usr/bin/{tool}", f.read(), 0o755)
        for lib in _host_libs(real):
            if lib in copied:
                continue
            copied.add(lib)
            # Keep the host's path, inside the usr-merged tree.
            target = lib[1:] if lib.startswith("/usr/") else "usr" + lib
            with open(os.path.realpath(lib), "rb") as f:
                t.file(target, f.read(), 0o755)
    t.add(Member(b"usr/bin/sh", SYM, 0o777, mtime=MTIME, linkname=b"bash"))
    if fidelity:
        _fidelity_cases(t)
    return t.getvalue()


def _fidelity_cases(t: _TarBuilder) -> None:
    cap = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep
    t.file("usr/bin/ping-like", b"\x7fELF-not-really\n", 0o4755,
           xattrs={b"security.capability": cap,
                   b"security.selinux": b"system_u:object_r:ping_exec_t:s0\0"})
    t.file("usr/bin/setgid-tool", b"sg\n", 0o2711, gid=5)
    t.add(Member(b"srv", DIR, 0o755, mtime=MTIME))
    t.add(Member(b"srv/sticky", DIR, 0o1777, mtime=MTIME))
    t.add(Member(b"srv/empty", DIR, 0o700, uid=1000, gid=1000, mtime=MTIME))
    t.file("srv/owned-by-nobody-known", b"uid without passwd entry\n", 0o640, uid=12345,
           gid=54321)
    t.file("srv/huge-uid", b"uid beyond ustar octal\n", 0o600, uid=4000000, gid=4000001)
    t.file("srv/xattrs", b"xattrs\n", 0o644,
           xattrs={b"user.comment": b"hello", b"user.binary": bytes(range(0, 256, 7)),
                   b"trusted.overlay.test": b"y",
                   b"security.selinux": b"system_u:object_r:etc_t:s0\0"})
    t.file("srv/acl", b"acl\n", 0o640,
           acls={b"SCHILY.acl.access": b"user::rw-,user:1000:r--,group::r--,mask::r--,"
                                        b"other::---"})
    # hard links whose walk order and sorted order differ
    t.file("srv/links/b-first", b"shared inode\n", 0o644)
    t.add(Member(b"srv/a-link", LNK, 0o644, mtime=MTIME, linkname=b"srv/links/b-first"))
    t.add(Member(b"srv/links/z-link", LNK, 0o644, mtime=MTIME, linkname=b"srv/links/b-first"))
    t.add(Member(b"srv/rel-link", SYM, 0o777, mtime=MTIME, linkname=b"links/b-first"))
    t.add(Member(b"srv/abs-link", SYM, 0o777, mtime=MTIME, linkname=b"/etc/os-release"))
    t.add(Member(b"srv/dangling", SYM, 0o777, mtime=MTIME, linkname=b"/no/such/file"))
    t.add(Member(b"srv/dev", DIR, 0o755, mtime=MTIME))
    t.add(Member(b"srv/dev/null", CHR, 0o666, mtime=MTIME, devmajor=1, devminor=3))
    t.add(Member(b"srv/dev/sda9", BLK, 0o660, gid=6, mtime=MTIME, devmajor=8, devminor=9))
    t.add(Member(b"srv/dev/fifo", FIFO, 0o620, mtime=MTIME))
    long_dir = "d" * 120
    t.file(f"srv/{long_dir}/{'f' * 200}", b"long name\n")
    t.file("srv/ünïcødé-名前", b"utf-8 name\n")
    t.file(b"srv/latin1-\xe9\xff", b"not utf-8 name\n")
    t.file("srv/space and 'quote' \"dq\"", b"odd chars\n")
    segments = [(off, len(data)) for off, data in SPARSE_DATA]
    t.data(Member(b"srv/sparse", REG, 0o644, size=SPARSE_SIZE, mtime=MTIME, sparse=segments),
           b"".join(data for _, data in SPARSE_DATA))
    t.file("srv/empty-file", b"", 0o444)


def boot_tree() -> bytes:
    t = _TarBuilder()
    t.file("vmlinuz-5.10.0-60.18.0.50.oe2203.x86_64", b"not a kernel\n", 0o755)
    t.add(Member(b"grub2", DIR, 0o700, mtime=MTIME))
    t.file("grub2/grub.cfg", b"# demo\n", 0o600)
    return t.getvalue()


def make(path: Path, *, fidelity: bool = False, fmt: str = "qcow2",
         arch: str | None = None) -> None:
    """Write an openEuler-shaped disk image to `path` (atomically)."""
    work = path.parent / f".{path.name}.trees-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        root_tar = work / "root.tar"
        boot_tar = work / "boot.tar"
        root_tar.write_bytes(root_tree(fidelity=fidelity, arch=arch))
        boot_tar.write_bytes(boot_tree())
        guestfs_io.make_disk_image(
            path, fmt=fmt, size_mib=256,
            partitions=[guestfs_io.Partition("/boot", 64), guestfs_io.Partition("/", None)],
            trees={"/": root_tar, "/boot": boot_tar}, label=f"sample image {path.name}")
    finally:
        for p in work.iterdir():
            p.unlink()
        work.rmdir()
