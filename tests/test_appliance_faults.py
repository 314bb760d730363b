"""Appliance faults: a launch that cannot succeed, and a call that hangs.

A failed launch is retried once with TCG, then explained in one line that
names the likely fix; a call that makes no progress is stopped after
--appliance-timeout seconds with one line naming the call and the option,
and the appliance is gone afterwards.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Build, one_error_line
from reliability_helpers import (
    copy_cache,
    demo_image,
    entries_of_kind,
    error_lines,
    gone_within,
    leftovers,
    recipe,
    sleepy_element,
    start_build,
)

pytestmark = [pytest.mark.appliance]


def _supermin_env(tmp_path: Path) -> dict[str, str]:
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    if not kernels:
        pytest.skip("no kernel in /boot")
    appliance_cache = tmp_path / "libguestfs-cache"   # empty: supermin must build anew
    appliance_cache.mkdir()
    # The version is given too: supermin ignores a SUPERMIN_KERNEL whose name
    # does not say it and picks one from /boot instead.
    return {"SUPERMIN_KERNEL": "/nonexistent",
            "SUPERMIN_KERNEL_VERSION": Path(kernels[-1]).name.removeprefix("vmlinuz-"),
            "LIBGUESTFS_CACHEDIR": str(appliance_cache)}


CASES = {
    "qemu-fails": ({"LIBGUESTFS_HV": "/bin/false"},
                   ["LIBGUESTFS_HV=/bin/false", "unset LIBGUESTFS_HV"]),
    "supermin-kernel-missing": (None,
                                ["supermin", "SUPERMIN_KERNEL=/nonexistent",
                                 "unset SUPERMIN_KERNEL"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_launch_failure_is_one_line_with_the_fix(case: str, demo_build: Build,
                                                 tmp_path: Path) -> None:
    env, wanted = CASES[case]
    env = dict(env or _supermin_env(tmp_path))
    env["LIBGUESTFS_BACKEND_SETTINGS"] = ""   # not forced to TCG: KVM first, then TCG
    cache, out = tmp_path / "cache", tmp_path / "out"
    r = recipe(tmp_path / "cold.yaml", "cold", demo_image(demo_build))
    t0 = time.monotonic()
    run = start_build(r, "-o", out, "--cache-dir", cache, "--json", logs=tmp_path / "logs",
                      env=env)
    assert run.finish(timeout=300) == 2, run.stderr
    seconds = time.monotonic() - t0
    print(f"{case}: failed in {seconds:.1f} s: {run.stderr}")
    line = one_error_line(run.stderr)
    assert "the libguestfs appliance did not start (KVM and TCG)" in line, line
    for text in wanted:
        assert text in line, line
    assert line.count("base image openEuler") == 1, line    # the step is named once
    # one retry with TCG, announced once
    assert run.stderr.count("the appliance failed to start with KVM; using TCG") == 1
    assert run.json["appliance_launches"] == 0
    assert run.json["phase"] == "base image extraction"
    assert leftovers(out, "cold", cache) == []
    assert not (out / "cold").exists()
    assert not gone_within(run.qemus(), 5)


def test_hung_appliance_call_times_out(demo_build: Build, tmp_path: Path) -> None:
    cache = copy_cache(demo_build.cache, tmp_path / "cache")
    # the session's demo cache holds the run steps of the tests that used it
    runs_before = entries_of_kind(cache, "run")
    out = tmp_path / "out"
    sleepy_element(tmp_path / "elements")
    r = recipe(tmp_path / "sleepy.yaml", "sleepy", demo_image(demo_build),
               elements=["sleepy"], params={"nap": 1000})
    t0 = time.monotonic()
    run = start_build(r, "-o", out, "--cache-dir", cache, "--json", "--appliance-timeout",
                      "20", logs=tmp_path / "logs", env={"LIBGUESTFS_TRACE": "1"})
    run.wait_for(lambda: "libguestfs: trace: command " in run.stderr, "the script to start")
    started = time.monotonic()
    assert run.finish(timeout=300) == 2, run.stderr
    ended = time.monotonic()
    print(f"hung call: stopped {ended - started:.1f} s after the script started, "
          f"{ended - t0:.1f} s after the build did")
    assert 19 <= ended - started < 60   # 20 s, give or take our polling
    assert ended - t0 < 300   # well under the script's 1000 s
    errors = error_lines(run.stderr)
    assert "Traceback" not in run.stderr
    assert len(errors) == 1, run.stderr
    assert re.fullmatch(
        r"rootfs-build: error: element sleepy \(install\.d/10-sleep\): appliance call "
        r"command made no progress for 20 s and was stopped \(raise it with "
        r"--appliance-timeout SECONDS.*\)", errors[0]), errors[0]
    assert run.json["phase"] == "running element sleepy (install.d/10-sleep)"
    assert run.json["appliance_launches"] == 1
    assert run.qemus() and not gone_within(run.qemus(), 0), "qemu outlived the build"
    assert leftovers(out, "sleepy", cache) == []
    assert not (out / "sleepy").exists()
    assert entries_of_kind(cache, "run") == runs_before   # nothing of the stopped step


@pytest.mark.root
def test_without_dev_kvm_access_the_build_runs_on_tcg(demo_build: Build,
                                                      tmp_path: Path) -> None:
    """A process that may not open /dev/kvm still builds: the appliance runs
    on TCG, with no error.  Inside a mount namespace /dev/kvm is covered by a
    node of the same device that belongs to nobody (mode 0600), and the build
    runs without CAP_DAC_OVERRIDE, so root is refused like any other user,
    whatever the machine's own permissions, and wherever the checkout lives."""
    if not shutil.which("unshare") or not shutil.which("setpriv"):
        pytest.skip("needs unshare and setpriv")
    cache = copy_cache(demo_build.cache, tmp_path / "cache")
    sleepy_element(tmp_path / "elements")
    r = recipe(tmp_path / "nokvm.yaml", "nokvm", demo_image(demo_build), elements=["sleepy"],
               params={"nap": 0})
    (tmp_path / "dev").mkdir()
    (tmp_path / "guestfs").mkdir()
    env = {"LIBGUESTFS_CACHEDIR": str(tmp_path / "guestfs"),  # no cached "KVM: enabled"
           "LIBGUESTFS_BACKEND_SETTINGS": "",     # not forced: the tool and libguestfs choose
           "LIBGUESTFS_DEBUG": "1"}               # with -v: what qemu said about KVM
    script = ('set -e; mount -t tmpfs -o size=1M,mode=0755 none "$1"; '
              'mknod -m 0600 "$1/kvm" c 10 232; chown 65534:65534 "$1/kvm"; '
              'mount --bind "$1/kvm" /dev/kvm; shift; '
              'exec setpriv --bounding-set -dac_override,-dac_read_search -- "$@"')
    cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
           str(tmp_path / "dev"), sys.executable, "-m", "builder.cli", str(r),
           "-o", str(tmp_path / "out"), "--cache-dir", str(cache), "--json", "-v"]
    res = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["appliance_launches"] == 1
    assert "rootfs-build: error" not in res.stderr
    # libguestfs' own probe, and qemu falling back from accel=kvm:tcg
    assert "libguestfs: qemu KVM: disabled" in res.stderr
    assert "Could not access KVM kernel module: Permission denied" in res.stderr
    # TCG that libguestfs chose still gets the CPU without the slow-copy flags
    # (the last -cpu on qemu's command line is the one it takes)
    cpus = re.findall(r"^\s*-cpu (\S+)", res.stderr, re.M)
    assert cpus and "erms=off" in cpus[-1], cpus
    with tarfile.open(tmp_path / "out" / "nokvm" / "rootfs.tar") as tf:
        slept = tf.extractfile("./opt/slept")
        assert slept is not None and slept.read() == b"slept 0\n"
    # the machine's /dev/kvm was not touched outside the namespace
    assert " /dev/kvm " not in Path("/proc/self/mountinfo").read_text()


def _stand_in_qemu(hv: Path, ran: Path, when: str, monkeypatch: pytest.MonkeyPatch, *,
                   talk_for: float | None = None) -> None:
    """Make `hv` the qemu libguestfs runs.  A boot for which the Python
    expression `when` holds writes its pid to `ran` and then hangs, silent;
    or, given `talk_for`, prints a console line every 0.5 s for that many
    seconds and then becomes the real qemu, on TCG whatever it was asked
    for.  Any other run is the real qemu.  (Our kill finds qemu by its name,
    so `hv` should be named qemu-*.)"""
    from builder import guestfs_io

    real = guestfs_io._guestfs_module().GuestFS().get_hv()
    act = ("    time.sleep(1000)\n" if talk_for is None else
           f"    for i in range(int({talk_for} * 2)):\n"
           "        print(f'still booting {i}', flush=True)\n"
           "        time.sleep(0.5)\n"
           # a TCG boot told not to be quiet: its console is never silent
           # for long, as a slow KVM boot's would not be
           "    sys.argv = [{'accel=kvm:tcg': 'accel=tcg', 'host': 'max'}.get(a, a)"
           ".replace(' quiet ', ' ') for a in sys.argv]\n")
    hv.write_text(f"#!{sys.executable}\n"
                  "import os, sys, time\n"
                  f"if '-kernel' in sys.argv and {when}:\n"
                  f"    open({str(ran)!r}, 'w').write(str(os.getpid()))\n"
                  f"{act}"
                  f"os.execv({real!r}, [{real!r}, *sys.argv[1:]])\n")
    hv.chmod(0o755)
    monkeypatch.setenv("LIBGUESTFS_HV", str(hv))


def _blank_disk_appliance(tmp_path: Path, label: str, session: Any) -> Any:
    """An Appliance (not launched) with one blank 1 MiB raw drive."""
    from builder import guestfs_io

    disk = tmp_path / "empty.raw"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    app = guestfs_io.Appliance(label, session=session, timeout=60)
    app.add_drive(disk, fmt="raw")
    return app


# the stand-in's condition for a boot asked to use KVM
_ASKED_FOR_KVM = "any('accel=kvm' in a for a in sys.argv)"


def _kvm_first(hv_dir: Path, monkeypatch: pytest.MonkeyPatch, kvm_limit: float) -> Path:
    """Launches in this process try KVM first, with a KVM limit of
    `kvm_limit` s, and libguestfs' cache directory (where a KVM failure is
    recorded) is an empty one of the test's: the machine's own is left alone.
    Returns where the record would go."""
    from builder import guestfs_io

    cachedir = hv_dir / "cache"
    cachedir.mkdir()
    monkeypatch.setenv("LIBGUESTFS_CACHEDIR", str(cachedir))
    monkeypatch.delenv("LIBGUESTFS_BACKEND_SETTINGS", raising=False)
    monkeypatch.setattr(guestfs_io, "_tcg_only", False)
    monkeypatch.setattr(guestfs_io, "KVM_LAUNCH_STALLED_AFTER", kvm_limit)
    return cachedir / f".guestfs-{os.geteuid()}" / guestfs_io.KVM_FAILURE_RECORD


def test_a_launch_that_hangs_is_started_again(tmp_path: Path, hv_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """A boot that hangs (likely what stopped a CI run: a build of a blank
    image silent for 300 s after its fall back to TCG) is stopped after
    LAUNCH_STALLED_AFTER and started again, with one warning.  The first boot
    here is a stand-in qemu that hangs; the second is the real one."""
    from builder import guestfs_io
    from builder.session import Session

    hangs = tmp_path / "hung.pid"
    _stand_in_qemu(hv_dir / "qemu-hangs-once", hangs, f"not os.path.exists({str(hangs)!r})",
                   monkeypatch)
    monkeypatch.setenv("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    monkeypatch.setattr(guestfs_io, "LAUNCH_STALLED_AFTER", 5.0)
    # the second, real boot takes 8-17 s; should the stand-in hang there too
    # (its first boot not reached within the 5 s), fail after 300 s, not 1800
    monkeypatch.setattr(guestfs_io, "LAUNCH_TIMEOUT", 300.0)
    session = Session()
    app = _blank_disk_appliance(tmp_path, "hang probe", session)
    t0 = time.monotonic()
    with app:
        assert app.call("debug", "sh", ["echo up"]).strip() == "up"
    print(f"hung launch stopped and the second one up in {time.monotonic() - t0:.1f} s")
    assert hangs.exists(), "the stand-in never ran: the test proves nothing"
    try:   # the stand-in is stopped: gone, or a zombie libguestfs has not reaped
        state = Path(f"/proc/{hangs.read_text()}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z"), f"the hung stand-in is still running ({state})"
    assert session.launches == 1
    warnings = [r.getMessage() for r in caplog.records if "starting it again" in r.getMessage()]
    assert warnings == ["warning: hang probe: the appliance had not started after 5 s; "
                        "starting it again"], caplog.text


def test_a_kvm_launch_that_hangs_goes_on_to_tcg_soon_and_later_processes_skip_it(
        tmp_path: Path, hv_dir: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """On one dev VM a KVM launch hung instead of aborting, and every build
    process waited LAUNCH_STALLED_AFTER (180 s) before going on to TCG.  The
    KVM attempt has a limit of its own, and the failure is recorded so that
    a later process does not try KVM again: here a stand-in qemu hangs when
    it is asked for KVM and hands a TCG boot to the real one."""
    from builder import guestfs_io
    from builder.session import Session

    hung = tmp_path / "hung.pid"
    hv = hv_dir / "qemu-hangs-on-kvm"
    _stand_in_qemu(hv, hung, _ASKED_FOR_KVM, monkeypatch)
    # libguestfs' cache directory starts empty, so supermin first builds an
    # appliance there, silent for 8-15 s: that must not count against the
    # 5 s KVM limit (it did, and the stand-in was never reached)
    record = _kvm_first(hv_dir, monkeypatch, 5.0)
    # Were the KVM attempt held to the general limit, the launch would take
    # at least this long; the TCG boot after a 5 s KVM attempt takes 8-26 s.
    monkeypatch.setattr(guestfs_io, "LAUNCH_STALLED_AFTER", 120.0)
    app = _blank_disk_appliance(tmp_path, "kvm hang probe", Session())
    t0 = time.monotonic()
    with app:
        took = time.monotonic() - t0
        assert app.call("debug", "sh", ["echo up"]).strip() == "up"
    assert hung.exists(), "the stand-in was never asked for KVM: the test proves nothing"
    assert took < guestfs_io.LAUNCH_STALLED_AFTER, f"KVM attempt held {took:.0f} s"
    assert guestfs_io._tcg_only, "later launches in the process should go straight to TCG"
    assert json.loads(record.read_text())["hv"] == str(hv)

    # a later process: nothing of this one's verdict but the record
    hung.unlink()
    monkeypatch.setattr(guestfs_io, "_tcg_only", False)
    caplog.clear()
    with _blank_disk_appliance(tmp_path, "kvm hang probe 2", Session()) as app:
        assert app.call("debug", "sh", ["echo up"]).strip() == "up"
    assert not hung.exists(), "KVM was tried again despite the record"
    warnings = [r.getMessage() for r in caplog.records if "KVM" in r.getMessage()]
    assert warnings == [f"warning: the appliance failed to start with KVM earlier on this "
                        f"boot ({record}; remove it to try KVM again); using TCG (software "
                        "emulation, slower)"], caplog.text


def test_a_kvm_launch_that_is_slow_but_printing_is_not_stopped(
        tmp_path: Path, hv_dir: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The launch limits count silence: a KVM boot that prints for longer
    than KVM_LAUNCH_STALLED_AFTER (a loaded host) is let through, not taken
    for a hung one and recorded as a KVM failure.  The stand-in asked for
    KVM prints for 15 s against a 10 s limit, then boots (on TCG, not
    quiet: its longest silence was 3.6 s on a loaded 2-core VM)."""
    from builder import guestfs_io
    from builder.session import Session

    talked = tmp_path / "talked.pid"
    _stand_in_qemu(hv_dir / "qemu-slow-on-kvm", talked, _ASKED_FOR_KVM, monkeypatch,
                   talk_for=15)
    record = _kvm_first(hv_dir, monkeypatch, 10.0)
    t0 = time.monotonic()
    with _blank_disk_appliance(tmp_path, "slow kvm probe", Session()) as app:
        took = time.monotonic() - t0
        assert app.call("debug", "sh", ["echo up"]).strip() == "up"
    print(f"slow but printing launch up in {took:.1f} s")
    assert talked.exists(), "the stand-in was never asked for KVM: the test proves nothing"
    assert took > 15
    assert not guestfs_io._tcg_only
    assert [r.getMessage() for r in caplog.records if "KVM" in r.getMessage()] == []
    assert not record.exists()


def test_a_kvm_failure_record_holds_for_one_boot_and_one_qemu(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        request: pytest.FixtureRequest) -> None:
    """A record of a KVM failure is read back only for the boot and the qemu
    binary it was made with: a reboot or another (or upgraded) qemu gets a
    new trial.  No appliance runs here."""
    from builder import guestfs_io

    hv = tmp_path / "qemu-stand-in"
    hv.write_text("#!/bin/sh\n")
    monkeypatch.setenv("LIBGUESTFS_HV", str(hv))
    monkeypatch.setenv("LIBGUESTFS_CACHEDIR", str(tmp_path))
    g = guestfs_io._guestfs_module().GuestFS(python_return_dict=True)
    request.addfinalizer(g.close)
    guestfs_io._record_kvm_failure(g)
    assert guestfs_io._recorded_kvm_failure() is None, "no libguestfs directory, no record"
    cache = tmp_path / f".guestfs-{os.geteuid()}"
    cache.mkdir()
    guestfs_io._record_kvm_failure(g)
    record = cache / guestfs_io.KVM_FAILURE_RECORD
    assert guestfs_io._recorded_kvm_failure() == record

    os.utime(hv, ns=(0, hv.stat().st_mtime_ns + 1))     # qemu upgraded in place
    assert guestfs_io._recorded_kvm_failure() is None
    guestfs_io._record_kvm_failure(g)
    assert guestfs_io._recorded_kvm_failure() == record
    monkeypatch.setenv("LIBGUESTFS_HV", "/bin/false")   # another qemu
    assert guestfs_io._recorded_kvm_failure() is None
    monkeypatch.setenv("LIBGUESTFS_HV", str(hv))
    boot = tmp_path / "boot_id"
    boot.write_text("another boot\n")
    monkeypatch.setattr(guestfs_io, "BOOT_ID", boot)       # the host rebooted
    assert guestfs_io._recorded_kvm_failure() is None
