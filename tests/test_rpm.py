"""RPM packages unpacked in pure Python into a FilePlan (builder/rpm.py).

The packages are real ones built with rpmbuild (tests/rpm_helpers.py): a
full one (owners, setuid, symlink, hard links, directories, %ghost, a
device, a file capability, a %post scriptlet, a file over SMALL_FILE) in
every payload compressor, plus small noarch ones for conflicts, scriptlet
detection and refusals.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

import pytest
import rpm_helpers as h

from builder import rpm
from builder.errors import UserError
from builder.filelayers import FilePlan
from builder.tarfmt import BLK, CHR, DIR, LNK, REG, SYM

PASSWD = ("root:x:0:0:root:/root:/bin/bash\n"
          "# comment\n"
          "qemu:x:107:107:qemu user:/:/sbin/nologin\n"
          "+nis\n")
GROUP = "root:x:0:\nkvm:x:36:qemu\nqemu:x:107:\n"
USERS, GROUPS = rpm.read_user_maps(PASSWD, GROUP)

# `setcap` on Linux wrote these bytes (VFS_CAP_REVISION_2, little endian):
# magic|effective, permitted[0], inheritable[0], permitted[1], inheritable[1]
CAP_NET_RAW_EP = bytes.fromhex("0100000200200000000000000000000000000000")
KNOWN_CAPS = {
    "cap_net_raw=ep": CAP_NET_RAW_EP,
    "=ep": bytes.fromhex("01000002ffffffff00000000ff01000000000000"),
    "cap_net_admin,cap_net_raw+ep": bytes.fromhex("0100000200300000000000000000000000000000"),
    "cap_sys_admin=eip": bytes.fromhex("0100000200002000000020000000000000000000"),
    "cap_net_raw+p": bytes.fromhex("0000000200200000000000000000000000000000"),
    "CAP_NET_RAW=ep": CAP_NET_RAW_EP,
    "all=ep cap_net_raw-ep cap_net_raw+ep": bytes.fromhex(
        "01000002ffffffff00000000ff01000000000000"),
}
BIG = b"".join(b"%d\n" % i for i in range(1, 40001))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """All packages the tests use, built once."""
    tmp = tmp_path_factory.mktemp("rpms")
    out = {f"full-{p}": h.build_rpm(tmp, h.FULL_SPEC, target="aarch64", payload=p,
                                    defines={"_binary_filedigest_algorithm": "1"}
                                    if p == "gzip" else None)
           for p in h.PAYLOADS}
    out["full-x86_64"] = h.build_rpm(tmp, h.FULL_SPEC, target="x86_64", payload="gzip")
    out["share"] = h.build_rpm(tmp, h.simple_spec(
        "rbshare", {"/usr/share/rbtest/share.txt": "shared"},
        dirs=("/usr/share/rbtest",),
        scripts="%pretrans -p <lua>\nprint(1)\n%post -p /sbin/ldconfig\n"
                "%triggerin -- bash\necho t\n%posttrans\necho x\n%preun\necho u\n"))
    out["conflict"] = h.build_rpm(tmp, h.simple_spec(
        "rbconflict", {"/etc/rbtest.conf": "other"}))
    out["plain"] = h.build_rpm(tmp, h.simple_spec(
        "rbplain", {"/usr/share/rbplain/a.txt": "a"}, scripts="%postun\necho gone\n"))
    out["plain2"] = h.build_rpm(tmp, h.simple_spec(
        "rbplain", {"/usr/share/rbplain/a.txt": "a"}, version="2.0"))
    out["source"] = h.build_rpm(tmp, h.simple_spec("rbsrc", {"/a": "a"}), source=True)
    return out


def plan(paths: list[Path], tmp: Path, *, arch: str = "aarch64",
         passwd: dict[str, int] = USERS, group: dict[str, int] = GROUPS
         ) -> tuple[FilePlan, rpm.RpmReport]:
    work = tmp / f"work-{len(list(tmp.glob('work-*')))}"
    work.mkdir()
    return rpm.plan_rpms(paths, arch=arch, passwd=passwd, group=group, workdir=work,
                         label="test rpms")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------


def test_read_user_maps() -> None:
    assert USERS == {"root": 0, "qemu": 107}
    assert GROUPS == {"root": 0, "kvm": 36, "qemu": 107}
    passwd, group = rpm.read_user_maps("a:x:1:1::/:/bin/sh\na:x:2:2::/:/bin/sh\nbad:x:y:1\n",
                                       "")
    assert passwd == {"a": 1} and group == {}


@pytest.mark.parametrize("text", sorted(KNOWN_CAPS))
def test_caps_xattr_matches_kernel_bytes(text: str) -> None:
    assert rpm.caps_xattr(text) == KNOWN_CAPS[text]


def test_caps_xattr_refusals() -> None:
    assert rpm.caps_xattr("cap_net_raw=") is None
    for bad in ("cap_bogus=ep", "cap_net_raw=ep cap_chown+p", "+ep", "cap_net_raw=x",
                "cap_net_raw", "", "cap_net_raw=ep;rm"):
        with pytest.raises(ValueError):
            rpm.caps_xattr(bad)


def test_full_package_items(built: dict[str, Path], tmp_path: Path) -> None:
    path = built["full-zstd"]
    fp, report = plan([path], tmp_path)
    items = {i.member.name: i for i in fp.items}
    assert sorted(items) == sorted([
        b"etc/rbtest.conf", b"usr/bin/pinger", b"usr/bin/suid", b"usr/bin/tool",
        b"usr/bin/tool-link", b"usr/bin/tool-sym", b"usr/share/rbtest",
        b"usr/share/rbtest/a-big-link.txt", b"usr/share/rbtest/big.txt",
        b"usr/share/rbtest/empty", b"usr/share/rbtest/empty.txt", b"usr/share/rbtest/null",
        b"var/lib/rbtest"])  # no %ghost state file, no implied parents
    m = {name: i.member for name, i in items.items()}
    assert (m[b"usr/bin/tool"].type, m[b"usr/bin/tool"].mode) == (REG, 0o755)
    assert items[b"usr/bin/tool"].data == b"hello\n"
    assert m[b"usr/bin/tool-link"].type == LNK
    assert m[b"usr/bin/tool-link"].linkname == b"usr/bin/tool"
    assert (m[b"usr/bin/tool-sym"].type, m[b"usr/bin/tool-sym"].linkname) == (SYM, b"tool")
    assert m[b"usr/bin/suid"].mode == 0o4755
    assert m[b"usr/bin/pinger"].xattrs == {b"security.capability": CAP_NET_RAW_EP}
    assert not m[b"usr/bin/tool"].xattrs
    conf = m[b"etc/rbtest.conf"]
    assert (conf.mode, conf.uid, conf.gid) == (0o640, 0, 107)
    assert items[b"etc/rbtest.conf"].data == b"conf=1\n"
    state = m[b"var/lib/rbtest"]
    assert (state.type, state.mode, state.uid, state.gid) == (DIR, 0o750, 107, 36)
    assert (m[b"usr/share/rbtest"].type, m[b"usr/share/rbtest"].mode) == (DIR, 0o755)
    null = m[b"usr/share/rbtest/null"]
    assert (null.type, null.mode, null.devmajor, null.devminor) == (CHR, 0o666, 1, 3)
    assert null.type != BLK
    # the hard link pair's data sits on the name that sorts first
    big = items[b"usr/share/rbtest/a-big-link.txt"]
    assert big.member.type == REG and big.member.size == len(BIG) > rpm.SMALL_FILE
    assert big.data is None and big.path is not None and big.path.read_bytes() == BIG
    assert big.path.parent.name.startswith("work-")
    assert big.digest == hashlib.sha256(BIG).hexdigest()
    assert m[b"usr/share/rbtest/big.txt"].type == LNK
    assert m[b"usr/share/rbtest/big.txt"].linkname == b"usr/share/rbtest/a-big-link.txt"
    empty = items[b"usr/share/rbtest/empty.txt"]
    assert (empty.member.size, empty.data) == (0, b"")
    for item in items.values():
        if item.member.type == REG:
            content = item.data if item.data is not None else item.path.read_bytes()
            assert item.digest == hashlib.sha256(content).hexdigest()

    assert fp.kind == "rpms" and fp.label == "test rpms"
    assert fp.inputs == {str(path): _sha(path)}
    [pkg] = report.packages
    assert (pkg.nevra, pkg.file, pkg.sha256) == ("rbtest-1.0-1.aarch64", str(path), _sha(path))
    assert pkg.scriptlets == ["post"] and pkg.files == 13 == report.files
    assert report.scriptlets_skipped == ["rbtest-1.0-1.aarch64"]
    assert report.warning() == ("rpm scriptlets were not run (they would need the target's "
                                "rpm): rbtest-1.0-1.aarch64 (post)")
    assert report.to_json()["scriptlets_not_run"] == ["rbtest-1.0-1.aarch64"]


@pytest.mark.parametrize("payload", sorted(set(h.PAYLOADS) - {"zstd"}))
def test_every_compressor_gives_the_same_plan(built: dict[str, Path], tmp_path: Path,
                                              payload: str) -> None:
    reference, _ = plan([built["full-zstd"]], tmp_path)
    other, _ = plan([built[f"full-{payload}"]], tmp_path)
    assert other.key() == reference.key()


def test_layer_tar_members(built: dict[str, Path], tmp_path: Path) -> None:
    fp, _ = plan([built["full-xz"]], tmp_path)
    layer = tmp_path / "layer"
    layer.mkdir()
    summary = fp.write(layer)
    assert summary["entries"] == 13
    with tarfile.open(layer / "layer.tar") as tf:
        members = {t.name: t for t in tf.getmembers()}
        data = {n: tf.extractfile(t).read() for n, t in members.items() if t.isreg()}
    assert set(members) == {
        "./etc/rbtest.conf", "./usr/bin/pinger", "./usr/bin/suid", "./usr/bin/tool",
        "./usr/bin/tool-link", "./usr/bin/tool-sym", "./usr/share/rbtest",
        "./usr/share/rbtest/a-big-link.txt", "./usr/share/rbtest/big.txt",
        "./usr/share/rbtest/empty", "./usr/share/rbtest/empty.txt",
        "./usr/share/rbtest/null", "./var/lib/rbtest"}
    suid = members["./usr/bin/suid"]
    assert (suid.mode, suid.uid, suid.gid, suid.mtime) == (0o4755, 0, 0, 0)
    assert data["./usr/bin/suid"] == b"setuid\n"
    assert data["./usr/share/rbtest/a-big-link.txt"] == BIG
    assert data["./etc/rbtest.conf"] == b"conf=1\n"
    assert (members["./etc/rbtest.conf"].gid, members["./etc/rbtest.conf"].mode) == (107, 0o640)
    link = members["./usr/bin/tool-link"]
    assert link.islnk() and link.linkname == "./usr/bin/tool"
    sym = members["./usr/bin/tool-sym"]
    assert sym.issym() and sym.linkname == "tool"
    rb = members["./var/lib/rbtest"]
    assert rb.isdir() and (rb.mode, rb.uid, rb.gid) == (0o750, 107, 36)
    null = members["./usr/share/rbtest/null"]
    assert null.ischr() and (null.devmajor, null.devminor) == (1, 3)
    pinger = members["./usr/bin/pinger"]
    raw = pinger.pax_headers["SCHILY.xattr.security.capability"]
    assert raw.encode("utf-8", "surrogateescape") == CAP_NET_RAW_EP


def test_arch_is_checked(built: dict[str, Path], tmp_path: Path) -> None:
    path = built["full-x86_64"]
    with pytest.raises(UserError) as e:
        plan([path], tmp_path, arch="aarch64")
    text = str(e.value)
    assert str(path) in text and "x86_64" in text and "aarch64" in text
    fp, report = plan([path], tmp_path, arch="amd64")  # Debian's name for it
    assert report.packages[0].nevra == "rbtest-1.0-1.x86_64"
    # noarch fits every rootfs
    for arch in ("aarch64", "x86_64"):
        _, report = plan([built["plain"]], tmp_path, arch=arch)
        assert report.packages[0].nevra == "rbplain-1.0-1.noarch"


def test_unknown_owner_names_rpm_file_and_user(built: dict[str, Path], tmp_path: Path) -> None:
    path = built["full-zstd"]
    with pytest.raises(UserError) as e:
        plan([path], tmp_path, passwd={"root": 0})
    text = str(e.value)
    assert str(path) in text and "/var/lib/rbtest" in text and "'qemu'" in text
    assert "base image" in text
    with pytest.raises(UserError, match="group 'kvm'.*/etc/group"):
        plan([path], tmp_path, group={"root": 0, "qemu": 107})


def test_scriptlets_and_shared_directories(built: dict[str, Path], tmp_path: Path) -> None:
    fp, report = plan([built["full-zstd"], built["share"], built["plain"]], tmp_path)
    by_name = {p.nevra: p.scriptlets for p in report.packages}
    assert by_name == {"rbtest-1.0-1.aarch64": ["post"],
                       "rbshare-1.0-1.noarch": ["pretrans", "post", "posttrans", "triggers"],
                       "rbplain-1.0-1.noarch": []}  # %postun never runs on install
    assert report.scriptlets_skipped == ["rbtest-1.0-1.aarch64", "rbshare-1.0-1.noarch"]
    # /usr/share/rbtest is listed by two packages, identically: kept once
    names = [i.member.name for i in fp.items]
    assert names.count(b"usr/share/rbtest") == 1
    assert b"usr/share/rbtest/share.txt" in names
    assert len(fp.inputs) == 3
    assert report.files == 13 + 2 + 1 and len(fp.items) == report.files - 1


def test_conflicting_files_are_refused(built: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="etc/rbtest.conf of rbconflict.*rbtest-1.0-1"):
        plan([built["full-zstd"], built["conflict"]], tmp_path)
    with pytest.raises(UserError, match="package rbplain is also given"):
        plan([built["plain"], built["plain2"]], tmp_path)


def test_unconvertible_caps_are_a_user_error(tmp_path: Path) -> None:
    reader = rpm._Reader(tmp_path / "x.rpm", 0, arch="aarch64", passwd=USERS, group=GROUPS,
                         workdir=tmp_path)
    with pytest.raises(UserError, match=r"x\.rpm: /usr/bin/x has file capabilities "
                                        r"'cap_bogus=ep'.*unknown capability"):
        reader._caps(b"cap_bogus=ep", "usr/bin/x")


def test_source_package_is_refused(built: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="source package"):
        plan([built["source"]], tmp_path)


def test_not_an_rpm(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.rpm"
    bogus.write_bytes(b"This is not an rpm at all" * 10)
    with pytest.raises(UserError, match=f"{bogus}: not an rpm"):
        plan([bogus], tmp_path)
    with pytest.raises(UserError, match="cannot read rpm"):
        plan([tmp_path / "missing.rpm"], tmp_path)


@pytest.mark.parametrize("cut", [120, 500, 2000, -300, -30])
def test_truncated_rpm(built: dict[str, Path], tmp_path: Path, cut: int) -> None:
    data = built["full-xz"].read_bytes()
    short = tmp_path / "short.rpm"
    short.write_bytes(data[:cut])
    with pytest.raises(UserError, match=f"{short}: .*(truncated|corrupt)"):
        plan([short], tmp_path)


def test_corrupt_payload(built: dict[str, Path], tmp_path: Path) -> None:
    data = bytearray(built["full-none"].read_bytes())
    pos = data.index(b"conf=1\n")
    data[pos] ^= 0x20
    bad = tmp_path / "bad.rpm"
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match="etc/rbtest.conf does not match its digest"):
        plan([bad], tmp_path)
    # compressed: the decompressor or the payload digest notices
    data = bytearray(built["full-gzip"].read_bytes())
    data[-200] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{bad}: .*(corrupt|digest)"):
        plan([bad], tmp_path)


def test_workdir_files_are_what_the_layer_reads(built: dict[str, Path], tmp_path: Path) -> None:
    fp, _ = plan([built["full-bzip2"]], tmp_path)
    on_disk = [i for i in fp.items if i.path is not None]
    assert [i.member.name for i in on_disk] == [b"usr/share/rbtest/a-big-link.txt"]
    assert os.path.getsize(on_disk[0].path) == len(BIG)
    # a workdir file changed after planning is noticed when the layer is written
    on_disk[0].path.write_bytes(BIG[:-1] + b"x")
    layer = tmp_path / "layer"
    layer.mkdir()
    with pytest.raises(UserError, match="changed while the build read it"):
        fp.write(layer)
