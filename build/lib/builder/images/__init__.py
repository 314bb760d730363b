"""Filesystem images from the canonical rootfs tar: squashfs, raw ext4, qcow2.

Every image is made from the one tar the pipeline assembled, streamed into
the image tools; nothing is unpacked onto the build host (ownership,
devices and xattrs would not survive that without root), and every
temporary file stays inside `staging`.

=========  ==================================  ===============  ======================
format     what                                 made by          reproducibility
=========  ==================================  ===============  ======================
squashfs   read-only squashfs, gzip             tar2sqfs         bit-identical
raw        one ext4 filesystem, no partitions   mke2fs, debugfs  bit-identical
qcow2      the same ext4 in a qcow2 container   qemu-img         bit-identical
=========  ==================================  ===============  ======================

"bit-identical" means: the same tar, epoch, ImageSpec and tool versions
give the same bytes on any host, in any directory, under any TZ, umask or
locale (tests/test_images.py builds twice and compares).  The tool
versions are recorded in each artifact's details, because a different
e2fsprogs, squashfs-tools-ng or qemu-img may lay the same tree out
differently.  See squashfs.py, ext4.py and qcow2.py for how each gets
there, and ext4.fit_geometry for the size rule.

Fidelity: raw/qcow2 hold every case of the tar (owners, modes with
setuid/setgid/sticky, devices, fifos, symlinks, hard links, sparse files,
long and non-UTF-8 names, all security.*/trusted.*/user.* xattrs and
POSIX ACLs).  squashfs holds the same except ACLs, which the format has no
place for: a tree with ACLs is refused for squashfs.  Times: mtimes as in
the tar; ext4 atime/ctime are set to the mtime and its creation time to
the epoch; /lost+found exists only if the tree has it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from ..errors import UserError
from .ext4 import Ext4Builder, plan_geometry
from .qcow2 import Qcow2Builder
from .scan import TreeScan, scan_tar, show
from .squashfs import SquashfsBuilder

IMAGE_FORMATS = ("squashfs", "raw", "qcow2")
FILE_NAMES = {"squashfs": "rootfs.squashfs", "raw": "rootfs.raw", "qcow2": "rootfs.qcow2"}
BIT_IDENTICAL = "bit-identical"
REPRODUCIBILITY = {"squashfs": BIT_IDENTICAL, "raw": BIT_IDENTICAL, "qcow2": BIT_IDENTICAL}

# Labels and UUIDs are uuid5 names in this namespace, so the same recipe
# name always gives the same filesystem identity.
UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://rootfs-build/images")
EXT4_LABEL_MAX = 16

__all__ = ["IMAGE_FORMATS", "ImageArtifact", "ImageSpec", "TreeScan", "write_images"]


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """How to build the images.

    size: exact ext4 filesystem size in bytes (raw/qcow2), or None to fit
      it to the tree: (content + metadata) * (1 + headroom), rounded up to
      a MiB (ext4.fit_geometry).  squashfs is always as small as it gets.
    headroom: free fraction added when fitting; also scales the inode count.
    label/uuid: ext4 label (at most 16 bytes) and UUID; by default the
      first 16 bytes of `name` and uuid5(UUID_NAMESPACE, name).
    """

    name: str
    epoch: int
    size: int | None = None
    headroom: float = 0.2
    qcow2_compressed: bool = False
    label: str | None = None
    uuid: str | None = None

    @property
    def fs_label(self) -> str:
        if self.label is not None:
            return self.label
        return self.name.encode()[:EXT4_LABEL_MAX].decode("utf-8", "ignore")

    @property
    def fs_uuid(self) -> str:
        if self.uuid is not None:
            return str(uuid.UUID(self.uuid))
        return str(uuid.uuid5(UUID_NAMESPACE, self.name))

    @property
    def hash_seed(self) -> str:
        """ext4 directory hash seed: fixed, derived from the UUID."""
        return str(uuid.uuid5(uuid.UUID(self.fs_uuid), "ext4-hash-seed"))

    def check(self) -> None:
        if self.epoch < 0:
            raise UserError(f"epoch {self.epoch} is before 1970", where="epoch")
        if not 0 <= self.headroom <= 10:
            raise UserError(f"headroom {self.headroom} is out of range",
                            where="output.headroom", hint="use a fraction such as 0.2")
        if self.size is not None and (isinstance(self.size, bool) or self.size <= 0):
            raise UserError(f"size {self.size!r} is not a positive number of bytes",
                            where="output.size")
        label = self.fs_label.encode()
        if len(label) > EXT4_LABEL_MAX or b"\0" in label:
            raise UserError(f"ext4 label {self.fs_label!r} is longer than {EXT4_LABEL_MAX} "
                            "bytes", hint="ImageSpec.label: use at most 16 bytes")
        try:
            uuid.UUID(self.fs_uuid)
        except ValueError:
            raise UserError(f"ImageSpec.uuid {self.uuid!r} is not a UUID") from None


@dataclasses.dataclass(frozen=True)
class ImageArtifact:
    """One image file in `staging`; details go into manifest.json."""

    format: str
    path: Path
    reproducibility: str
    details: dict


def _check_formats(formats: Sequence[str]) -> list[str]:
    wanted: list[str] = []
    for fmt in formats:
        if fmt not in IMAGE_FORMATS:
            raise UserError(f"{fmt!r} is not an image format ({', '.join(IMAGE_FORMATS)})",
                            where="output.formats")
        if fmt not in wanted:
            wanted.append(fmt)
    return wanted


def write_images(tar_path: Path, formats: Sequence[str], staging: Path,
                 spec: ImageSpec) -> list[ImageArtifact]:
    """Build the requested images from the canonical tar into `staging`
    (rootfs.squashfs, rootfs.raw, rootfs.qcow2), in the order asked.

    Each format reads the tar once (qcow2 converts the raw image), tools are
    checked before any work starts, and temporary files live in a
    directory inside `staging` that is removed afterwards.
    """
    wanted = _check_formats(formats)
    if not wanted:
        return []
    spec.check()
    tar_path = Path(tar_path).absolute()
    staging = Path(staging).absolute()
    squashfs = SquashfsBuilder(spec.epoch) if "squashfs" in wanted else None
    need_ext4 = "raw" in wanted or "qcow2" in wanted
    ext4 = (Ext4Builder(spec.epoch, spec.fs_label, spec.fs_uuid, spec.hash_seed)
            if need_ext4 else None)
    qcow2 = Qcow2Builder(spec.epoch) if "qcow2" in wanted else None

    scan = scan_tar(tar_path)
    if need_ext4 and scan.awkward_names:
        raise UserError(f"{show(scan.awkward_names[0])}: xattrs on a name with a line break "
                        "cannot be written into an ext4 image", where="output.formats")
    if squashfs is not None:
        squashfs.check(scan)
    # output.size is checked against the tree before any image is built.
    geometry = plan_geometry(scan, spec.size, spec.headroom) if need_ext4 else None

    common = {"tree": {"entries": scan.entries, "inodes": scan.inodes,
                       "data_bytes": scan.data_bytes, **scan.counts}}
    tmp = Path(tempfile.mkdtemp(prefix=".images-", dir=staging))
    try:
        done: dict[str, ImageArtifact] = {}

        def publish(fmt: str, built: Path, details: dict) -> None:
            final = staging / FILE_NAMES[fmt]
            os.replace(built, final)
            details = {**details, "bytes": final.stat().st_size, **common}
            done[fmt] = ImageArtifact(fmt, final, REPRODUCIBILITY[fmt], details)

        if squashfs is not None:
            built = tmp / FILE_NAMES["squashfs"]
            publish("squashfs", built, squashfs.build(tar_path, built, tmp, scan))
        if ext4 is not None:
            raw = tmp / FILE_NAMES["raw"]
            fs_details = ext4.build(tar_path, raw, tmp, scan, size=spec.size,
                                    headroom=spec.headroom, geometry=geometry)
            if qcow2 is not None:
                built = tmp / FILE_NAMES["qcow2"]
                container = qcow2.build(raw, built, tmp, compressed=spec.qcow2_compressed)
                container_tools = container.pop("tools")
                details = {**fs_details, **container,
                           "tools": {**fs_details["tools"], **container_tools}}
                publish("qcow2", built, details)
            if "raw" in wanted:
                publish("raw", raw, fs_details)
        return [done[fmt] for fmt in wanted]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
