"""The qcow2 image: the raw ext4 filesystem in a qcow2 container.

``qemu-img convert`` writes clusters in guest order (no -W), skips zero
clusters, and has no timestamps in the format; compression (zlib, per
cluster) is deterministic for a given zlib.  So the same raw image and
qemu-img version give the same bytes; the version is recorded.
"""

from __future__ import annotations

from pathlib import Path

from .. import runner

CLUSTER_SIZE = 65536


class Qcow2Builder:
    def __init__(self, epoch: int):
        self.epoch = epoch
        self.qemu_img = runner.find_tool("qemu-img")
        self.version = runner.version(self.qemu_img, "--version")

    def build(self, raw: Path, out: Path, tmp: Path, *, compressed: bool) -> dict:
        out.unlink(missing_ok=True)
        options = (f"compat=1.1,cluster_size={CLUSTER_SIZE},lazy_refcounts=off,"
                   "preallocation=off,compression_type=zlib")
        argv = [self.qemu_img, "convert", "-q", "-f", "raw", "-O", "qcow2", "-o", options]
        if compressed:
            argv.append("-c")
        argv += [str(raw), str(out)]
        runner.run(argv, env=runner.tool_env(self.epoch, tmp), cwd=tmp, what="qcow2 image")
        return {
            "container": "qcow2",
            "compat": "1.1",
            "cluster_size": CLUSTER_SIZE,
            "compressed": compressed,
            "compression_type": "zlib" if compressed else None,
            "tools": {"qemu-img": self.version},
        }
