"""The `oci` output: an OCI image layout holding the rootfs as one layer.

    rootfs.oci/
      oci-layout             {"imageLayoutVersion": "1.0.0"}
      index.json             one manifest, with its platform and ref name
      blobs/sha256/<hex>     the layer, the image config, the manifest

The layer is the canonical rootfs tar compressed with the project's fixed
settings (outputs.TarSink: zstd, or gzip for older runtimes), so it holds
the same bytes as the build's rootfs.tar.zst / rootfs.tar.gz.  Config and
manifest are canonical JSON (sorted keys, no whitespace) made only of values
that come from the recipe and its inputs -- `created` is the epoch; no paths,
host names or clock -- so the same recipe and inputs give the same manifest
digest on every machine.  Nothing here holds the tar in memory: the layer is
compressed as the build streams the tar (LayerSink), or from a tar file.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from . import __version__, elfinfo, outputs
from .errors import UserError
from .hashing import CHUNK
from .recipe import Recipe

FORMAT = "oci"
LAYOUT_DIR = "rootfs.oci"
COMPRESSIONS = ("zstd", "gzip")
DEFAULT_COMPRESSION = "zstd"

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPES = {"zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
                     "gzip": "application/vnd.oci.image.layer.v1.tar+gzip"}
# the tar output format whose bytes the layer blob has
_TAR_FORMAT = {"zstd": "tar.zst", "gzip": "tar.gz"}

ANN = "org.opencontainers.image."
REF_NAME = ANN + "ref.name"
# Recipe keys (under output:) that only mean something for the oci format.
RECIPE_KEYS = ("oci_compression", "oci_version", "oci_revision")

# rootfs arch (libguestfs / uname names, see elfinfo) -> OCI platform (Go names)
PLATFORMS: dict[str, dict[str, str]] = {
    "x86_64": {"architecture": "amd64"},
    "aarch64": {"architecture": "arm64", "variant": "v8"},
    "i386": {"architecture": "386"},
    "arm": {"architecture": "arm"},
    "ppc64le": {"architecture": "ppc64le"},
    "ppc64": {"architecture": "ppc64"},
    "s390x": {"architecture": "s390x"},
    "riscv64": {"architecture": "riscv64"},
    "loongarch64": {"architecture": "loong64"},
    "mips": {"architecture": "mips"},
}


def canonical_json(doc: Any) -> bytes:
    """The one serialization used for every config, manifest and index:
    its digest depends on the content only."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def rfc3339(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str          # "sha256:<hex>"
    size: int
    annotations: tuple[tuple[str, str], ...] = ()
    platform: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.annotations:
            doc["annotations"] = dict(self.annotations)
        if self.platform:
            doc["platform"] = dict(self.platform)
        return doc

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")

    @classmethod
    def from_json(cls, doc: Any, where: str) -> Descriptor:
        """A descriptor read from a manifest or index, checked enough to be
        used as a file name and a download size."""
        try:
            media_type, digest, size = doc["mediaType"], doc["digest"], doc["size"]
            annotations = doc.get("annotations") or {}
            platform = doc.get("platform") or {}
            ok = (isinstance(media_type, str) and isinstance(digest, str)
                  and is_sha256_digest(digest) and isinstance(size, int)
                  and not isinstance(size, bool) and size >= 0
                  and isinstance(annotations, dict) and isinstance(platform, dict)
                  and all(isinstance(k, str) and isinstance(v, str)
                          for k, v in annotations.items()))
        except (TypeError, KeyError, AttributeError):
            ok = False
        if not ok:
            raise UserError("not a valid OCI descriptor (mediaType, sha256 digest, size)",
                            where=where)
        return cls(media_type, digest, size, tuple(sorted(annotations.items())),
                   tuple(sorted((k, str(v)) for k, v in platform.items())))


def is_sha256_digest(text: str) -> bool:
    hexpart = text.removeprefix("sha256:")
    return (text.startswith("sha256:") and len(hexpart) == 64
            and all(c in "0123456789abcdef" for c in hexpart))


# ---------------------------------------------------------------------------
# what goes into the config and annotations


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """The values the config and the annotations are made of."""

    arch: str                     # rootfs arch, elfinfo names (x86_64, aarch64, ...)
    epoch: int
    title: str                    # the recipe's name
    description: str | None = None
    version: str | None = None    # output.oci_version
    revision: str | None = None   # output.oci_revision
    base_digest: str | None = None   # sha256 hex of the base image file
    compression: str = DEFAULT_COMPRESSION

    @classmethod
    def from_build(cls, recipe: Recipe, base_arch: str, base_sha256: str | None,
                   epoch: int) -> ImageInfo:
        spec = recipe.spec
        if base_arch in ("", "unknown") and spec.base.arch:
            base_arch = elfinfo.normalize_arch(spec.base.arch)   # inspection could not tell
        return cls(arch=base_arch, epoch=epoch, title=spec.name,
                   description=spec.description or None,
                   version=spec.output.oci_version, revision=spec.output.oci_revision,
                   base_digest=base_sha256, compression=spec.output.oci_compression)

    def platform(self) -> dict[str, str]:
        plat = PLATFORMS.get(self.arch)
        if plat is None:
            raise UserError(f"the rootfs architecture {self.arch!r} has no OCI platform name",
                            hint="set base.arch, or leave oci out of output.formats")
        return {"os": "linux", **plat}

    def annotations(self) -> dict[str, str]:
        ann = {ANN + "title": self.title, ANN + "created": rfc3339(self.epoch)}
        for key, value in (("description", self.description), ("version", self.version),
                           ("revision", self.revision)):
            if value:
                ann[ANN + key] = value
        if self.base_digest:
            ann[ANN + "base.digest"] = "sha256:" + self.base_digest
        return ann


def check_recipe(recipe: Recipe, *, bundle: bool) -> None:
    """Before any work: oci_* keys only with the oci format, and a bundle
    needs a format install.sh can install (it does not read OCI layouts)."""
    output = recipe.data.get("output", {})   # the keys as written (defaults aside)
    formats = list(recipe.spec.output.formats)
    if FORMAT not in formats:
        for key in RECIPE_KEYS:
            if key in output:
                raise UserError(f"output.{key} is set but output.formats has no oci",
                                where=recipe.where("output", key),
                                hint="add oci to output.formats, or remove the key")
        return
    if bundle and formats == [FORMAT]:
        raise UserError("output.formats: the deployment bundle needs a tar or image format "
                        "besides oci (install.sh does not read OCI layouts)",
                        where=recipe.where("output", "formats"),
                        hint="add tar.zst (the same bytes as the zstd OCI layer, stored "
                             "once in a registry), or set output.bundle: false")


# ---------------------------------------------------------------------------
# writing a layout


class LayerSink:
    """An outputs.Tee sink that makes the layer blob from the rootfs tar as
    the build streams it, and hashes the uncompressed tar (the diff_id).

    When the build also writes the same compressed tar (rootfs.tar.zst for
    zstd, rootfs.tar.gz for gzip: the same TarSink settings give the same
    bytes), the blob is copied from that file instead of compressing twice.
    """

    fmt = FORMAT

    def __init__(self, directory: Path, compression: str, siblings: list[Any]):
        if compression not in COMPRESSIONS:
            raise ValueError(compression)
        self.compression = compression
        tar_fmt = _TAR_FORMAT[compression]
        self._twin: outputs.TarSink | None = next(
            (s for s in siblings if getattr(s, "fmt", None) == tar_fmt), None)
        self._own = (None if self._twin is not None else outputs.TarSink(
            directory / f".{LAYOUT_DIR}-layer-{os.getpid()}.tmp", tar_fmt))
        self._diff = hashlib.sha256()
        self._closed = False
        self.tar_bytes = 0

    def write(self, data: bytes) -> None:
        self._diff.update(data)
        self.tar_bytes += len(data)
        if self._own is not None:
            self._own.write(data)

    def close(self) -> None:
        if self._own is not None and not self._closed:
            self._closed = True
            self._own.close()

    def discard(self) -> None:
        """Remove the temporary blob if write_layout did not take it."""
        if self._own is not None:
            self._own.file.path.unlink(missing_ok=True)

    @property
    def diff_id(self) -> str:
        return "sha256:" + self._diff.hexdigest()

    def blob(self) -> tuple[Path, str, int, bool]:
        """(file, sha256 hex, size, owned): `owned` files may be moved."""
        sink = self._own or self._twin
        assert sink is not None
        return sink.file.path, sink.file.sha.hexdigest(), sink.file.size, self._own is not None


def layer_sink(directory: Path, info: ImageInfo, formats: Any, sinks: list[Any]
               ) -> LayerSink | None:
    """With the oci format: a LayerSink added to the build's tar sinks
    (`sinks`, an outputs.Tee's list), after checking the platform is
    known; None otherwise."""
    if FORMAT not in formats:
        return None
    info.platform()
    sink = LayerSink(directory, info.compression, list(sinks))
    sinks.append(sink)
    return sink


@dataclasses.dataclass(frozen=True)
class OciImage:
    """A written (or read) layout: its manifest and what it points at."""

    directory: Path
    manifest: Descriptor
    config: Descriptor
    layers: tuple[Descriptor, ...]
    manifest_bytes: bytes

    def blob_path(self, desc: Descriptor) -> Path:
        return self.directory / "blobs" / "sha256" / desc.hex

    def artifact(self) -> dict[str, Any]:
        """The build's artifact entry (manifest.json, --json): a directory,
        identified by its manifest digest."""
        size = sum(self.blob_path(d).stat().st_size
                   for d in (self.manifest, self.config, *self.layers))
        return {"path": self.directory.name, "format": FORMAT, "sha256": self.manifest.hex,
                "size": size, "reproducibility": "bit-identical",
                "details": {"manifest_digest": self.manifest.digest,
                            "config_digest": self.config.digest,
                            "layer_digest": self.layers[0].digest,
                            "layer_media_type": self.layers[0].media_type}}


def _image_docs(layer: Descriptor, diff_id: str, info: ImageInfo
                ) -> tuple[bytes, bytes, dict[str, str]]:
    created = rfc3339(info.epoch)
    platform = info.platform()
    annotations = info.annotations()
    config = {
        **platform,
        "created": created,
        "config": {"Labels": annotations},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created,
                     "created_by": f"rootfs-build {__version__}: recipe {info.title}"}],
    }
    config_bytes = canonical_json(config)
    config_desc = Descriptor(MEDIA_CONFIG, sha256_digest(config_bytes), len(config_bytes))
    manifest = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
                "config": config_desc.to_json(), "layers": [layer.to_json()],
                "annotations": annotations}
    return config_bytes, canonical_json(manifest), platform


def write_layout(directory: Path, layer: LayerSink, info: ImageInfo) -> OciImage:
    """Write the layout into `directory` (which must not exist yet; a
    staging path: the caller publishes it).  `layer` is closed."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    src, hexdigest, size, owned = layer.blob()
    if owned:
        os.replace(src, blobs / hexdigest)
    else:
        shutil.copyfile(src, blobs / hexdigest)
    os.chmod(blobs / hexdigest, 0o644)   # not the umask's business
    layer_desc = Descriptor(LAYER_MEDIA_TYPES[layer.compression], "sha256:" + hexdigest, size)
    config_bytes, manifest_bytes, platform = _image_docs(layer_desc, layer.diff_id, info)
    image = _finish_layout(directory, config_bytes, manifest_bytes, platform,
                           ref_name=info.version or "latest")
    return image


def _finish_layout(directory: Path, config_bytes: bytes, manifest_bytes: bytes,
                   platform: dict[str, str], *, ref_name: str) -> OciImage:
    blobs = directory / "blobs" / "sha256"
    for data in (config_bytes, manifest_bytes):
        _write_file(blobs / hashlib.sha256(data).hexdigest(), data)
    manifest_desc = Descriptor(MEDIA_MANIFEST, sha256_digest(manifest_bytes),
                               len(manifest_bytes), annotations=((REF_NAME, ref_name),),
                               platform=tuple(sorted(platform.items())))
    index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX,
             "manifests": [manifest_desc.to_json()]}
    _write_file(directory / "index.json", canonical_json(index))
    _write_file(directory / "oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}))
    for d in (directory, directory / "blobs", blobs):
        os.chmod(d, 0o755)
    return read_layout(directory)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o644)


def layout_from_tar(tar: Path, layout: Path, info: ImageInfo) -> OciImage:
    """Write `layout` (a new directory) for a canonical rootfs tar file,
    streamed, never read whole: what the build writes for the same tar and
    ImageInfo."""
    sink = LayerSink(layout.parent, info.compression, [])
    try:
        with open(tar, "rb") as f:
            while chunk := f.read(CHUNK):
                sink.write(chunk)
        sink.close()
        return write_layout(layout, sink, info)
    finally:
        sink.close()
        sink.discard()


# ---------------------------------------------------------------------------
# reading a layout


MAX_JSON = 4 << 20   # index, manifest and config documents are small


def read_json_doc(data: bytes, where: str) -> dict[str, Any]:
    if len(data) > MAX_JSON:
        raise UserError(f"document is larger than {MAX_JSON >> 20} MiB", where=where)
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise UserError("not valid JSON", where=where) from None
    if not isinstance(doc, dict):
        raise UserError("not a JSON object", where=where)
    return doc


def parse_manifest(data: bytes, where: str) -> tuple[Descriptor, tuple[Descriptor, ...],
                                                     dict[str, Any]]:
    """(config, layers, the whole document) of an OCI image manifest."""
    doc = read_json_doc(data, where)
    if doc.get("schemaVersion") != 2 or doc.get("mediaType", MEDIA_MANIFEST) != MEDIA_MANIFEST:
        raise UserError(f"not an OCI image manifest (mediaType {doc.get('mediaType')!r})",
                        where=where)
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise UserError("manifest has no layers list", where=where)
    return (Descriptor.from_json(doc.get("config"), f"{where}: config"),
            tuple(Descriptor.from_json(d, f"{where}: layers[{i}]") for i, d in enumerate(layers)),
            doc)


def read_layout(directory: Path) -> OciImage:
    """The image of a layout written by write_layout (one manifest); the
    manifest is checked against its digest, the blobs must exist with the
    sizes the manifest gives (their content is checked by whoever reads
    them: a registry on upload, skopeo, rootfs-build pull)."""
    where = str(directory / "index.json")
    try:
        index = read_json_doc((directory / "index.json").read_bytes(), where)
    except FileNotFoundError:
        raise UserError("not an OCI image layout (no index.json)", where=str(directory)) from None
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or len(manifests) != 1:
        raise UserError("expected exactly one manifest in index.json", where=where)
    desc = Descriptor.from_json(manifests[0], where)
    if desc.media_type != MEDIA_MANIFEST:
        raise UserError(f"index.json points at a {desc.media_type}, not an OCI image manifest",
                        where=where)
    path = directory / "blobs" / "sha256" / desc.hex
    try:
        data = path.read_bytes() if path.stat().st_size <= MAX_JSON else b""
    except FileNotFoundError:
        raise UserError("the manifest blob is missing", where=str(path)) from None
    if sha256_digest(data) != desc.digest or len(data) != desc.size:
        raise UserError("the manifest blob does not match its digest", where=str(path))
    config, layers, _ = parse_manifest(data, str(path))
    for d in (config, *layers):
        blob = directory / "blobs" / "sha256" / d.hex
        try:
            size = blob.stat().st_size
        except FileNotFoundError:
            raise UserError(f"blob {d.digest} is missing", where=str(directory)) from None
        if size != d.size:
            raise UserError(f"blob {d.digest} has {size} bytes, the manifest says {d.size}",
                            where=str(blob))
    return OciImage(directory, desc, config, layers, data)
