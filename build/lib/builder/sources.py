"""Source trees: a release tarball plus ordered patches, checked on the build host.

The tarball is read with tarfile member by member and written out by hand
(only directories, regular files and links that stay inside the tree; no
absolute names, no '..', nothing written through a symlink) into a private
work directory, and each patch is applied there with GNU patch in order.  A
patch that does not apply stops the build before any appliance starts.
The patched tree becomes a file layer; the element's install scripts then
configure, build and install it inside the rootfs.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

from . import runner
from .errors import UserError
from .filelayers import FilePlan, plan_overlay
from .hashing import sha256_file
from .recipe import OverlaySpec


def _refuse(archive: Path, name: str, why: str, where: str) -> UserError:
    return UserError(f"{archive}: refused member {name!r}: {why}", where=where,
                     hint="a source tarball may only hold files, directories and links "
                          "that stay inside it")


def unpack(archive: Path, dest: Path, *, where: str) -> Path:
    """Unpack `archive` into `dest` safely; returns the source root (the single
    top-level directory when there is one).

    Only directories, regular files, and links that stay inside the tree are
    accepted; nothing is written through a symlink.  Modes keep only the x
    bit, owners are the caller's (it is a source tree, not a rootfs).
    """
    root = dest.resolve()
    try:
        with tarfile.open(archive) as tf:
            for m in tf:
                parts = [p for p in m.name.split("/") if p not in ("", ".")]
                if m.name.startswith("/") or ".." in parts:
                    raise _refuse(archive, m.name, "absolute or '..' name", where)
                if not parts:
                    continue
                target = root.joinpath(*parts)
                if target.parent.resolve() != target.parent or \
                        not target.parent.resolve().is_relative_to(root):
                    raise _refuse(archive, m.name, "its directory is a symlink", where)
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                elif m.isreg():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tf.extractfile(m)
                    assert src is not None
                    with open(target, "xb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                    target.chmod(0o755 if m.mode & 0o100 else 0o644)
                elif m.issym() or m.islnk():
                    link = m.linkname
                    base = target.parent if m.issym() else root
                    resolved = os.path.normpath(os.path.join(base, link))
                    if link.startswith("/") or not Path(resolved).is_relative_to(root):
                        raise _refuse(archive, m.name, "link leaves the tree", where)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if m.issym():
                        os.symlink(link, target)
                    else:
                        os.link(resolved, target, follow_symlinks=False)
                else:
                    raise _refuse(archive, m.name, "device, fifo or other special file",
                                  where)
    except UserError:
        raise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"{archive}: cannot unpack: {e}", where=where,
                        hint="expected a .tar, .tar.gz, .tar.xz or .tar.bz2 archive") from None
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return dest


def apply_patches(tree: Path, patches: list[Path], *, archive: Path, where: str) -> None:
    if not patches:
        return
    patch = runner.find_tool("patch", needed_for="source patches")
    for p in patches:
        proc = runner.run(
            [patch, "-p1", "--batch", "--forward", "--no-backup-if-mismatch",
             "-d", str(tree), "-i", str(p.resolve())],
            env=runner.tool_env(0), what=f"patch {p.name}", check=False)
        if proc.returncode != 0:
            output = (proc.stdout + proc.stderr).decode("utf-8", "replace")
            lines = [line for line in output.splitlines()
                     if "FAILED" in line or "malformed" in line or "can't find" in line
                     or "Reversed" in line or "No such file" in line]
            detail = lines[0].strip() if lines else runner.last_line(proc.stderr or b"patch failed")
            raise UserError(f"patch {p.name} does not apply to {archive.name}: {detail}",
                            where=where,
                            hint="check the patch order and that it matches this release")


def plan_source(archive: Path, patches: list[Path], dest: str, workdir: Path, *,
                label: str, where: str) -> FilePlan:
    """Unpack and patch into `workdir` (which must exist and stay until the
    layer is written) and plan the patched tree at `dest` in the rootfs."""
    root = unpack(archive, workdir, where=where)
    apply_patches(root, patches, archive=archive, where=where)
    plan = plan_overlay(OverlaySpec(path=root, dest=dest), 0, where)
    plan.kind = "source"
    plan.label = label
    plan.inputs = {str(archive): sha256_file(archive), **{str(p): sha256_file(p) for p in patches}}
    return plan
