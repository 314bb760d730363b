"""The host side, run for real (as root) in a sandbox of namespaces: overlays
over /etc, /usr, /var and /home catch every write, the network namespace is
the test's own, systemctl is a stand-in (systemd does not run here), nft and
the module/ELF/port checks are real.

- issue 16: with the ruleset host/setup.sh loads, a "dpu" network namespace
  reaches a listener on the rexec port and a "stranger" one does not; setup
  twice leaves one table; teardown removes it and leaves other tables alone;
  without nft, setup stops unless --no-firewall;
- issue 13 point 6: a failed check (a module for another kernel) changes
  nothing; a changed whitelist, or one with the wrong mode, restarts
  rexec_server and nothing else.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import pytest
from deploy_helpers import HOST_SANDBOX, have_unshare, run_ns

from builder.deploy import DeployConfig, mount_table, render_deploy
from builder.sampleimage import fake_elf, fake_module

ELF_MACHINE = {"x86_64": 62, "aarch64": 183}

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not have_unshare(), reason="needs root and unshare"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (nftables)"),
    pytest.mark.skipif(platform.machine() not in ELF_MACHINE,
                       reason="stand-in binaries for x86_64 and aarch64 only"),
]

HOST_IP, DPU_IP, STRANGER_IP = "10.9.8.7", "10.9.8.8", "10.9.9.9"


def host_dir(tmp: Path, name: str, kernel: str | None = None, **params) -> Path:
    """host/ of a build for host_ip 10.9.8.7, dpu_ip 10.9.8.8, with stand-ins
    built for this machine (and qtfs_server.ko for `kernel`, default this one)."""
    inputs = tmp / f"{name}-inputs"
    inputs.mkdir()
    ko = inputs / "qtfs_server.ko"
    ko.write_bytes(fake_module("qtfs_server", kernel or platform.release()))
    binaries = {}
    for b in ("engine", "rexec_server"):
        (inputs / b).write_bytes(fake_elf(ELF_MACHINE[platform.machine()]))
        binaries[b] = inputs / b
    cfg = DeployConfig(name="demo", host_ip=HOST_IP, dpu_ip=DPU_IP, qtfs_server_ko=ko,
                       engine_bin=binaries["engine"], rexec_server_bin=binaries["rexec_server"],
                       **params)
    out = tmp / name
    render_deploy(out, cfg, mount_table([], "m"))
    return out / "host"


def text(work: Path, name: str) -> str:
    return (work / name).read_text()


def rc(work: Path, name: str) -> int:
    return int(text(work, name + ".rc"))


# Three network namespaces: the driver's is the host; "dpu" and "stranger" are
# held by sleepers of the driver's pid namespace (gone with it).  The host has
# 10.9.8.7 on the link to the DPU (10.9.8.8) and 10.9.9.7 on another network,
# where the stranger (10.9.9.9) routes to the host.  Nothing leaves the machine.
NETWORK = f"""
unshare -n sleep 600 & DPU=$!
unshare -n sleep 600 & STRANGER=$!
for i in $(seq 100); do
  [ "$(readlink /proc/$DPU/ns/net)" != "$(readlink /proc/self/ns/net)" ] &&
    [ "$(readlink /proc/$STRANGER/ns/net)" != "$(readlink /proc/self/ns/net)" ] && break
  sleep 0.05
done
ip link add h-dpu type veth peer name d-host netns $DPU
ip link add h-str type veth peer name s-host netns $STRANGER
ip addr add {HOST_IP}/24 dev h-dpu && ip link set h-dpu up
ip addr add 10.9.9.7/24 dev h-str && ip link set h-str up
nsenter -t $DPU -n sh -c 'ip link set lo up; ip addr add {DPU_IP}/24 dev d-host;
  ip link set d-host up'
nsenter -t $STRANGER -n sh -c 'ip link set lo up; ip addr add {STRANGER_IP}/24 dev s-host;
  ip link set s-host up; ip route add default via 10.9.9.7'
# stands in for rexec_server on the rexec port (named so: setup.sh finds the
# port held by rexec_server, as on a host set up before)
python3 -c '
import ctypes, socket
ctypes.CDLL(None).prctl(15, b"rexec_server", 0, 0, 0)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{HOST_IP}", 7777))
s.listen(16)
while True:
    s.accept()[0].close()
' &
for i in $(seq 100); do grep -q ':1E61 00000000:0000 0A' /proc/net/tcp && break; sleep 0.05; done
# probe NS: can namespace NS open a connection to rexec_server?
probe() {{
  nsenter -t $1 -n timeout 2 bash -c 'exec 3<>/dev/tcp/{HOST_IP}/7777' 2>/dev/null &&
    echo open || echo closed
}}
"""


def test_the_firewall_admits_the_dpu_only(tmp_path: Path) -> None:
    host = host_dir(tmp_path, "out")
    res = run_ns(HOST_SANDBOX + NETWORK + f"""
H={host}
# someone else's firewall: left alone
nft add table ip other
nft add chain ip other input '{{ type filter hook input priority 0; policy accept; }}'
nft add rule ip other input tcp dport 9 drop
nft list table ip other > $W/other0
echo "dpu $(probe $DPU) stranger $(probe $STRANGER)" > $W/open0
$H/setup.sh > $W/s1.out 2>&1; echo $? > $W/s1.rc
$H/setup.sh > $W/s2.out 2>&1; echo $? > $W/s2.rc
cp $W/systemd/log $W/log2
nft list ruleset > $W/rules2
# the units as installed, with the binaries they run in place
(cd /etc/systemd/system && systemd-analyze verify rexec.service qtfs-engine.service \
  rootfs-offload-firewall.service) > $W/verify.out 2>&1; echo $? > $W/verify.rc
echo "dpu $(probe $DPU) stranger $(probe $STRANGER)" > $W/open2
$H/status.sh > $W/st.out 2>&1; echo $? > $W/st.rc
$H/teardown.sh > $W/t1.out 2>&1; echo $? > $W/t1.rc
$H/teardown.sh > $W/t2.out 2>&1; echo $? > $W/t2.rc
nft list ruleset > $W/rules3
echo "dpu $(probe $DPU) stranger $(probe $STRANGER)" > $W/open3
""", tmp_path, shield=False, net=True, timeout=120)
    assert res.returncode == 0, res.stderr
    # without the ruleset the stranger gets in (so the probe can tell)
    assert text(tmp_path, "open0") == "dpu open stranger open\n"
    assert rc(tmp_path, "s1") == 0, text(tmp_path, "s1.out")
    assert rc(tmp_path, "s2") == 0, text(tmp_path, "s2.out")
    assert f"firewall: table inet rootfs_offload admits the DPU {DPU_IP} only" in \
        text(tmp_path, "s1.out")
    assert text(tmp_path, "open2") == "dpu open stranger closed\n"
    rules = text(tmp_path, "rules2")
    assert rules.count("table inet rootfs_offload {") == 1, rules
    assert text(tmp_path, "other0") in rules
    # setup.sh installed the ruleset and its boot unit, and starts the services
    upper = tmp_path / "upper"
    assert (upper / "etc/rootfs-offload/firewall.nft").read_text() == \
        (host / "firewall.nft").read_text()
    assert (upper / "etc/systemd/system/rootfs-offload-firewall.service").is_file()
    log = text(tmp_path, "log2").splitlines()
    assert "enable rootfs-offload-firewall.service" in log
    assert "restart rexec.service qtfs-engine.service" in log
    # the second run changed nothing, so it restarted nothing
    assert log.count("daemon-reload") == 1 and log[-1] == "start rexec.service qtfs-engine.service"
    if shutil.which("systemd-analyze"):
        assert rc(tmp_path, "verify") == 0, text(tmp_path, "verify.out")
    status = text(tmp_path, "st.out")
    assert f"rexec port 7777      {HOST_IP}" in status
    assert f"firewall (inet rootfs_offload) loaded: the offload ports answer {DPU_IP} only" \
        in status
    # teardown: the table is gone, the other one stays; again: nothing to do
    assert rc(tmp_path, "t1") == 0, text(tmp_path, "t1.out")
    assert rc(tmp_path, "t2") == 0, text(tmp_path, "t2.out")
    assert "rootfs_offload" not in text(tmp_path, "rules3")
    assert text(tmp_path, "rules3") == text(tmp_path, "other0")
    assert text(tmp_path, "open3") == "dpu open stranger open\n"


def upper_files(work: Path) -> list[str]:
    upper = work / "upper"
    return sorted(p.relative_to(upper).as_posix() for p in upper.rglob("*")
                  if p.relative_to(upper).as_posix() not in ("etc", "usr", "var", "home"))


def test_setup_with_a_module_for_another_kernel_changes_nothing(tmp_path: Path) -> None:
    host = host_dir(tmp_path, "out", kernel="1.2.3-other")
    res = run_ns(HOST_SANDBOX + f"""
# something else holds the qtfs port
python3 -c 'import socket, time; s = socket.socket(); s.bind(("0.0.0.0", 12345)); s.listen(); \
time.sleep(60)' &
echo $! > $W/squatter
for i in $(seq 100); do grep -q ':3039 00000000:0000 0A' /proc/net/tcp && break; sleep 0.05; done
{host}/setup.sh > $W/s.out 2>&1; echo $? > $W/s.rc
nft list ruleset > $W/rules
""", tmp_path, shield=False, net=True)
    assert res.returncode == 0, res.stderr
    out = text(tmp_path, "s.out")
    assert rc(tmp_path, "s") == 1, out
    assert f"qtfs_server.ko was built for kernel 1.2.3-other, this host runs {platform.release()}" \
        in out
    squatter = text(tmp_path, "squatter").strip()
    assert f"port 12345 (qtfs_server) is in use by {squatter}(python3)" in out
    assert "2 problem(s); nothing was changed" in out
    assert upper_files(tmp_path) == []          # no file, no directory
    assert not (tmp_path / "systemd/log").exists()  # no systemctl
    assert text(tmp_path, "rules") == ""        # no firewall


def test_setup_without_nftables_stops_unless_told(tmp_path: Path) -> None:
    host = host_dir(tmp_path, "out")
    res = run_ns(HOST_SANDBOX + f"""
rm /usr/sbin/nft
{host}/setup.sh > $W/s1.out 2>&1; echo $? > $W/s1.rc
find $W/upper -mindepth 2 ! -path '*/usr/sbin' ! -path '*/usr/sbin/nft' > $W/left1
{host}/setup.sh --no-firewall > $W/s2.out 2>&1; echo $? > $W/s2.rc
""", tmp_path, shield=False, net=True)
    assert res.returncode == 0, res.stderr
    assert rc(tmp_path, "s1") == 1
    assert "no nftables (nft) on this host: install it, or pass --no-firewall" in \
        text(tmp_path, "s1.out")
    assert text(tmp_path, "left1") == ""
    assert rc(tmp_path, "s2") == 0, text(tmp_path, "s2.out")
    assert "--no-firewall: the qtfs, rexec, QMP and console ports answer every network" in \
        text(tmp_path, "s2.out")
    assert not (tmp_path / "upper/etc/systemd/system/rootfs-offload-firewall.service").exists()


def test_a_changed_whitelist_restarts_rexec_server(tmp_path: Path) -> None:
    """rexec_server reads its whitelist only when it starts; it must be root's
    with mode 0400 (rexec checks)."""
    first = host_dir(tmp_path, "a")
    second = host_dir(tmp_path, "b", rexec_whitelist=["qemu-img"])
    res = run_ns(HOST_SANDBOX + f"""
log() {{ mv $W/systemd/log $W/$1.log 2>/dev/null || : > $W/$1.log; }}
{first}/setup.sh > $W/s1.out 2>&1; echo $? > $W/s1.rc; log s1
{second}/setup.sh > $W/s2.out 2>&1; echo $? > $W/s2.rc; log s2
stat -c '%a %u %g' /etc/rexec/whitelist /etc/rexec/server.json > $W/modes
chmod 0644 /etc/rexec/whitelist
{second}/setup.sh > $W/s3.out 2>&1; echo $? > $W/s3.rc; log s3
stat -c '%a' /etc/rexec/whitelist >> $W/modes
{second}/setup.sh > $W/s4.out 2>&1; echo $? > $W/s4.rc; log s4
""", tmp_path, shield=False, net=True)
    assert res.returncode == 0, res.stderr
    for n in ("s1", "s2", "s3", "s4"):
        assert rc(tmp_path, n) == 0, text(tmp_path, f"{n}.out")
    assert "restart rexec.service qtfs-engine.service" in text(tmp_path, "s1.log")
    for n in ("s2", "s3"):  # only rexec_server restarts, the engine just runs on
        log = text(tmp_path, f"{n}.log").splitlines()
        assert "restart rexec.service" in log and "start qtfs-engine.service" in log, log
    assert "restart" not in text(tmp_path, "s4.log")
    assert text(tmp_path, "modes") == "400 0 0\n400 0 0\n400\n"
    assert (tmp_path / "upper/etc/rexec/whitelist").read_text().endswith("qemu-img\n")
