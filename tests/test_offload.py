"""The offload content: demo build, qemu-kvm shim, input checks, run steps."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import (
    Build,
    CliResult,
    extract_tar,
    one_error_line,
    read_tar,
    remove_tree,
    run_cli,
    write_recipe,
)

from builder import sampleimage
from builder.hashing import sha256_file as sha256

REPO = Path(__file__).resolve().parent.parent




@pytest.mark.parametrize("recipe", ["demo.yaml", "libvirt-offload-x86_64.yaml",
                                    "libvirt-offload-aarch64.yaml"])
def test_shipped_recipes_validate(recipe: str) -> None:
    res = run_cli("validate", REPO / "recipes" / recipe, "--json")
    assert res.returncode == 0, res.stderr
    assert "libvirt-offload" in res.json["elements"]
    assert res.json["missing_params"] == []


# ---------------------------------------------------------------------------
# the demo


@pytest.mark.appliance
def test_demo_builds_twice_to_identical_bytes(demo_build: Build, tmp_path: Path) -> None:
    again = run_cli(demo_build.recipe, "-o", tmp_path / "out", "--cache-dir",
                    tmp_path / "cache", "--json", "--set",
                    "output.formats=[tar, tar.zst, squashfs, raw, qcow2]",
                    env={"TZ": "America/Lima", "LC_ALL": "C"}, umask=0o027, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.json["appliance_launches"] >= 1  # a cold build, not a cache copy
    first = {Path(a["path"]).name: a["sha256"] for a in demo_build.result.json["artifacts"]}
    second = {Path(a["path"]).name: a["sha256"] for a in again.json["artifacts"]}
    assert set(first) == {"rootfs.tar", "rootfs.tar.zst", "rootfs.squashfs", "rootfs.raw",
                          "rootfs.qcow2", "demo.bundle.tar"}
    assert first == second
    for rel in ("manifest.json", "SHA256SUMS", "dpu/prepare.sh", "dpu/offload.conf",
                "host/rexec.service"):
        assert (demo_build.dir / rel).read_bytes() == (tmp_path / "out/demo" / rel).read_bytes()


@pytest.mark.appliance
def test_demo_rootfs_holds_the_offload_pieces(demo_build: Build) -> None:
    with tarfile.open(demo_build.artifact("rootfs.tar")) as tf:
        names = set(tf.getnames())
        rexec = tf.getmember("./usr/bin/rexec")
        shim = tf.extractfile("./usr/bin/qemu-kvm").read().decode()  # type: ignore[union-attr]
        libexec = tf.extractfile("./usr/libexec/qemu-kvm").read().decode()  # type: ignore[union-attr]
    assert (rexec.mode, rexec.uid, rexec.gid) == (0o755, 0, 0)
    assert shim == libexec and '"$@"' in shim and "$*" not in shim
    assert "host=192.168.122.1\n" in shim and "port=7777\n" in shim
    for d in ("local_proc", "local/proc", "local/sys", "home/VMs", "var/lib/libvirt",
              "usr/sbin/libvirtd", "usr/bin/bash"):
        assert f"./{d}" in names or f"./{d}/" in names, d
    manifest = (demo_build.dir / "manifest.json").read_text()
    assert "rexec_bin" in manifest and "qtfs.ko" in manifest
    assert (demo_build.dir / "dpu" / "qtfs.ko").is_file()
    for f in ("prepare.sh", "teardown.sh", "start-libvirtd.sh", "status.sh", "offload.conf"):
        assert (demo_build.dir / "dpu" / f).is_file(), f


@pytest.mark.appliance
@pytest.mark.root
def test_qemu_kvm_shim_passes_arguments_and_address_exactly(demo_build: Build,
                                                            tmp_path: Path) -> None:
    root = tmp_path / "root"
    extract_tar(demo_build.artifact("rootfs.tar"), root)
    args = ["-name", "vm one", "-drive", "file=/home/VMs/a b.qcow2,if=virtio",
            "it's", '"quoted"', "", "$(touch /pwned)", "*", "tab\there", "new\nline"]

    def shim(env: dict[str, str]) -> list[str]:
        record = root / "rexec-record"
        record.unlink(missing_ok=True)
        subprocess.run(["/usr/sbin/chroot", str(root), "/usr/bin/qemu-kvm", *args],
                       env={"PATH": "/usr/bin", "REXEC_RECORD": "/rexec-record", **env},
                       check=True)
        return record.read_bytes().decode().split("\0")[:-1]

    # built-in address (params host_ip, rexec_port)
    assert shim({}) == ["CMD_NET_ADDR=tcp://192.168.122.1:7777", "/usr/bin/qemu-kvm", *args]
    assert not (root / "pwned").exists()
    # the address prepare.sh writes on each DPU wins over the built-in one
    (root / "etc" / "rexec").mkdir()
    (root / "etc" / "rexec" / "hostaddr").write_text("10.1.2.3\n")
    (root / "etc" / "rexec" / "rexecport").write_text("6666\n")
    assert shim({})[0] == "CMD_NET_ADDR=tcp://10.1.2.3:6666"
    # and CMD_NET_ADDR from the environment wins over both
    assert shim({"CMD_NET_ADDR": "unix:///run/x.sock"})[0] == "CMD_NET_ADDR=unix:///run/x.sock"
    # /usr/libexec/qemu-kvm is the same shim
    out = subprocess.run(["/usr/sbin/chroot", str(root), "/usr/libexec/qemu-kvm", "a b"],
                         env={"PATH": "/usr/bin", "REXEC_RECORD": "/rexec-record"},
                         check=True)
    assert out.returncode == 0
    assert (root / "rexec-record").read_bytes().split(b"\0")[1:3] == [b"/usr/bin/qemu-kvm",
                                                                      b"a b"]
    remove_tree(root)


# ---------------------------------------------------------------------------
# refused inputs (checked before the slow parts)


def _demo_cli(demo_build: Build, out: Path, *extra: str) -> CliResult:
    return run_cli(demo_build.recipe, "-o", out, "--cache-dir", demo_build.cache, "--json",
                   *extra)


@pytest.mark.appliance
def test_foreign_arch_rexec_is_refused(demo_build: Build, tmp_path: Path) -> None:
    foreign = tmp_path / "rexec-aarch64"
    foreign.write_bytes(sampleimage.fake_elf(183))
    res = _demo_cli(demo_build, tmp_path / "out", "--set", f"params.rexec_bin={foreign}")
    assert res.returncode != 0
    err = one_error_line(res.stderr)
    assert "built for aarch64, but the rootfs is x86_64" in err and "rexec_bin" in err
    assert res.json["appliance_launches"] == 0
    assert not (tmp_path / "out" / "demo").exists()


def _make_source(tmp: Path) -> tuple[Path, Path, Path]:
    src = tmp / "src" / "libvirt-6.9.0"
    src.mkdir(parents=True)
    (src / "README").write_text("line one\nline two\n")
    archive = tmp / "libvirt-6.9.0.tar.gz"
    subprocess.run(["tar", "-C", str(tmp / "src"), "-czf", str(archive), "libvirt-6.9.0"],
                   check=True)
    good = tmp / "0001-good.patch"
    good.write_text("--- a/README\n+++ b/README\n@@ -1,2 +1,2 @@\n line one\n-line two\n"
                    "+line 2\n")
    bad = tmp / "0003-bad.patch"
    bad.write_text("--- a/README\n+++ b/README\n@@ -1,2 +1,2 @@\n line one\n-no such line\n"
                   "+x\n")
    return archive, good, bad


def test_patches_apply_on_the_build_host(tmp_path: Path) -> None:
    from builder import sources
    archive, good, _ = _make_source(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    plan = sources.plan_source(archive, [good], "/usr/src/libvirt", work, label="t", where="t")
    readme = next(i for i in plan.items if i.member.name == b"usr/src/libvirt/README")
    assert readme.path is not None and readme.path.read_text() == "line one\nline 2\n"


@pytest.mark.appliance
def test_patch_that_does_not_apply_is_refused_before_the_appliance(
        demo_build: Build, tmp_path: Path) -> None:
    archive, good, bad = _make_source(tmp_path)
    res = run_cli(demo_build.recipe, "-o", tmp_path / "out", "--cache-dir",
                  tmp_path / "fresh-cache", "--json",
                  "--set", "params.libvirt_mode=source",
                  "--set", f"params.libvirt_source={archive}",
                  "--set", f"params.libvirt_patches=[{good}, {bad}]")
    assert res.returncode != 0
    assert ("patch 0003-bad.patch does not apply to libvirt-6.9.0.tar.gz"
            in one_error_line(res.stderr))
    assert res.json["appliance_launches"] == 0
    assert res.json["phase"] == "checking sources and patches"
    assert not list((tmp_path / "fresh-cache" / "entries").iterdir())


@pytest.mark.appliance
def test_qtfs_ko_for_another_kernel_is_refused(demo_build: Build, tmp_path: Path) -> None:
    res = _demo_cli(demo_build, tmp_path / "out", "--set",
                    "params.dpu_kernel=6.6.0-1.oe2403.x86_64")
    assert res.returncode != 0
    assert "built for kernel 5.10.0-60.18.0.50.oe2203.x86_64" in res.stderr
    assert "6.6.0-1.oe2403.x86_64" in res.stderr
    assert res.json["appliance_launches"] == 0
    inputs = demo_build.recipe.parent / "demo-inputs"
    res = _demo_cli(demo_build, tmp_path / "out", "--set",
                    f"params.qtfs_server_ko={inputs / 'qtfs.ko'}", "--set",
                    "params.host_kernel=6.6.0-host")
    assert res.returncode != 0
    assert "host_kernel is 6.6.0-host" in res.stderr


@pytest.mark.appliance
def test_file_under_a_shadowed_path_is_reported(demo_build: Build, tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    (overlay / "etc" / "libvirt").mkdir(parents=True)
    (overlay / "etc" / "libvirt" / "libvirtd.conf").write_text("listen_tls = 0\n")
    res = _demo_cli(demo_build, tmp_path / "out", "--set", f"overlays=[{overlay}]")
    assert res.returncode != 0
    err = one_error_line(res.stderr)
    assert "/etc/libvirt/libvirtd.conf under /etc" in err and "allow_shadowed" in err
    assert not (tmp_path / "out" / "demo").exists()
    res = _demo_cli(demo_build, tmp_path / "out", "--set", f"overlays=[{overlay}]",
                    "--set", "allow_shadowed=[/etc/libvirt]")
    assert res.returncode == 0, res.stderr
    assert res.json["appliance_launches"] == 0


# ---------------------------------------------------------------------------
# steps that run inside the rootfs


@pytest.mark.appliance
def test_run_step_executes_inside_the_rootfs_and_is_cached(demo_build: Build,
                                                           tmp_path: Path) -> None:
    element = tmp_path / "elements" / "marker"
    (element / "install.d").mkdir(parents=True)
    (element / "element.yaml").write_text("params:\n  greeting: {type: str, default: hi}\n")
    script = element / "install.d" / "20-mark"
    script.write_text("#!/bin/bash\nset -eu\n"
                      "mkdir -p /opt/marker\n"
                      "IFS= read -r first < /etc/os-release\n"
                      'echo "$(id -u) ${PARAM_GREETING} $first" > /opt/marker/ran\n'
                      "rm /etc/hostname\n"
                      "echo scratch > /tmp/not-in-layer\n")
    script.chmod(0o755)
    recipe = tmp_path / "demo.yaml"
    text = demo_build.recipe.read_text().replace("elements: [libvirt-offload]",
                                                 "elements: [libvirt-offload, marker]")
    text = text.replace("demo-inputs/", f"{demo_build.recipe.parent}/demo-inputs/")
    text = text.replace("../overlays/", f"{demo_build.recipe.parent}/../overlays/")
    recipe.write_text(text.replace("params:\n", "params:\n  greeting: hello\n", 1))

    def build(out: str) -> dict:
        res = run_cli(recipe, "-o", tmp_path / out, "--cache-dir", demo_build.cache, "--json")
        assert res.returncode == 0, res.stderr
        return res.json

    first = build("one")
    runs = [layer for layer in first["layers"] if layer["kind"] == "run"]
    assert [r["cache"] for r in runs] == ["built"]
    assert first["appliance_launches"] == 1  # base and file layers came from the cache
    tree = read_tar(tmp_path / "one" / "demo" / "rootfs.tar.zst")
    assert tree["./opt/marker/ran"][1] == b'0 hello NAME="openEuler"\n'
    names = set(tree)
    assert "./etc/hostname" not in names
    assert "./tmp/not-in-layer" not in names
    assert "./.rootfs-build-run" not in names and "./.rootfs-build-run/" not in names
    second = build("two")
    assert second["appliance_launches"] == 0
    assert [layer["cache"] for layer in second["layers"] if layer["kind"] == "run"] == ["hit"]
    assert (sha256(tmp_path / "one" / "demo" / "rootfs.tar.zst")
            == sha256(tmp_path / "two" / "demo" / "rootfs.tar.zst"))
    # A failing script: one line naming the step and its last output line.
    script.write_text("#!/bin/bash\necho 'configure: error: no meson here'\nexit 3\n")
    res = run_cli(recipe, "-o", tmp_path / "three", "--cache-dir", demo_build.cache, "--json")
    assert res.returncode != 0
    err = one_error_line(res.stderr)
    assert "element marker (install.d/20-mark)" in err
    assert "configure: error: no meson here" in err
    assert not (tmp_path / "three" / "demo").exists()


def test_host_phase_scripts_are_refused(tmp_path: Path) -> None:
    # Checked without the appliance: the build refuses a host phase at load time.
    element = tmp_path / "elements" / "hosty" / "root.d"
    element.mkdir(parents=True)
    (element / "10-x").write_text("#!/bin/sh\n")
    recipe = write_recipe(tmp_path / "r.yaml", "name: h\nbase: {image: x.qcow2}\n"
                                               "elements: [hosty]\n")
    res = run_cli("validate", recipe)
    assert res.returncode != 0
    assert "phase root.d of element hosty would run on the build host" in res.stderr
