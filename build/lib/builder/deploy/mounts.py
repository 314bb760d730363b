"""The DPU mount table: what prepare.sh mounts into the rootfs, as data.

The default is the written procedure's list (section 3.4.2.3 of openEuler's
"Imperceptible Virtualization Management Plane Offload" guide, the manual
procedure rootfs-build replaces) in its order, with its mistakes fixed:
every mount point is created, ``local/proc`` and ``local/sys`` included, and
teardown is derived from what was actually mounted instead of a
hand-written list.

Elements contribute entries as dicts (type, source, target, options, order);
``mount_table`` validates them and merges them with the defaults, sorted by
(order, position).  The defaults use these order bands, so a contribution can
be placed between them:

    100  local procfs/sysfs (/local_proc, /local/proc, /local/sys)
    200  bind mounts of the DPU's own /var/run, /var/lib, /var/cache, /etc
    300  qtfs data directories (/home/VMs, /var/lib/libvirt)
    400  /dev (devtmpfs, hugetlbfs, mqueue, shm)
    500  local sysfs on /sys, cgroup tmpfs and v1 controllers
    600  qtfs system directories (/proc, /sys, /dev/pts, /dev/vfio)

A contribution without ``order`` goes after all of them (CONTRIB_ORDER).
Targets are paths inside the rootfs; every value is validated against a strict
character set, so nothing odd can reach a generated script.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, cast

from .. import values
from ..errors import UserError

TYPES = ("proc", "sysfs", "bind", "qtfs", "devtmpfs", "hugetlbfs", "mqueue", "tmpfs",
         "cgroup", "cgroup2", "devpts")
# Types whose source is a path (on the DPU for bind, on the host for qtfs);
# the others take a device name such as "proc" or "tmpfs".
PATH_SOURCE_TYPES = ("bind", "qtfs")
KEYS = ("type", "source", "target", "options", "order")
CONTRIB_ORDER = 1000
ORDER_RANGE = (-100000, 100000)

SOURCE_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Mount options: comma-separated words of plain characters (no spaces, quotes,
# globs, $, `, ;, /, newlines).
OPTION_RE = re.compile(r"^[A-Za-z0-9_.=:+%][A-Za-z0-9_.=:+%-]*$")
OPTIONS_MAX = 256

# Options of a cgroup v1 mount that are not controller names.
CGROUP_FLAGS = frozenset({
    "rw", "ro", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "relatime",
    "norelatime", "noatime", "atime", "strictatime", "nodiratime", "diratime", "sync",
    "async", "dirsync", "lazytime", "nolazytime", "silent", "loud", "defaults", "none",
    "noprefix", "clone_children", "xattr", "all", "cpuset_v2_mode", "favordynmods",
})


@dataclass(frozen=True)
class MountEntry:
    """One mount: ``mount -t type [-o options] source <rootfs>target``.

    bind: ``mount --bind source`` (a path on the DPU); qtfs: a path on the host
    reached through qtfs (``--rehearse`` binds ``HOSTDIR/source`` instead).
    """

    type: str
    source: str
    target: str
    options: str = ""
    order: int = 0

    def describe(self) -> str:
        opts = f" -o {self.options}" if self.options else ""
        return f"{self.type}{opts} {self.source} on {self.target}"


def controllers(options: str) -> list[str]:
    """Controller names in a cgroup v1 option string (flags and key=value dropped)."""
    return [o for o in options.split(",") if o and "=" not in o and o not in CGROUP_FLAGS]


def normalize_target(value: object) -> str:
    """A validated absolute path inside the rootfs, without '.', '//' or a trailing '/'."""
    path = values.check_abs_path(value)
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        raise ValueError(f"{value!r} is the rootfs itself; mount targets must lie below it")
    return "/" + "/".join(parts)


def check_options(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a mount option string (like 'rw,nosuid')")
    if value == "":
        return value
    if len(value) > OPTIONS_MAX or not all(OPTION_RE.match(o) for o in value.split(",")):
        raise ValueError(
            f"{value!r} is not a mount option string: comma-separated words of letters, "
            "digits and _ . = : + % - only")
    return value


def check_order(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not an integer")
    if not ORDER_RANGE[0] <= value <= ORDER_RANGE[1]:
        raise ValueError(f"{value} is out of range {ORDER_RANGE[0]}..{ORDER_RANGE[1]}")
    return value


def check_entry(entry: MountEntry) -> MountEntry:
    """Validate a MountEntry; raises ValueError prefixed with the failing key."""
    if entry.type not in TYPES:
        raise ValueError(f"type: {entry.type!r} is not one of {', '.join(TYPES)}")
    try:
        target = normalize_target(entry.target)
    except ValueError as e:
        raise ValueError(f"target: {e}") from None
    try:
        if entry.type in PATH_SOURCE_TYPES:
            source = normalize_target(entry.source) if entry.source != "/" else "/"
        else:
            if not isinstance(entry.source, str) or not SOURCE_NAME_RE.match(entry.source):
                raise ValueError(f"{entry.source!r} is not a device name (like {entry.type!r})")
            source = entry.source
    except ValueError as e:
        raise ValueError(f"source: {e}") from None
    try:
        options = check_options(entry.options)
        if entry.type == "cgroup" and not (controllers(options) or "name=" in options):
            raise ValueError(f"{options!r} names no cgroup v1 controller (like 'rw,memory')")
    except ValueError as e:
        raise ValueError(f"options: {e}") from None
    try:
        order = check_order(entry.order)
    except ValueError as e:
        raise ValueError(f"order: {e}") from None
    return MountEntry(entry.type, source, target, options, order)


CGROUP_V1_OPTS = "rw,nosuid,nodev,noexec,relatime"
# The procedure's controller list.  'files' exists only in openEuler kernels
# and 'rdma' not everywhere: prepare.sh skips controllers the running kernel
# does not offer (per /proc/cgroups) or that it cannot mount, with a warning.
CGROUP_V1_CONTROLLERS = ("perf_event", "freezer", "files", "net_cls,net_prio", "hugetlb", "pids",
                         "rdma", "cpu,cpuacct", "memory", "devices", "blkio", "cpuset")

# On /sys the procedure stacks three layers, and the order is deliberate, so
# it is kept:
#   1. a local sysfs on /sys: gives /sys/fs/cgroup as a mount point without
#      creating directories in the rootfs image;
#   2. a tmpfs on /sys/fs/cgroup plus one cgroup v1 mount per controller: these
#      make libvirtd's own mount table (it reads /proc/self/mounts, which
#      qtfs -o proc redirects to the DPU's local procfs) list the controllers
#      where it expects them;
#   3. qtfs /sys on top: every path lookup under /sys, cgroup files included,
#      then reaches the host, where qemu-kvm and its cgroups actually live.
# So (1) and (2) end up hidden under (3) and that is intended.  What the
# procedure gets wrong is undoing it: teardown pops the stack in exact reverse
# (qtfs /sys first), which is what prepare's recorded order gives.
DEFAULT_MOUNTS: tuple[MountEntry, ...] = (
    MountEntry("proc", "proc", "/local_proc", "", 100),
    MountEntry("proc", "proc", "/local/proc", "", 100),
    MountEntry("sysfs", "sysfs", "/local/sys", "", 100),
    MountEntry("bind", "/var/run", "/var/run", "", 200),
    MountEntry("bind", "/var/lib", "/var/lib", "", 200),
    MountEntry("bind", "/var/cache", "/var/cache", "", 200),
    MountEntry("bind", "/etc", "/etc", "", 200),
    MountEntry("qtfs", "/home/VMs", "/home/VMs", "", 300),
    MountEntry("qtfs", "/var/lib/libvirt", "/var/lib/libvirt", "", 300),
    MountEntry("devtmpfs", "devtmpfs", "/dev", "", 400),
    MountEntry("hugetlbfs", "hugetlbfs", "/dev/hugepages", "", 400),
    MountEntry("mqueue", "mqueue", "/dev/mqueue", "", 400),
    MountEntry("tmpfs", "tmpfs", "/dev/shm", "", 400),
    MountEntry("sysfs", "sysfs", "/sys", "", 500),
    MountEntry("tmpfs", "tmpfs", "/sys/fs/cgroup", "", 500),
    *(MountEntry("cgroup", "cgroup", f"/sys/fs/cgroup/{c}", f"{CGROUP_V1_OPTS},{c}", 500)
      for c in CGROUP_V1_CONTROLLERS),
    MountEntry("qtfs", "/proc", "/proc", "proc", 600),
    MountEntry("qtfs", "/sys", "/sys", "", 600),
    MountEntry("qtfs", "/dev/pts", "/dev/pts", "", 600),
    MountEntry("qtfs", "/dev/vfio", "/dev/vfio", "", 600),
)


def _from_dict(raw: object, where: str) -> MountEntry:
    if not isinstance(raw, dict):
        raise UserError(f"a mount entry must be a mapping with keys {', '.join(KEYS)}",
                        where=where)
    data = cast(dict[str, Any], raw)
    for key in data:
        if key not in KEYS:
            raise UserError(f"unknown key {key!r} (known: {', '.join(KEYS)})",
                            where=f"{where}.{key}")
    for key in ("type", "target"):
        if key not in data:
            raise UserError(f"missing key {key!r}", where=f"{where}.{key}")
    mtype = data["type"]
    if mtype in PATH_SOURCE_TYPES and "source" not in data:
        raise UserError(f"a {mtype} mount needs a source path", where=f"{where}.source")
    entry = MountEntry(
        type=mtype,
        source=data.get("source", mtype),
        target=data["target"],
        options=data.get("options", ""),
        order=data.get("order", CONTRIB_ORDER),
    )
    try:
        return check_entry(entry)
    except ValueError as e:
        key, _, message = str(e).partition(": ")
        raise UserError(message, where=f"{where}.{key}") from None


def mount_table(contributions: list[dict], where: str) -> list[MountEntry]:
    """DEFAULT_MOUNTS plus validated contributions, sorted by (order, position).

    ``where`` names the contributions in errors, e.g. ``"elements.foo.mounts"``
    (an entry's error says ``<where>[<i>].<key>: ...``).
    """
    if not isinstance(contributions, list):
        raise UserError("mounts must be a list of mount entries", where=where)
    entries = list(DEFAULT_MOUNTS)
    seen = {(e.type, e.source, e.target, e.options) for e in entries}
    for i, raw in enumerate(contributions):
        entry = _from_dict(raw, f"{where}[{i}]")
        key = (entry.type, entry.source, entry.target, entry.options)
        if key in seen:
            raise UserError(f"duplicates an existing mount ({entry.describe()})",
                            where=f"{where}[{i}]")
        seen.add(key)
        entries.append(entry)
    positions = {id(e): n for n, e in enumerate(entries)}
    return sorted(entries, key=lambda e: (e.order, positions[id(e)]))


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def shadowed_paths(table: list[MountEntry] | tuple[MountEntry, ...],
                   types: tuple[str, ...] = ("bind",)) -> list[str]:
    """Rootfs paths whose content a mount of one of ``types`` hides at run time.

    By default the bind mounts of the DPU's own directories (/etc, /var/lib,
    ...): a file an element puts there is in the image but invisible to
    libvirtd.  Pass ``types=("bind", "qtfs")`` to include the qtfs mounts.
    Paths nested in another returned path are dropped; table order is kept.
    The paths are as written in the table: /var/run is usually a symlink to
    ../run in the rootfs, so match against resolved paths too.
    """
    targets = [e.target for e in table if e.type in types]
    out: list[str] = []
    for t in targets:
        if any(_inside(t, o) for o in targets if o != t) or t in out:
            continue
        out.append(t)
    return out


SHADOWED_PATHS: list[str] = shadowed_paths(DEFAULT_MOUNTS)
