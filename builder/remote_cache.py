"""A layer cache shared through an OCI registry: --cache-from / --cache-to.

Each cache entry (cache.py: entries/<key>/ holding its files and entry.json)
is one OCI artifact in the cache repository, tagged with its key:

    REPO:<key>   config  {"key", "kind", "label", "files": {name: {sha256, size}},
                          "info"}  (canonical JSON, no clock: the same entry
                          gives the same bytes on every machine)
                 layers  each file, zstd-compressed with the project's
                         settings, titled by its name

Keys are content digests (the same recipe and inputs give the same keys in
any directory, on any machine), so one tag per key needs no shared index
that concurrent pushers would have to merge: two builds pushing at once
write the same tags with the same bytes, and a reader asks for exactly the
keys it needs (404 is a miss).

What a reader takes is checked before the cache uses it: every blob
against its digest, every file against the size and sha256 the entry
lists, the entry's key against the key asked for, the set of files;
anything else is discarded with a warning and the entry is built locally.
A registry that is down, slow or refuses is one warning, and the build goes
on without it.  Trust: an entry cannot be checked against its key without
building it, so a cache repository is trusted like whoever can push to it
(as with BuildKit's registry cache).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import zstandard

from . import oci, outputs, ui
from .cache import ENTRY_META, Cache
from .errors import UserError
from .hashing import CHUNK
from .registry import (
    DigestMismatch,
    NotFound,
    Options,
    Reference,
    RegistryError,
    connect,
)

if TYPE_CHECKING:
    from .registry_client import Client

MEDIA_ENTRY_CONFIG = "application/vnd.rootfs-build.cache.entry.v1+json"
MEDIA_ENTRY_FILE = "application/vnd.rootfs-build.cache.file.v1+zstd"
ARTIFACT_ENTRY = "application/vnd.rootfs-build.cache.entry.v1"
TITLE = oci.ANN + "title"
KEY_RE = re.compile(r"^[0-9a-f]{64}$")
FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def cache_ref(text: str, flag: str) -> Reference:
    """A cache repository: HOST[:PORT]/REPOSITORY, without tag or digest
    (entries are tagged with their keys)."""
    ref = Reference.parse(text, what=flag)
    if ref.tag or ref.digest:
        raise UserError(f"{flag} {text}: give a repository without a tag or digest; the cache "
                        "tags each entry with its key", hint=f"e.g. {flag} {ref.repo}")
    return ref


class _Damaged(Exception):
    """An entry from the registry that must not be used."""


@dataclasses.dataclass
class Stats:
    ref: str
    fetched: list[str] = dataclasses.field(default_factory=list)
    pushed: list[str] = dataclasses.field(default_factory=list)
    present: list[str] = dataclasses.field(default_factory=list)   # already in the registry
    warnings: list[str] = dataclasses.field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "seconds": round(self.seconds, 3)}


class RemoteCache:
    """One cache repository.  `fetch` is Cache's remote hook (consulted on
    a local miss, with the entry's lock held); `push` uploads entries after
    a build.  Every registry problem is a warning, never an error."""

    def __init__(self, ref: Reference, opts: Options, *, role: str):
        self.ref = ref
        self.opts = opts
        self.role = role                      # "--cache-from" or "--cache-to", for messages
        self.stats = Stats(str(ref))
        self._client: Client | None = None
        self._off: str | None = None          # why the registry is no longer asked

    # -- connection ----------------------------------------------------------
    def connect(self) -> bool:
        """Reach the registry once (credentials, TLS); False, with a warning,
        if it cannot be used."""
        if self._off is not None:
            return False
        if self._client is None:
            try:
                client = connect(self.ref, self.opts)
            except RegistryError as e:
                self._give_up(e)
                return False
            self._client = client
        return True

    def _give_up(self, e: RegistryError) -> None:
        self._off = str(e)
        self._warn(f"{self.role} {self.ref}: {e}; going on without the remote cache")

    def _warn(self, message: str) -> None:
        self.stats.warnings.append(message)
        ui.warn(message)

    # -- reading ---------------------------------------------------------------
    def fetch(self, key: str, directory: Path) -> dict[str, Any] | None:
        """Fill `directory` (empty) with entry `key`'s files; returns
        {"files", "info"} or None (a miss, or a problem already warned
        about; `directory` is left empty)."""
        if not self.connect():
            return None
        assert self._client is not None
        start = time.monotonic()
        before = self._client.bytes_down
        try:
            doc = self._fetch(self._client, key, directory)
        except NotFound:
            return None
        except (_Damaged, DigestMismatch) as e:
            _empty(directory)
            self._warn(f"{self.role} {self.ref}: cache entry {key[:12]} is damaged ({e}); "
                       "building it here")
            return None
        except RegistryError as e:
            _empty(directory)
            self._give_up(e)
            return None
        except BaseException:
            _empty(directory)
            raise
        self.stats.fetched.append(key)
        self.stats.bytes += self._client.bytes_down - before
        self.stats.seconds += time.monotonic() - start
        ui.info(f"cache entry {key[:12]} fetched from {self.ref}")
        return doc

    def _fetch(self, client: Client, key: str, directory: Path) -> dict[str, Any]:
        data, _ = client.get_manifest_bytes(self.ref, key, oci.MEDIA_MANIFEST)  # NotFound: a miss
        try:
            return self._fetch_entry(client, key, directory, data)
        except NotFound as e:
            raise _Damaged(f"a blob it lists is missing: {e.message}") from None

    def _fetch_entry(self, client: Client, key: str, directory: Path, data: bytes
                     ) -> dict[str, Any]:
        try:
            config_desc, layers, _ = oci.parse_manifest(data, f"{self.ref}:{key[:12]}")
        except UserError as e:
            raise _Damaged(e.message) from None
        if config_desc.media_type != MEDIA_ENTRY_CONFIG:
            raise _Damaged(f"not a rootfs-build cache entry ({config_desc.media_type})")
        try:
            entry = oci.read_json_doc(client.fetch_blob_bytes(self.ref, config_desc.digest,
                                                              config_desc.size), "config")
        except UserError as e:
            if isinstance(e, RegistryError):
                raise
            raise _Damaged(e.message) from None
        files = entry.get("files")
        if entry.get("key") != key or not isinstance(files, dict):
            raise _Damaged("its config is for another key or lists no files")
        titles = {dict(d.annotations).get(TITLE, ""): d for d in layers}
        if sorted(titles) != sorted(files) or len(titles) != len(layers):
            raise _Damaged("its layers are not the files its config lists")
        for name, want in files.items():
            if (not FILE_RE.match(name) or name == ENTRY_META or not isinstance(want, dict)
                    or not isinstance(want.get("size"), int)
                    or not isinstance(want.get("sha256"), str)):
                raise _Damaged(f"unusable file entry {name!r}")
            d = titles[name]
            if d.media_type != MEDIA_ENTRY_FILE:
                raise _Damaged(f"{name}: unexpected media type {d.media_type}")
            with _Unpacked(directory / name, want["size"]) as sink:
                client.fetch_blob(self.ref, d.digest, d.size, sink.write)
            if sink.plain.size != want["size"] or sink.plain.sha.hexdigest() != want["sha256"]:
                raise _Damaged(f"{name} does not match the sha256 its entry lists")
        return {"files": files, "info": entry.get("info", {})}

    # -- writing ---------------------------------------------------------------------
    def push(self, cache: Cache, keys: list[str]) -> None:
        """Upload the entries `keys` (from `cache`, which holds them) that the
        registry lacks.  Problems are warnings."""
        if not self.connect():
            return
        assert self._client is not None
        client = self._client
        start = time.monotonic()
        before = client.bytes_up
        for key in dict.fromkeys(keys):
            try:
                if client.manifest_digest(self.ref, key, oci.MEDIA_MANIFEST) is not None:
                    self.stats.present.append(key)
                    continue
                self._push_entry(client, cache, key)
                self.stats.pushed.append(key)
            except _Damaged as e:
                self._warn(f"{self.role}: cache entry {key[:12]} not pushed: {e}")
            except RegistryError as e:
                self._give_up(e)
                break
        self.stats.bytes += client.bytes_up - before
        self.stats.seconds += time.monotonic() - start

    def _push_entry(self, client: Client, cache: Cache, key: str) -> None:
        meta = cache.meta(key)
        d = cache.entry_dir(key)
        files = meta["files"]
        layers = []
        with ui.bar(f"pushing cache entry {key[:12]}", sum(f["size"] for f in files.values())
                    ) as bar:
            for name, want in sorted(files.items()):
                with open(d / name, "rb") as f:
                    digest, size = client.push_blob_stream(
                        self.ref, _compressed(f, want, name, bar.update))
                layers.append(oci.Descriptor(MEDIA_ENTRY_FILE, digest, size,
                                             annotations=((TITLE, name),)))
        config = oci.canonical_json({"key": key, "kind": meta.get("kind"),
                                     "label": meta.get("label"), "files": files,
                                     "info": meta.get("info", {})})
        config_desc = oci.Descriptor(MEDIA_ENTRY_CONFIG, client.push_blob_bytes(self.ref, config),
                                     len(config))
        manifest = oci.canonical_json({
            "schemaVersion": 2, "mediaType": oci.MEDIA_MANIFEST, "artifactType": ARTIFACT_ENTRY,
            "config": config_desc.to_json(), "layers": [x.to_json() for x in layers]})
        client.put_manifest(self.ref, manifest, oci.MEDIA_MANIFEST, key)


def _compressed(f: BinaryIO, want: dict[str, Any], name: str, progress: Any) -> Iterator[bytes]:
    """zstd of a cache file as it is read, checked against its entry."""
    cobj = outputs.zstd_compressor().compressobj()
    sha = hashlib.sha256()
    size = 0
    while chunk := f.read(CHUNK):
        sha.update(chunk)
        size += len(chunk)
        progress(len(chunk))
        out = cobj.compress(chunk)
        if out:
            yield out
    if size != want["size"] or sha.hexdigest() != want["sha256"]:
        raise _Damaged(f"{name} no longer matches its entry in the local cache")
    tail = cobj.flush()
    if tail:
        yield tail


class _Plain:
    """The decompressed side: a new file, hashed as it is written; more
    bytes than the entry lists are refused (a small blob cannot fill the
    disk)."""

    def __init__(self, f: BinaryIO, limit: int):
        self.f = f
        self.limit = limit
        self.size = 0
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self.limit:
            raise _Damaged("it unpacks to more bytes than its entry lists")
        self.sha.update(data)
        self.f.write(data)
        return len(data)


class _Unpacked:
    """Takes the compressed bytes of a download (`write`) and writes the
    file they unpack to."""

    def __init__(self, path: Path, limit: int):
        self._f = open(path, "wb")   # noqa: SIM115 - closed in __exit__
        self.plain = _Plain(self._f, limit)
        self._dctx = zstandard.ZstdDecompressor().stream_writer(
            self.plain, closefd=False)  # type: ignore[arg-type]

    def write(self, data: bytes) -> None:
        try:
            self._dctx.write(data)
        except zstandard.ZstdError as e:
            raise _Damaged(f"its blob does not unpack: {e}") from None

    def __enter__(self) -> _Unpacked:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self._dctx.flush()
        finally:
            self._f.close()


def _empty(directory: Path) -> None:
    for p in directory.iterdir():
        if p.is_file() or p.is_symlink():
            p.unlink()


@dataclasses.dataclass
class Remotes:
    """The remote caches of one build: what the CLI's flags asked for."""

    source: RemoteCache | None
    target: RemoteCache | None

    @classmethod
    def from_flags(cls, cache_from: str | None, cache_to: str | None,
                   opts: Options) -> Remotes:
        return cls(RemoteCache(cache_ref(cache_from, "--cache-from"), opts, role="--cache-from")
                   if cache_from else None,
                   RemoteCache(cache_ref(cache_to, "--cache-to"), opts, role="--cache-to")
                   if cache_to else None)

    def attach(self, cache: Cache) -> None:
        """Before the build: misses consult --cache-from; --cache-to is
        reached once now, so a registry that is down is reported early."""
        if self.source is not None:
            self.source.connect()
            cache.remote = self.source
        if self.target is not None:
            self.target.connect()

    def finish(self, cache: Cache) -> dict[str, Any]:
        """After a successful build: push what it used to --cache-to; the
        summary for --json."""
        if self.target is not None:
            self.target.push(cache, cache.used)
        return {role: r.stats.to_json() for role, r in
                (("from", self.source), ("to", self.target)) if r is not None}

