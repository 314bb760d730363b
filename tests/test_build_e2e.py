"""End to end: the fixture qcow2 -> rootfs-build -> reproducible, faithful tars.

Real libguestfs, real CLI processes; no mocks.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import FIXTURE_RECIPE, Build, run_cli, write_recipe

from builder import tarfmt
from builder.hashing import sha256_file as sha256

pytestmark = pytest.mark.appliance

FORMATS = ("tar", "tar.gz", "tar.zst")




def test_inspect_finds_root_mounts_os_release_and_arch(fixture_image: Path) -> None:
    res = run_cli("inspect", fixture_image, "--json")
    assert res.returncode == 0, res.stderr
    info = res.json
    assert info["root"] == "/dev/sda2"
    assert info["mountpoints"] == {"/": "/dev/sda2", "/boot": "/dev/sda1"}
    assert info["os_release"]["ID"] == "openEuler"
    assert info["os_release"]["VERSION_ID"] == "22.03"
    assert info["arch"] == "x86_64"
    assert info["partitions"] == ["/dev/sda1", "/dev/sda2"]
    assert info["format"] == "qcow2"


def test_outputs_json_manifest_and_sums(fixture_build: Build) -> None:
    summary = fixture_build.result.json
    assert summary["name"] == "tricky"
    assert {Path(a["path"]).name for a in summary["artifacts"]} == {f"rootfs.{f}"
                                                                    for f in FORMATS}
    for a in summary["artifacts"]:
        assert sha256(Path(a["path"])) == a["sha256"]
        assert Path(a["path"]).stat().st_size == a["size"]
    assert summary["appliance_launches"] >= 1
    check = subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"],
                           cwd=fixture_build.dir, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    manifest = json.loads((fixture_build.dir / "manifest.json").read_text())
    assert manifest["base"]["os_release"]["ID"] == "openEuler"
    assert manifest["base"]["arch"] == "x86_64"
    assert manifest["base"]["sha256"] == sha256(Path(manifest["base"]["image"]))
    assert manifest["tool"]["name"] == "rootfs-build"
    with tarfile.open(fixture_build.artifact("rootfs.tar")) as tf:
        members = tf.getmembers()
    assert manifest["rootfs"]["entries"] == len(members)
    assert manifest["epoch"] == max(m.mtime for m in members)
    assert [e["name"] for e in manifest["elements"]] == ["rootfs-base"]
    # The three formats hold the same tar.
    raw = fixture_build.artifact("rootfs.tar").read_bytes()
    import gzip

    import zstandard
    assert gzip.decompress(fixture_build.artifact("rootfs.tar.gz").read_bytes()) == raw
    with open(fixture_build.artifact("rootfs.tar.zst"), "rb") as f:
        assert zstandard.ZstdDecompressor().stream_reader(f).read() == raw


def test_two_builds_in_other_dirs_tz_umask_locale_are_identical(
        fixture_build: Build, fixture_image: Path, tmp_path: Path) -> None:
    # Another checkout place, a relative image path, other TZ/umask/locale, a
    # fresh cache: every artifact must be the same bytes.
    work = tmp_path / "elsewhere" / "deeper"
    local_image = work / "img" / "base.qcow2"
    local_image.parent.mkdir(parents=True)
    shutil.copy(fixture_image, local_image)
    recipe = write_recipe(work / "r" / "tricky.yaml",
                          FIXTURE_RECIPE.format(image="../img/base.qcow2"))
    res = run_cli(recipe, "-o", work / "out", "--cache-dir", work / "cache", "--json",
                  cwd=tmp_path, umask=0o077,
                  env={"TZ": "Asia/Shanghai", "LC_ALL": "POSIX", "LANG": "de_DE.UTF-8"})
    assert res.returncode == 0, res.stderr
    assert res.json["appliance_launches"] >= 1
    for fmt in FORMATS:
        a = fixture_build.artifact(f"rootfs.{fmt}")
        b = work / "out" / "tricky" / f"rootfs.{fmt}"
        assert sha256(a) == sha256(b), fmt


def test_warm_rebuild_is_identical_and_launches_nothing(fixture_build: Build,
                                                         tmp_path: Path) -> None:
    res = run_cli(fixture_build.recipe, "-o", tmp_path / "out", "--cache-dir",
                  fixture_build.cache, "--json")
    assert res.returncode == 0, res.stderr
    assert res.json["appliance_launches"] == 0
    assert all(layer["cache"] == "hit" for layer in res.json["layers"])
    for fmt in FORMATS:
        assert (sha256(fixture_build.artifact(f"rootfs.{fmt}"))
                == sha256(tmp_path / "out" / "tricky" / f"rootfs.{fmt}"))


def test_changing_a_file_layer_rebuilds_only_it_without_the_appliance(
        fixture_build: Build, fixture_image: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    (overlay / "etc" / "motd.d").mkdir(parents=True)
    (overlay / "etc" / "motd.d" / "hello").write_text("first\n")
    (overlay / "etc").chmod(0o750)   # differs from the base's /etc, which must win
    text = FIXTURE_RECIPE.format(image=fixture_image).replace(
        "overlays: []", f"overlays: [{overlay}]")
    recipe = write_recipe(tmp_path / "r" / "tricky.yaml", text)
    with tarfile.open(fixture_build.artifact("rootfs.tar")) as base:
        base_etc = base.getmember("./etc")
    # An epoch after the base's /etc: an overlay entry (stamped with the epoch)
    # would then show in the mtime.  The base's newest file may be /etc itself.
    epoch = str(base_etc.mtime + 3600)

    def build(out: str) -> dict:
        res = run_cli(recipe, "-o", tmp_path / out, "--cache-dir", fixture_build.cache,
                      "--json", env={"SOURCE_DATE_EPOCH": epoch})
        assert res.returncode == 0, res.stderr
        return res.json

    first = build("one")
    (overlay / "etc" / "motd.d" / "hello").write_text("second\n")
    second = build("two")
    for summary in (first, second):
        assert summary["appliance_launches"] == 0
        assert [layer["kind"] for layer in summary["layers"]] == ["base", "overlay"]
        assert summary["layers"][0]["cache"] == "hit"
    assert second["layers"][1]["cache"] == "built"
    assert second["layers"][1]["key"] != first["layers"][1]["key"]
    with tarfile.open(tmp_path / "two" / "tricky" / "rootfs.tar") as tf:
        member = tf.getmember("./etc/motd.d/hello")
        assert (member.uid, member.gid, member.mode) == (0, 0, 0o644)
        assert tf.extractfile(member).read() == b"second\n"  # type: ignore[union-attr]
        # /etc keeps the base's entry: the overlay's directories only fill gaps
        etc = tf.getmember("./etc")
    assert (etc.mode, etc.mtime) == (base_etc.mode, base_etc.mtime)
    assert etc.mode != 0o750 and etc.mtime < second["epoch"] == int(epoch)


# ---------------------------------------------------------------------------
# fidelity: the output tar against a listing taken with per-file guestfs calls


def _guest_listing(image: Path) -> tuple[dict[bytes, dict], int]:
    import guestfs

    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend_settings(["force_tcg"])
    g.add_drive_opts(str(image), format="qcow2", readonly=True)
    g.launch()
    try:
        g.mount_ro("/dev/sda2", "/")
        g.mount_ro("/dev/sda1", "/boot")
        names_file = image.parent / "find0.out"
        g.find0("/", str(names_file))
        names = [n for n in names_file.read_bytes().split(b"\0") if n]
        listing: dict[bytes, dict] = {}
        for raw in [b"", *names]:
            try:
                path = "/" + raw.decode("utf-8")
            except UnicodeDecodeError:
                listing[raw] = _stat_undecodable(g, raw)
                continue
            st = g.lstatns(path)
            entry = {"mode": st["st_mode"], "uid": st["st_uid"], "gid": st["st_gid"],
                     "size": st["st_size"], "ino": (st["st_dev"], st["st_ino"]),
                     "nlink": st["st_nlink"], "rdev": st["st_rdev"],
                     "mtime": st["st_mtime_sec"],
                     "xattrs": {x["attrname"].encode(): x["attrval"]
                                for x in g.lgetxattrs(path)}}
            kind = stat.S_IFMT(st["st_mode"])
            if kind == stat.S_IFLNK:
                entry["target"] = g.readlink(path).encode()
            elif kind == stat.S_IFREG:
                entry["sha256"] = g.checksum("sha256", path)
            listing[raw] = entry
        return listing, len(names)
    finally:
        g.close()


def _stat_undecodable(g, raw: bytes) -> dict:
    # The Python binding cannot pass non-UTF-8 names; ask the appliance's
    # shell about that one file, the name given as octal escapes.
    escaped = "".join(f"\\{b:03o}" for b in raw)
    out = g.debug("sh", [f'p="/sysroot/$(printf "{escaped}")"; '
                         'stat -c "%f %u %g %s %i %h %Y" "$p"; sha256sum < "$p"'])
    first, second = out.strip().splitlines()[-2:]
    mode, uid, gid, size, ino, nlink, mtime = first.split()
    return {"mode": int(mode, 16), "uid": int(uid), "gid": int(gid), "size": int(size),
            "ino": (None, int(ino)), "nlink": int(nlink), "rdev": 0, "mtime": int(mtime),
            "xattrs": {}, "sha256": second.split()[0]}


def _rel(name: str) -> bytes:
    raw = name.encode("utf-8", "surrogateescape").rstrip(b"/")
    return b"" if raw == b"." else raw.removeprefix(b"./")


def test_output_holds_every_fixture_case_unchanged(fixture_build: Build,
                                                    fixture_image: Path) -> None:
    listing, count = _guest_listing(fixture_image)
    epoch = fixture_build.result.json["epoch"]
    with tarfile.open(fixture_build.artifact("rootfs.tar"), encoding="utf-8",
                      errors="surrogateescape") as tf:
        members = {_rel(m.name): (m, tf.extractfile(m).read() if m.isreg() else None)  # type: ignore[union-attr]
                   for m in tf.getmembers()}
    assert set(members) == set(listing), set(members) ^ set(listing)
    assert len(members) == count + 1  # plus the root directory
    anchors: dict[tuple, bytes] = {}
    seen_kinds = set()
    for name in sorted(members, key=lambda n: n.replace(b"/", b"\0")):
        m, data = members[name]
        g = listing[name]
        kind = stat.S_IFMT(g["mode"])
        seen_kinds.add(kind)
        assert stat.S_IMODE(g["mode"]) == m.mode, name
        assert (g["uid"], g["gid"]) == (m.uid, m.gid), name
        assert m.uname == "" and m.gname == ""
        assert m.mtime == min(g["mtime"], epoch), name
        xattrs = {k.removeprefix("SCHILY.xattr.").encode("utf-8", "surrogateescape"):
                  v.encode("utf-8", "surrogateescape")
                  for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
        if not m.islnk():
            # one canonical form for ACLs: SCHILY.acl.* text with numeric ids,
            # never also the raw system.posix_acl_* xattr
            acls = {k: v for k, v in g["xattrs"].items() if k.startswith(b"system.posix_acl_")}
            assert xattrs == {k: v for k, v in g["xattrs"].items() if k not in acls}, name
            for record, xattr in tarfmt.ACL_RECORDS.items():
                want = tarfmt.acl_text(acls[xattr]).decode() if xattr in acls else None
                assert m.pax_headers.get(record.decode()) == want, name
        if kind == stat.S_IFREG:
            key = g["ino"]
            if g["nlink"] > 1 and key in anchors:
                assert m.islnk(), name
                assert m.linkname.encode("utf-8", "surrogateescape") == b"./" + anchors[key]
                continue
            anchors[key] = name
            assert m.isreg(), name
            assert m.size == g["size"], name
            assert hashlib.sha256(data).hexdigest() == g["sha256"], name
        elif kind == stat.S_IFDIR:
            assert m.isdir(), name
        elif kind == stat.S_IFLNK:
            assert m.issym() and m.linkname.encode("utf-8", "surrogateescape") == g["target"]
        elif kind == stat.S_IFCHR:
            assert m.ischr() and (m.devmajor, m.devminor) == divmod(g["rdev"], 256), name
        elif kind == stat.S_IFBLK:
            assert m.isblk() and (m.devmajor, m.devminor) == divmod(g["rdev"], 256), name
        elif kind == stat.S_IFIFO:
            assert m.isfifo(), name
    assert seen_kinds == {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR,
                          stat.S_IFBLK, stat.S_IFIFO}
    # The cases the fixture was made to hold are really there.
    sparse, _ = members[b"srv/sparse"]
    assert sparse.issparse() and sparse.size == 48 << 20
    assert members[b"usr/bin/ping-like"][0].mode == 0o4755
    assert members[b"srv/huge-uid"][0].uid == 4000000
    assert b"security.selinux" in listing[b"srv/xattrs"]["xattrs"]
    assert b"security.capability" in listing[b"usr/bin/ping-like"]["xattrs"]
    assert members[b"srv/acl"][0].pax_headers["SCHILY.acl.access"] == (
        "user::rw-,user:1000:r--,group::r--,mask::r--,other::---")
    assert members[b"srv/dangling"][0].linkname == "/no/such/file"
