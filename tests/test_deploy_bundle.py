"""The offline bundle: reproducible bytes, and install.sh installing a tree
identical to the rootfs tar, refusing damaged bundles, escaping members and
mounted targets."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from deploy_helpers import (
    check_tree_is_tar,
    have_unshare,
    make_rootfs_tar,
    remove_tree,
    run_ns,
    write_sums,
)

from builder.deploy import DeployConfig, make_bundle, mount_table, render_deploy
from builder.errors import UserError

EPOCH = 1_700_000_000


def build_output(tmp: Path, artifact: str = "rootfs.tar",
                 extra: list[tarfile.TarInfo] | None = None) -> Path:
    """<tmp>/out/demo/ as the pipeline leaves it: artifact, dpu/, host/, manifest, sums."""
    out = tmp / "out" / "demo"
    out.mkdir(parents=True)
    make_rootfs_tar(out / "rootfs.tar", extra or [])
    if artifact != "rootfs.tar":
        tool = {"rootfs.tar.zst": ["zstd", "-q", "--rm"], "rootfs.tar.gz": ["gzip"]}[artifact]
        subprocess.run([*tool, str(out / "rootfs.tar")], check=True)
    cfg = DeployConfig(name="demo", host_ip="192.168.1.1", dpu_ip="192.168.1.2")
    render_deploy(out, cfg, mount_table([], "mounts"))
    (out / "manifest.json").write_text('{"name": "demo"}\n')
    write_sums(out)
    return out


def bundle(output_root: Path, epoch: int = EPOCH, **kw) -> Path:
    """make_bundle for <output_root>/demo; its path."""
    return Path(make_bundle(output_root, "demo", epoch, **kw)["path"])


def unpack_bundle(bundle: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-xf", str(bundle), "-C", str(dest)], check=True)
    return dest / "demo"


def install(bundle_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bundle_dir / "install.sh"), *args], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin"})


def listing(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")) if path.exists() \
        else []


# ---------------------------------------------------------------------------


def test_bundle_layout_and_reproducible_bytes(tmp_path: Path) -> None:
    out = build_output(tmp_path)
    info = make_bundle(out.parent, "demo", EPOCH)
    assert info == {"path": str(out.parent / "demo.bundle.tar"), "signed_by": "unsigned"}
    first = Path(info["path"]).read_bytes()
    for p in out.rglob("*"):
        os.utime(p, (1, 1))
    assert bundle(out.parent).read_bytes() == first
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    with tarfile.open(info["path"]) as t:
        members = {m.name.removeprefix("./"): m for m in t.getmembers()}
        names = [m.name for m in t.getmembers()]
    assert "demo/install.sh" in members and "demo/rootfs.tar" in members
    assert "demo/dpu/prepare.sh" in members and "demo/SHA256SUMS" in members
    assert all(n == "demo" or n.startswith("demo/") for n in members)
    assert all(m.uid == 0 and m.gid == 0 and m.mtime == EPOCH for m in members.values())
    assert members["demo/install.sh"].mode == 0o755
    assert members["demo/host/whitelist"].mode == 0o400
    assert members["demo/dpu/prepare.sh"].mode == 0o755
    assert names == sorted(names, key=lambda n: n.replace("/", "\0"))
    # from a staging directory into a staging path: the same bytes
    staging = tmp_path / ".staging"
    shutil.copytree(out, staging)
    other = bundle(out.parent, src=staging, dest=tmp_path / "b.part")
    assert other == tmp_path / "b.part" and other.read_bytes() == first
    assert bundle(out.parent, EPOCH + 1).read_bytes() != first


def test_make_bundle_checks_the_output(tmp_path: Path) -> None:
    out = build_output(tmp_path)
    (out / "stray.txt").write_text("x")
    with pytest.raises(UserError, match="stray.txt is not listed in SHA256SUMS"):
        make_bundle(out.parent, "demo", EPOCH)
    (out / "stray.txt").unlink()
    (out / "manifest.json").write_text("{}\n")
    with pytest.raises(UserError, match="checksum mismatch for manifest.json"):
        make_bundle(out.parent, "demo", EPOCH)
    write_sums(out)
    # the installer is part of the output, covered by SHA256SUMS like the rest
    installer = (out / "install.sh").read_text()
    (out / "install.sh").unlink()
    write_sums(out)
    with pytest.raises(UserError, match="no install.sh to bundle"):
        make_bundle(out.parent, "demo", EPOCH)
    (out / "install.sh").write_text(installer)
    with pytest.raises(UserError, match="install.sh is not listed in SHA256SUMS"):
        make_bundle(out.parent, "demo", EPOCH)
    (out / "rootfs.tar").unlink()
    write_sums(out)
    with pytest.raises(UserError, match="no rootfs artifact"):
        make_bundle(out.parent, "demo", EPOCH)
    with pytest.raises(UserError, match="no build output"):
        make_bundle(out.parent, "other", EPOCH)
    assert not (out.parent / "demo.bundle.tar").exists()


@pytest.mark.root
@pytest.mark.parametrize("artifact", ["rootfs.tar", "rootfs.tar.zst"])
def test_install_gives_the_rootfs_tree(tmp_path: Path, artifact: str) -> None:
    if artifact.endswith(".zst") and shutil.which("zstd") is None:
        pytest.skip("needs zstd")
    out = build_output(tmp_path, artifact)
    site = tmp_path / "site"
    site.mkdir()
    if artifact == "rootfs.tar":
        shutil.copy(out / "rootfs.tar", site / "source.tar")
    else:
        subprocess.run(["zstd", "-q", "-d", str(out / artifact), "-o", str(site / "source.tar")],
                       check=True)
    bdir = unpack_bundle(bundle(out.parent), tmp_path / "usb")
    target = site / "rootfs"
    try:
        # --dry-run: checks everything, writes nothing
        r = install(bdir, "--target", str(target), "--dry-run")
        assert r.returncode == 0, r.stderr
        assert listing(site) == ["source.tar"]
        r = install(bdir, "--target", str(target))
        assert r.returncode == 0, r.stdout + r.stderr
        check_tree_is_tar(target, site / "source.tar")
        deploy = site / "rootfs.deploy"
        assert os.access(deploy / "prepare.sh", os.X_OK)
        assert f"ROOTFS={target}\n" in (deploy / "offload.conf").read_text()
        assert sorted(p.name for p in site.iterdir()) == ["rootfs", "rootfs.deploy", "source.tar"]
        # an existing rootfs needs --force, which replaces it
        (target / "stale").write_text("x")
        r = install(bdir, "--target", str(target))
        assert r.returncode == 1 and "not empty (--force replaces it)" in r.stderr
        assert (target / "stale").exists()
        conf = deploy / "offload.conf"
        conf.write_text(conf.read_text() + "# edited by the operator\n")
        r = install(bdir, "--target", str(target), "--force")
        assert r.returncode == 0, r.stderr
        check_tree_is_tar(target, site / "source.tar")
        assert "edited by the operator" in (deploy / "offload.conf").read_text()
        assert (deploy / "offload.conf.new").exists()
        assert sorted(p.name for p in site.iterdir()) == ["rootfs", "rootfs.deploy", "source.tar"]
    finally:
        remove_tree(site)


@pytest.mark.root
def test_install_refuses_a_changed_byte(tmp_path: Path) -> None:
    out = build_output(tmp_path)
    bdir = unpack_bundle(bundle(out.parent), tmp_path / "usb")
    data = bytearray((bdir / "rootfs.tar").read_bytes())
    data[1536] ^= 0x01
    (bdir / "rootfs.tar").write_bytes(bytes(data))
    site = tmp_path / "site"
    site.mkdir()
    r = install(bdir, "--target", str(site / "rootfs"), "--force")
    assert r.returncode == 1
    assert "checksum mismatch for rootfs.tar" in r.stderr and "nothing was installed" in r.stderr
    assert listing(site) == []


@pytest.mark.root
def test_install_refuses_unlisted_files(tmp_path: Path) -> None:
    out = build_output(tmp_path)
    bdir = unpack_bundle(bundle(out.parent), tmp_path / "usb")
    (bdir / "dpu/evil.sh").write_text("#!/bin/sh\n")
    site = tmp_path / "site"
    site.mkdir()
    r = install(bdir, "--target", str(site / "rootfs"))
    assert r.returncode == 1 and "dpu/evil.sh" in r.stderr and "not in SHA256SUMS" in r.stderr
    assert listing(site) == []


def _escaping(kind: str) -> tarfile.TarInfo:
    if kind == "dotdot":
        ti = tarfile.TarInfo("../escaped")
    elif kind == "absolute":
        ti = tarfile.TarInfo("/escaped")
    elif kind == "nested-dotdot":
        ti = tarfile.TarInfo("./etc/../../escaped")
    else:
        ti = tarfile.TarInfo("./etc/passwd-link")
        ti.type = tarfile.LNKTYPE
        ti.linkname = "../../escaped" if kind == "hardlink" else "/escaped"
    return ti


@pytest.mark.root
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "nested-dotdot", "hardlink",
                                  "hardlink-absolute"])
def test_install_refuses_escaping_members(tmp_path: Path, kind: str) -> None:
    out = build_output(tmp_path, extra=[_escaping(kind)])
    bdir = unpack_bundle(bundle(out.parent), tmp_path / "usb")
    site = tmp_path / "deep" / "site"
    site.mkdir(parents=True)
    r = install(bdir, "--target", str(site / "rootfs"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "rootfs.tar:" in r.stderr and "nothing was installed" in r.stderr
    assert listing(site) == []
    assert not (tmp_path / "deep" / "escaped").exists()
    assert not Path("/escaped").exists()


@pytest.mark.root
@pytest.mark.skipif(not have_unshare(), reason="needs root and unshare -m")
def test_install_into_a_mount_point(tmp_path: Path) -> None:
    """Issue 13 point 8: a rootfs on its own partition (the target is a mount
    point) is installed into with --force; mounts below the target (a prepared
    rootfs) are still refused, and so is an image, which prepare.sh would
    mount on the target itself."""
    out = build_output(tmp_path)
    (out / "rootfs.raw").write_bytes(FAKE_IMAGES["rootfs.raw"])
    write_sums(out)
    bdir = unpack_bundle(bundle(out.parent), tmp_path / "usb")
    site = tmp_path / "site"
    (site / "rootfs/dev").mkdir(parents=True)
    part = site / "part"
    (part / "lost+found").mkdir(parents=True)
    (part / "old-file").write_text("x")
    shutil.copy(out / "rootfs.tar", tmp_path / "source.tar")
    res = run_ns(f"""
mount -t tmpfs tmpfs {site}/rootfs/dev
{bdir}/install.sh --target {site}/rootfs --force > $W/a.out 2>&1; echo $? > $W/a.rc
umount {site}/rootfs/dev
# the partition: here a bind mount of the directory on itself, so what is
# installed outlives this namespace for the checks below
mount --bind {part} {part}
{bdir}/install.sh --target {part} > $W/b.out 2>&1; echo $? > $W/b.rc
{bdir}/install.sh --target {part} --format raw --force > $W/c.out 2>&1; echo $? > $W/c.rc
{bdir}/install.sh --target {part} --force > $W/d.out 2>&1; echo $? > $W/d.rc
grep -c " {part} " /proc/self/mountinfo > $W/still
""", tmp_path)
    assert res.returncode == 0, res.stderr
    a, b, c, d = ((tmp_path / f"{n}.out").read_text() for n in "abcd")
    assert (tmp_path / "a.rc").read_text() == "1\n" and "rootfs/dev is mounted" in a, a
    assert (tmp_path / "b.rc").read_text() == "1\n", b
    assert "is a mount point (its own filesystem): --force installs into it" in b
    assert (tmp_path / "c.rc").read_text() == "1\n" and "is a mount point: prepare.sh mounts" in c
    assert (tmp_path / "d.rc").read_text() == "0\n", d
    assert f"installed rootfs.tar into {part}" in d
    assert (tmp_path / "still").read_text() == "1\n"
    # lost+found stays (the tarball has none), the old content is gone
    assert (part / "lost+found").is_dir() and not (part / "old-file").exists()
    st = part.stat()
    (part / "lost+found").rmdir()
    os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns))
    check_tree_is_tar(part, tmp_path / "source.tar")
    assert sorted(p.name for p in site.iterdir()) == ["part", "part.deploy", "rootfs"]
    remove_tree(site)


@pytest.mark.parametrize("target", ["/var/lib", "/var/log", "/var/lib/rootfs", "/var/log/x",
                                    "/var/cache/rootfs", "/var/spool", "/var/rootfs", "/srv",
                                    "/mnt", "/usr/local/rootfs", "/etc/rootfs", "/boot/efi",
                                    "/run/rootfs", "/opt", "/media", "/"])
def test_install_refuses_system_directories(tmp_path: Path, target: str) -> None:
    out = build_output(tmp_path)
    bdir = unpack_bundle(bundle(out.parent), tmp_path / "usb")
    r = install(bdir, "--target", target, "--dry-run")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"refusing to install into {target}: a system directory" in r.stderr


def test_install_accepts_a_target_of_its_own(tmp_path: Path) -> None:
    out = build_output(tmp_path)
    bdir = unpack_bundle(bundle(out.parent), tmp_path / "usb")
    for target in ("/another_rootfs", "/srv/dpu/rootfs", "/mnt/rootfs", "/home/rootfs"):
        r = install(bdir, "--target", target, "--dry-run")
        assert r.returncode == 0 and f"would install rootfs.tar into {target}" in r.stdout, \
            r.stderr


@pytest.mark.root
@pytest.mark.parametrize("planted", ["deploy-dir", "offload.conf", "prepare.sh.new"])
def test_install_refuses_planted_symlinks(tmp_path: Path, planted: str) -> None:
    out = build_output(tmp_path)
    bdir = unpack_bundle(bundle(out.parent), tmp_path / "usb")
    site = tmp_path / "site"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.write_text("root:x:0:0\n")
    site.mkdir()
    if planted == "deploy-dir":
        (site / "rootfs.deploy").symlink_to(elsewhere)
        link = site / "rootfs.deploy"
    else:
        (site / "rootfs.deploy").mkdir()
        link = site / "rootfs.deploy" / planted
        link.symlink_to(secret)
    r = install(bdir, "--target", str(site / "rootfs"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{link} is a symbolic link: refusing to follow it" in r.stderr
    assert "nothing was installed" in r.stderr
    assert list(elsewhere.iterdir()) == [] and secret.read_text() == "root:x:0:0\n"
    assert not (site / "rootfs").exists()


# ---------------------------------------------------------------------------
# signed bundles (issue 13 point 9)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two ed25519 keys, and an allowed-signers (trust) file for each."""
    if shutil.which("ssh-keygen") is None:
        pytest.skip("needs ssh-keygen")
    d = tmp_path_factory.mktemp("keys")
    out: dict[str, Path] = {}
    for name in ("release", "other"):
        key = d / name
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                        str(key)], check=True)
        trust = d / f"{name}.trust"
        trust.write_text(f'{name} namespaces="rootfs-build-bundle" '
                         f"{(d / f'{name}.pub').read_text()}")
        out[name], out[f"{name}.trust"] = key, trust
    return out


def fingerprint(pub: Path) -> str:
    return subprocess.run(["ssh-keygen", "-l", "-f", str(pub)], capture_output=True, text=True,
                          check=True).stdout.split()[1]


def test_signed_bundle_verifies_and_says_which_key(tmp_path: Path, keys: dict[str, Path]
                                                   ) -> None:
    out = build_output(tmp_path)
    info = make_bundle(out.parent, "demo", EPOCH, signing_key=keys["release"])
    fp = fingerprint(keys["release"].with_suffix(".pub"))
    assert info == {"path": str(out.parent / "demo.bundle.tar"), "signed_by": fp,
                    "key_type": "ssh-ed25519", "namespace": "rootfs-build-bundle",
                    "signature": "SHA256SUMS.sig"}
    first = Path(info["path"]).read_bytes()
    assert bundle(out.parent, signing_key=keys["release"]).read_bytes() == first  # reproducible
    bdir = unpack_bundle(Path(info["path"]), tmp_path / "usb")
    # SHA256SUMS covers the installer, and the signature covers SHA256SUMS
    assert "  install.sh\n" in (bdir / "SHA256SUMS").read_text()
    manual = subprocess.run(
        ["sh", "-c", f"ssh-keygen -Y verify -f {keys['release.trust']} -I release -n "
                     "rootfs-build-bundle -s SHA256SUMS.sig < SHA256SUMS && sha256sum -c "
                     "--quiet SHA256SUMS"], cwd=bdir, capture_output=True, text=True)
    assert manual.returncode == 0, manual.stdout + manual.stderr
    r = install(bdir, "--target", str(tmp_path / "site/rootfs"), "--trust",
                str(keys["release.trust"]), "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f'Good "rootfs-build-bundle" signature for release with ED25519 key {fp}' in r.stdout
    # without --trust the installer says it is signed but checks only the sums
    r = install(bdir, "--target", str(tmp_path / "site/rootfs"), "--dry-run")
    assert r.returncode == 0 and "--trust FILE would check by whom" in r.stdout


def test_a_bundle_signed_by_another_key_is_refused(tmp_path: Path, keys: dict[str, Path]
                                                   ) -> None:
    out = build_output(tmp_path)
    bdir = unpack_bundle(bundle(out.parent, signing_key=keys["other"]), tmp_path / "usb")
    site = tmp_path / "site"
    site.mkdir()
    r = install(bdir, "--target", str(site / "rootfs"), "--trust", str(keys["release.trust"]))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "SHA256SUMS.sig was not made by a key in" in r.stderr
    assert "nothing was installed" in r.stderr and listing(site) == []


@pytest.mark.root
def test_a_file_changed_with_remade_sums_is_refused_with_trust(tmp_path: Path,
                                                              keys: dict[str, Path]) -> None:
    out = build_output(tmp_path)
    bdir = unpack_bundle(bundle(out.parent, signing_key=keys["release"]), tmp_path / "usb")
    data = bytearray((bdir / "rootfs.tar").read_bytes())
    data[1536] ^= 0x01
    (bdir / "rootfs.tar").write_bytes(bytes(data))
    sig = (bdir / "SHA256SUMS.sig").read_bytes()
    write_sums(bdir)  # the attacker's SHA256SUMS (install.sh and the signature not in it)
    sums = "".join(line + "\n" for line in (bdir / "SHA256SUMS").read_text().splitlines()
                   if not line.endswith(("  SHA256SUMS.sig",)))
    (bdir / "SHA256SUMS").write_text(sums)
    (bdir / "SHA256SUMS.sig").write_bytes(sig)
    site = tmp_path / "site"
    site.mkdir()
    # the checksums alone agree with each other: only the signature tells
    r = install(bdir, "--target", str(site / "rootfs"), "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    r = install(bdir, "--target", str(site / "rootfs"), "--trust", str(keys["release.trust"]))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the signature of SHA256SUMS does not verify" in r.stderr
    assert "nothing was installed" in r.stderr and listing(site) == []


def test_an_unsigned_bundle_is_refused_with_trust(tmp_path: Path, keys: dict[str, Path]) -> None:
    out = build_output(tmp_path)
    bdir = unpack_bundle(bundle(out.parent), tmp_path / "usb")
    site = tmp_path / "site"
    site.mkdir()
    r = install(bdir, "--target", str(site / "rootfs"), "--trust", str(keys["release.trust"]))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the bundle is not signed (no SHA256SUMS.sig), and --trust was given" in r.stderr
    assert listing(site) == []
    r = install(bdir, "--target", str(site / "rootfs"), "--dry-run")
    assert r.returncode == 0 and "the bundle is not signed" in r.stdout


def test_a_key_that_cannot_sign_is_refused_before_the_build(tmp_path: Path,
                                                           keys: dict[str, Path]) -> None:
    locked = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(locked)],
                   check=True)
    for key in (locked, keys["release"].with_suffix(".pub")):
        with pytest.raises(UserError) as info:
            DeployConfig(name="demo", host_ip="192.168.1.1", dpu_ip="192.168.1.2",
                         bundle_signing_key=key)
        assert info.value.where == "params.bundle_signing_key"
        assert "cannot sign" in info.value.message


@pytest.mark.root
def test_install_prefers_the_plain_tar(tmp_path: Path) -> None:
    if shutil.which("zstd") is None:
        pytest.skip("needs zstd")
    out = build_output(tmp_path)
    subprocess.run(["zstd", "-q", "-k", str(out / "rootfs.tar")], check=True)
    write_sums(out)
    bdir = unpack_bundle(bundle(out.parent), tmp_path / "usb")
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(out / "rootfs.tar", site / "source.tar")
    try:
        r = install(bdir, "--target", str(site / "rootfs"), "--scripts", str(site / "scripts"))
        assert r.returncode == 0, r.stderr
        assert "installed rootfs.tar into" in r.stdout
        check_tree_is_tar(site / "rootfs", site / "source.tar")
        assert (site / "scripts/teardown.sh").exists()
    finally:
        remove_tree(site)


def test_installer_help_documents_the_scripts_location(tmp_path: Path) -> None:
    out = build_output(tmp_path)
    bdir = unpack_bundle(bundle(out.parent), tmp_path / "usb")
    r = install(bdir, "--help")
    assert r.returncode == 0 and "DIR.deploy" in r.stdout and "--scripts DIR" in r.stdout
    r = install(bdir, "--target", "/usr", "--dry-run")
    assert r.returncode == 2 and "refusing to install into /usr" in r.stderr
    r = install(bdir)
    assert r.returncode == 2 and "--target DIR is required" in r.stderr


# ---------------------------------------------------------------------------
# bundles carrying images (issue 5): install.sh only copies an image (prepare.sh
# mounts it), so stand-ins with the right magic numbers are enough here; the
# real images are mounted in test_deploy_e2e.py.

FAKE_IMAGES = {
    "rootfs.raw": b"\0" * 1080 + b"\x53\xef" + b"\0" * 2966,       # ext4 superblock magic
    "rootfs.squashfs": b"hsqs" + b"\0" * 4092,
    "rootfs.qcow2": b"QFI\xfb" + b"\0" * 4092,
}


def image_output(tmp: Path, images: list[str], tar: bool = False) -> Path:
    """<tmp>/out/demo/ with the given (stand-in) images and optionally rootfs.tar."""
    if tar:
        out = build_output(tmp)
    else:
        out = tmp / "out" / "demo"
        out.mkdir(parents=True)
        render_deploy(out, DeployConfig(name="demo", host_ip="192.168.1.1", dpu_ip="192.168.1.2"),
                      mount_table([], "mounts"))
        (out / "manifest.json").write_text('{"name": "demo"}\n')
    for name in images:
        (out / name).write_bytes(FAKE_IMAGES[name])
    write_sums(out)
    return out


def conf_of(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines()
                if line and not line.startswith("#"))


def test_bundle_with_images_only_and_the_format_choice(tmp_path: Path) -> None:
    out = image_output(tmp_path, ["rootfs.raw", "rootfs.squashfs", "rootfs.qcow2"])
    bdir = unpack_bundle(bundle(out.parent), tmp_path / "usb")
    assert (bdir / "rootfs.raw").read_bytes() == FAKE_IMAGES["rootfs.raw"]
    target = tmp_path / "site/rootfs"
    # default: raw before squashfs (a tarball would come first)
    r = install(bdir, "--target", str(target), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert f"would install rootfs.raw as {target}.raw, mounted on {target}" in r.stdout
    r = install(bdir, "--target", str(target), "--dry-run", "--format", "squashfs")
    assert r.returncode == 0, r.stderr
    assert f"would install rootfs.squashfs as {target}.squashfs" in r.stdout
    r = install(bdir, "--target", str(target), "--dry-run", "--format", "tar")
    assert r.returncode == 1 and "the bundle has no tar artifact" in r.stderr
    r = install(bdir, "--target", str(target), "--dry-run", "--format", "qcow2")
    assert r.returncode == 1 and "qemu-nbd" in r.stderr
    r = install(bdir, "--target", str(target), "--dry-run", "--format", "ext4")
    assert r.returncode == 2 and "is not one of tar, raw, squashfs" in r.stderr
    assert not (tmp_path / "site").exists()


def test_qcow2_only_bundle_is_refused(tmp_path: Path) -> None:
    out = image_output(tmp_path, ["rootfs.qcow2"])
    bdir = unpack_bundle(bundle(out.parent), tmp_path / "usb")
    site = tmp_path / "site"
    site.mkdir()
    r = install(bdir, "--target", str(site / "rootfs"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "needs qemu-nbd" in r.stderr and "qemu-img convert -O raw" in r.stderr
    assert "nothing was installed" in r.stderr and len(r.stderr.splitlines()) == 1
    assert listing(site) == []


def test_install_refuses_an_image_of_the_wrong_kind(tmp_path: Path) -> None:
    out = image_output(tmp_path, [])
    (out / "rootfs.raw").write_bytes(FAKE_IMAGES["rootfs.squashfs"])
    write_sums(out)
    bdir = unpack_bundle(bundle(out.parent), tmp_path / "usb")
    site = tmp_path / "site"
    site.mkdir()
    r = install(bdir, "--target", str(site / "rootfs"), "--dry-run")
    assert r.returncode == 1 and "rootfs.raw is not a raw ext4 image" in r.stderr
    assert listing(site) == []


@pytest.mark.root
def test_install_image_then_tar_and_back(tmp_path: Path) -> None:
    out = image_output(tmp_path, ["rootfs.raw"], tar=True)
    bdir = unpack_bundle(bundle(out.parent), tmp_path / "usb")
    site = tmp_path / "site"
    site.mkdir()
    target, image, deploy = site / "rootfs", site / "rootfs.raw", site / "rootfs.deploy"
    try:
        # a tarball is preferred; --format raw installs the image
        r = install(bdir, "--target", str(target), "--dry-run")
        assert r.returncode == 0 and "would install rootfs.tar into" in r.stdout
        r = install(bdir, "--target", str(target), "--format", "raw")
        assert r.returncode == 0, r.stdout + r.stderr
        assert image.read_bytes() == FAKE_IMAGES["rootfs.raw"]
        assert stat.S_IMODE(image.stat().st_mode) == 0o600
        assert target.is_dir() and listing(target) == []
        conf = conf_of(deploy / "offload.conf")
        assert conf["ROOTFS"] == str(target) and conf["ROOTFS_IMAGE"] == str(image)
        assert sorted(p.name for p in site.iterdir()) == ["rootfs", "rootfs.deploy", "rootfs.raw"]
        # again: the image exists
        r = install(bdir, "--target", str(target), "--format", "raw")
        assert r.returncode == 1 and f"{image} exists (--force replaces it)" in r.stderr
        image.write_bytes(b"old")
        r = install(bdir, "--target", str(target), "--format", "raw", "--force")
        assert r.returncode == 0, r.stderr
        assert image.read_bytes() == FAKE_IMAGES["rootfs.raw"]
        # the operator edits the config; a tarball over it: the operator's file
        # is kept, but says where the rootfs is now
        (deploy / "offload.conf").write_text((deploy / "offload.conf").read_text()
                                             + "# edited by the operator\n")
        r = install(bdir, "--target", str(target), "--format", "tar")
        assert r.returncode == 0, r.stderr
        assert (target / "etc/hostname").read_text() == "dpu\n"
        kept = (deploy / "offload.conf").read_text()
        assert "# edited by the operator\n" in kept and conf_of(deploy / "offload.conf")[
            "ROOTFS_IMAGE"] == ""
        assert "set ROOTFS and ROOTFS_IMAGE in your" in r.stderr
        assert f"{image} (installed before) is no longer used" in r.stderr
        assert conf_of(deploy / "offload.conf.new")["ROOTFS_IMAGE"] == ""
        # and back to the image: the rootfs tree is in the way without --force
        r = install(bdir, "--target", str(target), "--format", "raw")
        assert r.returncode == 1 and "is not empty (--force replaces it)" in r.stderr
        r = install(bdir, "--target", str(target), "--format", "raw", "--force")
        assert r.returncode == 0, r.stderr
        assert listing(target) == [] and image.read_bytes() == FAKE_IMAGES["rootfs.raw"]
        assert conf_of(deploy / "offload.conf")["ROOTFS_IMAGE"] == str(image)
        assert not [p for p in site.iterdir() if ".installing." in p.name or ".old." in p.name]
    finally:
        remove_tree(site)
