"""Issue 11, host side (no appliance): what packages.check refuses before
any appliance, what the cache key depends on, the emulator lookup, and the
rpm database rewrite of the older-rpm path, on real RPMs built here."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from packages_helpers import (
    EPOCH,
    SPECS,
    make_gpg,
    make_iso,
    make_repo,
    tamper_first_file_mode,
)
from rpm_helpers import build_rpm

from builder import emulation, guestfs_io, packages, rpmheader
from builder.errors import UserError
from builder.packages import PackageRequest


@pytest.fixture(scope="module")
def rpms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("rpms")
    return {name: build_rpm(work, SPECS[name])
            for name in ("rb-lib", "rb-app", "rb-weak", "rb-needs-absent", "rb-tampered")}


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gpg = make_gpg(tmp_path_factory.mktemp("gpg") / "home", "suite")
    gpg.stop()
    return gpg.public


def _check(request: PackageRequest, tmp_path: Path, arch: str = "x86_64") -> packages.RepoSet:
    return packages.check(request, arch=arch, workdir=tmp_path / "work", where="recipe.yaml")


def _refused(request: PackageRequest, tmp_path: Path, *needles: str) -> str:
    with pytest.raises(UserError) as e:
        _check(request, tmp_path)
    line = str(e.value)
    assert "\n" not in line and line.startswith("recipe.yaml: "), line
    for needle in needles:
        assert needle in line, line
    return line


def _tree(path: Path) -> list[tuple[str, int, float]]:
    return sorted((str(p.relative_to(path)), p.stat().st_mode, p.stat().st_mtime)
                  for p in path.rglob("*"))


def test_directory_of_rpms_is_indexed_outside_the_users_directory(rpms: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", [rpms["rb-lib"], rpms["rb-app"]], index=False)
    os.chmod(repo, 0o555)
    before = _tree(repo)
    rs = _check(PackageRequest(repos=(repo,), install=("rb-app", "rb-lib-api",
                                                       "/usr/share/rb-lib/lib.txt", "rb-*")),
                tmp_path)
    assert _tree(repo) == before
    (r,) = rs.repos
    assert r.kind == "rpms" and (r.metadata / "repodata" / "repomd.xml").is_file()
    assert r.metadata.is_relative_to(tmp_path / "work")
    shas = {p.name: p.sha256 for p in r.packages}
    assert shas == {n: packages.sha256_file(rpms[n]) for n in ("rb-lib", "rb-app")}


def test_repodata_and_iso_repositories(rpms: dict[str, Path], tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", [rpms["rb-lib"]])
    iso = make_iso(make_repo(tmp_path / "iso-src", [rpms["rb-weak"]]), tmp_path / "r.iso")
    rs = _check(PackageRequest(repos=(repo, iso), install=("rb-lib", "rb-weak")), tmp_path)
    assert [r.kind for r in rs.repos] == ["repodata", "iso"]
    assert rs.repos[0].metadata == repo
    assert [p.name for p in rs.repos[1].packages] == ["rb-weak"]
    drives = packages.repo_drives(rs)
    assert drives[1].path == iso and drives[1].fstype == "iso9660"
    listing = subprocess.run(["rdsquashfs", "--describe", str(drives[0].path)],
                             capture_output=True, text=True, check=True).stdout
    names = sorted(line.split()[1] for line in listing.splitlines() if line.startswith("file"))
    assert [n for n in names if n.endswith(".rpm")] == [rpms["rb-lib"].name]
    assert "repodata/repomd.xml" in names


@pytest.mark.parametrize("case", ["missing", "plain file", "empty dir", "url",
                                  "iso without repodata", "repodata without repomd"])
def test_bad_repository_is_one_line(case: str, tmp_path: Path) -> None:
    path: Path | str
    if case == "missing":
        path, needle = tmp_path / "nope", "not found"
    elif case == "plain file":
        path = tmp_path / "f.txt"
        path.write_text("x")
        needle = "not an .iso"
    elif case == "empty dir":
        path = tmp_path / "empty"
        path.mkdir()
        needle = "has no repodata/ and no .rpm files"
    elif case == "url":
        path, needle = "http://127.0.0.1/repo", "only local repositories"
    elif case == "iso without repodata":
        src = tmp_path / "src"
        src.mkdir()
        (src / "x").write_text("x")
        path = make_iso(src, tmp_path / "x.iso")
        needle = "not an ISO with a repository"
    else:
        path = tmp_path / "r"
        (path / "repodata").mkdir(parents=True)
        needle = "repodata/ has no repomd.xml"
    _refused(PackageRequest(repos=(Path(path),), install=("x",)), tmp_path, needle,
             str(path).split("//")[-1])


def test_directory_with_a_damaged_rpm_cannot_be_indexed(rpms: dict[str, Path],
                                                        tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", [rpms["rb-lib"]], index=False)
    (repo / "broken-1.0-1.noarch.rpm").write_bytes(rpms["rb-app"].read_bytes()[:300])
    _refused(PackageRequest(repos=(repo,), install=("rb-lib",)), tmp_path,
             "broken-1.0-1.noarch.rpm is not a readable RPM", "cannot be indexed")


def test_name_no_repository_has_is_one_line(rpms: dict[str, Path], tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", [rpms["rb-lib"]])
    _refused(PackageRequest(repos=(repo,), install=("rb-lib", "libvirt-client")), tmp_path,
             "no repository has a package 'libvirt-client'", str(repo))


def test_arch_of_the_rootfs_decides(tmp_path: Path) -> None:
    arm = build_rpm(tmp_path / "b", SPECS["rb-arm"], target="aarch64")
    repo = make_repo(tmp_path / "repo", [arm])
    assert _check(PackageRequest(repos=(repo,), install=("rb-arm",)), tmp_path, "aarch64")
    _refused(PackageRequest(repos=(repo,), install=("rb-arm",)), tmp_path,
             "no repository has a package 'rb-arm' (for x86_64)")


@pytest.mark.parametrize("case", ["missing", "damaged", "tampered header", "source"])
def test_bad_rpm_file_is_one_line(case: str, rpms: dict[str, Path], tmp_path: Path) -> None:
    f = tmp_path / "x-1.0-1.noarch.rpm"
    if case == "damaged":
        f.write_bytes(rpms["rb-lib"].read_bytes()[:200])
        needle = "is damaged or not an RPM"
    elif case == "tampered header":
        tamper_first_file_mode(rpms["rb-tampered"], f)
        needle = "is damaged or not an RPM"
        check = subprocess.run(["rpm", "-K", str(f)], capture_output=True, text=True)
        assert "NOT OK" in check.stdout   # what rpm itself says of it
    elif case == "source":
        f = build_rpm(tmp_path / "b", SPECS["rb-lib"], source=True)
        needle = "is a source package"
    else:
        needle = "not found"
    _refused(PackageRequest(rpm_files=(f,)), tmp_path, needle, str(f))


def test_keys(key: Path, tmp_path: Path) -> None:
    rs = _check(PackageRequest(rpm_files=(), install=(), remove=("x",), gpgkeys=(key,)),
                tmp_path)
    assert len(rs.keys[0].fingerprints[0]) == 40
    bad = tmp_path / "bad.asc"
    bad.write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\ngarbage\n")
    _refused(PackageRequest(remove=("x",), gpgkeys=(bad,)), tmp_path, "is not a public key")
    _refused(PackageRequest(remove=("x",), gpgkeys=(tmp_path / "nope",)), tmp_path,
             "gpg key", "not found")


def test_request_shape_errors(tmp_path: Path) -> None:
    _refused(PackageRequest(), tmp_path, "nothing to install or remove")
    _refused(PackageRequest(install=("a",)), tmp_path, "but no repositories")
    _refused(PackageRequest(remove=("-rf",)), tmp_path, "is not a package name")


# -- the cache key --------------------------------------------------------------------

def test_request_digest_is_content_only(rpms: dict[str, Path], tmp_path: Path) -> None:
    def digest(where: Path, names: tuple[str, ...] = ("rb-app",), **kw: object) -> str:
        repo = make_repo(where / "repo", [rpms["rb-lib"], rpms["rb-app"]], index=False)
        req = PackageRequest(repos=(repo,), install=names, **kw)  # type: ignore[arg-type]
        return packages.request_digest(req, packages.check(req, arch="x86_64",
                                                           workdir=where / "w"))

    first = digest(tmp_path / "a")
    assert digest(tmp_path / "elsewhere" / "b") == first        # another directory
    assert digest(tmp_path / "c", gpgcheck=False) != first
    assert digest(tmp_path / "d", ("rb-app", "rb-lib")) != first
    assert digest(tmp_path / "e", weak_deps=True) != first
    # another RPM content under the same name
    repo = make_repo(tmp_path / "f" / "repo", [rpms["rb-lib"], rpms["rb-app"]], index=False)
    shutil.copy(rpms["rb-weak"], repo / rpms["rb-app"].name)
    req = PackageRequest(repos=(repo,), install=("rb-weak",))
    assert packages.request_digest(req, packages.check(req, arch="x86_64",
                                                       workdir=tmp_path / "f" / "w")) != first


def test_repodata_digest_is_location_independent(rpms: dict[str, Path], tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "a" / "repo", [rpms["rb-lib"]])
    moved = tmp_path / "b" / "moved"
    moved.parent.mkdir()
    shutil.copytree(repo, moved)
    req = PackageRequest(repos=(repo,), install=("rb-lib",))
    req2 = PackageRequest(repos=(moved,), install=("rb-lib",))
    assert packages.request_digest(req, _check(req, tmp_path / "1")) == \
        packages.request_digest(req2, _check(req2, tmp_path / "2"))


# -- emulators --------------------------------------------------------------------------

def test_can_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert packages.can_run(emulation.host_arch())
    assert packages.can_run("aarch64") == Path("/usr/bin/qemu-aarch64-static").exists()
    assert not packages.can_run("elf-machine-999")
    monkeypatch.setenv(emulation.EMULATOR_DIR_ENV, str(tmp_path))
    assert not packages.can_run("aarch64")
    with pytest.raises(UserError) as e:
        emulation.require("aarch64", step="element x (install.d/10-a)")
    assert "there is no emulator for aarch64" in str(e.value)
    assert "qemu-aarch64-static" in str(e.value)
    assert emulation.require(emulation.host_arch(), step="native") is None


def test_emulator_registration_uses_debians_binfmt_description() -> None:
    emu = emulation.find("aarch64")
    if emu is None:
        pytest.skip("qemu-user-static not installed")
    line = emu.registration("x", "/run/rb/emu/qemu-aarch64-static")
    assert line.startswith(":x:M:0:\\x7f\\x45\\x4c\\x46") and line.endswith(":F")


# -- what the rootfs's rpm is asked -------------------------------------------------------

def test_one_rpm_run_gives_the_database_directory_packages_and_stamps(
        rpms: dict[str, Path], tmp_path: Path) -> None:
    """A package step asks the rootfs's rpm once for what three runs used to
    give (each run costs seconds under emulation): rpm prints -E's expansion
    while it reads its options, then the query's lines."""
    root = tmp_path / "root"
    root.mkdir()
    db = ["--root", str(root), "--define", "_dbpath /var/lib/rpm-here"]
    subprocess.run(["rpm", *db, "-i", "--justdb", "--nodeps", str(rpms["rb-lib"]),
                    str(rpms["rb-weak"])], check=True, capture_output=True,
                   env={**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH)})
    argv = guestfs_io.RPM_LISTING_ARGV
    out = subprocess.run([argv[0], *db, *argv[1:]], check=True, capture_output=True,
                         text=True).stdout
    listing = guestfs_io.RpmListing.parse(out)
    assert listing.dbdir == "var/lib/rpm-here"
    assert sorted(listing.packages) == [("rb-lib", 0, "1.0", "1", "noarch"),
                                        ("rb-weak", 0, "1.0", "1", "noarch")]
    # rpm 4.18: the transaction id is SOURCE_DATE_EPOCH, the n-th package's
    # install time SOURCE_DATE_EPOCH + n
    assert len(listing.stamps) == 4 and min(listing.stamps) == EPOCH
    assert max(listing.stamps) <= EPOCH + 2
    assert guestfs_io.RpmListing.parse("\n").dbdir is None


# -- the older-rpm path's database rewrite ------------------------------------------------

def test_clamp_install_times_on_a_real_export(rpms: dict[str, Path], tmp_path: Path) -> None:
    """rpm records the clock (no SOURCE_DATE_EPOCH); the export rewritten
    and imported into a new database gives the epoch, every other header
    byte unchanged, the same database bytes on a second import."""
    root = tmp_path / "root"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    subprocess.run(["rpm", "--root", str(root), "--dbpath", "/db", "-i", "--justdb",
                    "--nodeps", str(rpms["rb-lib"]), str(rpms["rb-weak"])], check=True,
                   env=env, capture_output=True)
    export = subprocess.run(["rpmdb", "--root", str(root), "--dbpath", "/db", "--exportdb"],
                            check=True, capture_output=True).stdout
    clamped = rpmheader.clamp_install_times(export, EPOCH)
    assert len(clamped) == len(export)
    assert sum(a != b for a, b in zip(export, clamped, strict=True)) <= 16  # 2 tags x 2 pkgs
    assert rpmheader.clamp_install_times(clamped, EPOCH) == clamped
    assert rpmheader.clamp_install_times(export, 2**32 - 1) == export  # nothing later

    def imported(name: str) -> tuple[bytes, str]:
        new = tmp_path / name
        new.mkdir()
        subprocess.run(["rpmdb", "--root", str(new), "--dbpath", "/db", "--initdb"],
                       check=True, capture_output=True)
        subprocess.run(["rpmdb", "--root", str(new), "--dbpath", "/db", "--importdb"],
                       input=clamped, check=True, capture_output=True)
        q = subprocess.run(["rpm", "--root", str(new), "--dbpath", "/db", "-qa", "--qf",
                            "%{NAME} %{INSTALLTIME} %{INSTALLTID}\\n"], check=True,
                           capture_output=True, text=True).stdout
        return (new / "db" / "rpmdb.sqlite").read_bytes(), q

    one, listed = imported("one")
    two, _ = imported("two")
    assert sorted(listed.split("\n")[:-1]) == [f"rb-lib {EPOCH} {EPOCH}",
                                               f"rb-weak {EPOCH} {EPOCH}"]
    assert one == two
    with pytest.raises(UserError):
        rpmheader.clamp_install_times(b"not an export", EPOCH)
