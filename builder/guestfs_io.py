"""The libguestfs boundary: the only module that talks to the appliance.

Launch policy: the direct backend, with KVM when it works.  When a launch
fails and TCG was not forced already, it is retried once with TCG and one
warning (on some hosts KVM aborts with "failed to set MSR 0x10a"); later
launches in the same process go straight to TCG.  A launch silent for
LAUNCH_STALLED_AFTER seconds (a KVM one: KVM_LAUNCH_STALLED_AFTER; every line
the appliance's console prints counts as progress, and so does a supermin
building the appliance, up to LAUNCH_TIMEOUT) is stopped: a KVM one goes on
to TCG, a TCG one is started once more (_launch_attempts).  A KVM failure
that TCG then got past is recorded in libguestfs' cache directory for this
boot of the host and this qemu (_kvm_failure_record): later processes go
straight to TCG, with a warning naming the record.  A TCG appliance gets
libguestfs' CPU model without the flags TCG is slow at (_TCG_CPU_FLAGS_OFF).

Every call runs on a worker thread so the main thread stays free to take
SIGINT/SIGTERM and to enforce the timeout; both end a call by killing qemu.
A handle is closed only once no call runs on it (_start, _close_handle).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import glob
import json
import os
import shlex
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from . import confined, elfinfo, fileio, interrupts, rpmheader, runner, ui
from .errors import UserError
from .session import Session

T = TypeVar("T")

DEFAULT_TIMEOUT = 1800.0   # seconds without progress before a call is killed
# A launch boots a VM (tens of seconds under TCG on a loaded host) and reports
# no progress meanwhile, so it gets at least this long whatever the call limit.
LAUNCH_TIMEOUT = 600.0
# A launch took 8-17 s under TCG on the 2-core build machines.  A guest booting
# under TCG can hang now and then: in CI a build of a blank image said it fell
# back to TCG and then nothing more until the test killed it after 300 s.  A
# launch not finished after this long is stopped and started again; the second
# attempt gets the full limit.
LAUNCH_STALLED_AFTER = 180.0
# A KVM boot takes seconds, not minutes.  Where KVM is broken, qemu usually
# aborts at once ("failed to set MSR 0x10a"), but on one dev VM a KVM launch
# hung instead (SeaBIOS' "Booting from ROM..." and then no word from the
# kernel), and every build process waited LAUNCH_STALLED_AFTER before going
# on to TCG.  Both limits count silence, not the whole launch: a boot that
# is slow but printing (a loaded host), or a first launch whose supermin
# builds the appliance, is not taken for a hung one.
KVM_LAUNCH_STALLED_AFTER = 60.0
DEFAULT_SMP = 2            # tar_out is CPU-bound under TCG; 2 vCPUs measured 1.7x faster

# Set once a KVM launch failed: later launches in this process go straight
# to TCG instead of failing again.
_tcg_only = False
# The same verdict across processes: on the VM where KVM hangs, each build
# process (and each test that runs one) waited KVM_LAUNCH_STALLED_AFTER.
KVM_FAILURE_RECORD = "rootfs-build-kvm-failed.json"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")

# Under TCG on x86_64, libguestfs gives the appliance "-cpu max,la57=off".
# max's ERMS and FSRM flags make the appliance kernel and glibc copy memory
# with `rep movsb`, which TCG emulates far more slowly than the vector copies
# they use otherwise: without the two flags tar_out of the 1 GB bench base
# took 40.0-40.5 s instead of 51.8-56.4 s, and launch 7.0 s instead of
# 8.1-8.6 s (bench/README.md).  The rest of max stays, so a base built for
# x86-64-v2 or v3 still runs its programs in the appliance; la57=off is
# libguestfs' own (RHBZ#2082806).  Flags the hypervisor does not list are
# left out, and a hypervisor that lists none of these (not x86_64) keeps
# libguestfs' choice.
_TCG_CPU_MODEL = "max"
_TCG_CPU_FLAGS_OFF = ("la57", "erms", "fsrm")
_tcg_cpu_models: dict[str, str | None] = {}   # hypervisor -> the -cpu we give it

QCOW2_MAGIC = b"QFI\xfb"

RUN_DIR = "/.rootfs-build-run"
# What a run step's layer is made by: part of its cache key, raised when
# TreeSession changes what ends in a layer (2: SOURCE_DATE_EPOCH, clock at
# the epoch, TRANSIENT_PATHS, rpm database and mtimes normalized, emulation).
RUN_STEP_VERSION = 2
# The tree (first scratch disk) becomes the lower layer of an overlay on
# /sysroot; changes go to the second scratch disk; scripts and their log live
# in a tmpfs, /tmp in another, so neither ends up in the step's layer.  The
# shell finds the two disks by label:
# the kernel may name the disks in another order than the API's /dev/sdX,
# which guestfsd translates but a shell does not.
_LOWER_LABEL, _UPPER_LABEL = "rb-lower", "rb-upper"
_UPPER = "/run/rb/upperfs/upper"
_OVERLAY_UP = f"""set -e
mkdir -p /run/rb/lower /run/rb/upperfs
mountpoint -q /run/rb/lower || mount LABEL={_LOWER_LABEL} /run/rb/lower
mountpoint -q /run/rb/upperfs || mount LABEL={_UPPER_LABEL} /run/rb/upperfs
mkdir -p {_UPPER} /run/rb/upperfs/work
mount -t overlay overlay -o lowerdir=/run/rb/lower,upperdir={_UPPER},\
workdir=/run/rb/upperfs/work,index=off,metacopy=off,redirect_dir=off /sysroot
mount -t tmpfs -o mode=0700 tmpfs /sysroot{RUN_DIR}
mkdir -p /sysroot{RUN_DIR}/scripts
mount -t tmpfs -o mode=1777 tmpfs /sysroot/tmp
"""
# Unmounts everything below /sysroot (read-only repositories under RUN_DIR
# first), then the overlay; the disks stay mounted for reset() and finish().
_OVERLAY_DOWN = """set -e
for m in $(while read -r _ m _; do case $m in /sysroot/*) echo "$m";; esac; done \
           < /proc/self/mounts | sort -r); do umount "$m"; done
umount /sysroot
"""
# The environment of everything run inside the rootfs: fixed, so a step's
# result does not depend on the build host's locale, zone or clock.  It runs
# under bash's `exec -c` (an empty environment): the appliance's own variables
# (root=/sysroot, RUNLEVEL=S, ...) never reach it; it gets exactly these and
# the step's (exported in @EXPORTS@).
RUN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "LANG": "C", "LC_ALL": "C", "TZ": "UTC", "HOME": "/root", "SHELL": "/bin/bash",
           "TMPDIR": "/tmp"}


def _exports(env: dict[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted({**RUN_ENV, **env}.items()))


_RUN_SH = f"""#!/bin/bash
set -eu
exec >>{RUN_DIR}/log 2>&1
@EXPORTS@
cd /
for script in {RUN_DIR}/scripts/*; do
    echo "rootfs-build: running ${{script##*/}}"
    "$script"
done
"""
# One command with the same environment, its output captured by the caller.
_ONE_SH = """#!/bin/bash
set -eu
@EXPORTS@
cd /
exec "$@"
"""

# What run steps leave behind that would make two builds differ, and how it
# is normalized (paths relative to the rootfs; @RPMDB@ is the rootfs's rpm
# database directory).  Only what the step itself wrote is touched: a file
# the base already had and the step left alone is not in the step's layer.
#   drop   files the step wrote there are dropped, so the path reads as it
#          did before the step (a cache, log, lock or seed); deletions stay
#   empty  a file the step wrote there is truncated (a machine-id: systemd
#          makes a new one at first boot)
TRANSIENT_PATHS: tuple[tuple[str, str], ...] = (
    ("drop", "var/cache/dnf"),              # dnf's metadata and package cache
    ("drop", "var/cache/yum"),
    ("drop", "var/log/dnf.log"),            # dnf's logs: times, pids
    ("drop", "var/log/dnf.librepo.log"),
    ("drop", "var/log/dnf.rpm.log"),
    ("drop", "var/log/hawkey.log"),
    ("drop", "var/lib/dnf/history.sqlite"),  # dnf's history database: times
    ("drop", "var/lib/dnf/history.sqlite-shm"),
    ("drop", "var/lib/dnf/history.sqlite-wal"),
    ("drop", "var/cache/ldconfig/aux-cache"),  # ldconfig: inode numbers, times
    ("drop", "var/lib/systemd/random-seed"),
    ("drop", "var/lib/random-seed"),
    ("drop", "var/lib/urandom/random-seed"),
    ("drop", "etc/.pwd.lock"),              # shadow-utils' lock file
    ("drop", "@RPMDB@/.rpm.lock"),          # rpm's locks and Berkeley DB environment
    ("drop", "@RPMDB@/.dbenv.lock"),
    ("drop", "@RPMDB@/__db.*"),
    ("drop", "@RPMDB@/rpmdb.sqlite-shm"),
    ("empty", "etc/machine-id"),
)
# Where rpm keeps its database on the distributions we know; the rootfs's own
# `rpm --eval %_dbpath` is asked as well when the tree has rpm.
RPMDB_DIRS = ("var/lib/rpm", "usr/lib/sysimage/rpm", "root/.rpmdb")

Nevra = tuple[str, int, str, str, str]   # name, epoch, version, release, arch
# The database directory, then one line per installed package: its NEVRA,
# its install time and transaction id (the two stamps _normalize_rpmdb clamps).
RPM_LISTING_ARGV = ("rpm", "-E", "%_dbpath", "-qa", "--qf",
                    "%{NAME}\\t%{EPOCHNUM}\\t%{VERSION}\\t%{RELEASE}\\t%{ARCH}"
                    "\\t%{INSTALLTIME}\\t%{INSTALLTID}\\n")


@dataclasses.dataclass(frozen=True)
class RpmListing:
    """What one run of a rootfs's rpm says: its database directory (relative
    to the rootfs, None when %_dbpath is empty), the installed packages, and
    every install time and transaction id recorded (a package without them,
    like gpg-pubkey on some rpm versions, adds none)."""
    dbdir: str | None
    packages: list[Nevra]
    stamps: list[int]

    @classmethod
    def parse(cls, out: str) -> RpmListing:
        """`out` of RPM_LISTING_ARGV: rpm prints the expansion while it reads
        its options, so it comes first."""
        dbpath, _, rows = out.partition("\n")
        packages, stamps = [], []
        for line in rows.splitlines():
            parts = line.split("\t")
            if len(parts) != 7:
                continue
            name, epoch, version, release, arch, installtime, tid = parts
            packages.append((name, int(epoch), version, release, arch))
            stamps += [int(t) for t in (installtime, tid) if t.isdigit()]
        return cls(dbpath.strip().strip("/") or None, packages, stamps)


class ApplianceError(UserError):
    """The appliance could not do what was asked."""


def _guestfs_module() -> Any:
    try:
        import guestfs
    except ImportError:
        raise UserError("the libguestfs Python binding is missing",
                        hint="install python3-guestfs and use a venv made with "
                             "--system-site-packages (./setup.sh does both)") from None
    return guestfs


_set_error_handler: Any = None


def _quiet_thread(g: Any) -> None:
    """Silence libguestfs' own error printing on this thread.

    libguestfs keeps its error handler per thread and gives each new thread
    the default one, which prints every failed call to stderr; the Python
    binding silences only the thread that created the handle.  Our calls run
    on worker threads, so without this a killed appliance (interrupt,
    timeout) or a probe for a missing file would add "libguestfs: error:"
    paragraphs to the one line the user gets.  Errors still arrive as
    exceptions."""
    global _set_error_handler
    try:
        if _set_error_handler is None:
            lib = ctypes.CDLL("libguestfs.so.0")
            lib.guestfs_set_error_handler.argtypes = [ctypes.c_void_p] * 3
            lib.guestfs_set_error_handler.restype = None
            get = ctypes.pythonapi.PyCapsule_GetPointer
            get.argtypes = [ctypes.py_object, ctypes.c_char_p]
            get.restype = ctypes.c_void_p
            _set_error_handler = lambda h: lib.guestfs_set_error_handler(  # noqa: E731
                get(h._o, b"guestfs_h"), None, None)
        _set_error_handler(g)
    except (OSError, AttributeError, ValueError, TypeError):
        pass  # a noisier stderr, nothing worse


def _close(g: Any) -> None:
    """Close a handle whole (see interrupts: a signal between the binding
    freeing the handle and marking it closed would make __del__ free it
    again).  Closing a dead handle must not mask the error that killed it."""
    with interrupts.deferred(), contextlib.suppress(Exception):
        g.close()


def _tcg_cpu_model(hv: str) -> str | None:
    """The -cpu for a TCG appliance run by `hv` (see _TCG_CPU_FLAGS_OFF), or
    None to keep libguestfs' own.  Asks the hypervisor once per process."""
    if hv not in _tcg_cpu_models:
        try:
            listing = runner.run([hv, "-cpu", "help"], env=runner.tool_env(0),
                                 what="qemu -cpu help", check=False).stdout
        except OSError:
            listing = b""
        known = set(listing.partition(b"Recognized CPUID flags:")[2].decode(
            "ascii", "replace").split())
        off = [flag for flag in _TCG_CPU_FLAGS_OFF if flag in known]
        _tcg_cpu_models[hv] = (",".join([_TCG_CPU_MODEL] + [f"{f}=off" for f in off])
                               if set(off) - {"la57"} else None)
    return _tcg_cpu_models[hv]


def _kvm_openable() -> bool:
    """libguestfs' own test for using KVM (launch-direct.c): /dev/kvm opens
    read-write.  When it does not, the appliance runs on TCG unasked."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def _kvm_failure_record(g: Any) -> tuple[Path, dict[str, Any]] | None:
    """Where a KVM failure on this host is recorded, and what the record
    says when it holds: libguestfs' per-user cache directory
    ($LIBGUESTFS_CACHEDIR, else $TMPDIR, else /var/tmp, then .guestfs-UID),
    which libguestfs makes and checks for the appliance it keeps there.  A
    record holds for one boot of the host (a reboot may bring a fixed
    hypervisor) and one qemu binary (LIBGUESTFS_HV, or a qemu upgrade, gets
    its own trial).  None when the directory is not there or not ours (no
    launch made it yet) or the qemu or the boot id cannot be read."""
    directory = Path(g.get_cachedir()) / f".guestfs-{os.geteuid()}"
    try:
        st = os.lstat(directory)
        hv = os.path.realpath(g.get_hv())
        hv_st = os.stat(hv)
        boot_id = BOOT_ID.read_text().strip()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        return None
    return directory / KVM_FAILURE_RECORD, {
        "boot_id": boot_id, "hv": hv, "hv_size": hv_st.st_size,
        "hv_mtime_ns": hv_st.st_mtime_ns}


def _recorded_kvm_failure() -> Path | None:
    """The record of a KVM failure that holds for this boot and this qemu,
    if there is one."""
    g = _guestfs_module().GuestFS(python_return_dict=True)
    try:
        found = _kvm_failure_record(g)
    finally:
        g.close()
    if found is None:
        return None
    path, identity = found
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return path if recorded == identity else None


def _record_kvm_failure(g: Any) -> None:
    """Record that KVM failed and TCG started (see _kvm_failure_record).
    Only a saving for later processes: when it cannot be written, they try
    KVM again."""
    found = _kvm_failure_record(g)
    if found is None:
        return
    path, identity = found
    try:
        fileio.write_atomic(path, json.dumps(identity, sort_keys=True) + "\n")
    except OSError as e:
        ui.info(f"could not record the KVM failure in {path}: {e}")


def _tcg_forced_by_env() -> bool:
    return "force_tcg" in os.environ.get("LIBGUESTFS_BACKEND_SETTINGS", "").split(":")


def _launch_hint() -> str:
    """The likely fix for a launch that failed with KVM and TCG."""
    hv = os.environ.get("LIBGUESTFS_HV")
    if hv:
        return (f"LIBGUESTFS_HV={hv} did not start the appliance: unset LIBGUESTFS_HV "
                "or point it at a working qemu-system binary")
    kernel = os.environ.get("SUPERMIN_KERNEL")
    if kernel and not os.path.isfile(kernel):
        return (f"SUPERMIN_KERNEL={kernel} is not a kernel file: unset SUPERMIN_KERNEL "
                "(and SUPERMIN_KERNEL_VERSION) or point it at one such as "
                f"{(sorted(glob.glob('/boot/vmlinuz-*')) or ['/boot/vmlinuz-VERSION'])[-1]}")
    modules = os.environ.get("SUPERMIN_MODULES")
    if modules and not os.path.isdir(modules):
        return (f"SUPERMIN_MODULES={modules} is not a directory: unset it or point it at "
                "/lib/modules/VERSION")
    kernels = glob.glob("/boot/vmlinuz-*")
    if not kernels:
        return ("supermin needs a kernel in /boot: install linux-image-amd64 "
                "(./setup.sh does)")
    if not any(os.access(k, os.R_OK) for k in kernels):
        return ("supermin cannot read the kernel in /boot: chmod 0644 /boot/vmlinuz-* "
                "or run as root")
    return "run libguestfs-test-tool to see why; LIBGUESTFS_DEBUG=1 shows the appliance log"


def image_format(path: Path) -> str:
    """'qcow2' or 'raw', from the file's magic; refuses qcow2 features that
    would let an image make the appliance read host files."""
    try:
        with open(path, "rb") as f:
            head = f.read(104)
            if head[:4] != QCOW2_MAGIC:
                return "raw"
            if len(head) < 72:
                raise UserError(f"{path}: truncated qcow2 header",
                                hint="the image file is damaged; download it again")
            version = int.from_bytes(head[4:8], "big")
            backing_offset = int.from_bytes(head[8:16], "big")
            if backing_offset:
                raise UserError(f"{path}: qcow2 image has a backing file",
                                hint="flatten it first: qemu-img convert -O qcow2 IN OUT")
            if version >= 3 and len(head) >= 104:
                header_length = int.from_bytes(head[100:104], "big")
                f.seek(header_length)
                while True:
                    ext = f.read(8)
                    if len(ext) < 8:
                        break
                    kind = int.from_bytes(ext[:4], "big")
                    length = int.from_bytes(ext[4:], "big")
                    if kind == 0:
                        break
                    if kind == 0x44415441:  # external data file
                        raise UserError(f"{path}: qcow2 image uses an external data file",
                                        hint="convert it to a self-contained image first")
                    f.seek((length + 7) & ~7, os.SEEK_CUR)
            return "qcow2"
    except OSError as e:
        raise UserError(f"{path}: cannot read the image: {e.strerror}") from None


def check_image(path: Path, fmt: str) -> None:
    """Refuse a damaged qcow2 (truncated, metadata pointing past its end)
    before the appliance reads zeros where its data should be and a rootfs
    with holes comes out.  qemu-img check only reads the image."""
    if fmt != "qcow2":
        return
    qemu_img = runner.find_tool("qemu-img", needed_for="qcow2 base images")
    proc = runner.run([qemu_img, "check", "-U", "--output=json", "-f", "qcow2", str(path)],
                      env=runner.tool_env(0), what="qemu-img check", check=False)
    stdout, stderr = (proc.stdout.decode("utf-8", "replace"),
                      proc.stderr.decode("utf-8", "replace"))
    try:
        report = json.loads(stdout)
    except ValueError:
        report = None
    if not isinstance(report, dict):
        report = {}
    errors = int(report.get("corruptions", 0) or 0) + int(report.get("check-errors", 0) or 0)
    if report and not errors and proc.returncode in (0, 3):  # 3: leaked clusters only
        return
    detail = (f"qemu-img check found {errors} errors" if errors else
              (stderr.strip().splitlines() or ["qemu-img check failed"])[-1])
    raise UserError(f"{path}: the qcow2 image is damaged ({detail})",
                    hint="it is probably truncated or incomplete; download or copy it again")


@dataclasses.dataclass
class BaseInfo:
    """What inspection found in the base image."""

    root: str
    mountpoints: dict[str, str]
    os_release: dict[str, str]
    arch: str
    filesystems: dict[str, str]
    used_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Appliance:
    """One libguestfs handle with its drives; use as a context manager."""

    def __init__(self, label: str, *, session: Session | None = None, smp: int = DEFAULT_SMP,
                 timeout: float | None = None, network: bool = False):
        """`session` counts the appliances that started (a KVM attempt that
        fails before the appliance runs does not count)."""
        self.label = label
        self.session = session
        self.network = network
        self.smp = smp
        self.timeout = timeout or DEFAULT_TIMEOUT
        self._drives: list[tuple[str, dict[str, Any]]] = []
        self.g: Any = None
        self._progress = time.monotonic()
        self._killed_for: str | None = None
        self._pid = 0  # qemu's pid: the handle is locked during a call, so ask once
        self._launching = False   # the console's output counts as progress
        self._echo_console = False  # libguestfs is verbose (LIBGUESTFS_DEBUG=1)
        # the call on a worker thread, from its start until the handle closes:
        # closing the handle under a running call frees memory the call uses
        self._call: _Worker | None = None

    # -- life cycle -----------------------------------------------------
    def add_drive(self, path: Path | str, *, fmt: str, readonly: bool = True,
                  label: str | None = None) -> None:
        opts: dict[str, Any] = {"format": fmt, "readonly": readonly}
        if label:
            opts["label"] = label
        self._drives.append((str(path), opts))

    @property
    def _keeps_writes(self) -> bool:
        """A drive was added writable: what the appliance writes there
        outlives it (scratch disks have no "readonly" and go with it)."""
        return any(not opts.get("readonly", True) for _, opts in self._drives)

    def add_scratch(self, size: int) -> None:
        """A temporary disk of `size` bytes (sparse; removed at close)."""
        self._drives.append(("", {"scratch": size}))

    def add_run_scratch(self, tree_bytes: int, upper_bytes: int = 32 << 30) -> None:
        """The two scratch disks run_in_tree / TreeSession need, first: one
        for a tree of `tree_bytes` (tar bytes), one for the step's changes."""
        self.add_scratch(max(int(tree_bytes * 1.5) + (512 << 20), 1 << 30))
        self.add_scratch(upper_bytes)

    def _new_handle(self, tcg: bool) -> Any:
        self._killed_for, self._pid = None, 0  # nothing of a failed attempt carries over
        guestfs = _guestfs_module()
        # not closed by libguestfs at exit: a handle still open then is one
        # whose call never returned (_close_handle), and closing it would
        # free it under that call
        g = guestfs.GuestFS(python_return_dict=True, close_on_exit=False)
        if tcg:
            g.set_backend_settings(["force_tcg"])
        if tcg or not _kvm_openable():
            cpu = _tcg_cpu_model(g.get_hv())
            if cpu:
                g.config("-cpu", cpu)   # after libguestfs' own -cpu, so qemu takes it
        g.set_smp(self.smp)
        # Console lines count as progress during the launch only: later ones
        # (a kernel's periodic stall warnings, say) must not keep a hung call
        # alive.  The callback stays registered: removing it waits for the
        # handle's lock, which a hung launch holds.
        self._echo_console = g.get_verbose()
        g.set_event_callback(self._console_line, guestfs.EVENT_APPLIANCE)
        # autosync unmounts and syncs the guest's filesystems before qemu
        # stops (~0.9 s under TCG): only writes to a drive we keep need it;
        # read-only drives and scratch disks go with the appliance
        g.set_autosync(self._keeps_writes)
        if self.network:
            g.set_network(True)
        for path, opts in self._drives:
            if "scratch" in opts:
                g.add_drive_scratch(opts["scratch"])
            else:
                g.add_drive_opts(path, **opts)
        return g

    def _launch_quietly(self, limit: float) -> None:
        """launch(), with libguestfs' own stderr chatter kept out of the user's
        way (shown with -v)."""
        saved = os.dup(2)
        with tempfile.TemporaryFile() as log:
            os.dup2(log.fileno(), 2)
            self._launching = True
            started = time.monotonic()

            def building() -> bool:
                # bounded: a supermin waiting forever (on a lock whose holder
                # stopped, say) must not hold the build forever
                return (time.monotonic() - started < self._whole_launch_limit
                        and _supermin_building())

            try:
                self._run(self.g.launch, "launch", limit, busy=building)
                if self.session is not None:
                    self.session.launches += 1
                self._pid = self.g.get_pid()
            finally:
                self._launching = False
                os.dup2(saved, 2)
                os.close(saved)
                if ui.verbose():
                    log.seek(0)
                    sys.stderr.write(log.read().decode("utf-8", "replace"))

    @property
    def _whole_launch_limit(self) -> float:
        """The longest a launch may go on: the last TCG attempt's limit, and
        the bound on counting a building supermin as progress."""
        return max(self.timeout, LAUNCH_TIMEOUT)

    def _launch_attempts(self) -> list[tuple[bool, float]]:
        """(TCG?, seconds allowed) of each launch to try, in order: KVM once,
        unless known to fail (in this process, or by a record: then with
        the warning, once); then TCG, first with a short limit so that a
        hung boot is stopped early, then with the full one."""
        global _tcg_only
        tcg = [(True, LAUNCH_STALLED_AFTER), (True, self._whole_launch_limit)]
        if _tcg_only or _tcg_forced_by_env():
            return tcg
        record = _recorded_kvm_failure()
        if record is not None:
            ui.warn(f"the appliance failed to start with KVM earlier on this boot ({record}; "
                    "remove it to try KVM again); using TCG (software emulation, slower)",
                    once_key="tcg")
            _tcg_only = True
            return tcg
        return [(False, KVM_LAUNCH_STALLED_AFTER), *tcg]

    def launch(self) -> None:
        """Start the appliance (see the module's launch policy); one line of
        error naming the likely fix when no attempt starts it."""
        global _tcg_only
        ui.step(f"starting the appliance for {self.label}")
        attempts = self._launch_attempts()
        tried_kvm = not attempts[0][0]
        for number, (tcg, limit) in enumerate(attempts, 1):
            self.g = self._new_handle(tcg)
            try:
                self._launch_quietly(limit)
                if tried_kvm and tcg:
                    _record_kvm_failure(self.g)
                return
            except ApplianceError as e:
                stalled = (self._killed_for or "").startswith("timeout")
                self._close_handle()
                last = number == len(attempts)
                if last or (tcg and not stalled):
                    raise ApplianceError(
                        f"{self.label}: the libguestfs appliance did not start"
                        f"{' (KVM and TCG)' if tried_kvm else ''}: {self._unlabelled(e)}",
                        hint=_launch_hint()) from None
            if not tcg:
                ui.warn("the appliance failed to start with KVM; using TCG (software "
                        "emulation, slower)", once_key="tcg")
                _tcg_only = True
            else:
                ui.warn(f"{self.label}: the appliance had not started after {limit:.0f} s; "
                        "starting it again")

    def _unlabelled(self, e: UserError) -> str:
        return e.message.removeprefix(f"{self.label}: ")

    def __enter__(self) -> Appliance:
        try:
            self.launch()
        except BaseException:
            # an interrupt can leave the launch running (see _start): stop it
            self.close(shutdown=False)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(shutdown=exc[0] is None)

    def close(self, *, shutdown: bool = True) -> None:
        if self.g is None:
            return
        if shutdown and self._killed_for is None and self._running_call() is None:
            with contextlib.suppress(ApplianceError):
                self.call("shutdown", timeout=120)
        else:
            self.kill("closing")
        self._close_handle()

    def _close_handle(self) -> None:
        call = self._running_call()
        if call is not None:
            self._stop(call, "closing")
            if not call.done.is_set():
                # still inside libguestfs 30 s after qemu died: closing now
                # would free the handle under it.  qemu is dead; the handle's
                # temporary directory stays behind
                ui.warn(f"{self.label}: a libguestfs call did not return after the "
                        "appliance was stopped; its handle is left open")
                self.g = None
                return
        g, self.g = self.g, None
        if g is not None:
            _close(g)

    def _running_call(self) -> _Worker | None:
        """The call still inside libguestfs, if any."""
        call = self._call
        return call if call is not None and not call.done.is_set() else None

    def kill(self, why: str) -> None:
        """Kill qemu so a blocked call returns at once."""
        self._killed_for = self._killed_for or why
        if self._pid <= 0:
            self._pid = next(iter(_qemu_children()), 0)
        if self._pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)

    def _stop(self, worker: _Worker, why: str, wait: float = 30) -> None:
        """Kill qemu and wait (up to `wait` s) for the blocked call to return.
        Early in a launch qemu does not exist yet: keep looking for it, so it
        dies as soon as it appears instead of booting the whole appliance."""
        deadline = time.monotonic() + wait
        self.kill(why)
        killed = {self._pid}
        while not worker.wait(0.1) and time.monotonic() < deadline:
            # a launch runs qemu-img and qemu probes before the appliance
            for pid in _qemu_children() - killed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.add(pid)

    # -- calls ------------------------------------------------------------
    def touch(self) -> None:
        """Note progress (resets the timeout)."""
        self._progress = time.monotonic()

    def _console_line(self, _event: int, _handle: int, text: str | bytes,
                      _array: object) -> None:
        """libguestfs' callback for the appliance's console output (qemu's
        own stderr among it).  With a callback set, libguestfs no longer
        prints that output in verbose mode: it is echoed here instead."""
        if self._launching:
            self.touch()
        if self._echo_console:
            os.write(2, text.encode("utf-8", "replace") if isinstance(text, str) else text)

    def call(self, name: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Run g.<name>(*args, **kwargs) on a worker thread with a timeout."""
        fn = getattr(self.g, name)
        return self._run(lambda: fn(*args, **kwargs), name, timeout)

    def _start(self, name: str, fn: Callable[[], Any],
               after: Callable[[], None] | None = None) -> _Worker:
        """Start fn on a worker thread; `after` runs there once it returns.
        The worker is known to close() from the moment its thread runs: an
        interrupt that lands before the caller holds it (Thread.start() waits
        for the thread, and signal handlers run in waits) cannot leave the
        call running unseen, to be freed under it when the process exits."""
        self.touch()
        with interrupts.deferred():
            self._call = _Worker(name, fn, self.g, after)
        return self._call

    def _error(self, name: str, err: BaseException) -> ApplianceError:
        first = str(err).splitlines()[0] if str(err) else name
        return ApplianceError(f"{self.label}: {name}: {first}")

    def _timeout_error(self, name: str, limit: float) -> ApplianceError:
        return ApplianceError(
            f"{self.label}: appliance call {name} made no progress for {limit:.0f} s "
            "and was stopped", hint="raise it with --appliance-timeout SECONDS if the step "
                                    "is slow")

    def _run(self, fn: Callable[[], T], name: str, timeout: float | None, *,
             busy: Callable[[], bool] | None = None) -> T:
        """fn on a worker thread, stopped once it made no progress for
        `timeout` s; while `busy()` holds, it counts as progress."""
        limit = timeout or self.timeout
        worker = self._start(name, fn)
        try:
            while not worker.wait(0.2):
                if busy is not None and busy():
                    self.touch()
                if time.monotonic() - self._progress > limit:
                    self._stop(worker, f"timeout in {name}")
                    raise self._timeout_error(name, limit)
        except BaseException:
            if not worker.done.is_set():
                self._stop(worker, f"interrupted in {name}")
            raise
        if worker.error is not None:
            if isinstance(worker.error, RuntimeError):
                raise self._error(name, worker.error) from None
            raise worker.error
        return worker.value

    def stream_out(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   consume: Callable[[BinaryIO], T]) -> T:
        """Run a FileOut call (tar_out, download...) into a pipe that `consume`
        reads on this thread as the appliance writes it."""
        r, w = os.pipe()
        _widen_pipe(w)
        fn = getattr(self.g, name)
        stop = threading.Event()
        limit = self.timeout

        def watchdog() -> None:
            while not stop.wait(1.0):
                if time.monotonic() - self._progress > limit:
                    self.kill(f"timeout in {name}")
                    return

        # the reader is closed whatever happens once the call started: a call
        # blocked writing to a full pipe ends only then
        reader = _ProgressReader(os.fdopen(r, "rb", buffering=1 << 20), self.touch)
        try:
            worker = self._start(name, lambda: fn(*args, f"/dev/fd/{w}", **kwargs),
                                 after=lambda: os.close(w))
            threading.Thread(target=watchdog, daemon=True).start()
            try:
                value = consume(reader)  # type: ignore[arg-type]
                while reader.read(1 << 20):
                    pass
            except BaseException as consume_error:
                # Did the appliance fail first (the stream then ends early)?
                worker.wait(0.5)
                appliance_failed = worker.error is not None
                self.kill(f"interrupted in {name}")
                # libguestfs may be blocked writing to the full pipe, which no
                # kill ends: close our end so that write fails now.
                reader.close()
                worker.wait(30)
                if self._killed_for and self._killed_for.startswith("timeout"):
                    raise self._timeout_error(name, limit) from None
                if (appliance_failed and worker.error is not None
                        and isinstance(consume_error, UserError)):
                    raise self._error(name, worker.error) from None
                raise
            worker.wait()
        finally:
            stop.set()
            reader.close()
        if worker.error is not None:
            raise self._error(name, worker.error) from None
        return value

    def stream_in(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                  produce: Callable[[BinaryIO], None]) -> None:
        """Run a FileIn call (tar_in, upload...) fed through a pipe by
        `produce`, which writes on this thread as the appliance reads."""
        r, w = os.pipe()
        _widen_pipe(w)
        fn = getattr(self.g, name)
        writer = _ProgressWriter(os.fdopen(w, "wb", buffering=1 << 20), self.touch)
        worker: _Worker | None = None
        try:
            worker = self._start(name, lambda: fn(f"/dev/fd/{r}", *args, **kwargs),
                                 after=lambda: os.close(r))
            try:
                produce(writer)  # type: ignore[arg-type]
                writer.close()
            except BrokenPipeError:
                pass
            except BaseException:
                self.kill(f"interrupted in {name}")
                # libguestfs may be blocked reading the pipe, which no kill
                # ends: EOF (or EPIPE once it gave up) lets it return now.
                with contextlib.suppress(OSError, ValueError):
                    writer.close()
                worker.wait(30)
                raise
            finally:
                with contextlib.suppress(BrokenPipeError):
                    writer.close()
            self._run(worker.wait, name, None)
        finally:
            with contextlib.suppress(OSError, ValueError):
                writer.close()
            if worker is not None:
                worker.wait(1)
        if worker.error is not None:
            raise self._error(name, worker.error) from None

    # -- inspection -----------------------------------------------------------
    def inspect_base(self, image: str, *, mount: bool = True,
                     every_filesystem: bool = False) -> BaseInfo:
        """Find the root filesystem, mount it and its mount points read-only.

        `filesystems` holds the root's own (what inspection tied to it), or
        with `every_filesystem` all the image has: listing them probes every
        device again (inspect_os did it once), ~4 s of a TCG launch."""
        roots = self.call("inspect_os")
        if not roots:
            raise UserError(f"{image}: no operating system found in the image",
                            hint="libguestfs found no Linux root filesystem; is it the "
                                 "right image?")
        if len(roots) > 1:
            raise UserError(f"{image}: more than one operating system found "
                            f"({', '.join(roots)})", hint="use an image with one root")
        root = roots[0]
        if every_filesystem:
            filesystems = dict(self.call("list_filesystems"))
        else:
            filesystems = {dev: self.call("vfs_type", dev)
                           for dev in self.call("inspect_get_filesystems", root)}
        mountpoints = dict(self.call("inspect_get_mountpoints", root))
        if mount:
            for mp in sorted(mountpoints, key=lambda p: (p.count("/"), p)):
                try:
                    self.call("mount_ro", mountpoints[mp], mp)
                except ApplianceError as e:
                    if mp == "/":
                        raise
                    ui.warn(f"{image}: {mp} ({mountpoints[mp]}) not mounted: {e.message}")
                    del mountpoints[mp]
        else:
            self.call("mount_ro", root, "/")
        os_release = parse_os_release(self._read_guest_text("/etc/os-release")
                                      or self._read_guest_text("/usr/lib/os-release") or "")
        arch = self.call("inspect_get_arch", root)
        if arch in ("unknown", ""):
            arch = self._elf_arch() or "unknown"
        used = 0
        for mp in mountpoints:
            try:
                st = self.call("statvfs", mp)
                used += (st["blocks"] - st["bfree"]) * st["frsize"]
            except ApplianceError:
                pass
        return BaseInfo(root=root, mountpoints=mountpoints, os_release=os_release,
                        arch=elfinfo.normalize_arch(arch), filesystems=filesystems,
                        used_bytes=used)

    def guest_realpath(self, path: str) -> str | None:
        """Resolve symlinks inside the guest tree (confined to it); None if a
        component is missing or the links loop."""
        class Missing(Exception):
            pass

        def readlink(candidate: str) -> str | None:
            try:
                st = self.call("lstatns", "/" + candidate)
            except ApplianceError:
                raise Missing from None
            if st["st_mode"] & 0o170000 != 0o120000:
                return None
            return str(self.call("readlink", "/" + candidate))

        try:
            return "/" + confined.resolve(path, readlink, follow_last=True)
        except (Missing, confined.SymlinkLoop):
            return None

    def _read_guest_text(self, path: str, limit: int = 65536) -> str | None:
        real = self.guest_realpath(path)
        if real is None or not self.call("is_file", real):
            return None
        if self.call("filesize", real) > limit:
            return None
        return bytes(self.call("read_file", real)).decode("utf-8", "replace")

    def _elf_arch(self) -> str | None:
        for candidate in ("/usr/bin/bash", "/usr/bin/sh", "/usr/bin/ls", "/usr/bin/busybox",
                          "/usr/lib/systemd/systemd", "/sbin/init"):
            real = self.guest_realpath(candidate)
            if real is None or not self.call("is_file", real):
                continue
            arch = elfinfo.machine_of_header(bytes(self.call("pread", real, 20, 0)))
            if arch:
                return arch
        return None

    # -- extraction ----------------------------------------------------------
    def tar_out(self, directory: str, consume: Callable[[BinaryIO], T]) -> T:
        """Stream the tree at `directory` (numeric owners, xattrs, SELinux
        labels, ACLs) to `consume`."""
        return self.stream_out("tar_out", (directory,),
                               {"numericowner": True, "xattrs": True, "selinux": True,
                                "acls": True}, consume)


    # -- steps inside the rootfs ------------------------------------------
    def run_in_tree(self, tree: Callable[[BinaryIO], None], scripts: list[tuple[str, bytes]],
                    env: dict[str, str], consume_upper: Callable[[BinaryIO], T],
                    *, step: str, epoch: int, arch: str,
                    files: Callable[[BinaryIO], None] | None = None,
                    not_reproducible: list[str] | None = None) -> T:
        """Lay a rootfs tree onto scratch disk 1, run `scripts` chrooted in it
        under an overlay whose upper directory lives on scratch disk 2, and
        hand the upper directory (the step's changes, normalized: see
        TreeSession.finish) to `consume_upper` as a tar stream.  Needs two
        scratch drives added, in that order.  The scripts get
        SOURCE_DATE_EPOCH=`epoch` and the appliance's clock starts at it; a
        rootfs of another `arch` than the appliance's runs under a user-mode
        emulator (emulation.require refuses first when there is none).
        `files` (a tar stream) is unpacked into the rootfs's /tmp, a tmpfs
        during the run: what is there never reaches the step's layer.
        What could not be made identical is appended to `not_reproducible`
        (normally nothing)."""
        session = TreeSession(self, step=step, epoch=epoch, arch=arch)
        session.lay(tree)
        if files is not None:
            session.put_tmp(files)
        session.run_scripts(scripts, env)
        value = session.finish(consume_upper)
        if not_reproducible is not None:
            not_reproducible.extend(session.not_reproducible)
        return value


class TreeSession:
    """A rootfs tree laid out in the appliance for steps that run inside it.

    Invariants: the tree (scratch disk 1) is never written; everything a step
    changes lands in the overlay's upper directory (scratch disk 2); what the
    session itself needs (scripts, logs, read-only repositories, dnf's cache)
    lives under RUN_DIR or /tmp, tmpfs both, or outside /sysroot, so it
    never reaches the layer.  Every command runs with SOURCE_DATE_EPOCH=epoch
    in the fixed environment RUN_ENV (nothing of the appliance's), with the
    appliance clock set to `clock` (default: the epoch) when the tree is laid
    and at each reset().
    """

    def __init__(self, app: Appliance, *, step: str, epoch: int, arch: str,
                 clock: int | None = None) -> None:
        from . import emulation

        self.app = app
        self.step = step
        self.epoch = epoch
        self.arch = arch
        self.clock = epoch if clock is None else clock
        self.emulator = emulation.require(arch, step=step)
        self.not_reproducible: list[str] = []
        self.rpmdb_rewrites: list[float] = []   # seconds each rpm database rewrite took
        self._binfmt_name = ""
        self._rpmdb: str | None = None
        self._rpm_checked = False
        self._rpm_listing: RpmListing | None = None   # None once the tree may have changed
        self._down = True

    # -- set up -----------------------------------------------------------------
    def lay(self, tree: Callable[[BinaryIO], None]) -> None:
        app = self.app
        app.call("mkfs", "ext4", "/dev/sda", label=_LOWER_LABEL)
        app.call("mount", "/dev/sda", "/")
        app.stream_in("tar_in", ("/",), {"xattrs": True, "selinux": True, "acls": True}, tree)
        if app.guest_realpath("/bin/bash") is None:
            raise UserError(f"{self.step}: the rootfs has no /bin/bash to run scripts with",
                            hint="scripts run inside the rootfs; install bash in the base")
        if app.call("exists", "/tmp") and app.call("is_symlink", "/tmp"):
            raise UserError(f"{self.step}: the rootfs's /tmp is a symlink",
                            hint="steps run with a private /tmp; make /tmp a directory in the "
                                 "base")
        # Mount points made on the lower disk only: the step's layer is the
        # upper directory, which does not see them.
        app.call("mkdir_p", RUN_DIR)
        app.call("mkdir_p", "/tmp")
        app.call("umount_all")
        # no hashed directories on the upper disk: readdir then returns
        # entries in the order the step made them, which is deterministic, so
        # tar_out streams the layer in the same order on every build (a
        # hashed directory's order depends on mkfs's random hash seed)
        app.call("mkfs", "ext4", "/dev/sdb", label=_UPPER_LABEL, features="^dir_index")
        self._up()
        if self.emulator is not None:
            self._register_emulator()

    def _up(self) -> None:
        self._down = False
        self.app.call("debug", "sh", [_OVERLAY_UP + f"date -u -s @{int(self.clock)} >/dev/null\n"])
        env = _exports({"SOURCE_DATE_EPOCH": str(int(self.epoch))})
        self.app.call("write", f"{RUN_DIR}/one.sh", _ONE_SH.replace("@EXPORTS@\n", env))

    def reset(self, *, clock: int | None = None) -> None:
        """Drop everything steps changed so far (the upper directory) and
        start again on the same tree, the clock set anew."""
        if clock is not None:
            self.clock = clock
        self._rpm_listing = None
        down = "" if self._down else _OVERLAY_DOWN
        self.app.call("debug", "sh", [down + f"rm -rf {_UPPER} /run/rb/upperfs/work\n"])
        self._up()

    def _register_emulator(self) -> None:
        """binfmt_misc in the appliance's kernel: the emulator lives outside
        /sysroot (F keeps it open; /sysroot must stay unmountable), so the
        rootfs gets no trace of it.  Unregistered in finish()."""
        emu = self.emulator
        assert emu is not None
        staged = f"{RUN_DIR}/{emu.path.name}"
        self.app.call("upload", str(emu.path), staged)
        self._binfmt_name = f"rootfs-build-{emu.arch}"
        interpreter = f"/run/rb/emu/{emu.path.name}"
        self.app.call("debug", "sh", [f"""set -e
mkdir -p /run/rb/emu
mv /sysroot{staged} {interpreter}
chmod 0755 {interpreter}
modprobe binfmt_misc 2>/dev/null || true
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
printf '%s' {shlex.quote(emu.registration(self._binfmt_name, interpreter))} \
  > /proc/sys/fs/binfmt_misc/register
"""])

    def put_tmp(self, files: Callable[[BinaryIO], None]) -> None:
        """Unpack the tar stream `files` into the rootfs's /tmp (a tmpfs)."""
        self.app.stream_in("tar_in", ("/tmp",), {}, files)

    def mount_readonly(self, label: str, fstype: str, name: str) -> str:
        """Mount the drive added with `label` read-only at RUN_DIR/name (in
        the tmpfs, so nothing of it reaches the layer); the path inside the
        rootfs."""
        inside = f"{RUN_DIR}/{name}"
        self.app.call("debug", "sh", [f"""set -e
mkdir -p /sysroot{inside}
mountpoint -q /sysroot{inside} || mount -o ro -t {fstype} /dev/disk/guestfs/{label} /sysroot{inside}
"""])
        return inside

    # -- running ------------------------------------------------------------------
    def command(self, argv: list[str]) -> str:
        """Run argv chrooted in the rootfs with the session's environment;
        its stdout.  A failure raises ApplianceError with its stderr."""
        self._rpm_listing = None
        return str(self.app.call("command", ["/bin/bash", "-c", 'exec -c /bin/bash "$0" "$@"',
                                             f"{RUN_DIR}/one.sh", *argv]))

    def write(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Write a file into the rootfs (use paths under RUN_DIR for the
        session's own files)."""
        self.app.call("write", path, data.encode() if isinstance(data, str) else data)
        self.app.call("chmod", mode, path)

    def has(self, path: str) -> bool:
        """Whether `path` exists in the rootfs (symlinks resolved inside it)."""
        return self.app.guest_realpath(path) is not None

    def run_scripts(self, scripts: list[tuple[str, bytes]], env: dict[str, str], *,
                    explain: Callable[[str], str | None] | None = None,
                    hint: str = "-v shows the last lines of its output") -> None:
        """Run `scripts` in order (their output in one log); a failure is one
        UserError line: `explain(log)` when it recognizes the log, else the
        last line of the output."""
        self._rpm_listing = None
        self.app.call("rm_rf", f"{RUN_DIR}/scripts")
        self.app.call("mkdir_p", f"{RUN_DIR}/scripts")
        for i, (name, data) in enumerate(scripts):
            self.write(f"{RUN_DIR}/scripts/{i:03d}-{name}", data, 0o755)
        exports = _exports({**env, "SOURCE_DATE_EPOCH": str(int(self.epoch))})
        self.write(f"{RUN_DIR}/run.sh", _RUN_SH.replace("@EXPORTS@\n", exports))
        self.app.call("write", f"{RUN_DIR}/log", b"")
        try:
            self.app.call("command", ["/bin/bash", "-c", f"exec -c /bin/bash {RUN_DIR}/run.sh"])
        except ApplianceError:
            if self.app._killed_for is not None:  # timed out: qemu is gone, say so
                raise
            log = self.log()
            tail = [line for line in log.splitlines()[-15:] if line]
            if ui.verbose():
                for line in tail:
                    ui.info(f"  | {line}")
            explained = explain(log) if explain else None
            if explained:
                raise UserError(f"{self.step}: {explained}") from None
            last = tail[-1] if tail else "(no output)"
            # the runner announces each script: name the one that failed
            started = [line.removeprefix("rootfs-build: running ")
                       for line in log.splitlines() if line.startswith("rootfs-build: running ")]
            which = started[-1] if started else "a script"
            raise UserError(f"{self.step}: {which} failed inside the rootfs: {last}",
                            hint=hint) from None

    def log(self, limit: int = 1 << 20) -> str:
        """The scripts' output so far (the last `limit` bytes)."""
        return self.read_text(f"{RUN_DIR}/log", limit)

    def read_text(self, path: str, limit: int = 1 << 20) -> str:
        """The last `limit` bytes of a file in the rootfs, "" if it is missing."""
        try:
            size = self.app.call("filesize", path)
            data = self.app.call("pread", path, min(size, limit), max(0, size - limit))
        except ApplianceError:
            return ""
        return bytes(data).decode("utf-8", "replace")

    # -- the rpm database -----------------------------------------------------------
    def rpm_listing(self) -> RpmListing:
        """The rootfs's installed packages and database directory, from one
        run of its rpm (the rootfs must have rpm).  Under emulation every rpm
        run costs seconds (5 s just to start, on the 2-core build machines),
        so the listing is kept until the tree may have changed: a command,
        scripts, reset()."""
        if self._rpm_listing is None:
            out = self.command(list(RPM_LISTING_ARGV))
            self._rpm_listing = RpmListing.parse(out)
            self._rpmdb, self._rpm_checked = self._rpm_listing.dbdir, True
        return self._rpm_listing

    def rpmdb_dir(self) -> str | None:
        """The rootfs's rpm database directory (relative), None without rpm."""
        if not self._rpm_checked:
            self._rpm_checked = True
            if self.has("/usr/bin/rpm"):
                out = self.command(["rpm", "--eval", "%_dbpath"]).strip()
                self._rpmdb = out.strip("/") or None
        return self._rpmdb

    def _normalize_rpmdb(self) -> None:
        """Install times and transaction ids a step recorded after the epoch
        are set to the epoch (like file mtimes, they are clamped).  rpm >=
        4.18 takes the transaction id from SOURCE_DATE_EPOCH and gives the
        n-th package of a transaction SOURCE_DATE_EPOCH + n as its install
        time; older rpm records the clock.  Either way the database is
        exported with the rootfs's own rpmdb, the two tags rewritten in the
        headers (rpmheader.clamp_install_times) and imported into a new
        database, so its content does not depend on the rpm version or on
        how long the step took.  Seconds spent: rpmdb_rewrites."""
        dbdir = self.rpmdb_dir()
        if dbdir is None or not self._upper_has(dbdir):
            return
        if not any(t > self.epoch for t in self.rpm_listing().stamps):
            return
        started = time.monotonic()
        export = f"{RUN_DIR}/rpmdb-export"
        self.command(["/bin/bash", "-c", f"rpmdb --exportdb > {export}"])
        with tempfile.TemporaryDirectory(prefix="rpmdb-") as tmp:
            blob = Path(tmp) / "export"
            self.app.call("download", export, str(blob))
            blob.write_bytes(rpmheader.clamp_install_times(blob.read_bytes(), self.epoch))
            self.app.call("upload", str(blob), export)
        # the old database's files go; bash and rm only: a minimal rootfs
        # (rpm, bash, coreutils) has no find
        self.command(["/bin/bash", "-c", f"""set -e
shopt -s dotglob nullglob
for f in /{dbdir}/*; do
  if [ -L "$f" ] || [ ! -d "$f" ]; then rm -f "$f"; fi
done
rpmdb --initdb
rpmdb --importdb < {export}
rm -f {export}
"""])
        self.rpmdb_rewrites.append(time.monotonic() - started)

    def _upper_has(self, rel: str) -> bool:
        out = self.app.call("debug", "sh", [f"test -e {_UPPER}/{rel} && echo yes || true"])
        return "yes" in str(out)

    # -- finishing ------------------------------------------------------------------
    def capture(self, consume_upper: Callable[[BinaryIO], T]) -> T:
        """Normalize what the steps left (the rpm database's install times,
        TRANSIENT_PATHS, mtimes after the epoch) and stream the upper directory (numeric owners,
        xattrs, whiteouts) to `consume_upper`.  The session can go on after
        a reset()."""
        self._normalize_rpmdb()
        dbdirs = sorted({*RPMDB_DIRS, *([self._rpmdb] if self._rpmdb else [])})
        script = [_OVERLAY_DOWN, f"cd {_UPPER}\n"]
        for action, pattern in TRANSIENT_PATHS:
            for rel in ([pattern.replace("@RPMDB@", d) for d in dbdirs] if "@RPMDB@" in pattern
                        else [pattern]):
                script.append(_NORMALIZE[action].replace("@PATH@", rel))
        # a WAL that still holds data is part of the database: keep it, say so
        for d in dbdirs:
            script.append(f"if [ -f {d}/rpmdb.sqlite-wal ] && [ ! -L {d}/rpmdb.sqlite-wal ]; "
                          f"then if [ -s {d}/rpmdb.sqlite-wal ]; then echo WAL:{d}; "
                          f"else rm -f {d}/rpmdb.sqlite-wal; fi; fi\n")
        # mtimes after the epoch (files the step made, packaged files built
        # later) are clamped here, not only at assembly: the layer's bytes
        # must not depend on how long the step took
        script.append(f"find . -newermt @{int(self.epoch)} -exec touch -h -d @{int(self.epoch)} "
                      "{} +\n")
        script.append(f"mount --bind {_UPPER} /sysroot\n")
        out = str(self.app.call("debug", "sh", ["set -e\n" + "".join(script)]))
        for line in out.splitlines():
            if line.startswith("WAL:"):
                self.not_reproducible.append(
                    f"/{line[4:]}/rpmdb.sqlite-wal: the rpm database's write-ahead log was "
                    "not checkpointed")
        try:
            return self.app.tar_out("/", consume_upper)
        finally:
            if self.app.g is not None and self.app._killed_for is None:
                self.app.call("debug", "sh", ["umount /sysroot"])
                self._down = True

    def finish(self, consume_upper: Callable[[BinaryIO], T]) -> T:
        """capture(), then close(): the session is over."""
        value = self.capture(consume_upper)
        self.close()
        return value

    def close(self) -> None:
        """Unregister the emulator (the build host's binfmt_misc was never
        touched; this is the appliance kernel's)."""
        if self._binfmt_name:
            self.app.call("debug", "sh", [
                f"echo -1 > /proc/sys/fs/binfmt_misc/{self._binfmt_name}\n"
                "umount /proc/sys/fs/binfmt_misc\n"])
            self._binfmt_name = ""


# Shell for each TRANSIENT_PATHS action, run in the upper directory; @PATH@
# may be a glob.  Whiteouts (character devices) are deletions: kept.
_NORMALIZE = {
    "drop": """for f in @PATH@; do
  if [ -L "$f" ] || [ -f "$f" ]; then rm -f "$f"
  elif [ -d "$f" ]; then
    find "$f" -mindepth 1 ! -type d ! -type c -delete
    find "$f" -mindepth 1 -depth -type d -empty -delete
  fi
done
""",
    "empty": """for f in @PATH@; do
  if [ -f "$f" ] && [ ! -L "$f" ] && [ -s "$f" ]; then : > "$f"; fi
done
""",
}


class _Worker:
    """fn on a daemon thread, its value or exception kept for the caller.
    Completion is an Event rather than Thread.is_alive()/join(): on CPython
    3.11 a KeyboardInterrupt that lands inside join() was seen to mark the
    still-running launch thread as stopped, so the interrupted build skipped
    killing qemu and libguestfs later crashed closing the handle."""

    def __init__(self, name: str, fn: Callable[[], Any], g: Any,
                 after: Callable[[], None] | None) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()

        def work() -> None:
            try:
                _quiet_thread(g)
                self.value = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e
            finally:
                try:
                    if after is not None:
                        after()
                finally:
                    self.done.set()

        threading.Thread(target=work, name=f"guestfs-{name}", daemon=True).start()

    def wait(self, timeout: float | None = None) -> bool:
        """True once fn has returned (and `after` has run)."""
        return self.done.wait(timeout)


def _children(prefix: str) -> set[int]:
    """Our live child processes whose name starts with `prefix`, found
    without the handle, which a running call keeps locked."""
    me = os.getpid()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)
            comm = fields[0].split("(", 1)[1]
            state, ppid = fields[1].split()[:2]
        except (OSError, IndexError, ValueError):
            continue
        if int(ppid) == me and comm.startswith(prefix) and state not in ("Z", "X"):
            found.add(int(entry))
    return found


def _qemu_children() -> set[int]:
    """The live qemu processes libguestfs started."""
    return _children("qemu")


def _supermin_building() -> bool:
    """supermin is building the appliance for a launch (a first launch, or
    one after the host's packages changed): it says nothing meanwhile."""
    return bool(_children("supermin"))


_F_SETPIPE_SZ = 1031
PIPE_BYTES = 1 << 20


def _widen_pipe(fd: int) -> None:
    """A 1 MiB pipe instead of 64 KiB: libguestfs hands file data over in
    small chunks; a wider pipe lets it run ahead while our side is busy and
    lets our side take the data in fewer reads.  The limit is the kernel's
    (fs.pipe-max-size, 1 MiB by default): where it is lower, the default
    stays."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_BYTES)


class _ProgressWriter:
    def __init__(self, f: BinaryIO, tick: Callable[[], None]):
        self.f = f
        self.tick = tick

    def write(self, data: bytes) -> int:
        n = self.f.write(data)
        self.tick()
        return n

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()


class _ProgressReader:
    def __init__(self, f: BinaryIO, tick: Callable[[], None]):
        self.f = f
        self.tick = tick

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.tick()
        return data

    def close(self) -> None:
        self.f.close()


def parse_os_release(text: str) -> dict[str, str]:
    """KEY=value lines of os-release(5), unquoted; nothing is evaluated."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        if not key.isidentifier():
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
            if line.partition("=")[2].strip()[0] == '"':
                value = (value.replace('\\"', '"').replace("\\$", "$")
                         .replace("\\`", "`").replace("\\\\", "\\"))
        out[key] = value
    return out


# -- writing disk images (demo inputs, test fixtures) ------------------------

@dataclasses.dataclass(frozen=True)
class Partition:
    mountpoint: str
    size_mib: int | None      # None: the rest of the disk
    fstype: str = "ext4"


def make_disk_image(path: Path, *, fmt: str, size_mib: int, partitions: list[Partition],
                    trees: dict[str, Path], label: str = "image") -> None:
    """Create an MBR disk image with `partitions`, each filled from a tar in
    `trees` (mountpoint -> tar path).  Appears whole or not at all."""
    guestfs = _guestfs_module()
    with fileio.atomic_path(path) as tmp:
        g = guestfs.GuestFS(python_return_dict=True)
        g.disk_create(str(tmp), fmt, size_mib << 20)
        _close(g)
        app = Appliance(label)
        app.add_drive(tmp, fmt=fmt, readonly=False)
        with app:
            app.call("part_init", "/dev/sda", "mbr")
            start = 2048
            total_sectors = (size_mib << 20) // 512
            devices = []
            for i, part in enumerate(partitions, start=1):
                end = (start + part.size_mib * 2048 - 1 if part.size_mib
                       else total_sectors - 2048)
                app.call("part_add", "/dev/sda", "p", start, end)
                dev = f"/dev/sda{i}"
                app.call("mkfs", part.fstype, dev)
                devices.append((part.mountpoint, dev))
                start = end + 1
            for mountpoint, dev in sorted(devices, key=lambda d: (d[0] != "/", d[0])):
                if mountpoint != "/":
                    app.call("mkdir_p", mountpoint)
                app.call("mount", dev, mountpoint)
            for mountpoint in sorted(trees, key=lambda m: (m != "/", m)):
                app.call("tar_in", str(trees[mountpoint]), mountpoint, xattrs=True,
                         selinux=True, acls=True)
