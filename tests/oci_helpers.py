"""Helpers for the OCI and registry tests: a small output directory shaped
like a build's (made without the appliance), and comparing trees."""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

from builder import fileio, oci, outputs, sampleimage
from builder.deploy import make_bundle
from builder.deploy.render import render_installer
from builder.tarfmt import DIR, REG, Member

EPOCH = 1700000000


def make_output(root: Path, name: str = "demo", *, seed: str = "a", size: int = 3 << 20,
                compression: str = "zstd", arch: str = "x86_64") -> Path:
    """`root/name/` like a build with formats [tar.zst, oci] and a deployment
    (dpu/ script, manifest.json, SHA256SUMS), plus `root/name.bundle.tar`.
    `seed` changes the content (and so every digest); the file data does not
    compress, so the layer is about `size` bytes."""
    d = root / name
    d.mkdir(parents=True)
    info = oci.ImageInfo(arch=arch, epoch=EPOCH, title=name, compression=compression)
    with outputs.open_sinks(d, ["tar.zst"]) as tee:
        layer = oci.layer_sink(d, info, ["tar.zst", "oci"], tee.sinks)
        assert layer is not None
        tar = sampleimage.TarStream(tee)
        tar.add(Member(b"etc", DIR, 0o755, mtime=EPOCH))
        tar.add(Member(b"etc/seed", REG, 0o644, size=len(seed), mtime=EPOCH),
                io.BytesIO(seed.encode()))
        data = _noise(seed, size)
        tar.add(Member(b"etc/data", REG, 0o644, size=len(data), mtime=EPOCH), io.BytesIO(data))
        tar.close()
    oci.write_layout(d / oci.LAYOUT_DIR, layer, info)
    os.chmod(d / "rootfs.tar.zst", 0o644)
    (d / "dpu").mkdir()
    (d / "dpu" / "prepare.sh").write_text("#!/bin/bash\necho prepare\n")
    os.chmod(d / "dpu" / "prepare.sh", 0o755)
    (d / "manifest.json").write_text(json.dumps({"name": name, "epoch": EPOCH}) + "\n")
    fileio.write_atomic(d / "install.sh", render_installer(name), 0o755)
    fileio.write_atomic(d / "SHA256SUMS", outputs.sha256sums(d))
    make_bundle(root, name, EPOCH)
    return d


def _noise(seed: str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)   # deterministic, incompressible


def tree_files(top: Path) -> dict[str, tuple[bytes, int]]:
    """relative path -> (content, mode) of every file below `top`
    (dot files of the publishing machinery aside)."""
    out = {}
    for p in sorted(top.rglob("*")):
        rel = p.relative_to(top).as_posix()
        if p.is_file() and not p.name.startswith("."):
            out[rel] = (p.read_bytes(), p.stat().st_mode & 0o7777)
    return out


def leftovers(top: Path) -> list[str]:
    """Anything below `top` but lock files: staging dirs, partial files."""
    return sorted(p.name for p in top.iterdir() if not p.name.endswith(".lock")) \
        if top.exists() else []
