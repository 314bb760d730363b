"""Packages installed by the rootfs's own dnf (or rpm), offline, reproducibly.

    check(request, arch=..., workdir=...)    host side, before any appliance:
        every repository readable (a directory with repodata/, a directory
        of *.rpm indexed here with createrepo_c, or an .iso read with
        bsdtar), every requested name provided by one of them, every RPM
        file and key readable.  Only metadata is read (dnf's library on
        the host, python3-rpm for RPM file headers, gpg for keys);
        nothing from an RPM runs on the build host.
    request_digest(request, repo_set)         the cache key's document:
        content only (metadata and RPM hashes, names, keys, options).
    install(request, repo_set, ...)           in the appliance: the
        repositories attached read-only (a squashfs made of a directory's
        RPMs and metadata, or the ISO itself), mounted in the run tmpfs,
        the rootfs's dnf run chrooted with network off, no image repo
        configs or plugins, weak dependencies off unless asked, scriptlets
        and triggers on; the rpm database is updated and normalized
        (guestfs_io.TreeSession.finish).  A user's mistake is one line.

The installed packages come back in PackageSummary (name, epoch, version,
release, arch, sha256 of the RPM file) for manifest.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from . import emulation, guestfs_io
from .errors import UserError
from .guestfs_io import Nevra
from .hashing import sha256_file

T = TypeVar("T")

ENGINE_VERSION = 1   # part of every request digest: bump when install() changes its result
can_run = emulation.can_run

REPO_ROOT = f"{guestfs_io.RUN_DIR}/repos"   # inside the rootfs, in the run tmpfs
RPMS_DIR = f"{guestfs_io.RUN_DIR}/rpms"
KEYS_DIR = f"{guestfs_io.RUN_DIR}/keys"
DNF_DIR = f"{guestfs_io.RUN_DIR}/dnf"
DNF_PROGRAMS = ("/usr/bin/dnf", "/usr/bin/yum", "/usr/bin/dnf-3")
RPM_PROGRAM = "/usr/bin/rpm"
# RPM file names that pass to dnf, rpm and gensquashfs's pack file unquoted
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._+~^:@,=%-]+$")


@dataclasses.dataclass(frozen=True)
class PackageRequest:
    """What to install: names (anything `dnf install` takes: names, provides,
    file paths, globs) from `repos`, and RPM files; then `remove`.  With
    gpgcheck every package must be signed by one of `gpgkeys` (imported into
    the rootfs's rpm database) or a key the rootfs already trusts."""

    repos: tuple[Path, ...] = ()
    install: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    rpm_files: tuple[Path, ...] = ()
    gpgcheck: bool = True
    gpgkeys: tuple[Path, ...] = ()
    weak_deps: bool = False


@dataclasses.dataclass(frozen=True)
class RepoPackage:
    name: str
    epoch: int
    version: str
    release: str
    arch: str
    sha256: str | None   # of the RPM file (None: the metadata uses another checksum)
    location: str        # relative to the repository's root

    @property
    def nevra(self) -> Nevra:
        return (self.name, self.epoch, self.version, self.release, self.arch)


@dataclasses.dataclass(frozen=True)
class Repo:
    """One checked repository.

    kind: "repodata" (the user's metadata), "rpms" (indexed by check() into
    `metadata`), "iso" (its repodata extracted into `metadata`; the ISO is
    attached as it is).  `metadata` holds repodata/ on the host.
    """

    source: Path
    kind: str
    metadata: Path
    digest: str
    packages: tuple[RepoPackage, ...]


@dataclasses.dataclass(frozen=True)
class RpmFile:
    path: Path
    sha256: str
    name: str
    epoch: int
    version: str
    release: str
    arch: str

    @property
    def nevra(self) -> Nevra:
        return (self.name, self.epoch, self.version, self.release, self.arch)


@dataclasses.dataclass(frozen=True)
class GpgKey:
    path: Path
    sha256: str
    fingerprints: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class RepoSet:
    """What check() found; install() and request_digest() take it."""

    repos: tuple[Repo, ...]
    rpm_files: tuple[RpmFile, ...]
    keys: tuple[GpgKey, ...]
    arch: str
    workdir: Path


@dataclasses.dataclass(frozen=True)
class InstalledPackage:
    name: str
    epoch: int
    version: str
    release: str
    arch: str
    sha256: str | None   # of the RPM file it came from; None if not found among the inputs

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PackageSummary:
    """What a package step did, for manifest.json."""

    tool: str                           # "dnf" or "rpm": the rootfs's own
    installed: list[InstalledPackage]   # new in this step, sorted (gpg keys apart)
    removed: list[str]                  # NEVRAs gone in this step
    keys_imported: list[str]            # gpg-pubkey-... entries new in the rpm database
    rpm_version: str
    not_reproducible: list[str]         # what could not be made identical (normally empty)

    def to_json(self) -> dict[str, Any]:
        return {"tool": self.tool, "rpm_version": self.rpm_version,
                "installed": [p.to_json() for p in self.installed],
                "removed": self.removed, "keys_imported": self.keys_imported,
                "not_reproducible": self.not_reproducible}


# -- host side: checks ---------------------------------------------------------

def check(request: PackageRequest, *, arch: str, workdir: Path,
          where: str | None = None) -> RepoSet:
    """Everything that can fail before the appliance; one UserError line per
    problem, naming the path or name (`where`: the recipe key or file).
    Indexes and extracted metadata go to `workdir`, never to the user's
    directories."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not request.install and not request.remove and not request.rpm_files:
        raise UserError("nothing to install or remove", where=where,
                        hint="list packages under install:, or RPM files")
    if request.install and not request.repos:
        raise UserError(f"packages to install ({', '.join(request.install)}) but no "
                        "repositories", where=where,
                        hint="list local repositories under repos:")
    for name in (*request.install, *request.remove):
        if not name or name.startswith("-") or any(c.isspace() for c in name):
            raise UserError(f"{name!r} is not a package name or spec", where=where)
    for p in request.repos:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", str(p)):
            raise UserError(f"repository {p}: only local repositories are supported",
                            where=where, hint="give a directory or an .iso on this machine")
    repos = tuple(_check_repo(Path(p), i, workdir, where) for i, p in enumerate(request.repos))
    rpm_files = tuple(_check_rpm_file(Path(p), where) for p in request.rpm_files)
    keys = tuple(_check_key(Path(p), where) for p in request.gpgkeys)
    if request.install:
        _check_names(request.install, repos, arch, workdir, where)
    return RepoSet(repos, rpm_files, keys, arch, workdir)


def _check_repo(path: Path, index: int, workdir: Path, where: str | None) -> Repo:
    shown = str(path)
    if not path.exists():
        raise UserError(f"repository {shown} not found", where=where,
                        hint="give a directory with repodata/, a directory of .rpm files "
                             "or an .iso")
    meta = workdir / f"repo-{index}"
    if meta.exists():
        shutil.rmtree(meta)
    meta.mkdir(parents=True)
    if path.is_file():
        if path.suffix.lower() != ".iso":
            raise UserError(f"repository {shown} is a file but not an .iso", where=where,
                            hint="give a directory or an .iso image")
        _extract_iso_repodata(path, meta, where)
        kind = "iso"
    elif (path / "repodata").is_dir():
        if not (path / "repodata" / "repomd.xml").is_file():
            raise UserError(f"repository {shown}: repodata/ has no repomd.xml", where=where,
                            hint="regenerate it with createrepo_c, or remove repodata/ so the "
                                 "directory's RPMs are indexed at build time")
        meta = path
        kind = "repodata"
    elif path.is_dir():
        _index_rpms(path, meta, where)
        kind = "rpms"
    else:
        raise UserError(f"repository {shown} is neither a directory nor an .iso", where=where)
    packages = _read_metadata(meta, index, where=where, shown=shown)
    if kind == "rpms":
        _check_all_indexed(path, packages, where)
    if kind in ("repodata", "rpms"):
        for p in packages:
            f = path / p.location
            if not f.is_file():
                raise UserError(f"repository {shown}: its metadata lists {p.location}, which "
                                "is missing", where=where,
                                hint="copy the file back or regenerate the metadata")
            if not all(_SAFE_NAME.match(part) for part in Path(p.location).parts):
                raise UserError(f"repository {shown}: {p.location}: unusual characters in the "
                                "file name", where=where,
                                hint="rename it to letters, digits and ._+~^:@,=%-")
    digest = _repodata_digest(meta / "repodata")
    if kind == "rpms":  # generated metadata carries times: the RPMs are the content
        digest = _digest({"rpms": sorted(sha256_file(path / p.location) for p in packages)})
    return Repo(path, kind, meta, digest, packages)


def _extract_iso_repodata(iso: Path, meta: Path, where: str | None) -> None:
    """repodata/ of an ISO, read without mounting it (bsdtar reads ISO 9660
    with Rock Ridge and Joliet; libarchive is already a dependency)."""
    tool = shutil.which("bsdtar")
    if tool is None:
        raise UserError("bsdtar is missing (needed to read .iso repositories)",
                        hint="install libarchive-tools (./setup.sh does)")
    proc = subprocess.run([tool, "-x", "-f", str(iso), "-C", str(meta), "repodata"],
                          capture_output=True, text=True, check=False)
    if not (meta / "repodata" / "repomd.xml").is_file():
        detail = (proc.stderr.strip().splitlines() or ["no repodata/repomd.xml in it"])[-1]
        raise UserError(f"repository {iso}: not an ISO with a repository ({detail})",
                        where=where, hint="use an installation/everything ISO, or a "
                                          "directory with repodata/")


def _index_rpms(path: Path, meta: Path, where: str | None) -> None:
    rpms = sorted(path.rglob("*.rpm"))
    if not rpms:
        raise UserError(f"repository {path} has no repodata/ and no .rpm files", where=where,
                        hint="give a directory with repodata/ or one holding RPMs")
    tool = shutil.which("createrepo_c")
    if tool is None:
        raise UserError("createrepo_c is missing (needed to index a directory of RPMs)",
                        hint="install createrepo-c (./setup.sh does)")
    proc = subprocess.run([tool, "--quiet", "--no-database", "--simple-md-filenames",
                           "--workers", "2", "--outputdir", str(meta), str(path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode or not (meta / "repodata" / "repomd.xml").is_file():
        detail = (proc.stderr.strip().splitlines() or ["createrepo_c failed"])[-1]
        raise UserError(f"repository {path} has no metadata and cannot be indexed: {detail}",
                        where=where, hint="fix or remove the file it names")


def _check_all_indexed(path: Path, packages: tuple[RepoPackage, ...], where: str | None) -> None:
    """createrepo_c skips an RPM it cannot read with only a warning: name it."""
    indexed = {p.location for p in packages}
    for f in sorted(path.rglob("*.rpm")):
        rel = f.relative_to(path).as_posix()
        if rel not in indexed:
            raise UserError(f"repository {path}: {rel} is not a readable RPM, so the directory "
                            "cannot be indexed", where=where,
                            hint="replace the damaged file or remove it")


def _repodata_digest(repodata: Path) -> str:
    return _digest({"repodata": sorted((f.name, sha256_file(f)) for f in repodata.iterdir()
                                       if f.is_file())})


def _digest(doc: Any) -> str:
    import json

    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def _dnf_base(metadata: list[Path], arch: str, scratch: Path) -> Iterator[Any]:
    """dnf's own library on the host, reading the metadata (the repodata/
    in each of `metadata`) only: no system repo, config or plugins."""
    try:
        import dnf
    except ImportError:
        raise UserError("the dnf Python library is missing (needed to read repository "
                        "metadata)", hint="install python3-dnf (./setup.sh does)") from None
    for d in ("root", "cache", "persist", "log"):
        (scratch / d).mkdir(parents=True, exist_ok=True)
    base = dnf.Base()
    try:
        conf = base.conf
        conf.installroot = str(scratch / "root")
        conf.cachedir = str(scratch / "cache")
        conf.persistdir = str(scratch / "persist")
        conf.logdir = str(scratch / "log")
        conf.reposdir = []
        conf.gpgcheck = False
        conf.substitutions["arch"] = arch
        conf.substitutions["basearch"] = dnf.rpm.basearch(arch) if arch in dnf.rpm._BASEARCH_MAP \
            else arch
        conf.substitutions["releasever"] = "0"
        for i, directory in enumerate(metadata):
            base.repos.add_new_repo(f"rb-{i}", conf, baseurl=[directory.as_uri()])
        base.fill_sack(load_system_repo=False)
        yield base
    finally:
        base.close()


def _read_metadata(meta: Path, index: int, *, where: str | None, shown: str
                   ) -> tuple[RepoPackage, ...]:
    import hawkey

    with tempfile.TemporaryDirectory(prefix="dnf-") as tmp:
        try:
            with _dnf_base([meta], emulation.host_arch(), Path(tmp)) as base:
                pkgs = []
                for p in base.sack.query().available():
                    kind, value = p.chksum if p.chksum else (None, b"")
                    sha = value.hex() if kind is not None and \
                        hawkey.chksum_name(kind) == "sha256" else None
                    pkgs.append(RepoPackage(p.name, int(p.epoch), p.version, p.release, p.arch,
                                            sha, p.location))
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - dnf raises many kinds for bad metadata
            raise UserError(f"repository {shown}: its metadata cannot be read: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}",
                            where=where, hint="regenerate it with createrepo_c") from None
    return tuple(sorted(pkgs, key=lambda p: (p.nevra, p.location)))


def _check_names(names: tuple[str, ...], repos: tuple[Repo, ...], arch: str, workdir: Path,
                 where: str | None) -> None:
    from dnf.subject import Subject

    with tempfile.TemporaryDirectory(prefix="dnf-", dir=workdir) as tmp, \
            _dnf_base([r.metadata for r in repos], arch, Path(tmp)) as base:
        for name in names:
            query = Subject(name).get_best_query(base.sack, with_provides=True,
                                                 with_filenames=True).available().filter(
                arch=base.sack.list_arches())
            if not query:
                shown = ", ".join(str(r.source) for r in repos)
                raise UserError(f"no repository has a package {name!r} (for {arch})",
                                where=where, hint=f"looked in {shown}; fix the name or add "
                                                  "the repository that has it")


def _rpm_module() -> Any:
    try:
        import rpm
    except ImportError:
        raise UserError("the rpm Python library is missing (needed to read RPM headers)",
                        hint="install python3-rpm (./setup.sh does)") from None
    return rpm


def _check_rpm_file(path: Path, where: str | None) -> RpmFile:
    """The header of an RPM file, read with python3-rpm (digests checked;
    signatures are checked by the rootfs's rpm)."""
    if not path.is_file():
        raise UserError(f"RPM file {path} not found", where=where)
    if not _SAFE_NAME.match(path.name):
        raise UserError(f"RPM file {path}: unusual characters in the file name", where=where,
                        hint="rename it to letters, digits and ._+~^:@,=%-")
    rpm = _rpm_module()
    ts = rpm.TransactionSet()
    ts.setVSFlags(rpm._RPMVSF_NOSIGNATURES)
    rpm.setVerbosity(rpm.RPMLOG_EMERG)   # the error comes back as one line below
    try:
        with open(path, "rb") as f:
            h = ts.hdrFromFdno(f.fileno())
    except (rpm.error, OSError) as e:
        raise UserError(f"RPM file {path} is damaged or not an RPM (rpm: {e})", where=where,
                        hint="rpm -K shows what is wrong with it; use an intact copy") from None
    finally:
        rpm.setVerbosity(rpm.RPMLOG_WARNING)
    if h.isSource():
        raise UserError(f"RPM file {path} is a source package", where=where,
                        hint="give the binary RPM built from it")
    return RpmFile(path, sha256_file(path), h["name"], int(h["epoch"] or 0), h["version"],
                   h["release"], h["arch"])


def _check_key(path: Path, where: str | None) -> GpgKey:
    if not path.is_file():
        raise UserError(f"gpg key {path} not found", where=where)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"gpg key {path} cannot be read: {e.strerror}", where=where) from None
    gpg = shutil.which("gpg")
    if gpg is None:
        raise UserError("gpg is missing (needed to read gpg keys)",
                        hint="install gnupg (./setup.sh does)")
    with tempfile.TemporaryDirectory(prefix="gnupg-") as home:
        proc = subprocess.run([gpg, "--homedir", home, "--batch", "--with-colons",
                               "--show-keys", str(path)], capture_output=True, text=True,
                              check=False)
    fingerprints = tuple(line.split(":")[9] for line in proc.stdout.splitlines()
                         if line.startswith("fpr:"))
    if proc.returncode or not fingerprints or b"PRIVATE KEY" in data:
        raise UserError(f"gpg key {path} is not a public key", where=where,
                        hint="export it with gpg --armor --export KEYID")
    return GpgKey(path, hashlib.sha256(data).hexdigest(), fingerprints)


def request_digest(request: PackageRequest, repo_set: RepoSet) -> str:
    """The package step's part of a cache key: content only (repositories'
    metadata and RPM hashes, RPM files', keys' sha256), the names and the
    options; never a host path.  The caller adds the layers below and the
    epoch."""
    return _digest({
        "kind": "packages", "engine": ENGINE_VERSION,
        "repos": [r.digest for r in repo_set.repos],
        "install": sorted(set(request.install)),
        "remove": sorted(set(request.remove)),
        "rpm_files": sorted(f.sha256 for f in repo_set.rpm_files),
        "gpgcheck": request.gpgcheck,
        "gpgkeys": sorted(k.sha256 for k in repo_set.keys),
        "weak_deps": request.weak_deps,
    })


# -- host side: repository drives -------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RepoDrive:
    path: Path      # the image attached read-only
    label: str      # libguestfs drive label (letters only)
    fstype: str


def _label(i: int) -> str:
    letters = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        letters = chr(97 + r) + letters
    return f"rbrepo{letters}"


def repo_drives(repo_set: RepoSet) -> list[RepoDrive]:
    """Read-only drives for the repositories: an ISO as it is; a directory as
    a squashfs (gensquashfs, from a pack file naming the host files: the
    package files its metadata lists and the metadata, nothing else)."""
    drives = []
    for i, repo in enumerate(repo_set.repos):
        if repo.kind == "iso":
            drives.append(RepoDrive(repo.source, _label(i), "iso9660"))
            continue
        image = repo_set.workdir / f"repo-{i}.sqfs"
        pack = repo_set.workdir / f"repo-{i}.pack"
        lines, dirs = [], {"/repodata"}
        for f in sorted((repo.metadata / "repodata").iterdir()):
            if f.is_file():
                lines.append(f"file /repodata/{f.name} 0644 0 0 {f.resolve()}")
        for p in repo.packages:
            parts = Path(p.location).parts
            for k in range(1, len(parts)):
                dirs.add("/" + "/".join(parts[:k]))
            lines.append(f"file /{p.location} 0644 0 0 {(repo.source / p.location).resolve()}")
        for bad in (line for line in lines if len(line.split(" ")) != 6):
            raise UserError(f"repository {repo.source}: cannot pack {bad.split(' ')[1]} "
                            "(spaces in its path)", hint="rename the directory or file")
        pack.write_text("".join(f"dir {d} 0755 0 0\n" for d in sorted(dirs))
                        + "\n".join(lines) + "\n")
        proc = subprocess.run(["gensquashfs", "--force", "--quiet", "-c", "lz4",
                               "-j", str(max(1, min(4, os.cpu_count() or 1))),
                               "-F", str(pack), str(image)],
                              capture_output=True, text=True, check=False)
        if proc.returncode:
            raise UserError(f"repository {repo.source}: packing it for the appliance failed: "
                            f"{(proc.stderr.strip().splitlines() or ['gensquashfs failed'])[-1]}")
        drives.append(RepoDrive(image, _label(i), "squashfs"))
    return drives


# -- in the appliance ----------------------------------------------------------------

def install(request: PackageRequest, repo_set: RepoSet, *, tree: Callable[[BinaryIO], None],
            tree_bytes: int, epoch: int, arch: str, consume_upper: Callable[[BinaryIO], T],
            step: str, smp: int = guestfs_io.DEFAULT_SMP, timeout: float | None = None
            ) -> tuple[T, PackageSummary]:
    """The package step: one appliance, the tree laid out, the request
    installed by the rootfs's own tools, the upper directory (the step's
    layer) streamed to `consume_upper`.  `tree` writes the rootfs as a tar
    (like run_in_tree's); check() made `repo_set`."""
    emulation.require(arch, step=step)
    drives = repo_drives(repo_set)
    app = guestfs_io.Appliance(step, smp=smp, timeout=timeout)
    app.add_run_scratch(tree_bytes)
    for d in drives:
        app.add_drive(d.path, fmt="raw", readonly=True, label=d.label)
    with app:
        session = guestfs_io.TreeSession(app, step=step, epoch=epoch, arch=arch)
        session.lay(tree)
        summary = install_in_session(session, request, repo_set, drives)
        upper = session.finish(consume_upper)
    summary.not_reproducible.extend(session.not_reproducible)
    return upper, summary


def install_in_session(session: guestfs_io.TreeSession, request: PackageRequest,
                       repo_set: RepoSet, drives: list[RepoDrive], *, tool: str | None = None,
                       rpm_ignores_epoch: bool = False) -> PackageSummary:
    """Install `request` in a laid-out tree whose appliance has `drives`
    attached.  `tool` "rpm" uses rpm even when the rootfs has dnf (RPM
    files only).  `rpm_ignores_epoch` runs rpm and dnf without
    SOURCE_DATE_EPOCH, as rpm < 4.18 behaves (the database is then
    normalized in capture()); tests use it to check that path."""
    tool = tool or _tool(session, request)
    repo_dirs = [session.mount_readonly(d.label, d.fstype, f"repos/{i}")
                 for i, d in enumerate(drives)]
    session.app.call("mkdir_p", RPMS_DIR)
    files = []
    for f in repo_set.rpm_files:
        session.app.call("upload", str(f.path), f"{RPMS_DIR}/{f.path.name}")
        files.append(f"{RPMS_DIR}/{f.path.name}")
    session.app.call("mkdir_p", KEYS_DIR)
    keys = []
    for i, k in enumerate(repo_set.keys):
        session.app.call("upload", str(k.path), f"{KEYS_DIR}/{i}.key")
        keys.append(f"{KEYS_DIR}/{i}.key")
    before = session.rpm_listing().packages
    rpm_version = _rpm_version(session, before)
    script = _script(tool, request, files, keys, rpm_ignores_epoch)
    if tool == "dnf":
        _write_dnf_config(session, request, repo_dirs)
    def explain(log: str) -> str | None:
        # dnf says only "Error unpacking rpm package X", not rpm's reason:
        # ask rpm, unpacking X again (scripts off) in the failed step's
        # changes, which are dropped anyway
        m = re.search(r"Error unpacking rpm package (\S+)", log)
        where = _package_file(m[1], repo_set, repo_dirs, files) if m else None
        if m and where:
            why = explain_failure(session.command([
                "/bin/bash", "-c", "rpm -i --nodeps --noscripts --notriggers --replacepkgs "
                f"--replacefiles -- {shlex.quote(where)} 2>&1 || true"]))
            if why:
                return f"{m[1]}: {why}"
        return explain_failure(log)

    session.run_scripts([("packages", script.encode())], {}, explain=explain,
                        hint="-v shows the package manager's last lines")
    log = session.log()
    # a failing %post or %posttrans is only a warning for rpm and dnf
    warned = _scriptlet_failure(log)
    if warned:
        raise UserError(f"{session.step}: {warned}")
    # and `dnf remove` of something not installed is not an error for dnf
    missing = re.search(r"^No match for argument: (\S+)", log, re.M)
    if missing:
        raise UserError(f"{session.step}: {missing[1]} is not installed, so it cannot be "
                        "removed", hint="fix the name under remove:")
    after = session.rpm_listing().packages
    return _summary(tool, before, after, repo_set, rpm_version)


def _package_file(nevra: str, repo_set: RepoSet, repo_dirs: list[str], files: list[str]
                  ) -> str | None:
    """Where the package `nevra` (name-version-release.arch) is inside the
    rootfs during the step."""
    for f, inside in zip(repo_set.rpm_files, files, strict=True):
        if _nevra(f.nevra).replace(f"-{f.epoch}:", "-") == nevra:
            return inside
    for repo, directory in zip(repo_set.repos, repo_dirs, strict=True):
        for p in repo.packages:
            if f"{p.name}-{p.version}-{p.release}.{p.arch}" == nevra:
                return f"{directory}/{p.location}"
    return None


def _tool(session: guestfs_io.TreeSession, request: PackageRequest) -> str:
    if any(session.has(p) for p in DNF_PROGRAMS):
        return "dnf"
    if session.has(RPM_PROGRAM):
        if request.install:
            raise UserError(f"{session.step}: the rootfs has rpm but no dnf, so packages from "
                            f"repositories ({', '.join(request.install)}) cannot be resolved",
                            hint="give the RPM files instead, or use a base with dnf")
        return "rpm"
    raise UserError(f"{session.step}: the rootfs has neither dnf nor rpm to install packages "
                    "with", hint="use a base image with rpm (and dnf for repositories)")


def _dnf_program(session: guestfs_io.TreeSession) -> str:
    return next(p for p in DNF_PROGRAMS if session.has(p))


def _write_dnf_config(session: guestfs_io.TreeSession, request: PackageRequest,
                      repo_dirs: list[str]) -> None:
    """dnf's configuration for this step only, in the run tmpfs: no image
    repos or plugins, caches, logs and history in the tmpfs, nothing from
    the network, weak dependencies only when asked."""
    gpg = "1" if request.gpgcheck else "0"
    conf = f"""[main]
gpgcheck={gpg}
localpkg_gpgcheck={gpg}
repo_gpgcheck=0
install_weak_deps={'1' if request.weak_deps else '0'}
keepcache=0
cachedir={DNF_DIR}/cache
persistdir={DNF_DIR}/persist
logdir={DNF_DIR}/log
reposdir={DNF_DIR}/repos.d
varsdir={DNF_DIR}/vars
plugins=0
skip_if_unavailable=0
clean_requirements_on_remove=0
best=1
"""
    for d in ("cache", "persist", "log", "repos.d", "vars"):
        session.app.call("mkdir_p", f"{DNF_DIR}/{d}")
    session.write(f"{DNF_DIR}/dnf.conf", conf)
    repos = "".join(f"""[rb-{i}]
name=rootfs-build repository {i}
baseurl=file://{d}
enabled=1
gpgcheck={gpg}
metadata_expire=-1

""" for i, d in enumerate(repo_dirs))
    session.write(f"{DNF_DIR}/repos.d/rootfs-build.repo", repos)


def _script(tool: str, request: PackageRequest, files: list[str], keys: list[str],
            rpm_ignores_epoch: bool) -> str:
    """The step's script: keys imported, then one install and one remove
    transaction of the rootfs's dnf (or rpm -U / rpm -e)."""
    q = shlex.quote
    pm = "env -u SOURCE_DATE_EPOCH " if rpm_ignores_epoch else ""
    lines = ["#!/bin/bash", "set -euo pipefail"]
    if request.gpgcheck:
        lines += [f"{pm}rpm --import {q(k)}" for k in keys]
    if tool == "dnf":
        dnf = (f"{pm}\"$DNF\" --config={DNF_DIR}/dnf.conf --releasever=rootfs-build "
               "--assumeyes --noplugins --disableplugin='*'")
        lines.insert(2, "DNF=$(command -v dnf || command -v yum || command -v dnf-3)")
        targets = [*request.install, *files]
        if targets:
            lines.append(f"{dnf} install -- {' '.join(q(t) for t in targets)}")
        if request.remove:
            lines.append(f"{dnf} remove -- {' '.join(q(n) for n in request.remove)}")
    else:
        level = "signature" if request.gpgcheck else "digest"
        if files:
            lines.append(f"{pm}rpm -U -v --define '_pkgverify_level {level}' -- "
                         + " ".join(q(f) for f in files))
        if request.remove:
            lines.append(f"{pm}rpm -e -v -- " + " ".join(q(n) for n in request.remove))
    return "\n".join(lines) + "\n"


def _rpm_version(session: guestfs_io.TreeSession, installed: list[Nevra]) -> str:
    """The version of the rpm that runs the transaction: the rootfs's rpm
    package's, or `rpm --version`'s where rpm is not a package (one more rpm
    run, seconds under emulation)."""
    versions = {version for name, _epoch, version, _release, _arch in installed
                if name == "rpm"}
    if len(versions) == 1:
        return versions.pop()
    return session.command(["rpm", "--version"]).strip().rsplit(" ", 1)[-1]


def _nevra(n: Nevra) -> str:
    name, epoch, version, release, arch = n
    return f"{name}-{epoch}:{version}-{release}.{arch}" if epoch else \
        f"{name}-{version}-{release}.{arch}"


def _summary(tool: str, before: list[Nevra], after: list[Nevra], repo_set: RepoSet,
             rpm_version: str) -> PackageSummary:
    new = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    sources: dict[Nevra, set[str | None]] = {}
    for f in repo_set.rpm_files:
        sources.setdefault(f.nevra, set()).add(f.sha256)
    for repo in repo_set.repos:
        for p in repo.packages:
            sha = p.sha256
            if sha is None and repo.kind != "iso":
                sha = sha256_file(repo.source / p.location)
            sources.setdefault(p.nevra, set()).add(sha)
    installed = []
    for n in new:
        if n[0] == "gpg-pubkey":
            continue
        found = sources.get(n, set())
        installed.append(InstalledPackage(*n, sha256=next(iter(found)) if len(found) == 1
                                          else None))
    return PackageSummary(
        tool=tool, installed=installed, removed=[_nevra(n) for n in gone],
        keys_imported=[_nevra(n) for n in new if n[0] == "gpg-pubkey"],
        rpm_version=rpm_version, not_reproducible=[])


# -- what went wrong, in one line ------------------------------------------------------

# (pattern, message) over the package manager's output; the first match wins.
_EXPLANATIONS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p, re.M), m) for p, m in (
        (r"^No match for argument: (?P<a>\S+)",
         "no repository has a package {a!r} (or it is not installed, for remove)"),
        (r"Unable to find a match: (?P<a>.+)$", "no repository has a package {a}"),
        (r"nothing provides (?P<a>.+?) needed by (?P<b>\S+)",
         "{b} needs {a}, which no repository provides and the rootfs does not have"),
        (r"package (?P<b>\S+) requires (?P<a>.+?), but none of the providers can be installed",
         "{b} needs {a}, but no package providing it can be installed"),
        (r"^\s*(?P<a>.+?) is needed by (?P<b>\S+)$",
         "{b} needs {a}, which the rootfs does not have and no given RPM provides"),
        (r"file (?P<a>\S+) from install of (?P<b>\S+) conflicts with file from package "
         r"(?P<c>\S+)",
         "file conflict: {b} and {c} both have {a}, with different content"),
        (r"unpacking of archive failed on file (?P<a>[^\s;]+)\S*: (?:cpio: )?File from "
         r"package already exists as a directory in system",
         "it has a file or symlink at {a}, which is a directory in the rootfs "
         "(rpm refuses to replace a directory)"),
        (r"(?P<a>\S+): (?:Header|Payload) \S+ digest: BAD",
         "{a}: rpm says its digests are BAD (the package is damaged or was altered)"),
        (r"Package \"?(?P<a>[^\"]+?)\"? from local repository \"?(?P<b>[^\"]+?)\"? has "
         r"incorrect checksum",
         "{a}: the package file does not match its repository's checksum (damaged or "
         "altered)"),
        (r"Public key for (?P<a>\S+) is not installed",
         "{a} is signed with a key that is not among gpgkeys (gpgcheck is on)"),
        (r"Package (?P<a>\S+) is not signed",
         "{a} is not signed, and gpgcheck is on"),
        (r"(?P<a>\S+): (?:Header|Payload)? ?V\d \S+ Signature, key ID (?P<b>\w+): BAD",
         "{a}: its signature (key {b}) is BAD"),
        (r"package (?P<a>\S+) does not verify: (?P<b>.+)$",
         "{a} does not verify ({b}); with gpgcheck on it must be signed by one of gpgkeys"),
        (r"(?P<a>\S+): not an rpm package", "{a} is not an RPM package (damaged?)"),
        (r"(?:error|Error): (?P<a>\S+?): (?:headerRead|rpmReadSignature|read) failed[:.]? "
         r"?(?P<b>.*)$", "{a} is damaged ({b})"),
        (r"unpacking of archive failed(?: on file (?P<a>[^\s;]+)\S*)?: (?:cpio: )?(?P<b>.+)$",
         "a package's payload is damaged ({b})"),
        (r"error: %(?P<a>\w+)\((?P<b>[^)]+)\) scriptlet failed, exit status (?P<c>\d+)",
         "the %{a} scriptlet of {b} failed (exit status {c})"),
        (r"package (?P<a>\S+) is intended for a (?:different|\S+) architecture",
         "{a} is built for another architecture than the rootfs"),
        (r"Error unpacking rpm package (?P<a>\S+)", "{a} could not be unpacked"),
        (r"^Error: No packages marked for removal", "nothing to remove: the packages named "
         "under remove are not installed"),
        (r"^error: package (?P<a>\S+) is not installed", "{a} is not installed (remove)"),
    ))


def explain_failure(log: str) -> str | None:
    """The one line a package manager's failed output comes down to."""
    for pattern, message in _EXPLANATIONS:
        m = pattern.search(log)
        if m:
            return message.format(**{k: v.strip() if v else "?"
                                     for k, v in m.groupdict().items()})
    errors = [line.strip() for line in log.splitlines()
              if line.lower().startswith(("error:", "error "))]
    return f"the package manager failed: {errors[-1]}" if errors else None


_WARNED_SCRIPTLET = re.compile(
    r"warning: %(?P<a>\w+)\((?P<b>[^)]+)\) scriptlet failed, exit status (?P<c>\d+)")


def _scriptlet_failure(log: str) -> str | None:
    m = _WARNED_SCRIPTLET.search(log)
    if m is None:
        return None
    return (f"the %{m['a']} scriptlet of {m['b']} failed (exit status {m['c']}); rpm "
            "counts it as a warning, the build does not")
