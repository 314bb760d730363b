"""The offline provisioning bundle: ``<output_root>/<name>.bundle.tar``.

Layout: everything in ``<output_root>/<name>/`` under ``<name>/``: the rootfs
artifacts (tarballs and/or images), dpu/, host/, install.sh (written there by
``render_deploy``), manifest.json, SHA256SUMS and, when signed,
SHA256SUMS.sig; so ``tar -xf <name>.bundle.tar`` gives ``<name>/install.sh``.
The bytes are reproducible: canonical tar members (builder.tarfmt), sorted
names, mtimes set to the epoch, owner 0, file modes kept, directories 0755.

SHA256SUMS (written by the pipeline, ``sha256sum`` format, paths relative to
``<output_root>/<name>/``) must list every file but itself and its signature,
install.sh included; this is checked here and again by install.sh on the DPU
before it writes anything.  With a signing key, SHA256SUMS is signed
(``signing.sign``: ssh-keygen -Y sign) and ``install.sh --trust FILE``
verifies that signature before it reads anything else.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

from .. import tarfmt, values
from ..errors import UserError
from ..hashing import sha256_file
from . import signing

SUMS = "SHA256SUMS"
SIGNATURE = signing.SIGNATURE
INSTALLER = "install.sh"
# Rootfs artifacts a bundle can carry, file name -> kind, in install.sh's
# order of preference (without --format it installs the first present; the
# same list is in templates/deploy-install.sh).  A tar is extracted into the
# target; rootfs.raw / rootfs.squashfs are copied next to it for prepare.sh
# to loop-mount (ROOTFS_IMAGE); install.sh refuses rootfs.qcow2, which needs
# qemu-nbd, with a hint to convert it.
ARTIFACT_KINDS = {
    "rootfs.tar": "tar",
    "rootfs.tar.zst": "tar",
    "rootfs.tar.gz": "tar",
    "rootfs.raw": "raw",
    "rootfs.squashfs": "squashfs",
    "rootfs.qcow2": "qcow2",
}
SUM_LINE_RE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")
REL_PATH_RE = re.compile(r"^[A-Za-z0-9._+@%=:,-][A-Za-z0-9._+@%=:,/-]*$")


def _check_rel(path: str) -> bool:
    parts = path.split("/")
    return bool(REL_PATH_RE.match(path)) and all(p not in ("", ".", "..") for p in parts)


def read_sums(path: Path) -> dict[str, str]:
    """Parse a SHA256SUMS file: relative path -> hex digest."""
    out: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read it: {e}", where=str(path)) from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        m = SUM_LINE_RE.match(line)
        if not m:
            raise UserError("not a sha256sum line", where=f"{path}:{n}")
        digest, rel = m.groups()
        if not _check_rel(rel):
            raise UserError(f"unsafe or unsupported path {rel!r}", where=f"{path}:{n}")
        if rel in out:
            raise UserError(f"{rel} is listed twice", where=f"{path}:{n}")
        out[rel] = digest
    return out


def _scan(src: Path) -> tuple[list[str], list[str]]:
    """Relative directories and regular files below src (symlinks etc. refused)."""
    dirs: list[str] = []
    files: list[str] = []
    for top, dirnames, filenames in os.walk(src):
        rel_top = os.path.relpath(top, src)
        for name in sorted(dirnames + filenames):
            rel = name if rel_top == "." else f"{rel_top}/{name}"
            st = os.lstat(os.path.join(top, name))
            if stat.S_ISDIR(st.st_mode):
                dirs.append(rel)
            elif stat.S_ISREG(st.st_mode):
                files.append(rel)
            else:
                raise UserError("only regular files and directories can go into a bundle",
                                where=str(src / rel))
            if not _check_rel(rel):
                raise UserError("name has characters install.sh refuses", where=str(src / rel))
    return dirs, files


def make_bundle(output_root: Path, name: str, epoch: int, *, src: Path | None = None,
                dest: Path | None = None, signing_key: Path | None = None) -> dict[str, Any]:
    """Write ``<output_root>/<name>.bundle.tar`` atomically.

    ``src`` (default ``<output_root>/<name>``) is the directory bundled as
    ``<name>/``, ``dest`` (default ``<output_root>/<name>.bundle.tar``) the file
    written (through a temporary file in its directory, then renamed): both
    let a pipeline bundle from a staging directory into a staging path.
    ``signing_key`` (an SSH private key) signs ``src/SHA256SUMS`` into
    ``src/SHA256SUMS.sig`` first.  Returns ``{"path": dest, "signed_by":
    <key fingerprint> | "unsigned", ...}`` (``signing.signing_info``).
    """
    try:
        values.check_name(name)
    except ValueError as e:
        raise UserError(str(e), where="name") from None
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise UserError(f"{epoch!r} is not a non-negative integer", where="epoch")
    output_root = Path(output_root)
    src = Path(src) if src is not None else output_root / name
    dest = Path(dest) if dest is not None else output_root / f"{name}.bundle.tar"
    if not src.is_dir():
        raise UserError("no build output directory to bundle", where=str(src))
    sums = read_sums(src / SUMS)
    info = signing.signing_info(signing_key)
    if signing_key is not None:
        signing.sign(src / SUMS, signing_key)
    dirs, files = _scan(src)
    if INSTALLER not in files:
        raise UserError(f"no {INSTALLER} to bundle (render_deploy writes it)",
                        where=str(src / INSTALLER))
    for rel in files:
        if rel not in (SUMS, SIGNATURE) and rel not in sums:
            raise UserError(f"{rel} is not listed in {SUMS}", where=str(src / rel),
                            hint="install.sh refuses unlisted files")
    for rel, digest in sums.items():
        path = src / rel
        if rel not in files:
            raise UserError(f"{rel} is listed in {SUMS} but missing", where=str(src / SUMS))
        if sha256_file(path) != digest:
            raise UserError(f"checksum mismatch for {rel}", where=str(src / SUMS))
    if not any(rel in ARTIFACT_KINDS for rel in files):
        raise UserError(f"no rootfs artifact ({', '.join(ARTIFACT_KINDS)}) to bundle",
                        where=str(src))

    prefix = name.encode()
    members: list[tuple[tarfmt.Member, Path | None]] = [
        (tarfmt.Member(name=prefix, type=tarfmt.DIR, mode=0o755, mtime=epoch), None)]
    for rel in dirs:
        members.append((tarfmt.Member(name=prefix + b"/" + rel.encode(), type=tarfmt.DIR,
                                      mode=0o755, mtime=epoch), None))
    for rel in files:
        path = src / rel
        st = path.stat()
        members.append((tarfmt.Member(name=prefix + b"/" + rel.encode(), type=tarfmt.REG,
                                      mode=stat.S_IMODE(st.st_mode), size=st.st_size,
                                      mtime=epoch), path))
    members.sort(key=lambda mp: tarfmt.sort_key(mp[0].name))

    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{name}.bundle.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for m, source in members:
                if source is None:
                    tarfmt.write_member(out, m, None)
                    continue
                with source.open("rb") as data:
                    if os.fstat(data.fileno()).st_size != m.size:
                        raise UserError("changed while bundling", where=str(source))
                    tarfmt.write_member(out, m, data)
            out.write(tarfmt.END_OF_ARCHIVE)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"path": str(dest), **info}
