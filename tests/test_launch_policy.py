"""How the tool starts and stops its appliances: the CPU a TCG appliance
gets (libguestfs' "max" without the flags whose memory copies TCG
emulates slowly, guestfs_io._TCG_CPU_FLAGS_OFF, and everything else of max
kept), and which appliances sync their filesystems before they stop."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder import guestfs_io


def _hypervisor(tmp_path: Path, name: str, flags: str) -> str:
    """A stand-in qemu whose `-cpu help` lists `flags` as qemu prints them."""
    hv = tmp_path / name
    hv.write_text("#!/bin/sh\n"
                  '[ "$1 $2" = "-cpu help" ] || exit 1\n'
                  "echo 'Available CPUs:'\necho 'x86 max  Enables all features'\n"
                  f"echo\necho 'Recognized CPUID flags:'\necho '  {flags}'\n")
    hv.chmod(0o755)
    return str(hv)


@pytest.mark.parametrize(("flags", "model"), [
    ("avx2 erms fma fsrm la57 sse4.2", "max,la57=off,erms=off,fsrm=off"),
    ("avx2 erms la57 sse4.2", "max,la57=off,erms=off"),      # a qemu before FSRM
    ("aes pmull sha1 sve", None),                           # not x86_64: libguestfs' own
    ("la57 sse4.2", None),                                  # nothing slow to turn off
])
def test_cpu_model_turns_off_only_the_flags_the_hypervisor_knows(
        tmp_path: Path, flags: str, model: str | None) -> None:
    hv = _hypervisor(tmp_path, f"qemu-{len(flags)}", flags)
    assert guestfs_io._tcg_cpu_model(hv) == model


def test_a_hypervisor_that_cannot_say_keeps_libguestfs_model(tmp_path: Path) -> None:
    assert guestfs_io._tcg_cpu_model("/bin/false") is None
    assert guestfs_io._tcg_cpu_model(str(tmp_path / "no-such-qemu")) is None


@pytest.mark.appliance
def test_tcg_appliance_runs_max_without_rep_movsb_flags(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Launched as the tool launches it on TCG, the appliance's CPU lacks
    ERMS and FSRM but keeps x86-64-v2, which qemu64 would not have."""
    g = guestfs_io._guestfs_module().GuestFS(python_return_dict=True)
    if guestfs_io._tcg_cpu_model(g.get_hv()) is None:
        pytest.skip("the hypervisor has no flags to turn off (not x86_64)")
    g.close()
    monkeypatch.setenv("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    disk = tmp_path / "empty.raw"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    app = guestfs_io.Appliance("cpu probe")
    app.add_drive(disk, fmt="raw")
    with app:
        cpuinfo = app.call("debug", "sh", ["grep -m1 '^flags' /proc/cpuinfo"])
    flags = set(cpuinfo.split(":", 1)[1].split())
    assert not flags & {"erms", "fsrm"}, cpuinfo
    x86_64_v2 = {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}
    assert x86_64_v2 <= flags, f"missing {x86_64_v2 - flags}"


def test_only_an_appliance_that_keeps_a_written_drive_syncs_at_shutdown(tmp_path: Path) -> None:
    """libguestfs' autosync unmounts and syncs everything in the guest before
    qemu stops (~0.9 s under TCG); only a drive written for keeps needs it.
    Read-only drives and scratch disks are thrown away with the appliance."""
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    handles = []
    try:
        reading = guestfs_io.Appliance("reads")
        reading.add_drive(disk, fmt="raw")
        reading.add_scratch(1 << 20)
        handles.append(reading._new_handle(True))
        writing = guestfs_io.Appliance("writes")
        writing.add_drive(disk, fmt="raw", readonly=False)
        handles.append(writing._new_handle(True))
        assert [bool(g.get_autosync()) for g in handles] == [False, True]
    finally:
        for g in handles:
            g.close()
