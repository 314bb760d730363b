"""Push a build's output directory to a registry, and pull it back.

A build directory with the oci format goes to a registry as two manifests:

    REF (tag T)        the OCI image of rootfs.oci: its exact manifest bytes, so
                       the registry's digest is the layout's digest
    tag "T.bundle"     an artifact with every other file of the directory as a
                       layer titled by its relative path (rootfs.oci's
                       index.json and oci-layout, manifest.json, SHA256SUMS,
                       dpu/, host/, other rootfs formats), its mode in an
                       annotation, `subject` = the image, and a config with the
                       name, the epoch and the bundle tar's sha256

Blobs are content-addressed: rootfs.tar.zst and the zstd layer are one blob.
The push uploads every blob, then the image manifest by digest, then the
bundle under its tag, and the image tag last: a push that stops midway
leaves the image tag as it was (or absent), never pointing at an image
whose parts are missing, and `pull` refuses a bundle whose subject is not
the image it pulled (a re-push that did not finish).

`pull` fetches into a staging directory beside DIR/<name> (outputs.OutputDir)
and publishes it with one rename only after every blob matched its digest
and SHA256SUMS matched every file; the bundle tar is remade (its bytes
depend only on the files and the epoch) and must match the pushed sha256.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, oci, ui, values
from .deploy.bundle import SUMS, _check_rel, read_sums
from .errors import UserError
from .hashing import sha256_file
from .registry import NotFound, Options, Reference, RegistryError, connect

if TYPE_CHECKING:
    from .registry_client import Client

BUNDLE_TAG_SUFFIX = ".bundle"
MEDIA_BUNDLE_CONFIG = "application/vnd.rootfs-build.bundle.config.v1+json"
MEDIA_FILE = "application/octet-stream"
ARTIFACT_BUNDLE = "application/vnd.rootfs-build.bundle.v1"
TITLE = oci.ANN + "title"
MODE = "rootfs-build.mode"
MANIFEST_JSON = "manifest.json"
MODE_RE = re.compile(r"^0[0-7]{3}$")


def bundle_tag(tag: str) -> str:
    out = tag + BUNDLE_TAG_SUFFIX
    if len(out) > 128:
        raise UserError(f"tag {tag!r} is too long to put {BUNDLE_TAG_SUFFIX!r} after it",
                        hint="use a tag of at most 121 characters")
    return out


@dataclasses.dataclass
class Transfer:
    """What a push or pull did, for --json and the benchmark."""

    ref: str
    digest: str            # the image manifest's
    bundle_digest: str
    directory: str
    bytes: int             # blob and manifest bytes sent or received
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# push


@dataclasses.dataclass(frozen=True)
class _File:
    rel: str
    path: Path
    sha256: str
    size: int
    mode: int


def _output_files(directory: Path) -> tuple[dict[str, Any], list[_File], oci.OciImage]:
    """The build's manifest.json, its files (checked against SHA256SUMS) and
    its OCI layout."""
    if not (directory / SUMS).is_file() or not (directory / MANIFEST_JSON).is_file():
        raise UserError("not a rootfs-build output directory (no SHA256SUMS and "
                        "manifest.json)", where=str(directory),
                        hint="give the directory a build wrote, e.g. output/NAME")
    if not (directory / oci.LAYOUT_DIR).is_dir():
        raise UserError(f"no {oci.LAYOUT_DIR} in the output directory", where=str(directory),
                        hint="build with oci among output.formats (e.g. --set "
                             "'output.formats=[tar.zst, oci]')")
    manifest = oci.read_json_doc((directory / MANIFEST_JSON).read_bytes(),
                                 str(directory / MANIFEST_JSON))
    sums = read_sums(directory / SUMS)
    files: list[_File] = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise UserError("only regular files and directories can be pushed", where=str(path))
        if path.is_dir():
            continue
        if rel != SUMS and rel not in sums:
            raise UserError(f"{rel} is not listed in {SUMS}", where=str(path))
        files.append(_File(rel, path, "", path.stat().st_size, path.stat().st_mode & 0o777))
    missing = sorted(set(sums) - {f.rel for f in files})
    if missing:
        raise UserError(f"{missing[0]} is listed in {SUMS} but missing", where=str(directory))
    checked = []
    with ui.bar("checking SHA256SUMS", sum(f.size for f in files)) as bar:
        for f in files:
            digest = sha256_file(f.path, progress=bar.update)
            if f.rel != SUMS and digest != sums[f.rel]:
                raise UserError(f"{f.rel} does not match {SUMS}", where=str(f.path),
                                hint="the output was changed after the build; build again")
            checked.append(dataclasses.replace(f, sha256=digest))
    image = oci.read_layout(directory / oci.LAYOUT_DIR)
    return manifest, checked, image


def push_output(directory: Path, ref: Reference, opts: Options) -> Transfer:
    """Push the output directory `directory` (DIR/<name>) as REF and
    REF's tag + ".bundle"."""
    start = time.monotonic()
    if ref.digest:
        raise UserError(f"REF {ref}: push to a tag, not a digest (the digest is the image's)",
                        hint="e.g. REPO:v1")
    ref = ref.with_tag(ref.tag or "latest")
    tag_b = bundle_tag(ref.tag or "latest")
    build_manifest, files, image = _output_files(directory)
    name = values.check_name(build_manifest.get("name"))
    epoch = build_manifest.get("epoch")
    bundle_file = directory.parent / f"{name}.bundle.tar"
    bundle_tar = None
    if bundle_file.is_file():
        bundle_tar = {"sha256": sha256_file(bundle_file), "size": bundle_file.stat().st_size}
    client = connect(ref, opts)
    blobs_prefix = f"{oci.LAYOUT_DIR}/blobs/"
    image_blobs = {d.hex for d in (image.manifest, image.config, *image.layers)}
    carried = [f for f in files if not (f.rel.startswith(blobs_prefix)
                                        and f.rel.removeprefix(blobs_prefix + "sha256/")
                                        in image_blobs)]
    total = sum(d.size for d in (image.config, *image.layers)) + sum(f.size for f in carried)
    with ui.bar(f"pushing {ref}", total) as bar:
        for d in (image.config, *image.layers):
            if not client.push_blob_file(ref, image.blob_path(d), d.digest, d.size,
                                         progress=bar.update):
                bar.update(d.size)
        layers = []
        for f in carried:
            digest = "sha256:" + f.sha256
            if not client.push_blob_file(ref, f.path, digest, f.size, progress=bar.update):
                bar.update(f.size)
            layers.append(oci.Descriptor(MEDIA_FILE, digest, f.size, annotations=(
                (MODE, f"0{f.mode:03o}"), (TITLE, f.rel))))
    config = oci.canonical_json({"name": name, "epoch": epoch, "bundle_tar": bundle_tar,
                                 "tool": f"rootfs-build {__version__}"})
    config_desc = oci.Descriptor(MEDIA_BUNDLE_CONFIG, client.push_blob_bytes(ref, config),
                                 len(config))
    subject = oci.Descriptor(oci.MEDIA_MANIFEST, image.manifest.digest, image.manifest.size)
    bundle_manifest = oci.canonical_json({
        "schemaVersion": 2, "mediaType": oci.MEDIA_MANIFEST, "artifactType": ARTIFACT_BUNDLE,
        "config": config_desc.to_json(), "layers": [d.to_json() for d in layers],
        "subject": subject.to_json(),
        "annotations": {TITLE: f"{name} deployment files", oci.ANN + "created":
                        oci.rfc3339(epoch) if isinstance(epoch, int) else ""}})
    # Image by digest, then the bundle, then the image tag: see the module docstring.
    client.put_manifest(ref, image.manifest_bytes, oci.MEDIA_MANIFEST, image.manifest.digest)
    bundle_digest = client.put_manifest(ref, bundle_manifest, oci.MEDIA_MANIFEST, tag_b)
    client.put_manifest(ref, image.manifest_bytes, oci.MEDIA_MANIFEST, ref.tag or "latest")
    return Transfer(str(ref), image.manifest.digest, bundle_digest, str(directory),
                    client.bytes_up, round(time.monotonic() - start, 3))


# ---------------------------------------------------------------------------
# pull


@dataclasses.dataclass(frozen=True)
class _Bundle:
    name: str
    epoch: int
    bundle_tar: dict[str, Any] | None
    files: list[tuple[str, oci.Descriptor, int]]   # rel, blob, mode


def _parse_bundle(data: bytes, image_digest: str, where: str, config: bytes) -> _Bundle:
    cfg = oci.read_json_doc(config, f"{where}: config")
    try:
        name = values.check_name(cfg.get("name"))
    except ValueError:
        raise UserError("the bundle's config has no valid name", where=where) from None
    epoch = cfg.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise UserError("the bundle's config has no valid epoch", where=where)
    bundle_tar = cfg.get("bundle_tar")
    if bundle_tar is not None and not (isinstance(bundle_tar, dict)
                                       and isinstance(bundle_tar.get("sha256"), str)):
        raise UserError("the bundle's config has a malformed bundle_tar", where=where)
    _, layers, doc = oci.parse_manifest(data, where)
    subject = doc.get("subject")
    if not isinstance(subject, dict) or subject.get("digest") != image_digest:
        raise UserError(f"the bundle belongs to another image ({(subject or {}).get('digest')}"
                        f", not {image_digest}): a push did not finish, or another one is "
                        "running", where=where, hint="push again, then pull")
    files = []
    seen = set()
    for i, d in enumerate(layers):
        ann = dict(d.annotations)
        rel, mode = ann.get(TITLE, ""), ann.get(MODE, "")
        if (not _check_rel(rel) or rel in seen or rel.startswith(f"{oci.LAYOUT_DIR}/blobs/")
                or not MODE_RE.match(mode)):
            raise UserError(f"layers[{i}]: unusable file name {rel!r} or mode {mode!r}",
                            where=where)
        seen.add(rel)
        files.append((rel, d, int(mode, 8)))
    for needed in (SUMS, MANIFEST_JSON, f"{oci.LAYOUT_DIR}/index.json"):
        if needed not in seen:
            raise UserError(f"the bundle has no {needed}", where=where)
    return _Bundle(name, epoch, bundle_tar, files)


def pull_output(ref: Reference, output_root: Path, opts: Options) -> Transfer:
    """Fetch REF (+ its ".bundle" tag) into output_root/<name>/, verified,
    published with one rename; also output_root/<name>.bundle.tar when the
    pushed build had one."""
    from .deploy import make_bundle
    from .outputs import OutputDir
    start = time.monotonic()
    if not ref.tag:
        if ref.digest:
            raise UserError(f"REF {ref}: pull needs a tag (the deployment files are found by "
                            f"the tag + {BUNDLE_TAG_SUFFIX!r})", hint="e.g. REPO:v1")
        ref = ref.with_tag("latest")
    client = connect(ref, opts)
    accept = oci.MEDIA_MANIFEST
    try:
        data, media_type = client.get_manifest_bytes(ref, ref.digest or ref.tag or "latest",
                                                     accept)
    except NotFound:
        raise NotFound(f"{ref}: no such image", hint="check the reference; push it first"
                       ) from None
    if media_type and media_type != oci.MEDIA_MANIFEST:
        raise RegistryError(f"{ref} is a {media_type}, not an image pushed by rootfs-build")
    image_digest = oci.sha256_digest(data)
    config, layers, _ = oci.parse_manifest(data, str(ref))
    b_ref = ref.with_tag(bundle_tag(ref.tag or "latest"))
    try:
        b_data, _ = client.get_manifest_bytes(b_ref, b_ref.tag or "", accept)
    except NotFound:
        raise NotFound(f"{b_ref}: no deployment files beside the image",
                       hint="push the build with rootfs-build push") from None
    b_config_desc, _, _ = oci.parse_manifest(b_data, str(b_ref))
    if b_config_desc.media_type != MEDIA_BUNDLE_CONFIG:
        raise RegistryError(f"{b_ref} is not a rootfs-build bundle ({b_config_desc.media_type})")
    bundle = _parse_bundle(b_data, image_digest, str(b_ref),
                           client.fetch_blob_bytes(b_ref, b_config_desc.digest,
                                                   b_config_desc.size))
    total = sum(d.size for d in (config, *layers)) + sum(d.size for _, d, _ in bundle.files)
    known: dict[str, str] = {}
    with OutputDir(output_root, bundle.name) as out:
        stage = out.staging
        blobs = stage / oci.LAYOUT_DIR / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        with ui.bar(f"pulling {ref}", total) as bar:
            for d in (config, *layers):
                rel = f"{oci.LAYOUT_DIR}/blobs/sha256/{d.hex}"
                _fetch_to(client, ref, d, stage / rel, 0o644, bar.update)
                known[rel] = d.hex
            (blobs / oci.Descriptor(oci.MEDIA_MANIFEST, image_digest, len(data)).hex
             ).write_bytes(data)
            os.chmod(blobs / image_digest.removeprefix("sha256:"), 0o644)
            known[f"{oci.LAYOUT_DIR}/blobs/sha256/{image_digest.removeprefix('sha256:')}"] = \
                image_digest.removeprefix("sha256:")
            have = {digest: stage / rel for rel, digest in known.items()}
            for rel, d, mode in bundle.files:
                if d.hex in have:   # e.g. rootfs.tar.zst: the layer, fetched and checked
                    _copy_to(have[d.hex], stage / rel, mode)
                    bar.update(d.size)
                else:
                    _fetch_to(client, b_ref, d, stage / rel, mode, bar.update)
                    have[d.hex] = stage / rel
                known[rel] = d.hex
        _check_pulled(stage, known, image_digest)
        if bundle.bundle_tar is not None:
            dest = out.sibling(f"{bundle.name}.bundle.tar")
            make_bundle(output_root, bundle.name, bundle.epoch, src=stage, dest=dest)
            if sha256_file(dest) != bundle.bundle_tar["sha256"]:
                dest.unlink()
                ui.warn(f"{bundle.name}.bundle.tar made here differs from the pushed build's "
                        "(another rootfs-build version?); it is left out: the directory is "
                        "complete and verified")
        final = out.publish()
    return Transfer(str(ref), image_digest, oci.sha256_digest(b_data), str(final),
                    client.bytes_down, round(time.monotonic() - start, 3))


def _fetch_to(client: Client, ref: Reference, d: oci.Descriptor, path: Path, mode: int,
              progress: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o755)
    with open(path, "wb") as f:   # fetch_blob hashes; OutputDir.publish fsyncs
        client.fetch_blob(ref, d.digest, d.size, f.write, progress=progress)
    os.chmod(path, mode)


def _copy_to(src: Path, path: Path, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o755)
    shutil.copyfile(src, path)
    os.chmod(path, mode)


def _check_pulled(stage: Path, known: dict[str, str], image_digest: str) -> None:
    """SHA256SUMS lists every pulled file with the digest it was fetched
    under, and rootfs.oci/index.json names the image that was pulled."""
    sums = read_sums(stage / SUMS)
    for rel, digest in known.items():
        if rel != SUMS and sums.get(rel) != digest:
            raise UserError(f"{rel} does not match the pulled {SUMS}", where=str(stage / rel))
    unlisted = sorted(set(sums) - set(known))
    if unlisted:
        raise UserError(f"{unlisted[0]} is listed in the pulled {SUMS} but was not pushed")
    image = oci.read_layout(stage / oci.LAYOUT_DIR)
    if image.manifest.digest != image_digest:
        raise UserError(f"the pulled {oci.LAYOUT_DIR}/index.json names {image.manifest.digest},"
                        f" not the image pulled ({image_digest})")


def transfer_lines(t: Transfer, verb: str) -> str:
    mb = t.bytes / 1e6
    return (f"{verb} {t.ref} ({t.digest}) in {t.seconds:.1f} s, {mb:.1f} MB transferred"
            f"\n  deployment files: {t.bundle_digest}\n  directory: {t.directory}")

