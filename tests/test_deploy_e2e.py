"""The deployment on the REAL demo build (as root, each sequence in its own
``unshare -m --propagation private`` driver, so every mount dies with it):

- the rehearsal on the demo rootfs extracted from rootfs.tar: every table
  entry mounted, a second prepare changes nothing, the qemu-kvm shim reaches
  the recording rexec with its arguments intact and the configured address,
  the demo's daemons start inside the root and teardown stops them;
- the demo bundle installs a tree identical to rootfs.tar; one changed byte
  is refused and nothing is written;
- issue 5: the raw (and squashfs) image, installed from the bundle with
  ``install.sh --format``, is loop-mounted by prepare (ROOTFS_IMAGE) and the
  rehearsal runs on it; teardown leaves nothing mounted and no loop device.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from conftest import Build, extract_tar, mounts_under, run_cli
from deploy_helpers import (
    check_tree_is_tar,
    have_unshare,
    mounts_below,
    parse_mountinfo,
    read_info,
    read_state,
    remove_tree,
    run_ns,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.appliance,
    pytest.mark.skipif(not have_unshare(), reason="needs root and unshare -m"),
]

# Extra lines for the driver: the rootfs binds the machine's /var/run (the
# demo daemons write their pid files there) and /etc: keep both clean of this
# test, and make what the chroot sees of /etc/rexec independent of the machine.
NS_HEAD = """
mount -t tmpfs tmpfs /run
if [ -d /etc/rexec ]; then mount -t tmpfs tmpfs /etc/rexec; fi
"""

# `chroot ROOT /usr/bin/qemu-kvm ...` with awkward arguments; the demo's rexec
# records CMD_NET_ADDR and its argv (NUL-separated) in the chroot's /tmp.
SHIM_ARGS = ("a b", "c,d", "e'f")
SHIM = ("chroot $R /usr/bin/qemu-kvm " + " ".join(shlex.quote(a) for a in SHIM_ARGS)
        + " > $W/shim.out 2>&1; echo $? > $W/shim.rc\n")

# the demo daemons' pids (from their pid files, in the rootfs's /var/run: a
# rehearsal's overlay of the machine's) and whether they run inside $R
DAEMONS = """
for d in virtlogd libvirtd; do
  pid=$(cat $R/var/run/$d.pid 2>/dev/null)
  echo "$d ${pid:-none} $(readlink /proc/$pid/root 2>/dev/null)" >> $W/$1
done
"""

GONE = """
for d in virtlogd libvirtd; do
  pid=$(cat $W/$d.pid 2>/dev/null) || continue
  st=$(awk '{print $3}' /proc/$pid/stat 2>/dev/null)
  echo "$d ${st:-gone}" >> $W/$1
done
"""


# With ROOTFS_IMAGE: prepare SIGKILLed after mounting the image and 3 entries,
# then teardown; then a prepare whose qtfs /home/VMs step fails (its rehearsal
# source is a file), which must roll back the image too.
KILL_AND_FAIL = """
ROOTFS_BUILD_TEST_STOP_AFTER=4 $D/prepare.sh --rehearse $W/host > /dev/null 2>&1 &
pid=$!
for i in $(seq 400); do
  [ "$(awk '{print $3}' /proc/$pid/stat 2>/dev/null)" = T ] && break
  sleep 0.025
done
snap killed
kill -KILL $pid
wait $pid
echo $? > $W/killed.rc
$D/teardown.sh --rehearse $W/host > $W/t3.out 2>&1; echo $? > $W/t3.rc
snap mi5
losetup -a > $W/mi5.loops
mkdir -p $W/badhost/home
: > $W/badhost/home/VMs
$D/prepare.sh --rehearse $W/badhost > $W/pf.out 2>&1; echo $? > $W/pf.rc
snap mi6
losetup -a > $W/mi6.loops
"""


def text(work: Path, name: str) -> str:
    return (work / name).read_text()


def rc(work: Path, name: str) -> int:
    return int(text(work, name + ".rc"))


def read_conf(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def rendered_table(prepare: Path) -> list[tuple[str, str]]:
    """(type, target) of each entry of the mount table a prepare.sh was rendered with."""
    arrays: dict[str, list[str]] = {}
    for line in prepare.read_text().splitlines():
        for key in ("MT_TYPE", "MT_TARGET"):
            if line.startswith(f"{key}=("):
                arrays[key] = shlex.split(line[len(key) + 2:-1])
    return list(zip(arrays["MT_TYPE"], arrays["MT_TARGET"], strict=True))


def check_table_mounted(table: list[tuple[str, str]], root: Path, work: Path, snap: str,
                        image: bool = False) -> None:
    """Every entry of the table is mounted where it resolves (skipped ones: cgroup
    v1 controllers, when prepare chose cgroup2 or the kernel lacks them),
    recorded in table order (after the image)."""
    recorded, skipped = read_state(work, root, snap)
    info = read_info(work, root, snap)
    assert all(table[i][0] == "cgroup" for i in skipped), skipped
    expected = [os.path.realpath(str(root) + target) for i, (_, target) in enumerate(table)
                if i not in skipped]
    if image:
        assert recorded[0] == str(root)
        recorded = recorded[1:]
    assert recorded == expected
    below = mounts_below(text(work, snap), root)
    assert Counter(m.path for m in below) == Counter(expected)
    types = {m.path: m.fstype for m in below}
    for i, (mtype, target) in enumerate(table):
        if i in skipped:
            continue
        # a rehearsal overlays the machine's own directories
        mtype = {"devtmpfs": "overlay", "bind": "overlay"}.get(mtype, mtype)
        if info.get(f"cgroup.{i}") == "v2":
            mtype = "cgroup2"
        if mtype in ("proc", "sysfs", "overlay", "tmpfs", "mqueue", "cgroup2"):
            path = os.path.realpath(str(root) + target)
            assert mtype in [m.fstype for m in below if m.path == path], (path, types[path])


def check_shim(work: Path, record: Path, conf: dict[str, str]) -> None:
    assert rc(work, "shim") == 0, text(work, "shim.out")
    fields = record.read_bytes().split(b"\0")
    assert fields[-1] == b""
    # rexec gets the command as the whitelist lists it, then every argument intact
    assert fields[1:-1] == [b"/usr/bin/qemu-kvm", *(a.encode() for a in SHIM_ARGS)]
    assert fields[0] == f"CMD_NET_ADDR=tcp://{conf['HOST_IP']}:{conf['REXEC_PORT']}".encode()


# ---------------------------------------------------------------------------


def test_rehearsal_on_the_demo_rootfs(tmp_path: Path, demo_build: Build) -> None:
    dpu = demo_build.dir / "dpu"
    conf = read_conf(dpu / "offload.conf")
    table = rendered_table(dpu / "prepare.sh")
    root = tmp_path / "rootfs"
    extract_tar(demo_build.artifact("rootfs.tar"), root)
    assert not (root / "tmp/rexec-record").exists()
    try:
        res = run_ns(NS_HEAD + f"""
D={dpu}
R={root}
daemons() {{ {DAEMONS} }}
gone() {{ {GONE} }}
$D/prepare.sh --root $R --rehearse $W/host > $W/p1.out 2>&1; echo $? > $W/p1.rc
snap mi1
$D/prepare.sh --root $R --rehearse $W/host > $W/p2.out 2>&1; echo $? > $W/p2.rc
snap mi2
{SHIM}
# what the chroot sees of the rexec files prepare wrote
for f in /etc/rexec/hostaddr /var/run/rexec/hostaddr; do
  chroot $R /usr/bin/cat $f >> $W/seen 2>/dev/null || echo "no $f" >> $W/seen
done
$D/start-libvirtd.sh --root $R --rehearse $W/host > $W/s.out 2>&1; echo $? > $W/s.rc
daemons up
for d in virtlogd libvirtd; do cp $R/var/run/$d.pid $W/ 2>/dev/null; done
$D/status.sh --root $R --rehearse $W/host > $W/st.out 2>&1; echo $? > $W/st.rc
$D/teardown.sh --root $R --rehearse $W/host > $W/t1.out 2>&1; echo $? > $W/t1.rc
snap mi3
gone down
$D/teardown.sh --root $R --rehearse $W/host > $W/t2.out 2>&1; echo $? > $W/t2.rc
snap mi4
""", tmp_path)
        assert res.returncode == 0, res.stderr
        assert rc(tmp_path, "p1") == 0, text(tmp_path, "p1.out")
        check_table_mounted(table, root, tmp_path, "mi1")
        # a second prepare changes nothing at all
        assert rc(tmp_path, "p2") == 0, text(tmp_path, "p2.out")
        assert text(tmp_path, "mi1") == text(tmp_path, "mi2")
        assert "0 mounted now" in text(tmp_path, "p2.out")

        # The rehearsal writes the rexec files under HOSTDIR (a real prepare
        # writes the DPU's /etc/rexec and /var/run/rexec, which the chroot sees
        # through the binds of /etc and /var/run) ...
        for d in ("etc/rexec", "var/run/rexec"):
            assert (tmp_path / "host" / d / "hostaddr").read_text() == conf["HOST_IP"] + "\n"
            assert (tmp_path / "host" / d / "rexecport").read_text() == conf["REXEC_PORT"] + "\n"
        # ... so the chroot sees none (its /etc and /var/run are this machine's) ...
        assert text(tmp_path, "seen") == "no /etc/rexec/hostaddr\nno /var/run/rexec/hostaddr\n"
        # ... and the shim falls back to the address the image was built with,
        # which is the one the DPU config says.
        check_shim(tmp_path, root / "tmp/rexec-record", conf)

        assert rc(tmp_path, "s") == 0, text(tmp_path, "s.out")
        assert "virtlogd started" in text(tmp_path, "s.out")
        assert "libvirtd started" in text(tmp_path, "s.out")
        up = dict(line.split(" ", 1) for line in text(tmp_path, "up").splitlines())
        assert set(up) == {"virtlogd", "libvirtd"}
        for name, info in up.items():
            pid, where = info.split(" ")
            assert where == str(root), (name, info)  # running chrooted in the rootfs
            assert f"{name}[{pid}]" in text(tmp_path, "st.out")
        assert rc(tmp_path, "st") == 0, text(tmp_path, "st.out")

        assert rc(tmp_path, "t1") == 0, text(tmp_path, "t1.out")
        assert "stopping libvirt daemons" in text(tmp_path, "t1.out")
        for line in text(tmp_path, "down").splitlines():
            assert line.split()[1] in ("gone", "Z"), line
        assert mounts_below(text(tmp_path, "mi3"), root) == []
        others = [m.line for m in parse_mountinfo(text(tmp_path, "mi1"))
                  if not m.path.startswith(str(root) + "/")]
        assert others == [m.line for m in parse_mountinfo(text(tmp_path, "mi3"))]
        assert rc(tmp_path, "t2") == 0, text(tmp_path, "t2.out")
        assert text(tmp_path, "mi3") == text(tmp_path, "mi4")
        assert read_state(tmp_path, root) == ([], {})
    finally:
        remove_tree(root)


# ---------------------------------------------------------------------------
# the bundle


def unpack_bundle(build: Build, dest: Path) -> Path:
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-xf", str(build.out / "demo.bundle.tar"), "-C", str(dest)],
                   check=True)
    return dest / "demo"


def install(bundle_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bundle_dir / "install.sh"), *args], capture_output=True,
                          text=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def listing(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))


def test_bundle_installs_the_tar_tree_and_refuses_a_changed_byte(
        tmp_path: Path, demo_build: Build) -> None:
    bdir = unpack_bundle(demo_build, tmp_path / "usb")
    site = tmp_path / "site"
    site.mkdir()
    target = site / "rootfs"
    try:
        r = install(bdir, "--target", str(target))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "installed rootfs.tar into" in r.stdout
        n = check_tree_is_tar(target, demo_build.artifact("rootfs.tar"))
        assert n > 50
        conf = read_conf(site / "rootfs.deploy/offload.conf")
        assert conf["ROOTFS"] == str(target) and conf["ROOTFS_IMAGE"] == ""
        assert sorted(p.name for p in site.iterdir()) == ["rootfs", "rootfs.deploy"]
    finally:
        remove_tree(site)

    # one changed byte in the artifact: refused before anything is written
    data = bytearray((bdir / "rootfs.tar").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bdir / "rootfs.tar").write_bytes(bytes(data))
    site.mkdir()
    r = install(bdir, "--target", str(site / "rootfs"), "--force")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "checksum mismatch for rootfs.tar" in r.stderr and "nothing was installed" in r.stderr
    assert listing(site) == []


# ---------------------------------------------------------------------------
# issue 5: the images


@pytest.mark.parametrize("fmt", ["raw", "squashfs"])
def test_image_from_the_bundle_is_mounted_by_prepare(tmp_path: Path, demo_build: Build,
                                                     fmt: str) -> None:
    bdir = unpack_bundle(demo_build, tmp_path / "usb")
    site = tmp_path / "site"
    site.mkdir()
    target = site / "rootfs"
    image = site / f"rootfs.{fmt}"
    deploy = site / "rootfs.deploy"
    table = rendered_table(bdir / "dpu/prepare.sh")
    try:
        r = install(bdir, "--target", str(target), "--format", fmt, "--dry-run")
        assert r.returncode == 0, r.stderr
        assert listing(site) == []
        r = install(bdir, "--target", str(target), "--format", fmt)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"installed rootfs.{fmt} as {image}" in r.stdout
        assert sorted(p.name for p in site.iterdir()) == \
            sorted(["rootfs", f"rootfs.{fmt}", "rootfs.deploy"])
        assert listing(target) == []  # the mount point
        assert image.read_bytes() == demo_build.artifact(f"rootfs.{fmt}").read_bytes()
        assert stat.S_IMODE(image.stat().st_mode) == 0o600
        conf = read_conf(deploy / "offload.conf")
        assert conf["ROOTFS"] == str(target) and conf["ROOTFS_IMAGE"] == str(image)
        # an installed image is only replaced with --force
        r = install(bdir, "--target", str(target), "--format", fmt)
        assert r.returncode == 1 and f"{image} exists (--force replaces it)" in r.stderr

        res = run_ns(NS_HEAD + f"""
D={deploy}
R={target}
$D/prepare.sh --rehearse $W/host > $W/p1.out 2>&1; echo $? > $W/p1.rc
snap mi1
losetup -a > $W/loops1
$D/status.sh --rehearse $W/host > $W/st.out 2>&1; echo $? > $W/st.rc
$D/prepare.sh --rehearse $W/host > $W/p2.out 2>&1; echo $? > $W/p2.rc
snap mi2
# the rootfs may be read-only (squashfs): rexec records in the table's /dev/shm
export REXEC_RECORD=/dev/shm/rexec-record
{SHIM}
cp $R/dev/shm/rexec-record $W/record
unset REXEC_RECORD
# prepared: the bundle refuses to install over it
{bdir}/install.sh --target $R --format {fmt} --force > $W/i.out 2>&1; echo $? > $W/i.rc
$D/teardown.sh --rehearse $W/host > $W/t1.out 2>&1; echo $? > $W/t1.rc
snap mi3
losetup -a > $W/loops3
$D/teardown.sh --rehearse $W/host > $W/t2.out 2>&1; echo $? > $W/t2.rc
snap mi4
{KILL_AND_FAIL if fmt == "raw" else ""}
""", tmp_path)
        assert res.returncode == 0, res.stderr
        assert rc(tmp_path, "p1") == 0, text(tmp_path, "p1.out")
        mi1 = parse_mountinfo(text(tmp_path, "mi1"))
        on_root = [m for m in mi1 if m.path == str(target)]
        assert len(on_root) == 1, on_root
        fstype = "ext4" if fmt == "raw" else "squashfs"
        assert on_root[0].fstype == fstype
        opts = on_root[0].line.split()[5].split(",")
        assert ("rw" if fmt == "raw" else "ro") in opts
        loop = on_root[0].line.split(" - ")[1].split()[1]
        assert loop.startswith("/dev/loop")
        assert f"{loop}: " in text(tmp_path, "loops1") and f"({image})" in text(tmp_path, "loops1")
        check_table_mounted(table, target, tmp_path, "mi1", image=True)
        assert rc(tmp_path, "st") == 0, text(tmp_path, "st.out")
        assert f"up      rootfs image {image} ({fstype}" in text(tmp_path, "st.out")
        assert rc(tmp_path, "p2") == 0, text(tmp_path, "p2.out")
        assert text(tmp_path, "mi1") == text(tmp_path, "mi2")
        assert "0 mounted now" in text(tmp_path, "p2.out")
        check_shim(tmp_path, tmp_path / "record", conf)
        assert rc(tmp_path, "i") == 1 and "is mounted" in text(tmp_path, "i.out")

        assert rc(tmp_path, "t1") == 0, text(tmp_path, "t1.out")
        assert [m for m in parse_mountinfo(text(tmp_path, "mi3"))
                if m.path == str(target) or m.path.startswith(str(target) + "/")] == []
        assert str(image) not in text(tmp_path, "loops3")  # the loop device is gone
        assert rc(tmp_path, "t2") == 0, text(tmp_path, "t2.out")
        assert text(tmp_path, "mi3") == text(tmp_path, "mi4")
        assert read_state(tmp_path, target) == ([], {})
        if fmt == "raw":
            # killed half-way (the image and 3 table entries mounted), then teardown
            assert rc(tmp_path, "killed") == 137
            killed = parse_mountinfo(text(tmp_path, "killed"))
            assert [m.fstype for m in killed if m.path == str(target)] == ["ext4"]
            assert len(mounts_below(text(tmp_path, "killed"), target)) == 3
            assert rc(tmp_path, "t3") == 0, text(tmp_path, "t3.out")
            # a step failing after the image was mounted: all of it rolled back
            assert rc(tmp_path, "pf") == 1, text(tmp_path, "pf.out")
            step = [t for _, t in table].index("/home/VMs") + 1
            assert f"failed at step {step}/{len(table)}" in text(tmp_path, "pf.out")
            # the entries before it and the image
            assert f"rolled back: unmounted {step} of the {step} mount(s)" in \
                text(tmp_path, "pf.out")
            for snap in ("mi5", "mi6"):
                assert text(tmp_path, snap) == text(tmp_path, "mi4"), snap
                assert str(image) not in text(tmp_path, f"{snap}.loops"), snap
        assert str(image) not in subprocess.run(["losetup", "-a"], capture_output=True,
                                                text=True).stdout
    finally:
        assert not mounts_under(site)
        remove_tree(site)


# ---------------------------------------------------------------------------
# issue 16 (host_listen: any) and issue 13 point 9 (a signed bundle) through the
# build: a warm build of the demo from demo_build's cache (no appliance)


def test_build_warns_of_host_listen_any_and_signs_the_bundle(tmp_path: Path,
                                                            demo_build: Build) -> None:
    key = tmp_path / "release"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "release", "-f",
                    str(key)], check=True)
    pub = (tmp_path / "release.pub").read_text()
    fp = subprocess.run(["ssh-keygen", "-l", "-f", str(tmp_path / "release.pub")],
                        capture_output=True, text=True, check=True).stdout.split()[1]
    res = run_cli(demo_build.recipe, "-o", tmp_path / "out", "--cache-dir", demo_build.cache,
                  "--json", "--set", "params.host_listen=any",
                  "--set", f"params.bundle_signing_key={key}")
    assert res.returncode == 0, res.stderr
    assert res.json["appliance_launches"] == 0
    assert "warning: host_listen: any: qtfs_server (port 12345, no authentication) and " \
        "rexec_server (0.0.0.0:7777) listen on every address of the host" in res.stderr
    out = tmp_path / "out/demo"
    deployment = json.loads((out / "manifest.json").read_text())["generated"]["offload-deployment"]
    assert deployment["host_listen"] == "any" and len(deployment["warnings"]) == 1
    assert deployment["listen"] == {"qtfs_server": "0.0.0.0:12345",
                                    "rexec_server": "tcp://0.0.0.0:7777"}
    assert deployment["firewall"]["admits"] == "192.168.122.2"
    assert deployment["signing"]["signed_by"] == fp
    unit = (out / "host/rexec.service").read_text()
    assert "Environment=CMD_NET_ADDR=tcp://0.0.0.0:7777\n" in unit
    # the bundle carries the signature, and install.sh checks it first
    trust = tmp_path / "trust"
    trust.write_text(f'release namespaces="rootfs-build-bundle" {pub}')
    usb = tmp_path / "usb"
    usb.mkdir()
    subprocess.run(["tar", "-xf", str(tmp_path / "out/demo.bundle.tar"), "-C", str(usb)],
                   check=True)
    r = install(usb / "demo", "--target", str(tmp_path / "site/rootfs"), "--trust", str(trust),
                "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f'Good "rootfs-build-bundle" signature for release with ED25519 key {fp}' in r.stdout
    # the default build says where it listens, unsigned
    default = json.loads(demo_build.artifact("manifest.json").read_text())[
        "generated"]["offload-deployment"]
    assert default["host_listen"] == "link" and default["warnings"] == []
    assert default["listen"]["rexec_server"] == "tcp://192.168.122.1:7777"
    assert default["signing"] == {"signed_by": "unsigned"}
