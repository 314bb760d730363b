"""The generated DPU scripts, run for real with --rehearse inside a private
mount namespace (as root): every table entry mounted, idempotence, rollback
of a failing mount, SIGKILL half-way, cgroup2 fallback, the libvirt daemons."""

from __future__ import annotations

import json
import stat
from collections import Counter
from pathlib import Path

import pytest
from deploy_helpers import (
    Rendered,
    add_fake_daemons,
    have_unshare,
    make_fake_rootfs,
    mounts_below,
    read_info,
    read_state,
    remove_tree,
    render,
    resolve_in_root,
    run_ns,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not have_unshare(), reason="needs root and unshare -m"),
]

PSEUDO_TYPES = ("proc", "sysfs", "hugetlbfs", "mqueue", "tmpfs", "cgroup", "cgroup2")


@pytest.fixture
def rootfs(tmp_path: Path):
    root = make_fake_rootfs(tmp_path / "root")
    yield root
    remove_tree(root)


def text(work: Path, name: str) -> str:
    return (work / name).read_text()


def rc(work: Path, name: str) -> int:
    return int(text(work, name + ".rc"))


def expected_mounts(r: Rendered, root: Path, skipped: dict[int, str],
                    info: dict[str, str]) -> list[tuple[str, str]]:
    """(path, filesystem type) of every table entry a rehearsal must have
    mounted: the machine's own directories (bind, devtmpfs) as overlays, qtfs
    as a bind mount of HOSTDIR (any type), a cgroup tmpfs as prepare decided."""
    out = []
    for i, e in enumerate(r.table):
        if i in skipped:
            continue
        mtype = {"bind": "overlay", "devtmpfs": "overlay", "qtfs": ""}.get(e.type, e.type)
        if info.get(f"cgroup.{i}") == "v2":
            mtype = "cgroup2"
        out.append((resolve_in_root(root, e.target), mtype))
    return out


def check_all_mounted(r: Rendered, root: Path, work: Path, snapshot: str) -> None:
    recorded, skipped = read_state(work, root, snapshot)
    info = read_info(work, root, snapshot)
    for i, reason in skipped.items():
        assert r.table[i].type == "cgroup", (r.table[i], reason)
    expected = expected_mounts(r, root, skipped, info)
    below = mounts_below(text(work, snapshot), root)
    assert Counter(m.path for m in below) == Counter(p for p, _ in expected)
    # prepare recorded them in table order
    assert recorded == [p for p, _ in expected]
    # and each is the right type
    by_path: dict[str, list[str]] = {}
    for m in below:
        by_path.setdefault(m.path, []).append(m.fstype)
    for path, mtype in expected:
        if mtype:
            assert mtype in by_path[path], (path, mtype, by_path[path])


def test_rehearse_prepare_idempotent_and_teardown(tmp_path: Path, rootfs: Path) -> None:
    r = render(tmp_path, rootfs)
    res = run_ns(f"""
D={r.dpu}
# as on a DPU, / is shared (peers only inside this namespace)
mount --make-rshared /
$D/prepare.sh --rehearse $W/host > $W/p1.out 2>&1; echo $? > $W/p1.rc
snap mi1
$D/status.sh --rehearse $W/host > $W/s1.out 2>&1; echo $? > $W/s1.rc
$D/prepare.sh --rehearse $W/host > $W/p2.out 2>&1; echo $? > $W/p2.rc
snap mi2
$D/teardown.sh --rehearse $W/host > $W/t1.out 2>&1; echo $? > $W/t1.rc
snap mi3
$D/teardown.sh --rehearse $W/host > $W/t2.out 2>&1; echo $? > $W/t2.rc
$D/status.sh --rehearse $W/host > $W/s2.out 2>&1; echo $? > $W/s2.rc
""", tmp_path)
    assert res.returncode == 0, res.stderr
    assert rc(tmp_path, "p1") == 0, text(tmp_path, "p1.out")
    check_all_mounted(r, rootfs, tmp_path, "mi1")
    # the bind mounts are slaves: the qtfs mount on <root>/var/lib/libvirt did
    # not propagate to the machine's own /var/lib/libvirt
    assert "/var/lib/libvirt" not in [m.path for m in mounts_below(text(tmp_path, "mi1"),
                                                                     Path("/"))]
    _, skipped = read_state(tmp_path, rootfs, "mi1")
    if skipped:  # this machine lacks some cgroup v1 controllers: said so
        assert "skipped" in text(tmp_path, "p1.out")
    assert rc(tmp_path, "s1") == 0, text(tmp_path, "s1.out")
    assert f"{len(r.table) - len(skipped)} up, 0 down" in text(tmp_path, "s1.out")
    # where this DPU expects the host (issue 16)
    assert ("host: rexec_server tcp://192.168.1.1:7777 (TLS off), qtfs server 192.168.1.1:12345, "
            "QMP 192.168.1.1:32323, consoles 192.168.1.1:50000-58191") in text(tmp_path, "s1.out")
    # a second prepare changes nothing at all
    assert rc(tmp_path, "p2") == 0, text(tmp_path, "p2.out")
    assert text(tmp_path, "mi1") == text(tmp_path, "mi2")
    assert "0 mounted now" in text(tmp_path, "p2.out")
    # the rexec files went under HOSTDIR, in both places
    for d in ("var/run/rexec", "etc/rexec"):
        assert (tmp_path / "host" / d / "hostaddr").read_text() == "192.168.1.1\n"
        assert (tmp_path / "host" / d / "rexecport").read_text() == "7777\n"
        assert (tmp_path / "host" / d / "qmpport").read_text() == "32323\n"
        assert (tmp_path / "host" / d / "usetls").read_text() == "0\n"
    assert (tmp_path / "host/var/run/rexec/pids").is_dir()
    # rexec's own config (issue 13, point 7): root, 0400, Port as a string
    client = tmp_path / "host/etc/rexec/client.json"
    assert json.loads(client.read_text()) == {"Protocol": "tcp", "Ipaddr": "192.168.1.1",
                                              "Port": "7777"}
    st = client.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o400, 0, 0)
    # teardown: nothing below the root, and again on a clean system
    assert rc(tmp_path, "t1") == 0, text(tmp_path, "t1.out")
    assert mounts_below(text(tmp_path, "mi3"), rootfs) == []
    others = [m.line for m in mounts_below(text(tmp_path, "mi1"), Path("/"))
              if not m.path.startswith(str(rootfs) + "/")]
    assert others == [m.line for m in mounts_below(text(tmp_path, "mi3"), Path("/"))]
    assert rc(tmp_path, "t2") == 0, text(tmp_path, "t2.out")
    assert rc(tmp_path, "s2") == 3, text(tmp_path, "s2.out")
    assert read_state(tmp_path, rootfs) == ([], {})


def test_failing_mount_rolls_back(tmp_path: Path, rootfs: Path) -> None:
    # a tmpfs with an impossible option, between /dev and /sys: fails at step 14
    r = render(tmp_path, rootfs, mounts=[
        {"type": "tmpfs", "target": "/mnt/bad", "options": "size=bogus", "order": 450}])
    res = run_ns(f"""
D={r.dpu}
snap mi0
$D/prepare.sh --rehearse $W/host > $W/p.out 2> $W/p.err; echo $? > $W/p.rc
snap mi1
$D/teardown.sh --rehearse $W/host > $W/t.out 2>&1; echo $? > $W/t.rc
""", tmp_path)
    assert res.returncode == 0, res.stderr
    assert rc(tmp_path, "p") == 1
    err = text(tmp_path, "p.err")
    bad = next(i for i, e in enumerate(r.table) if e.target == "/mnt/bad")
    assert f"failed at step {bad + 1}/{len(r.table)} (tmpfs -o size=bogus tmpfs on /mnt/bad)" \
        in err, err
    assert f"rolled back: unmounted {bad} of the {bad} mount(s)" in err, err
    assert mounts_below(text(tmp_path, "mi1"), rootfs) == []
    assert text(tmp_path, "mi0") == text(tmp_path, "mi1")
    assert read_state(tmp_path, rootfs, "mi1")[0] == []
    assert rc(tmp_path, "t") == 0


STOP_AND_KILL = """
ROOTFS_BUILD_TEST_STOP_AFTER={n} $D/prepare.sh --rehearse $W/host > /dev/null 2>&1 &
pid=$!
for i in $(seq 400); do
  [ "$(awk '{{print $3}}' /proc/$pid/stat 2>/dev/null)" = T ] && break
  sleep 0.025
done
snap {snap}
kill -KILL $pid
wait $pid
echo $? > $W/{snap}.rc
"""


def test_sigkill_half_way_then_teardown(tmp_path: Path, rootfs: Path) -> None:
    r = render(tmp_path, rootfs)
    res = run_ns(f"""
D={r.dpu}
{STOP_AND_KILL.format(n=8, snap="killed1")}
$D/teardown.sh --rehearse $W/host > $W/t1.out 2>&1; echo $? > $W/t1.rc
snap after1
{STOP_AND_KILL.format(n=5, snap="killed2")}
$D/prepare.sh --rehearse $W/host > $W/p.out 2>&1; echo $? > $W/p.rc
snap resumed
$D/teardown.sh --rehearse $W/host > $W/t2.out 2>&1; echo $? > $W/t2.rc
snap after2
""", tmp_path)
    assert res.returncode == 0, res.stderr
    assert rc(tmp_path, "killed1") == 137
    assert len(mounts_below(text(tmp_path, "killed1"), rootfs)) == 8
    assert rc(tmp_path, "t1") == 0, text(tmp_path, "t1.out")
    assert mounts_below(text(tmp_path, "after1"), rootfs) == []
    # killed again, then prepare finishes the job from where it stopped
    assert len(mounts_below(text(tmp_path, "killed2"), rootfs)) == 5
    assert rc(tmp_path, "p") == 0, text(tmp_path, "p.out")
    assert "5 already mounted" in text(tmp_path, "p.out")
    check_all_mounted(r, rootfs, tmp_path, "resumed")
    assert rc(tmp_path, "t2") == 0, text(tmp_path, "t2.out")
    assert mounts_below(text(tmp_path, "after2"), rootfs) == []


def test_cgroup2_when_the_kernel_has_no_v1(tmp_path: Path, rootfs: Path) -> None:
    r = render(tmp_path, rootfs)
    res = run_ns(f"""
D={r.dpu}
grep -vw cgroup /proc/filesystems > $W/filesystems
: > $W/cgroups
ROOTFS_BUILD_PROC_FILESYSTEMS=$W/filesystems $D/prepare.sh --rehearse $W/host \
  > $W/p1.out 2>&1; echo $? > $W/p1.rc
snap nov1
$D/status.sh --rehearse $W/host > $W/s.out 2>&1; echo $? > $W/s.rc
$D/teardown.sh --rehearse $W/host > $W/t1.out 2>&1; echo $? > $W/t1.rc
snap clean1
ROOTFS_BUILD_PROC_CGROUPS=$W/cgroups $D/prepare.sh --rehearse $W/host \
  > $W/p2.out 2>&1; echo $? > $W/p2.rc
snap nocontrollers
$D/teardown.sh --rehearse $W/host > $W/t2.out 2>&1; echo $? > $W/t2.rc
snap clean2
""", tmp_path)
    assert res.returncode == 0, res.stderr
    cg = str(rootfs / "sys/fs/cgroup")
    for n, snap in ((1, "nov1"), (2, "nocontrollers")):
        assert rc(tmp_path, f"p{n}") == 0, text(tmp_path, f"p{n}.out")
        assert "mounting cgroup2 on /sys/fs/cgroup instead" in text(tmp_path, f"p{n}.out")
        below = mounts_below(text(tmp_path, snap), rootfs)
        assert [m.fstype for m in below if m.path == cg] == ["cgroup2"]
        assert not [m for m in below if m.fstype == "cgroup"]
        assert rc(tmp_path, f"t{n}") == 0
        assert mounts_below(text(tmp_path, f"clean{n}"), rootfs) == []
    assert rc(tmp_path, "s") == 0, text(tmp_path, "s.out")


def test_start_libvirtd_and_teardown_stops_it(tmp_path: Path, rootfs: Path) -> None:
    add_fake_daemons(rootfs)
    r = render(tmp_path, rootfs, rexec_port=6666, rexec_tls=True)
    res = run_ns(f"""
D={r.dpu}
$D/start-libvirtd.sh --rehearse $W/host > $W/s0.out 2>&1; echo $? > $W/s0.rc
$D/prepare.sh --rehearse $W/host > $W/p.out 2>&1; echo $? > $W/p.rc
$D/start-libvirtd.sh --rehearse $W/host > $W/s1.out 2>&1; echo $? > $W/s1.rc
$D/start-libvirtd.sh --rehearse $W/host > $W/s2.out 2>&1; echo $? > $W/s2.rc
$D/status.sh --rehearse $W/host > $W/st.out 2>&1
# a libvirtd that does not run from the rootfs is none of teardown's business
cp /usr/bin/sleep $W/libvirtd
$W/libvirtd 301 </dev/null >/dev/null 2>&1 &
outside=$!
$D/teardown.sh --rehearse $W/host > $W/t.out 2>&1; echo $? > $W/t.rc
snap after
pgrep -f 'fake/(libvirtd|virtlogd) 300' > $W/left; true
kill -0 $outside && echo alive > $W/outside
kill $outside
""", tmp_path)
    assert res.returncode == 0, res.stderr
    assert rc(tmp_path, "s0") == 2 and "not prepared" in text(tmp_path, "s0.out")
    assert rc(tmp_path, "p") == 0, text(tmp_path, "p.out")
    assert rc(tmp_path, "s1") == 0, text(tmp_path, "s1.out")
    assert "libvirtd started" in text(tmp_path, "s1.out")
    assert "already runs" in text(tmp_path, "s2.out")
    # the daemons' rexec: CMD_NET_ADDR, and USE_TLS (rexec_tls)
    assert (rootfs / "tmp/libvirtd.env").read_text() == "tcp://192.168.1.1:6666 1\n"
    assert (tmp_path / "host/etc/rexec/usetls").read_text() == "1\n"
    assert "virtlogd[" in text(tmp_path, "st.out") and "libvirtd[" in text(tmp_path, "st.out")
    assert rc(tmp_path, "t") == 0, text(tmp_path, "t.out")
    assert "stopping libvirt daemons" in text(tmp_path, "t.out")
    assert mounts_below(text(tmp_path, "after"), rootfs) == []
    assert text(tmp_path, "left") == ""
    assert text(tmp_path, "outside") == "alive\n"


def test_targets_stay_inside_the_rootfs(tmp_path: Path, rootfs: Path) -> None:
    # an absolute symlink in the rootfs must not lead a mount out of it
    outside = tmp_path / "outside"
    outside.mkdir()
    (rootfs / "mnt/escape").symlink_to(str(outside))
    r = render(tmp_path, rootfs, mounts=[{"type": "tmpfs", "target": "/mnt/escape/x"}])
    res = run_ns(f"""
D={r.dpu}
$D/prepare.sh --rehearse $W/host > $W/p.out 2>&1; echo $? > $W/p.rc
snap mi
# teardown also removes mounts it did not record below the root, and only those
mkdir -p {rootfs}/mnt/by-hand/deeper $W/elsewhere
mount -t tmpfs by-hand {rootfs}/mnt/by-hand
mkdir {rootfs}/mnt/by-hand/deeper
mount -t tmpfs deeper {rootfs}/mnt/by-hand/deeper
mount -t tmpfs elsewhere $W/elsewhere
$D/teardown.sh --rehearse $W/host > $W/t.out 2>&1; echo $? > $W/t.rc
snap after
""", tmp_path)
    assert res.returncode == 0, res.stderr
    assert rc(tmp_path, "p") == 0, text(tmp_path, "p.out")
    paths = [m.path for m in mounts_below(text(tmp_path, "mi"), Path("/"))]
    assert str(rootfs) + str(outside) + "/x" in paths
    assert not any(p.startswith(str(outside)) for p in paths)
    assert rc(tmp_path, "t") == 0, text(tmp_path, "t.out")
    after = [m.path for m in mounts_below(text(tmp_path, "after"), Path("/"))]
    assert not [p for p in after if p.startswith(str(rootfs) + "/")]
    assert str(tmp_path / "elsewhere") in after
