"""Image outputs: squashfs, raw ext4 and qcow2 from the canonical tar.

The fixture (tests/image_helpers.py) holds every hard case: owners, modes
with setuid/setgid/sticky, devices, a fifo, symlinks (relative, absolute,
dangling, long, non-UTF-8 target), hard links (one whose own header
disagrees with its target, one to a long path), sparse and all-zero files,
long and non-UTF-8 names, names debugfs could misread (quotes, <5>, #),
security.selinux/security.capability/trusted.*/user.* xattrs (one needing
an external xattr block), ACLs and /lost+found (raw/qcow2 only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import image_helpers as h
import pytest

from builder import runner, tarfmt
from builder.errors import UserError
from builder.images import IMAGE_FORMATS, ImageSpec, ext4, scan, write_images
from builder.images.squashfs import SquashfsBuilder

HELPERS = Path(__file__).with_name("image_helpers.py")
SPEC = ImageSpec(name="dpu-rootfs-test-image", epoch=h.EPOCH)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tools_present() -> bool:
    try:
        for tool in ("tar2sqfs", "mke2fs", "debugfs", "e2fsck", "qemu-img"):
            runner.find_tool(tool)
    except UserError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _tools_present(), reason="image tools not installed")


@dataclasses.dataclass
class Build:
    plain_tar: Path  # the fixture without ACLs: all three formats
    acl_tar: Path  # with ACLs and /lost+found: raw and qcow2 (compressed)
    plain: dict[str, Path]
    acl: dict[str, Path]
    details: dict[str, dict]
    seconds: float


def _build(root: Path, plain_tar: Path, acl_tar: Path) -> Build:
    start = time.monotonic()
    (root / "plain").mkdir(parents=True)
    (root / "acl").mkdir()
    plain = write_images(plain_tar, IMAGE_FORMATS, root / "plain", SPEC)
    acl = write_images(acl_tar, ["raw", "qcow2"], root / "acl",
                       dataclasses.replace(SPEC, qcow2_compressed=True))
    return Build(plain_tar, acl_tar, {a.format: a.path for a in plain},
                 {a.format: a.path for a in acl},
                 {**{a.format: a.details for a in plain},
                  **{"acl-" + a.format: a.details for a in acl}},
                 time.monotonic() - start)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Build:
    base = tmp_path_factory.mktemp("images")
    plain_tar = h.build_fixture(base / "plain.tar", acls=False)
    acl_tar = h.build_fixture(base / "acl.tar", acls=True)
    return _build(base / "first", plain_tar, acl_tar)


# ---------------------------------------------------------------------------
# artifacts


def test_artifacts_are_named_described_and_alone_in_staging(built: Build) -> None:
    assert [p.name for p in built.plain.values()] == [
        "rootfs.squashfs", "rootfs.raw", "rootfs.qcow2"]
    # nothing but the outputs is left behind in staging
    assert sorted(p.name for p in built.plain["raw"].parent.iterdir()) == [
        "rootfs.qcow2", "rootfs.raw", "rootfs.squashfs"]
    raw = built.details["raw"]
    assert raw["label"] == "dpu-rootfs-test-"  # 16 bytes of the name
    assert raw["uuid"] == SPEC.fs_uuid == ImageSpec(name=SPEC.name, epoch=0).fs_uuid
    assert raw["uuid"] != ImageSpec(name="other", epoch=h.EPOCH).fs_uuid
    assert raw["size"] == built.plain["raw"].stat().st_size
    assert raw["size"] % 2**20 == 0 and raw["block_size"] == 4096
    assert raw["tools"]["e2fsprogs"].startswith("mke2fs 1.47")
    assert built.details["qcow2"]["uuid"] == raw["uuid"]
    assert built.details["qcow2"]["compressed"] is False
    assert built.details["acl-qcow2"]["compressed"] is True
    assert "qemu-img" in built.details["qcow2"]["tools"]
    assert "squashfs-tools-ng" in built.details["squashfs"]["tools"]
    assert built.details["squashfs"]["mkfs_time"] == h.EPOCH
    assert json.loads(json.dumps(built.details)) == built.details  # fit for manifest.json
    # qcow2 holds the raw filesystem
    info = json.loads(subprocess.run(
        [runner.find_tool("qemu-img"), "info", "--output=json", str(built.plain["qcow2"])],
        check=True, capture_output=True, text=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == raw["size"]


def test_written_order_follows_request(built: Build, tmp_path: Path) -> None:
    arts = write_images(built.plain_tar, ["qcow2", "squashfs", "qcow2"], tmp_path, SPEC)
    assert [a.format for a in arts] == ["qcow2", "squashfs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rootfs.qcow2", "rootfs.squashfs"]
    assert all(a.reproducibility == "bit-identical" for a in arts)
    assert _sha(tmp_path / "rootfs.qcow2") == _sha(built.plain["qcow2"])


def test_e2fsck_finds_the_raw_images_clean(built: Build) -> None:
    for raw in (built.plain["raw"], built.acl["raw"]):
        proc = subprocess.run([runner.find_tool("e2fsck"), "-f", "-n", str(raw)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------
# reproducibility


def test_second_build_elsewhere_is_bit_identical(built: Build, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Another directory, TZ, umask, locale and cwd: the same bytes."""
    elsewhere = tmp_path / "with space" / "other"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    monkeypatch.setenv("MKE2FS_CONFIG", "/nonexistent/mke2fs.conf")
    monkeypatch.setenv("E2FSPROGS_FAKE_TIME", "12345")
    old_umask = os.umask(0o077)
    time.tzset()
    try:
        time.sleep(1.1)  # a different wall-clock second
        again = _build(elsewhere, built.plain_tar, built.acl_tar)
    finally:
        os.umask(old_umask)
        monkeypatch.undo()
        time.tzset()
    for fmt in IMAGE_FORMATS:
        assert _sha(again.plain[fmt]) == _sha(built.plain[fmt]), fmt
    for fmt in ("raw", "qcow2"):
        assert _sha(again.acl[fmt]) == _sha(built.acl[fmt]), "acl " + fmt


def test_squashfs_bytes_do_not_depend_on_jobs(built: Build, tmp_path: Path) -> None:
    builder = SquashfsBuilder(h.EPOCH)
    tree = scan.scan_tar(built.plain_tar)
    one, four = tmp_path / "one.sqfs", tmp_path / "four.sqfs"
    builder.build(built.plain_tar, one, tmp_path, tree, num_jobs=1)
    builder.build(built.plain_tar, four, tmp_path, tree, num_jobs=4)
    assert _sha(one) == _sha(four) == _sha(built.plain["squashfs"])


# ---------------------------------------------------------------------------
# fidelity


@pytest.mark.appliance
def test_images_read_back_with_libguestfs_hold_the_tar_tree(built: Build,
                                                            tmp_path: Path) -> None:
    guestfs = pytest.importorskip("guestfs")
    drives = [("plain squashfs", built.plain["squashfs"], "raw", built.plain_tar),
              ("plain raw", built.plain["raw"], "raw", built.plain_tar),
              ("plain qcow2", built.plain["qcow2"], "qcow2", built.plain_tar),
              ("acl raw", built.acl["raw"], "raw", built.acl_tar),
              ("acl qcow2", built.acl["qcow2"], "qcow2", built.acl_tar)]
    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend_settings(["force_tcg"])
    for _, path, fmt, _ in drives:
        g.add_drive_opts(str(path), readonly=True, format=fmt)
    g.launch()
    try:
        devices = g.list_devices()
        assert len(devices) == len(drives)
        problems = []
        for (label, _, _, tar), device in zip(drives, devices, strict=True):
            g.mount_ro(device, "/")
            try:
                tree, allocated = h.guestfs_tree(g, tmp_path)
            finally:
                g.umount_all()
            problems += [f"{label}: {d}" for d in h.diff_trees(h.tar_tree(tar), tree)]
            if "squashfs" not in label:
                # holes stay holes in ext4
                assert allocated[b"var/sparse.img"] <= 64 * 1024, label
                assert allocated[b"var/zeros"] == 0, label
            else:
                assert g.vfs_type(device) == "squashfs"
        assert not problems, "\n".join(problems)
    finally:
        g.shutdown()
        g.close()


@pytest.mark.root
def test_raw_image_loop_mounts_with_the_tar_tree(built: Build, tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare")
    for raw, tar in ((built.plain["raw"], built.plain_tar), (built.acl["raw"], built.acl_tar)):
        mountpoint = tmp_path / "another_rootfs"
        mountpoint.mkdir(exist_ok=True)
        proc = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable,
                               str(HELPERS), "mount-list", str(raw), str(mountpoint)],
                              capture_output=True, text=True)
        if proc.returncode != 0 and "loop" in proc.stderr:
            pytest.skip(f"no loop devices here: {proc.stderr.strip()}")
        assert proc.returncode == 0, proc.stderr
        tree = h.load_listing(proc.stdout)
        problems = h.diff_trees(h.tar_tree(tar), tree)
        assert not problems, "\n".join(problems)


def test_squashfs_refuses_a_tree_with_acls(built: Build, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="ACL") as e:
        write_images(built.acl_tar, ["raw", "squashfs"], tmp_path, SPEC)
    assert e.value.where == "output.formats"
    assert "/var/acl" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # checked before anything was built


# ---------------------------------------------------------------------------
# size


def _small_files_tar(out: Path, files: int, dirs: int) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        root = tarfile.TarInfo("./")
        root.type = tarfile.DIRTYPE
        root.mode = 0o755
        tf.addfile(root)
        for d in range(dirs):
            t = tarfile.TarInfo(f"dir{d:03d}")
            t.type = tarfile.DIRTYPE
            t.mode = 0o755
            t.pax_headers = {"SCHILY.xattr.security.selinux": "system_u:object_r:usr_t:s0\0"}
            tf.addfile(t)
            for i in range(files // dirs):
                data = (f"{d}/{i}" * (i % 50)).encode()
                t = tarfile.TarInfo(f"dir{d:03d}/file-number-{i:05d}.conf")
                t.size = len(data)
                t.pax_headers = {
                    "SCHILY.xattr.security.selinux": "system_u:object_r:etc_t:s0\0"}
                tf.addfile(t, io.BytesIO(data))
        big = tarfile.TarInfo("big.bin")
        big.size = 5 * 2**20 + 17
        tf.addfile(big, io.BytesIO(h._bytes("big", big.size)))
    return h.canonical_tar(out, buf.getvalue())


def test_fitted_size_is_tight_but_enough(tmp_path: Path) -> None:
    tar = _small_files_tar(tmp_path / "small.tar", files=6000, dirs=40)
    tree = scan.scan_tar(tar)
    for headroom in (0.0, 0.2):
        out = tmp_path / f"h{headroom}"
        out.mkdir()
        (art,) = write_images(tar, ["raw"], out, dataclasses.replace(SPEC, headroom=headroom))
        d = art.details
        assert d["attempts"] == 1, "the size estimate was short"
        assert d["inodes"] >= tree.inodes * (1 + headroom)
        # free space actually left, read back from the superblock
        info = subprocess.run([runner.find_tool("dumpe2fs"), "-h", str(art.path)],
                              capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        free = int(fields["Free blocks"]) / int(fields["Block count"])
        assert free >= headroom * 0.8
        assert free <= headroom + 0.25, f"fitted image is {free:.0%} empty"


def test_fit_geometry_rule() -> None:
    tree = scan.TreeScan(inodes=1000, data_blocks=50_000, dir_blocks=100)
    g0 = ext4.fit_geometry(tree, 0.0)
    g2 = ext4.fit_geometry(tree, 0.2)
    assert g0.blocks % 256 == 0 and g2.blocks % 256 == 0
    assert g0.blocks >= tree.content_blocks + ext4.metadata_blocks(g0.blocks, g0.inodes)
    assert g2.blocks >= 1.2 * (tree.content_blocks + ext4.metadata_blocks(g2.blocks, g2.inodes))
    assert g2.blocks < 1.2 * (tree.content_blocks
                              + ext4.metadata_blocks(g2.blocks, g2.inodes)) + 256
    assert g2.inodes >= 1200
    assert ext4.fit_geometry(scan.TreeScan(), 0.2).blocks == ext4.MIN_BLOCKS


def test_fixed_size_is_exact(built: Build, tmp_path: Path) -> None:
    spec = dataclasses.replace(SPEC, size=48 * 2**20)
    (art,) = write_images(built.acl_tar, ["raw"], tmp_path, spec)
    assert art.path.stat().st_size == 48 * 2**20
    assert art.details["size_rule"] == "fixed (output.size)"


@pytest.mark.parametrize("size", [4 * 2**20, 48 * 2**20 + 1])
def test_unusable_size_names_output_size(built: Build, tmp_path: Path, size: int) -> None:
    with pytest.raises(UserError) as e:
        write_images(built.plain_tar, ["squashfs", "raw"], tmp_path,
                     dataclasses.replace(SPEC, size=size))
    assert e.value.where == "output.size"
    assert str(e.value).startswith("output.size: ")
    assert list(tmp_path.iterdir()) == []  # refused before any image was built


# ---------------------------------------------------------------------------
# errors and validation


def test_unknown_format_and_bad_spec(built: Build, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="'vmdk' is not an image format") as e:
        write_images(built.plain_tar, ["raw", "vmdk"], tmp_path, SPEC)
    assert e.value.where == "output.formats"
    with pytest.raises(UserError) as e:
        write_images(built.plain_tar, ["raw"], tmp_path,
                     dataclasses.replace(SPEC, label="x" * 17))
    assert "longer than 16 bytes" in e.value.message
    with pytest.raises(UserError) as e:
        write_images(built.plain_tar, ["raw"], tmp_path, dataclasses.replace(SPEC, uuid="nope"))
    assert "'nope' is not a UUID" in e.value.message
    with pytest.raises(UserError) as e:
        write_images(built.plain_tar, ["raw"], tmp_path, dataclasses.replace(SPEC, headroom=-1))
    assert e.value.where == "output.headroom"
    assert write_images(built.plain_tar, [], tmp_path, SPEC) == []


def test_given_label_and_uuid_are_used(built: Build, tmp_path: Path) -> None:
    spec = dataclasses.replace(SPEC, label="ROOT", uuid="12345678-1234-5678-1234-567812345678")
    (art,) = write_images(built.plain_tar, ["raw"], tmp_path, spec)
    out = subprocess.run([runner.find_tool("dumpe2fs"), "-h", str(art.path)],
                         capture_output=True, text=True, check=True).stdout
    assert "Filesystem volume name:   ROOT" in out
    assert "Filesystem UUID:          12345678-1234-5678-1234-567812345678" in out
    assert art.details["label"] == "ROOT"


def test_missing_tool_names_the_debian_package(built: Build, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "_SEARCH_PATH", str(tmp_path))
    with pytest.raises(UserError, match="squashfs-tools-ng"):
        write_images(built.plain_tar, ["squashfs"], tmp_path, SPEC)
    with pytest.raises(UserError, match="e2fsprogs"):
        write_images(built.plain_tar, ["raw"], tmp_path, SPEC)
    for tool in ("mke2fs", "debugfs", "e2fsck"):  # all but qemu-img
        (tmp_path / tool).symlink_to(shutil.which(tool, path="/usr/sbin:/sbin") or tool)
    with pytest.raises(UserError, match="qemu-utils"):
        write_images(built.plain_tar, ["qcow2"], tmp_path, SPEC)


def test_old_e2fsprogs_is_refused(built: Build, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "version", lambda *a: "mke2fs 1.47.0 (5-Feb-2023)")
    with pytest.raises(UserError, match="bookworm-backports"):
        write_images(built.plain_tar, ["raw"], tmp_path, SPEC)


def test_failing_tool_reports_its_last_stderr_line(built: Build, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    script = fake / "qemu-img"
    script.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "qemu-img version 0"; '
                      'exit 0; fi\necho "warming up" >&2\necho "boom: disk on fire" >&2\n'
                      "exit 3\n")
    script.chmod(0o755)
    real = runner.find_tool("mke2fs")
    monkeypatch.setattr(runner, "_SEARCH_PATH", f"{fake}:{Path(real).parent}:/usr/bin")
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(UserError) as e:
        write_images(built.plain_tar, ["qcow2"], staging, SPEC)
    assert "qemu-img failed (exit 3): boom: disk on fire" in str(e.value)
    assert list(staging.iterdir()) == []  # the temporary directory is gone


def test_xattrs_on_a_name_with_a_newline_are_refused_for_ext4(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        root = tarfile.TarInfo("./")
        root.type = tarfile.DIRTYPE
        tf.addfile(root)
        t = tarfile.TarInfo("two\nlines")
        t.pax_headers = {"SCHILY.xattr.user.a": "b"}
        tf.addfile(t, io.BytesIO(b""))
    tar = h.canonical_tar(tmp_path / "nl.tar", buf.getvalue())
    with pytest.raises(UserError, match="line break"):
        write_images(tar, ["raw"], tmp_path, SPEC)
    (art,) = write_images(tar, ["squashfs"], tmp_path, SPEC)  # squashfs has no such limit
    assert art.path.exists()


def test_acl_text_becomes_the_kernel_xattr_form() -> None:
    assert tarfmt.acl_xattr(h.ACL_TEXT.encode(), "/x") == h.acl_to_xattr(h.ACL_TEXT)
    # star/libarchive form: name plus numeric id
    star = b"user::rw-,user:alice:r--:1000,group::r--,mask::r--,other::---"
    assert tarfmt.acl_xattr(star, "/x") == h.acl_to_xattr(
        "user::rw-,user:1000:r--,group::r--,mask::r--,other::---")
    with pytest.raises(UserError, match="numeric id"):
        tarfmt.acl_xattr(b"user::rw-,user:alice:r--,group::r--,other::---", "/x")
