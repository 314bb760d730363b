"""The squashfs image, straight from the tar stream with tar2sqfs
(squashfs-tools-ng; Debian 12's squashfs-tools 4.5.1 has no sqfstar).

Bit-for-bit reproducible: tar2sqfs takes the superblock time from
SOURCE_DATE_EPOCH (the epoch), every inode time from the tar (whose mtimes
are already clamped), orders directory entries itself, and its block
processor writes blocks in input order whatever the number of jobs (-j 1
and -j N give the same bytes).  The tar's ``./`` entry becomes the root
inode (mode, owner, mtime, xattrs).  ``-s`` turns any tar record tar2sqfs
would skip into an error instead.

What squashfs cannot hold: POSIX ACLs (the format stores only user.*,
trusted.* and security.* xattrs), so a tree with ACLs is refused rather
than silently flattened.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import runner
from ..errors import UserError
from .scan import TreeScan, show

COMPRESSOR = "gzip"  # every kernel with squashfs has it
BLOCK_SIZE = 131072
DEV_BLOCK_SIZE = 4096


def jobs() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class SquashfsBuilder:
    def __init__(self, epoch: int):
        self.epoch = epoch
        self.tar2sqfs = runner.find_tool("tar2sqfs")
        self.version = runner.version(self.tar2sqfs, "--version")

    def check(self, scan: TreeScan) -> None:
        """Refuse a tree squashfs cannot hold (before any image is built)."""
        if scan.acl_paths:
            raise UserError(
                f"squashfs cannot hold POSIX ACLs, and {len(scan.acl_paths)} path(s) of the "
                f"tree have one (first: {show(scan.acl_paths[0])})",
                where="output.formats",
                hint="use raw or qcow2 for this tree, or remove the ACLs in a recipe step")

    def build(self, tar_path: Path, out: Path, tmp: Path, scan: TreeScan, *,
              num_jobs: int | None = None) -> dict:
        self.check(scan)
        out.unlink(missing_ok=True)
        argv = [self.tar2sqfs, "--quiet", "--no-skip", "--force",
                "--compressor", COMPRESSOR, "--block-size", str(BLOCK_SIZE),
                "--dev-block-size", str(DEV_BLOCK_SIZE),
                "--num-jobs", str(num_jobs or jobs()), str(out)]
        with open(tar_path, "rb") as f:
            runner.run(argv, env=runner.tool_env(self.epoch, tmp), cwd=tmp, stdin=f,
                       what="squashfs image")
        return {
            "filesystem": "squashfs",
            "compressor": COMPRESSOR,
            "block_size": BLOCK_SIZE,
            "mkfs_time": self.epoch,
            "tools": {"squashfs-tools-ng": self.version},
        }
