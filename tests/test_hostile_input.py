"""Hostile input: overlays, elements, base images and source tarballs that try
to reach outside the rootfs, and values that try to run on the build host.

Symlinks from an overlay are copied as symlinks and never read through; a
destination with '..' is refused; a path written through a symlink of the
base image resolves inside the rootfs, chroot-style; nothing from a recipe or
an image runs on the build host.  (install.sh refusing members that escape
its target is in test_deploy_bundle.py.)
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from bad_input_helpers import (
    demo_image,
    demo_recipe,
    hostile_root_tar,
    make_ext4_image,
    member,
    published,
    refused,
    tar_bytes,
    write_element,
)
from conftest import Build, CliResult, run_cli, write_recipe

from builder import sources
from builder.errors import UserError


def _build(recipe: Path, out: Path, cache: Path, *extra: str) -> CliResult:
    return run_cli(recipe, "-o", out, "--cache-dir", cache, "--json", *extra, timeout=600)


def _members(tar: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(tar) as tf:
        return {m.name.removeprefix("./"): m for m in tf.getmembers()}


def _read(tar: Path, name: str) -> bytes:
    with tarfile.open(tar) as tf:
        for m in tf:
            if m.name.removeprefix("./") == name:
                f = tf.extractfile(m)
                assert f is not None, name
                return f.read()
    raise AssertionError(f"{name} not in {tar}")


# ---------------------------------------------------------------------------
# overlays: symlinks are data


@pytest.mark.appliance
def test_overlay_symlinks_are_copied_not_followed(tmp_path: Path, demo_inputs: Path,
                                                  demo_build: Build) -> None:
    secret = f"SECRET-{uuid.uuid4()}"
    private = tmp_path / "private"
    private.mkdir()
    (private / "secret.txt").write_text(secret)
    (private / "secret.txt").chmod(0)
    host_dir = tmp_path / "host-dir"        # must stay empty
    host_dir.mkdir()
    links = tmp_path / "links"
    links.mkdir()
    targets = {
        "abs": "/etc/shadow",
        "rel": "../../../../etc/passwd",
        "secret": str(private / "secret.txt"),
        "secretdir": str(private),
        "escape": str(host_dir),
        "up": "../../../../../../.." + str(host_dir),
    }
    for name, target in targets.items():
        (links / name).symlink_to(target)
    through = tmp_path / "through"
    through.mkdir()
    (through / "x").write_text("written through a symlink of an overlay\n")
    recipe = write_recipe(tmp_path / "recipe.yaml", f"""\
name: links
base: {{image: {demo_image(demo_inputs)}}}
overlays:
  - {{path: {links}, dest: /srv/hostile}}
  - {{path: {through}, dest: /srv/hostile/escape}}
  - {{path: {through}, dest: /srv/hostile/up/sub}}
output: {{formats: [tar]}}
""")
    res = _build(recipe, tmp_path / "out", demo_build.cache)
    assert res.returncode == 0, res.stderr
    assert res.json["appliance_launches"] == 0
    tar = tmp_path / "out" / "links" / "rootfs.tar"
    members = _members(tar)
    for name, target in targets.items():
        m = members[f"srv/hostile/{name}"]
        assert m.issym() and m.linkname == target, (name, m.type, m.linkname)
    assert not [n for n in members if n.startswith("srv/hostile/secretdir/")]
    data = tar.read_bytes()
    assert secret.encode() not in data
    shadow = Path("/etc/shadow")
    if shadow.exists() and shadow.stat().st_size:
        assert shadow.read_bytes() not in data
    # Writes through those links resolve inside the rootfs, never on the host.
    inside = str(host_dir).lstrip("/")
    assert _read(tar, f"{inside}/x").startswith(b"written through")
    assert _read(tar, f"{inside}/sub/x").startswith(b"written through")
    assert list(host_dir.iterdir()) == []
    assert (private / "secret.txt").stat().st_mode & 0o777 == 0


# ---------------------------------------------------------------------------
# destinations that escape the rootfs are refused before any appliance

ESCAPES = {
    "element file dest": ("files:\n  - {src: f, dest: /../../etc/cron.d/x}\n",
                          ["{e}/element.yaml:2:", "'/../../etc/cron.d/x'"]),
    "element template dest": ("templates:\n  - {src: f, dest: /srv/../../../x}\n",
                              ["{e}/element.yaml:2:", "'/srv/../../../x'"]),
    "element tree dest": ("trees:\n  - {src: d, dest: /usr/../..}\n",
                          ["{e}/element.yaml:2:", "'/usr/../..'"]),
    "element dir": ("dirs:\n  - {path: /../x}\n", ["{e}/element.yaml:2:", "'/../x'"]),
    "element symlink": ("symlinks:\n  - {path: /../x, target: /etc}\n",
                        ["{e}/element.yaml:2:", "'/../x'"]),
    "element deletion": ("deletions: [/../etc]\n", ["{e}/element.yaml:1:", "'/../etc'"]),
    "element src outside the element": ("files:\n  - {src: ../../../../etc/passwd, "
                                        "dest: /x}\n  - {src: f, dest: /f}\n"
                                        "trees:\n  - {src: d, dest: /d}\n",
                                        ["{e}/element.yaml:2:", "stay inside the element"]),
    "overlay dest": (None, ["{r}:5:", "'/srv/../../x'"]),
}


@pytest.mark.parametrize("case", list(ESCAPES))
def test_escaping_destination_is_refused(tmp_path: Path, case: str) -> None:
    spec, needles = ESCAPES[case]
    el = write_element(tmp_path, "esc", spec, {"f": "data\n", "d/y": "data\n"})
    (tmp_path / "ovl").mkdir()
    (tmp_path / "ovl" / "z").write_text("z\n")
    extra = ("elements: [esc]\n" if spec else
             "overlays:\n  - {path: ovl, dest: /srv/../../x}\n")
    recipe = write_recipe(tmp_path / "recipe.yaml",
                          f"name: esc\nbase:\n  image: {tmp_path / 'img.qcow2'}\n{extra}")
    res = _build(recipe, tmp_path / "out", tmp_path / "cache")
    refused(res, tmp_path / "out", *(n.format(e=el, r=recipe) for n in needles), launches=0)
    assert {p.name for p in tmp_path.iterdir()} <= {"cache", "elements", "ovl", "out",
                                                     "recipe.yaml"}


# ---------------------------------------------------------------------------
# a hostile base image: symlinks to host paths, shell in os-release


@dataclass
class Hostile:
    image: Path
    host_dir: Path
    cache: Path
    markers: list[Path]
    plain: CliResult


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Hostile:
    """An aarch64-shaped image (made with mkfs.ext4 -d, no appliance) whose
    /srv/evil -> <host dir> and /srv/up -> ../../../..<host dir>, whose
    os-release holds $(...) and backticks, and /srv/loop -> loop; built once
    (one appliance launch) so the tests below start from its cached base."""
    work = tmp_path_factory.mktemp("hostile")
    host_dir = work / "host-dir"
    host_dir.mkdir()
    markers = [work / f"marker-{i}" for i in range(3)]
    os_release = (f'NAME="openEuler"\nID="openEuler"\nVERSION_ID="22.03"\n'
                  f'PRETTY_NAME="openEuler $(touch {markers[0]}) `touch {markers[1]}`"\n'
                  f"VARIANT=$(touch {markers[2]})\n")
    image = work / "hostile.img"
    make_ext4_image(image, hostile_root_tar("aarch64"), {
        "etc/fstab": "/dev/sda / ext4 defaults 0 1\n",
        "etc/os-release": os_release,
        "srv/evil": (str(host_dir),),
        "srv/up": ("../../../../../.." + str(host_dir),),
        "srv/loop": ("loop",),
    })
    recipe = write_recipe(work / "plain.yaml", f"name: plain\nbase: {{image: {image}}}\n")
    plain = _build(recipe, work / "out", work / "cache")
    return Hostile(image, host_dir, work / "cache", markers, plain)


@pytest.mark.appliance
def test_hostile_image_content_is_data(hostile: Hostile) -> None:
    assert hostile.plain.returncode == 0, hostile.plain.stderr
    assert hostile.plain.json["appliance_launches"] == 1
    out = Path(hostile.plain.json["output"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base"]["arch"] == "aarch64"
    assert "$(touch" in manifest["base"]["os_release"]["PRETTY_NAME"]
    assert manifest["base"]["os_release"]["VARIANT"].startswith("$(touch")
    members = _members(out / "rootfs.tar")
    assert members["srv/evil"].issym() and members["srv/evil"].linkname == str(hostile.host_dir)
    for marker in hostile.markers:
        assert not marker.exists()
    assert list(hostile.host_dir.iterdir()) == []


@pytest.mark.appliance
def test_writes_through_base_image_symlinks_stay_in_the_rootfs(hostile: Hostile,
                                                                tmp_path: Path) -> None:
    el = write_element(tmp_path, "writer", """\
files:
  - {src: payload, dest: /srv/evil/x}
templates:
  - {src: t.in, dest: /srv/up/y}
dirs:
  - {path: /srv/evil/d}
symlinks:
  - {path: /srv/up/l, target: /etc/shadow}
""", {"payload": "element file\n", "t.in": "template\n"})
    ovl = tmp_path / "ovl"
    ovl.mkdir()
    (ovl / "z").write_text("overlay file\n")
    recipe = write_recipe(tmp_path / "recipe.yaml", f"""\
name: through
base: {{image: {hostile.image}}}
elements: [writer]
overlays:
  - {{path: ovl, dest: /srv/evil}}
""")
    res = _build(recipe, tmp_path / "out", hostile.cache)
    assert res.returncode == 0, res.stderr
    assert res.json["appliance_launches"] == 0
    tar = tmp_path / "out" / "through" / "rootfs.tar"
    inside = str(hostile.host_dir).lstrip("/")
    assert _read(tar, f"{inside}/x") == b"element file\n"
    assert _read(tar, f"{inside}/y") == b"template\n"
    assert _read(tar, f"{inside}/z") == b"overlay file\n"
    members = _members(tar)
    assert members[f"{inside}/d"].isdir()
    assert members[f"{inside}/l"].issym() and members[f"{inside}/l"].linkname == "/etc/shadow"
    assert members["srv/evil"].issym()  # still the image's link, not replaced
    assert list(hostile.host_dir.iterdir()) == []
    assert el.exists()


@pytest.mark.appliance
def test_symlink_loop_in_the_base_is_one_line(hostile: Hostile, tmp_path: Path) -> None:
    write_element(tmp_path, "looper", "files:\n  - {src: f, dest: /srv/loop/x}\n",
                  {"f": "x\n"})
    recipe = write_recipe(tmp_path / "recipe.yaml", f"""\
name: loop
base: {{image: {hostile.image}}}
elements: [looper]
""")
    res = _build(recipe, tmp_path / "out", hostile.cache)
    refused(res, tmp_path / "out", "/srv/loop/x", "symbolic links", launches=0)


@pytest.mark.appliance
@pytest.mark.skipif(platform.machine() != "x86_64", reason="needs a foreign-arch base")
def test_install_script_never_runs_on_the_host(hostile: Hostile, tmp_path: Path) -> None:
    """Without an emulator for aarch64 (ROOTFS_BUILD_QEMU_DIR points where
    there is none) the run step is refused before any appliance: the
    script, which would leave a marker on the host, runs nowhere."""
    marker = tmp_path / "marker"
    write_element(tmp_path, "runner", None, {
        "install.d/10-touch": f"#!/bin/sh\ntouch {marker}\n"})
    os.chmod(tmp_path / "elements/runner/install.d/10-touch", 0o755)
    recipe = write_recipe(tmp_path / "recipe.yaml", f"""\
name: runner
base: {{image: {hostile.image}}}
elements: [runner]
""")
    no_qemu = tmp_path / "no-qemu"
    no_qemu.mkdir()
    res = run_cli(recipe, "-o", tmp_path / "out", "--cache-dir", hostile.cache, "--json",
                  env={"ROOTFS_BUILD_QEMU_DIR": str(no_qemu)}, timeout=600)
    refused(res, tmp_path / "out", "install.d/10-touch", "aarch64", "no emulator",
            launches=0)
    assert not marker.exists()


@pytest.mark.appliance
def test_install_script_runs_only_inside_the_appliance(tmp_path: Path, demo_inputs: Path,
                                                       demo_build: Build) -> None:
    """Same arch: the script runs, in the rootfs inside the appliance; its
    host-path marker never appears here, its other file is in the rootfs."""
    marker = tmp_path / "host-marker"
    script = (f"#!/bin/bash\nset -e\nmkdir -p {shlex.quote(str(tmp_path))}\n"
              f"touch {shlex.quote(str(marker))}\necho inside > /root/ran-inside\n")
    write_element(tmp_path, "runner", None, {"install.d/10-touch": script})
    os.chmod(tmp_path / "elements/runner/install.d/10-touch", 0o755)
    recipe = write_recipe(tmp_path / "recipe.yaml", f"""\
name: runner
base: {{image: {demo_image(demo_inputs)}}}
elements: [runner]
output: {{formats: [tar]}}
""")
    res = _build(recipe, tmp_path / "out", demo_build.cache)
    assert res.returncode == 0, res.stderr
    assert res.json["appliance_launches"] == 1
    assert _read(tmp_path / "out" / "runner" / "rootfs.tar", "root/ran-inside") == b"inside\n"
    assert not marker.exists()


@pytest.mark.appliance
def test_template_values_stay_text(tmp_path: Path, demo_inputs: Path,
                                   demo_build: Build) -> None:
    markers = [tmp_path / f"marker-{i}" for i in range(3)]
    value = f"$(touch {markers[0]}) `touch {markers[1]}`; touch {markers[2]}"
    write_element(tmp_path, "motd", "params:\n  motd: {type: str}\ntemplates:\n"
                  "  - {src: motd.in, dest: /etc/motd}\n", {"motd.in": "@{motd}\n@{motd_q}\n"})
    recipe = write_recipe(tmp_path / "recipe.yaml", f"""\
name: motd
description: "$(touch {markers[0]})"
base: {{image: {demo_image(demo_inputs)}}}
elements: [motd]
params:
  motd: {json.dumps(value)}
output: {{formats: [tar]}}
""")
    res = _build(recipe, tmp_path / "out", demo_build.cache)
    assert res.returncode == 0, res.stderr
    assert res.json["appliance_launches"] == 0
    motd = _read(tmp_path / "out" / "motd" / "rootfs.tar", "etc/motd").decode()
    assert motd == f"{value}\n{shlex.quote(value)}\n"
    for marker in markers:
        assert not marker.exists()


# ---------------------------------------------------------------------------
# source tarballs


def _hostile_tars(outside: Path) -> dict[str, list[tuple[tarfile.TarInfo, bytes | None]]]:
    ok = (member("libvirt-6.9.0/README"), b"fine\n")
    return {
        "dotdot name": [ok, (member("../escape.txt"), b"x")],
        "nested dotdot": [ok, (member("libvirt-6.9.0/../../escape.txt"), b"x")],
        "absolute name": [ok, (member(str(outside / "abs.txt")), b"x")],
        "symlink out (absolute)": [ok, (member("libvirt-6.9.0/l", tarfile.SYMTYPE,
                                               link=str(outside)), None),
                                   (member("libvirt-6.9.0/l/x"), b"x")],
        "symlink out (relative)": [ok, (member("libvirt-6.9.0/l", tarfile.SYMTYPE,
                                               link="../../outside"), None),
                                   (member("libvirt-6.9.0/l/x"), b"x")],
        "file through an inner symlink": [ok, (member("libvirt-6.9.0/l", tarfile.SYMTYPE,
                                                      link="."), None),
                                          (member("libvirt-6.9.0/l/x"), b"x")],
        "hard link out": [ok, (member("libvirt-6.9.0/h", tarfile.LNKTYPE,
                                      link=str(outside / "secret")), None)],
        "hard link dotdot": [ok, (member("libvirt-6.9.0/h", tarfile.LNKTYPE,
                                         link="../outside/secret"), None)],
        "character device": [ok, (member("libvirt-6.9.0/null", tarfile.CHRTYPE, dev=(1, 3)),
                                  None)],
        "block device": [ok, (member("libvirt-6.9.0/sda", tarfile.BLKTYPE, dev=(8, 0)),
                              None)],
        "fifo": [ok, (member("libvirt-6.9.0/fifo", tarfile.FIFOTYPE), None)],
    }


CASES = list(_hostile_tars(Path("/x")))


@pytest.mark.parametrize("case", CASES)
def test_source_tarball_member_is_refused(tmp_path: Path, case: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret\n")
    archive = tmp_path / "libvirt-6.9.0.tar.gz"
    archive.write_bytes(tar_bytes(_hostile_tars(outside)[case], "gz"))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(UserError) as e:
        sources.unpack(archive, work, where="libvirt.yaml:3")
    msg = str(e.value)
    assert "\n" not in msg and "refused member" in msg and msg.startswith("libvirt.yaml:3: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["libvirt-6.9.0.tar.gz", "outside",
                                                          "work"]
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").stat().st_nlink == 1
    assert not (tmp_path / "escape.txt").exists()
    for p in work.rglob("*"):
        assert p.resolve().is_relative_to(work.resolve()) or p.is_symlink()


@pytest.mark.appliance
def test_source_tarball_refused_by_the_cli(tmp_path: Path, demo_inputs: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = tmp_path / "libvirt-6.9.0.tar.gz"
    archive.write_bytes(tar_bytes(_hostile_tars(outside)["symlink out (absolute)"], "gz"))
    recipe = demo_recipe(tmp_path / "recipe.yaml", demo_inputs,
                         params={"libvirt_mode": "source", "libvirt_source": str(archive)})
    res = _build(recipe, tmp_path / "out", tmp_path / "cache")
    refused(res, tmp_path / "out", f"{archive}: refused member 'libvirt-6.9.0/l'", launches=0)
    assert res.json["phase"] == "checking sources and patches"
    assert list(outside.iterdir()) == []
    assert published(tmp_path / "out") == []
    assert not list((tmp_path / "cache" / "entries").iterdir())
    assert not list((tmp_path / "cache" / "tmp").iterdir())  # the unpacked part is gone
