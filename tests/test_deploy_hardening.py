"""Issue 13, the deployment's second day, with real mounts as root, each
sequence in its own private mount namespace: a wrong mount already there, a
re-run over a remote /sys, two roots, a rehearsal that leaves the machine
(and a real deployment) as they were, the DPU's own socket-activated
libvirt, a live daemon next to the rootfs, VMs and busy mounts at teardown.

The scripts' real mode needs qtfs, which this machine lacks: those tests use
tables without qtfs mounts in REAL_DPU (a private /run and /etc, qtfs counted
as loaded, stand-ins for rmmod and systemctl) and say so."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from deploy_helpers import (
    REAL_DPU,
    add_fake_daemons,
    have_unshare,
    make_fake_rootfs,
    mounts_below,
    parse_mountinfo,
    read_info,
    read_state,
    remove_tree,
    render,
    resolve_in_root,
    run_ns,
)

from builder.deploy.mounts import MountEntry

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not have_unshare(), reason="needs root and unshare -m"),
]


@pytest.fixture
def rootfs(tmp_path: Path):
    root = make_fake_rootfs(tmp_path / "root")
    yield root
    remove_tree(root)


def text(work: Path, name: str) -> str:
    return (work / name).read_text()


def rc(work: Path, name: str) -> int:
    return int(text(work, name + ".rc"))


def below(work: Path, snap: str, root: Path) -> list[tuple[str, str]]:
    return [(m.path, m.fstype) for m in mounts_below(text(work, snap), root)]


# ---------------------------------------------------------------------------
# point 1: "already mounted" means the right thing is mounted


@pytest.mark.parametrize("fstype, target, wanted", [
    ("proc", "/proc", "a bind mount of {host}/proc"),      # a manual chroot's leftover
    ("tmpfs", "/etc", "an overlay of /etc"),
])
def test_a_wrong_mount_already_there_is_an_error(tmp_path: Path, rootfs: Path, fstype: str,
                                                 target: str, wanted: str) -> None:
    r = render(tmp_path, rootfs)
    path = resolve_in_root(rootfs, target)
    res = run_ns(f"""
D={r.dpu}
mount -t {fstype} {fstype} {path}
snap mi0
$D/prepare.sh --rehearse $W/host > $W/p.out 2>&1; echo $? > $W/p.rc
snap mi1
$D/status.sh --rehearse $W/host > $W/s.out 2>&1; echo $? > $W/s.rc
$D/start-libvirtd.sh --rehearse $W/host > $W/l.out 2>&1; echo $? > $W/l.rc
""", tmp_path)
    assert res.returncode == 0, res.stderr
    out = text(tmp_path, "p.out")
    assert rc(tmp_path, "p") == 1, out
    want = wanted.format(host=tmp_path / "host")
    assert f"{path} has {fstype} from {fstype} mounted, but the table wants {want}" in out
    assert "rolled back" in out
    # nothing stacked on it, nothing else left mounted
    assert text(tmp_path, "mi1") == text(tmp_path, "mi0")
    assert below(tmp_path, "mi1", rootfs) == [(path, fstype)]
    status = text(tmp_path, "s.out")
    assert rc(tmp_path, "s") == 1, status
    assert [line for line in status.splitlines() if line.startswith("  wrong")] == [
        line for line in status.splitlines() if f"-> {path} ({path} has {fstype}" in line]
    assert ", 1 wrong" in status
    assert rc(tmp_path, "l") == 2 and "not prepared right" in text(tmp_path, "l.out")


# ---------------------------------------------------------------------------
# point 2: never write through a remote mount


def test_a_rerun_never_writes_through_the_remote_sys(tmp_path: Path, rootfs: Path) -> None:
    """A controller the kernel lists but cannot mount (like cpu,cpuacct where
    cpu and cpuacct are separate hierarchies already): prepare decides cgroup2
    once, and a re-run with the (rehearsed) host /sys read-only writes nothing
    through it."""
    r = render(tmp_path, rootfs, mounts=[
        {"type": "cgroup", "target": "/sys/fs/cgroup/bogus", "order": 500,
         "options": "rw,nosuid,nodev,noexec,relatime,bogus"}])
    (tmp_path / "cgroups").write_text(Path("/proc/cgroups").read_text() + "bogus\t0\t1\t1\n")
    sys_dir = resolve_in_root(rootfs, "/sys")
    res = run_ns(f"""
D={r.dpu}
export ROOTFS_BUILD_PROC_CGROUPS=$W/cgroups
$D/prepare.sh --rehearse $W/host > $W/p1.out 2>&1; echo $? > $W/p1.rc
find $W/host/sys | sort > $W/hostsys1
# the host's /sys, as the DPU sees it through qtfs: read-only
mount -o remount,bind,ro {sys_dir}
snap mi1
$D/prepare.sh --rehearse $W/host > $W/p2.out 2>&1; echo $? > $W/p2.rc
snap mi2
find $W/host/sys | sort > $W/hostsys2
$D/teardown.sh --rehearse $W/host > $W/t.out 2>&1; echo $? > $W/t.rc
snap mi3
""", tmp_path)
    assert res.returncode == 0, res.stderr
    p1 = text(tmp_path, "p1.out")
    assert rc(tmp_path, "p1") == 0, p1
    assert "cannot be mounted" in p1 and "so cgroup v1 would be partial: mounting cgroup2 on " \
        "/sys/fs/cgroup instead" in p1
    root_idx = next(i for i, e in enumerate(r.table) if e.target == "/sys/fs/cgroup")
    assert read_info(tmp_path, rootfs, "mi1")[f"cgroup.{root_idx}"] == "v2"
    mounted = below(tmp_path, "mi1", rootfs)
    assert (resolve_in_root(rootfs, "/sys/fs/cgroup"), "cgroup2") in mounted
    assert not [m for m in mounted if m[1] == "cgroup"]  # no partial v1 layout
    # the re-run: nothing new, nothing written to the host's /sys
    p2 = text(tmp_path, "p2.out")
    assert rc(tmp_path, "p2") == 0, p2
    assert "0 mounted now" in p2
    assert text(tmp_path, "mi2") == text(tmp_path, "mi1")
    assert text(tmp_path, "hostsys2") == text(tmp_path, "hostsys1")
    assert rc(tmp_path, "t") == 0, text(tmp_path, "t.out")
    assert below(tmp_path, "mi3", rootfs) == []


def test_a_full_v1_set_is_decided_once_and_kept(tmp_path: Path, rootfs: Path) -> None:
    """When every controller the kernel offers mounts, prepare keeps cgroup v1
    and records it.  (This machine's cpu and cpuacct are separate hierarchies
    already, so cpu,cpuacct cannot mount here: the kernel's list is given
    without them, which makes that controller one the kernel lacks.)"""
    r = render(tmp_path, rootfs)
    offered = [line for line in Path("/proc/cgroups").read_text().splitlines()
               if line.split("\t")[0] not in ("cpu", "cpuacct")]
    (tmp_path / "cgroups").write_text("\n".join(offered) + "\n")
    res = run_ns(f"""
D={r.dpu}
export ROOTFS_BUILD_PROC_CGROUPS=$W/cgroups
$D/prepare.sh --rehearse $W/host > $W/p1.out 2>&1; echo $? > $W/p1.rc
snap mi1
$D/prepare.sh --rehearse $W/host > $W/p2.out 2>&1; echo $? > $W/p2.rc
snap mi2
$D/teardown.sh --rehearse $W/host > $W/t.out 2>&1; echo $? > $W/t.rc
snap mi3
""", tmp_path)
    assert res.returncode == 0, res.stderr
    assert rc(tmp_path, "p1") == 0, text(tmp_path, "p1.out")
    root_idx = next(i for i, e in enumerate(r.table) if e.target == "/sys/fs/cgroup")
    assert read_info(tmp_path, rootfs, "mi1")[f"cgroup.{root_idx}"] == "v1"
    mounted = below(tmp_path, "mi1", rootfs)
    assert (resolve_in_root(rootfs, "/sys/fs/cgroup"), "tmpfs") in mounted
    assert (resolve_in_root(rootfs, "/sys/fs/cgroup/memory"), "cgroup") in mounted
    _, skipped = read_state(tmp_path, rootfs, "mi1")
    assert {r.table[i].target for i in skipped} >= {"/sys/fs/cgroup/cpu,cpuacct"}
    assert all("not available in this kernel" in why for why in skipped.values()), skipped
    assert rc(tmp_path, "p2") == 0 and "0 mounted now" in text(tmp_path, "p2.out")
    assert text(tmp_path, "mi2") == text(tmp_path, "mi1")
    assert rc(tmp_path, "t") == 0 and below(tmp_path, "mi3", rootfs) == []


# ---------------------------------------------------------------------------
# point 3: one state per root


def test_two_roots_never_share_state(tmp_path: Path) -> None:
    a = make_fake_rootfs(tmp_path / "x" / "y")
    b = make_fake_rootfs(tmp_path / "x_y")
    ra, rb = render(tmp_path / "a", a), render(tmp_path / "b", b)
    try:
        res = run_ns(f"""
{ra.dpu}/prepare.sh --rehearse $W/host > $W/pa.out 2>&1; echo $? > $W/pa.rc
{rb.dpu}/prepare.sh --rehearse $W/host > $W/pb.out 2>&1; echo $? > $W/pb.rc
snap both
{rb.dpu}/teardown.sh --rehearse $W/host > $W/tb.out 2>&1; echo $? > $W/tb.rc
snap agone
{ra.dpu}/teardown.sh --rehearse $W/host > $W/ta.out 2>&1; echo $? > $W/ta.rc
snap none
""", tmp_path)
        assert res.returncode == 0, res.stderr
        assert rc(tmp_path, "pa") == 0 and rc(tmp_path, "pb") == 0, text(tmp_path, "pb.out")
        assert "0 already mounted" in text(tmp_path, "pb.out")
        rec_a, _ = read_state(tmp_path, a, "both")
        rec_b, _ = read_state(tmp_path, b, "both")
        assert rec_a and rec_b and not set(rec_a) & set(rec_b)
        assert all(p.startswith(f"{a}/") for p in rec_a)
        assert all(p.startswith(f"{b}/") for p in rec_b)
        assert read_info(tmp_path, a, "both")["root"] == str(a)
        assert read_info(tmp_path, b, "both")["root"] == str(b)
        # tearing down one leaves the other as it was
        assert rc(tmp_path, "tb") == 0, text(tmp_path, "tb.out")
        assert below(tmp_path, "agone", b) == []
        assert below(tmp_path, "agone", a) == below(tmp_path, "both", a)
        assert rc(tmp_path, "ta") == 0 and below(tmp_path, "none", a) == []
    finally:
        remove_tree(a)
        remove_tree(b)


# A table without qtfs mounts, for the real mode (this machine has no qtfs)
REAL_TABLE = [MountEntry("proc", "proc", "/local_proc"),
              MountEntry("tmpfs", "tmpfs", "/mnt/scratch")]


def test_a_rehearsal_leaves_a_real_deployment_alone(tmp_path: Path, rootfs: Path) -> None:
    r = render(tmp_path, rootfs, table=REAL_TABLE)
    res = run_ns(REAL_DPU + f"""
D={r.dpu}
ls -A /run > $W/run0
$D/prepare.sh > $W/p1.out 2>&1; echo $? > $W/p1.rc
snap real
$D/prepare.sh --rehearse $W/host > $W/p2.out 2>&1; echo $? > $W/p2.rc
snap after
$D/teardown.sh > $W/t1.out 2>&1; echo $? > $W/t1.rc
cp $W/rmmod.log $W/rmmod1 2>/dev/null || : > $W/rmmod1
snap clean
ls -A /run > $W/run1
find $W/etc-upper -mindepth 1 > $W/etc-left
# a rehearsal's teardown does not touch a real deployment either
mkdir /sys/module/qtfs
$D/prepare.sh > $W/p3.out 2>&1; echo $? > $W/p3.rc
snap real2
$D/teardown.sh --rehearse $W/host > $W/t2.out 2>&1; echo $? > $W/t2.rc
snap after2
$D/teardown.sh > $W/t3.out 2>&1; echo $? > $W/t3.rc
""", tmp_path, shield=False)
    assert res.returncode == 0, res.stderr
    assert rc(tmp_path, "p1") == 0, text(tmp_path, "p1.out")
    # the rehearsal is refused, and the real teardown is a real one: it
    # unmounts and unloads qtfs
    assert rc(tmp_path, "p2") == 2 and "is prepared for real" in text(tmp_path, "p2.out")
    assert text(tmp_path, "after") == text(tmp_path, "real")
    assert rc(tmp_path, "t1") == 0, text(tmp_path, "t1.out")
    assert f"{rootfs} is clean (2 unmounted)" in text(tmp_path, "t1.out")
    assert text(tmp_path, "rmmod1") == "rmmod qtfs\n"
    assert below(tmp_path, "clean", rootfs) == []
    # the real state, in a place of its own, stayed as it was
    info = read_info(tmp_path, rootfs, "real", rehearsal=False)
    assert info["mode"] == "real" and info["root"] == str(rootfs)
    assert read_info(tmp_path, rootfs, "after", rehearsal=False) == info
    assert rc(tmp_path, "p3") == 0, text(tmp_path, "p3.out")
    assert rc(tmp_path, "t2") == 2 and "is prepared for real" in text(tmp_path, "t2.out")
    assert text(tmp_path, "after2") == text(tmp_path, "real2")
    assert rc(tmp_path, "t3") == 0, text(tmp_path, "t3.out")
    # point 4 on a real DPU: what prepare created outside the rootfs
    # (/etc/rexec, /var/run/rexec and their files) is gone again
    assert text(tmp_path, "etc-left") == ""
    assert text(tmp_path, "run1") == text(tmp_path, "run0")


# ---------------------------------------------------------------------------
# point 4: a rehearsal leaves the machine as it was

LISTING = ("find /dev /run /var/lib -xdev ! -path '/dev/loop*' -printf '%p %y %m %U\\n' "
           "| sort > $W/{}")


def test_a_rehearsal_leaves_the_machine_as_it_was(tmp_path: Path, rootfs: Path) -> None:
    """No safety net here (run_ns shield=False): the rehearsal and the daemons it
    starts run on the machine's real /dev, /run and /var/lib, whose listings
    must not change while prepared nor after teardown.  (/dev/loop* come and
    go with other users of the machine.)"""
    add_fake_daemons(rootfs, pidfiles=True)
    r = render(tmp_path, rootfs)
    res = run_ns(f"""
D={r.dpu}
{LISTING.format("before")}
$D/prepare.sh --rehearse $W/host > $W/p.out 2>&1; echo $? > $W/p.rc
$D/start-libvirtd.sh --rehearse $W/host > $W/s.out 2>&1; echo $? > $W/s.rc
{LISTING.format("during")}
find $W/host/.rehearsal -path '*/upper/*' -printf '%f\n' > $W/upper
cat {rootfs}/var/run/libvirtd.pid > $W/libvirtd.pid
$D/teardown.sh --rehearse $W/host > $W/t.out 2>&1; echo $? > $W/t.rc
{LISTING.format("after")}
snap clean
""", tmp_path, shield=False, pidns=True)
    assert res.returncode == 0, res.stderr
    assert rc(tmp_path, "p") == 0, text(tmp_path, "p.out")
    assert rc(tmp_path, "s") == 0, text(tmp_path, "s.out")
    assert rc(tmp_path, "t") == 0, text(tmp_path, "t.out")
    assert text(tmp_path, "libvirtd.pid").strip().isdigit()
    before = text(tmp_path, "before")
    assert before.count("\n") > 20
    for snap in ("during", "after"):
        now = text(tmp_path, snap)
        diff = set(before.splitlines()) ^ set(now.splitlines())
        assert now == before, (snap, sorted(diff))
    assert below(tmp_path, "clean", rootfs) == []
    # what the rehearsal wrote went to HOSTDIR: the daemons' pid files, /dev's
    # new mount points
    written = set(text(tmp_path, "upper").split())
    assert {"libvirtd.pid", "virtlogd.pid", "hugepages", "mqueue", "vfio"} <= written, written


# ---------------------------------------------------------------------------
# point 5: the DPU's own libvirt; VMs and busy mounts at teardown

SOCKET_ACTIVATION = r"""
S=$W/systemd
mkdir -p $W/bin $W/sbin
cp /usr/bin/sleep $W/sbin/libvirtd
cp /usr/bin/sleep $W/sbin/virtlogd
# (systemd-socket-activate passes its own environment only: no $W there)
cat > $W/bin/activated <<EOF
#!/bin/bash
echo \$\$ > $W/systemd/active/libvirtd.service
exec $W/sbin/libvirtd 300
EOF
chmod 0755 $W/bin/activated
touch $S/units/libvirtd.service $S/units/libvirtd.socket $S/units/virtlogd.service
# libvirtd.socket: a real socket activation (systemd's own tool), one libvirtd per connection
systemd-socket-activate --accept -l $W/libvirt-sock $W/bin/activated > /dev/null 2>&1 &
echo $! > $S/active/libvirtd.socket
$W/sbin/virtlogd 300 &
echo $! > $S/active/virtlogd.service
connect() {
  python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])' \
    $W/libvirt-sock 2>/dev/null && echo connected || echo refused
}
for i in $(seq 100); do [ -S $W/libvirt-sock ] && break; sleep 0.05; done
connect > $W/c0
for i in $(seq 100); do pgrep -x libvirtd > /dev/null && break; sleep 0.05; done
"""


def test_prepare_stops_and_masks_the_dpus_socket_activated_libvirt(tmp_path: Path,
                                                                    rootfs: Path) -> None:
    """systemctl is a stand-in (no systemd here), the socket activation is real
    (systemd-socket-activate): after prepare, a client connecting to the DPU's
    libvirt socket starts no libvirtd."""
    if shutil.which("systemd-socket-activate") is None:
        pytest.skip("needs systemd-socket-activate")
    r = render(tmp_path, rootfs, table=REAL_TABLE)
    res = run_ns(REAL_DPU + SOCKET_ACTIVATION + f"""
D={r.dpu}
pgrep -x libvirtd > $W/before
$D/prepare.sh > $W/p.out 2>&1; echo $? > $W/p.rc
connect > $W/c1
sleep 0.5
pgrep -x libvirtd > $W/after_libvirtd; pgrep -x virtlogd > $W/after_virtlogd
$D/teardown.sh > $W/t.out 2>&1; echo $? > $W/t.rc
ls $W/systemd/masked > $W/masked_after
""", tmp_path, shield=False, pidns=True)
    assert res.returncode == 0, res.stderr
    assert text(tmp_path, "c0") == "connected\n" and text(tmp_path, "before").strip()
    out = text(tmp_path, "p.out")
    assert rc(tmp_path, "p") == 0, out
    units = "libvirtd.service libvirtd.socket virtlogd.service"
    assert f"stopped, and masked until reboot (teardown.sh unmasks them): {units}" in out
    assert f"mask --runtime --now -- {units}\n" in text(tmp_path, "systemd/log")
    assert text(tmp_path, "c1") == "refused\n"
    assert text(tmp_path, "after_libvirtd") == "" and text(tmp_path, "after_virtlogd") == ""
    assert rc(tmp_path, "t") == 0, text(tmp_path, "t.out")
    assert f"unmask --runtime -- {units}\n" in text(tmp_path, "systemd/log")
    assert text(tmp_path, "masked_after") == ""


def test_start_refuses_next_to_a_live_daemon(tmp_path: Path, rootfs: Path) -> None:
    add_fake_daemons(rootfs)
    r = render(tmp_path, rootfs)
    res = run_ns(f"""
D={r.dpu}
$D/prepare.sh --rehearse $W/host > $W/p.out 2>&1; echo $? > $W/p.rc
cp /usr/bin/sleep $W/libvirtd
$W/libvirtd 300 </dev/null >/dev/null 2>&1 &
own=$!
echo $own > $W/own
$D/start-libvirtd.sh --rehearse $W/host > $W/s1.out 2>&1; echo $? > $W/s1.rc
pgrep -f 'fake/(libvirtd|virtlogd) 300' > $W/started1
kill $own; wait $own
$D/start-libvirtd.sh --rehearse $W/host > $W/s2.out 2>&1; echo $? > $W/s2.rc
$D/teardown.sh --rehearse $W/host > $W/t.out 2>&1; echo $? > $W/t.rc
""", tmp_path, pidns=True)
    assert res.returncode == 0, res.stderr
    assert rc(tmp_path, "p") == 0, text(tmp_path, "p.out")
    own = text(tmp_path, "own").strip()
    assert rc(tmp_path, "s1") == 2, text(tmp_path, "s1.out")
    assert f"libvirt daemons run outside {rootfs}: libvirtd[{own}]" in text(tmp_path, "s1.out")
    assert text(tmp_path, "started1") == ""
    assert rc(tmp_path, "s2") == 0, text(tmp_path, "s2.out")
    assert rc(tmp_path, "t") == 0, text(tmp_path, "t.out")


DAEMONS_ALIVE = "pgrep -f 'fake/(libvirtd|virtlogd) 300' | wc -l > $W/{}"


def test_teardown_names_every_holder_before_it_stops_anything(tmp_path: Path,
                                                             rootfs: Path) -> None:
    add_fake_daemons(rootfs)
    r = render(tmp_path, rootfs)
    vms = resolve_in_root(rootfs, "/home/VMs")
    res = run_ns(f"""
D={r.dpu}
$D/prepare.sh --rehearse $W/host > $W/p.out 2>&1; echo $? > $W/p.rc
$D/start-libvirtd.sh --rehearse $W/host > $W/s.out 2>&1; echo $? > $W/s.rc
snap up
# not chrooted: a shell of the operator's, left in the VM images' directory
(cd {vms} && exec sleep 300) &
holder=$!
echo $holder > $W/holder
sleep 0.2
$D/teardown.sh --rehearse $W/host > $W/t1.out 2>&1; echo $? > $W/t1.rc
{DAEMONS_ALIVE.format("alive1")}
snap refused
kill $holder; wait $holder
$D/teardown.sh --rehearse $W/host > $W/t2.out 2>&1; echo $? > $W/t2.rc
snap clean
""", tmp_path, pidns=True)
    assert res.returncode == 0, res.stderr
    assert rc(tmp_path, "s") == 0, text(tmp_path, "s.out")
    holder = text(tmp_path, "holder").strip()
    t1 = text(tmp_path, "t1.out")
    assert rc(tmp_path, "t1") == 1, t1
    assert f"{holder}(sleep): cwd {vms}" in t1 and "nothing was changed" in t1
    # nothing was stopped or unmounted
    assert text(tmp_path, "alive1").strip() == "2"
    assert text(tmp_path, "refused") == text(tmp_path, "up")
    assert rc(tmp_path, "t2") == 0, text(tmp_path, "t2.out")
    assert below(tmp_path, "clean", rootfs) == []


def test_teardown_refuses_running_vms_unless_forced(tmp_path: Path, rootfs: Path) -> None:
    add_fake_daemons(rootfs)
    shutil.copy2("/usr/bin/sleep", rootfs / "usr/libexec/fake/rexec")
    r = render(tmp_path, rootfs)
    qemu_run = resolve_in_root(rootfs, "/var/run/libvirt/qemu")
    res = run_ns(f"""
D={r.dpu}
$D/prepare.sh --rehearse $W/host > $W/p.out 2>&1; echo $? > $W/p.rc
$D/start-libvirtd.sh --rehearse $W/host > $W/s.out 2>&1; echo $? > $W/s.rc
# a VM: libvirt's domain pid file naming qemu-kvm running through rexec
chroot {rootfs} /usr/libexec/fake/rexec 300 </dev/null >/dev/null 2>&1 &
vm=$!
echo $vm > $W/vm
mkdir -p {qemu_run}
echo $vm > {qemu_run}/vm1.pid
snap up
$D/teardown.sh --rehearse $W/host > $W/t1.out 2>&1; echo $? > $W/t1.rc
{DAEMONS_ALIVE.format("alive1")}
kill -0 $vm && echo alive > $W/vm1
snap refused
$D/teardown.sh --rehearse $W/host --force > $W/t2.out 2>&1; echo $? > $W/t2.rc
kill -0 $vm 2>/dev/null && echo alive > $W/vm2
snap clean
""", tmp_path, pidns=True)
    assert res.returncode == 0, res.stderr
    assert rc(tmp_path, "s") == 0, text(tmp_path, "s.out")
    vm = text(tmp_path, "vm").strip()
    t1 = text(tmp_path, "t1.out")
    assert rc(tmp_path, "t1") == 1, t1
    assert f"VMs still run from {rootfs}: vm1[{vm}]" in t1 and "--force" in t1
    assert text(tmp_path, "alive1").strip() == "2" and text(tmp_path, "vm1") == "alive\n"
    assert text(tmp_path, "refused") == text(tmp_path, "up")
    t2 = text(tmp_path, "t2.out")
    assert rc(tmp_path, "t2") == 0, t2
    assert f"--force: stopping the VMs' processes too: vm1[{vm}]" in t2
    assert not (tmp_path / "vm2").exists()
    assert below(tmp_path, "clean", rootfs) == []
    assert [m.path for m in parse_mountinfo(text(tmp_path, "clean"))
            if m.path.startswith(f"{rootfs}/")] == []
