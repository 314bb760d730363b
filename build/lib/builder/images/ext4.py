"""The raw ext4 image: one filesystem, no partition table, from the tar.

Route (all rootless, nothing unpacked on the build host):

1. ``mke2fs -d -`` (e2fsprogs >= 1.47.1) reads the tar on stdin and writes
   the tree: owners, modes (setuid/setgid/sticky), devices, fifos,
   symlinks, hard links, file data (zero blocks become holes), mtimes.
   The tar reaches it through a small filter that (a) marks non-ASCII
   names ``hdrcharset=BINARY`` so libarchive takes them as bytes in any
   locale, (b) gives each hard link its target's mode/owner/mtime (mke2fs
   applies the link header's metadata to the shared inode), (c) sets
   atime and ctime to the mtime, and (d) drops xattrs and ACLs, because
   mke2fs keeps only security.capability of them.
2. ``debugfs -w -f cmds`` then sets every xattr and ACL of the tree with
   ``ea_set -f value`` (security.selinux with its NUL, security.capability,
   trusted.*, user.*, system.posix_acl_*), walking the tree with relative
   ``cd`` so no command line grows long; and removes /lost+found when the
   tree has none.
3. ``e2fsck -fn`` checks the result.

Bit-for-bit reproducibility: every time the tools write comes from
E2FSPROGS_FAKE_TIME/SOURCE_DATE_EPOCH (= the epoch), the UUID and the
directory hash seed are fixed (-U, -E hash_seed), the feature set, block
size, inode size, inode count, journal size and reserved blocks are all
given explicitly and MKE2FS_CONFIG points at a file written here, so the
host's /etc/mke2fs.conf cannot change the layout.  The same tar and the
same e2fsprogs version give the same bytes; the version is recorded.

Size: see `fit_geometry`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from pathlib import Path
from typing import BinaryIO

from .. import runner, tarfmt
from ..errors import UserError
from ..tarfmt import LNK, REG
from .scan import FS_BLOCK, TreeScan, member_xattrs, show

INODE_SIZE = 256
BLOCKS_PER_GROUP = 8 * FS_BLOCK
DESC_SIZE = 64  # 64bit feature
BYTES_PER_INODE = 16384  # inode ratio for the space beyond the tree
MIN_BLOCKS = 4096  # 16 MiB: room for the smallest journal
ALIGN_BLOCKS = 256  # sizes are whole MiB
FIXED_OVERHEAD_BLOCKS = 64  # root, lost+found, resize inode, slack
MAX_ATTEMPTS = 4  # fitted sizes grow by a quarter when an estimate was short

FEATURES = ("has_journal", "ext_attr", "resize_inode", "dir_index", "filetype", "extent",
            "64bit", "flex_bg", "sparse_super", "large_file", "huge_file", "dir_nlink",
            "extra_isize", "metadata_csum")

# Kernel 4.18+ mounts this (metadata_csum needs 3.18, 64bit 3.x); no
# orphan_file / metadata_csum_seed / inline_data, which old DPU kernels lack.
MKE2FS_CONF = f"""\
[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = {FS_BLOCK}
	inode_size = {INODE_SIZE}
	inode_ratio = {BYTES_PER_INODE}
	reserved_ratio = 0

[fs_types]
	ext4 = {{
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}}
	rootfs = {{
		inode_size = {INODE_SIZE}
	}}
"""

_NO_SPACE = ("Could not allocate", "No space left", "No free space")


@dataclasses.dataclass(frozen=True)
class Geometry:
    blocks: int
    inodes: int
    journal_blocks: int

    @property
    def size(self) -> int:
        return self.blocks * FS_BLOCK


def journal_blocks(blocks: int) -> int:
    """Journal size for a filesystem of `blocks` (e2fsprogs' default table)."""
    for limit, journal in ((32768, 1024), (256 * 1024, 4096), (512 * 1024, 8192),
                           (4096 * 1024, 16384), (8192 * 1024, 32768),
                           (16384 * 1024, 65536), (32768 * 1024, 131072)):
        if blocks < limit:
            return journal
    return 262144


def _backup_groups(groups: int) -> int:
    """Groups holding a superblock copy under sparse_super: 0, 1, 3^k, 5^k, 7^k."""
    found = {0, 1}
    for base in (3, 5, 7):
        n = base
        while n < groups:
            found.add(n)
            n *= base
    return len([g for g in found if g < groups])


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def metadata_blocks(blocks: int, inodes: int) -> int:
    """Blocks mke2fs spends on its own structures for this geometry."""
    groups = _ceil_div(blocks, BLOCKS_PER_GROUP)
    per_block = FS_BLOCK // INODE_SIZE
    per_group = _ceil_div(_ceil_div(inodes, groups), per_block) * per_block
    inode_tables = groups * per_group // per_block
    desc_per_block = FS_BLOCK // DESC_SIZE
    gdt = _ceil_div(groups, desc_per_block)
    # resize_inode reserves descriptor blocks for growth to 1024x (capped).
    max_blocks = min(2**32 - 1, blocks * 1024)
    reserved_gdt = min(FS_BLOCK // 4,
                       _ceil_div(_ceil_div(max_blocks, BLOCKS_PER_GROUP), desc_per_block) - gdt)
    copies = _backup_groups(groups) * (1 + gdt + max(reserved_gdt, 0))
    return (copies + 2 * groups + inode_tables + journal_blocks(blocks)
            + FIXED_OVERHEAD_BLOCKS)


def _inodes_for(scan: TreeScan, blocks: int, headroom: float) -> int:
    needed = math.ceil((scan.inodes + 1) * (1 + headroom)) + 16
    return max(needed, blocks * FS_BLOCK // BYTES_PER_INODE)


def fit_geometry(scan: TreeScan, headroom: float) -> Geometry:
    """The fitted size rule:

    ``blocks = round_up_MiB((content + metadata(blocks)) * (1 + headroom))``

    content: the tree's data blocks (holes excluded), directory, long
    symlink, extent and xattr blocks (TreeScan.content_blocks); metadata:
    superblock/descriptor copies, reserved GDT, bitmaps, inode tables,
    journal (metadata_blocks).  Inodes: the tree's inodes plus headroom, or
    one per 16 KiB of the filesystem if that is more.  Solved by iteration
    (metadata grows with the size); at least 16 MiB.
    """
    content = scan.content_blocks
    blocks = max(MIN_BLOCKS, content)
    for _ in range(20):
        inodes = _inodes_for(scan, blocks, headroom)
        want = math.ceil((content + metadata_blocks(blocks, inodes)) * (1 + headroom))
        want = max(want, MIN_BLOCKS, inodes)
        want = -(-want // ALIGN_BLOCKS) * ALIGN_BLOCKS
        if want <= blocks:
            break
        blocks = want
    inodes = _inodes_for(scan, blocks, headroom)
    return Geometry(blocks, inodes, journal_blocks(blocks))


def fixed_geometry(scan: TreeScan, size: int, headroom: float) -> Geometry:
    """Geometry for a filesystem of exactly `size` bytes (output.size)."""
    if size % FS_BLOCK or size < MIN_BLOCKS * FS_BLOCK:
        raise UserError(f"{size} bytes is not a usable ext4 size",
                        where="output.size",
                        hint=f"use a multiple of {FS_BLOCK} bytes of at least "
                             f"{MIN_BLOCKS * FS_BLOCK // 2**20} MiB")
    blocks = size // FS_BLOCK
    inodes = _inodes_for(scan, blocks, headroom)
    inodes = min(inodes, blocks)
    need = scan.content_blocks + metadata_blocks(blocks, inodes)
    if need > blocks or inodes < scan.inodes + 1:
        minimum = fit_geometry(scan, 0.0).size
        raise UserError(f"{size} bytes is too small for this tree (it needs about "
                        f"{minimum} bytes)", where="output.size",
                        hint="raise output.size or leave it unset to fit the image")
    return Geometry(blocks, inodes, journal_blocks(blocks))


def plan_geometry(scan: TreeScan, size: int | None, headroom: float) -> Geometry:
    """output.size when given (checked against the tree), else the fitted size."""
    if size is not None:
        return fixed_geometry(scan, size, headroom)
    return fit_geometry(scan, headroom)


class _NoSpace(Exception):
    pass


def _quote(name: bytes) -> bytes:
    """A debugfs (libss) argument: double quotes, inner quotes doubled."""
    return b'"' + name.replace(b'"', b'""') + b'"'


class _FixupWriter:
    """debugfs commands that set xattrs, walking the tree with relative cd."""

    def __init__(self, cmds: BinaryIO, values_dir: Path):
        self.cmds = cmds
        self.values_dir = values_dir
        self.cwd: list[bytes] = []
        self.values: set[str] = set()
        self.count = 0

    def _value_file(self, value: bytes) -> bytes:
        digest = hashlib.sha256(value).hexdigest()
        if digest not in self.values:
            (self.values_dir / digest).write_bytes(value)
            self.values.add(digest)
        return f"{self.values_dir.name}/{digest}".encode()

    def _cd(self, parts: list[bytes]) -> None:
        common = 0
        while (common < len(self.cwd) and common < len(parts)
               and self.cwd[common] == parts[common]):
            common += 1
        if common < len(self.cwd):
            up = b"/".join([b".."] * (len(self.cwd) - common))
            self.cmds.write(b"cd " + _quote(up) + b"\n")
        for part in parts[common:]:
            self.cmds.write(b"cd " + _quote(b"./" + part) + b"\n")
        self.cwd = list(parts)

    def set_xattrs(self, name: bytes, xattrs: dict[bytes, bytes]) -> None:
        if b"\n" in name or b"\r" in name:
            raise UserError(f"{show(name)}: xattrs on a name with a line break cannot be "
                            "written into an ext4 image")
        if name:
            *parents, base = name.split(b"/")
            self._cd(parents)
            target = _quote(b"./" + base)
        else:
            target = b'"/"'
        for key in sorted(xattrs):
            self.cmds.write(b"ea_set -f " + _quote(self._value_file(xattrs[key])) + b" "
                            + target + b" " + _quote(key) + b"\n")
            self.count += 1

    def remove_lost_found(self) -> None:
        self._cd([])
        self.cmds.write(b'rmdir "/lost+found"\n')


class _DataReader:
    def __init__(self, reader: tarfmt.TarReader):
        self.reader = reader

    def read(self, n: int = 1 << 20) -> bytes:
        return self.reader.read_data(n)


def _filter(tar_path: Path, out: BinaryIO, scan: TreeScan, fixups: _FixupWriter) -> None:
    """Stream the tar to mke2fs in the form it handles (see the module doc)."""
    targets: dict[bytes, tuple[int, int, int, int]] = {}
    with open(tar_path, "rb") as f:
        reader = tarfmt.TarReader(f, source=str(tar_path))
        for m in reader:
            if m.type == REG and m.name in scan.link_targets:
                targets[m.name] = (m.mode, m.uid, m.gid, m.mtime)
            if m.type == LNK:
                m.mode, m.uid, m.gid, m.mtime = targets[m.linkname]
            else:
                xattrs = member_xattrs(m)
                if xattrs:
                    fixups.set_xattrs(m.name, xattrs)
            m.acls, m.xattrs = {}, {}
            tarfmt.write_member(out, m, _DataReader(reader),  # type: ignore[arg-type]
                                for_libarchive=True)
        out.write(tarfmt.END_OF_ARCHIVE)


def _debugfs_errors(stderr: bytes) -> list[str]:
    lines = stderr.decode("utf-8", "replace").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("debugfs ")]


class Ext4Builder:
    """Builds rootfs.raw; one instance per write_images call."""

    def __init__(self, epoch: int, label: str, uuid: str, hash_seed: str):
        self.epoch = epoch
        self.label = label
        self.uuid = uuid
        self.hash_seed = hash_seed
        self.mke2fs = runner.find_tool("mke2fs")
        self.debugfs = runner.find_tool("debugfs")
        self.e2fsck = runner.find_tool("e2fsck")
        self.version = runner.version(self.mke2fs, "-V")
        if runner.version_tuple(self.version) < runner.MIN_E2FSPROGS:
            raise UserError(f"e2fsprogs is too old ({self.version}); raw and qcow2 images need "
                            "1.47.1 or newer (mke2fs -d reading a tar)",
                            hint="apt-get install -t bookworm-backports e2fsprogs libarchive13")

    def build(self, tar_path: Path, out: Path, tmp: Path, scan: TreeScan, *,
              size: int | None, headroom: float, geometry: Geometry | None = None) -> dict:
        """Write the image to `out`; `geometry` as plan_geometry gave it."""
        if geometry is None:
            geometry = plan_geometry(scan, size, headroom)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                fixups = self._attempt(tar_path, out, tmp, scan, geometry)
                break
            except _NoSpace as e:
                if size is not None:
                    raise UserError(f"{size} bytes is too small for this tree ({e})",
                                    where="output.size",
                                    hint="raise output.size or leave it unset to fit the "
                                         "image") from None
                if attempt == MAX_ATTEMPTS:
                    raise UserError(f"ext4 image: the tree did not fit in "
                                    f"{geometry.size} bytes ({e})",
                                    hint="set output.size explicitly") from None
                blocks = -(-geometry.blocks * 5 // 4 // ALIGN_BLOCKS) * ALIGN_BLOCKS
                geometry = Geometry(blocks, geometry.inodes * 5 // 4, journal_blocks(blocks))
        return {
            "filesystem": "ext4",
            "label": self.label,
            "uuid": self.uuid,
            "hash_seed": self.hash_seed,
            "size": geometry.size,
            "block_size": FS_BLOCK,
            "blocks": geometry.blocks,
            "inodes": geometry.inodes,
            "inode_size": INODE_SIZE,
            "journal_size": geometry.journal_blocks * FS_BLOCK,
            "reserved_blocks": 0,
            "features": list(FEATURES),
            "size_rule": "fixed (output.size)" if size is not None
            else f"fitted: (content + metadata) * (1 + {headroom}), whole MiB",
            "content_blocks_estimate": scan.content_blocks,
            "attempts": attempt,
            "xattrs_set": fixups,
            "lost_found": scan.lost_found,
            "tools": {"e2fsprogs": self.version},
        }

    def _env(self, tmp: Path) -> dict[str, str]:
        return runner.tool_env(self.epoch, tmp, E2FSPROGS_FAKE_TIME=str(self.epoch),
                               MKE2FS_CONFIG=str(tmp / "mke2fs.conf"))

    def _attempt(self, tar_path: Path, out: Path, tmp: Path, scan: TreeScan,
                 g: Geometry) -> int:
        (tmp / "mke2fs.conf").write_text(MKE2FS_CONF)
        values = tmp / "v"
        values.mkdir(exist_ok=True)
        out.unlink(missing_ok=True)
        env = self._env(tmp)
        argv = [
            self.mke2fs, "-q", "-F", "-t", "ext4", "-T", "rootfs",
            "-b", str(FS_BLOCK), "-I", str(INODE_SIZE), "-N", str(g.inodes), "-m", "0",
            "-J", f"size={g.journal_blocks * FS_BLOCK // 2**20}",
            "-L", self.label, "-U", self.uuid,
            "-E", f"hash_seed={self.hash_seed},root_owner=0:0,nodiscard,"
                  "assume_storage_prezeroed=1",
            "-d", "-", str(out), f"{g.size // 1024}k",
        ]
        err_path = tmp / "mke2fs.err"
        with open(tmp / "debugfs.cmds", "wb") as cmds, open(err_path, "wb") as err:
            fixups = _FixupWriter(cmds, values)
            proc = runner.start(argv, env=env, cwd=tmp, stderr=err)
            assert proc.stdin is not None
            try:
                # BrokenPipeError: mke2fs stopped reading; its exit status says why.
                with contextlib.suppress(BrokenPipeError):
                    _filter(tar_path, proc.stdin, scan, fixups)  # type: ignore[arg-type]
                    proc.stdin.close()
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            finally:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
            returncode = proc.wait()
            if not scan.lost_found:
                fixups.remove_lost_found()
        stderr = err_path.read_bytes()
        if returncode != 0:
            text = stderr.decode("utf-8", "replace")
            if any(s in text for s in _NO_SPACE):
                raise _NoSpace(runner.last_line(stderr))
            failure = runner.ToolFailed("ext4 image", "mke2fs", returncode, stderr)
            if "libarchive" in text:
                failure.hint = "mke2fs reads tars through libarchive: apt-get install libarchive13"
            raise failure

        proc2 = runner.run([self.debugfs, "-w", "-f", "debugfs.cmds", str(out)], env=env,
                           cwd=tmp, what="ext4 image (setting xattrs)", check=False)
        errors = _debugfs_errors(proc2.stderr)
        if proc2.returncode != 0 or errors:
            text = "\n".join(errors) or proc2.stderr.decode("utf-8", "replace")
            if any(s in text for s in _NO_SPACE):
                raise _NoSpace(runner.last_line(text))
            raise runner.ToolFailed("ext4 image (setting xattrs)", "debugfs",
                                    proc2.returncode, text.encode())
        runner.run([self.e2fsck, "-f", "-n", str(out)], env=env, cwd=tmp,
                   what="ext4 image check")
        return fixups.count
