"""The DPU mount table: defaults, validation of contributions, shadowed paths."""

from __future__ import annotations

import pytest

from builder.deploy.mounts import (
    DEFAULT_MOUNTS,
    SHADOWED_PATHS,
    MountEntry,
    check_entry,
    controllers,
    mount_table,
    shadowed_paths,
)
from builder.errors import UserError


def test_defaults_follow_the_procedure() -> None:
    targets = [e.target for e in DEFAULT_MOUNTS]
    # the procedure's order where it matters
    for before, after in [("/local_proc", "/local/proc"), ("/var/lib", "/var/lib/libvirt"),
                          ("/dev", "/dev/hugepages"), ("/dev", "/dev/pts"),
                          ("/sys/fs/cgroup", "/sys/fs/cgroup/memory"),
                          ("/sys/fs/cgroup/cpuset", "/proc")]:
        assert targets.index(before) < targets.index(after)
    # sysfs on /sys first, qtfs /sys stacked on top of it and the cgroup mounts
    sys_entries = [e for e in DEFAULT_MOUNTS if e.target == "/sys"]
    assert [e.type for e in sys_entries] == ["sysfs", "qtfs"]
    assert MountEntry("qtfs", "/proc", "/proc", "proc", 600) in DEFAULT_MOUNTS
    cgroups = [e for e in DEFAULT_MOUNTS if e.type == "cgroup"]
    assert [controllers(e.options) for e in cgroups] == [
        ["perf_event"], ["freezer"], ["files"], ["net_cls", "net_prio"], ["hugetlb"], ["pids"],
        ["rdma"], ["cpu", "cpuacct"], ["memory"], ["devices"], ["blkio"], ["cpuset"]]
    for e in DEFAULT_MOUNTS:
        assert check_entry(e) == e
    assert len({(e.type, e.target) for e in DEFAULT_MOUNTS}) == len(DEFAULT_MOUNTS)


def test_contributions_sorted_by_order_then_position() -> None:
    table = mount_table([
        {"type": "tmpfs", "target": "/run/a"},
        {"type": "bind", "source": "/opt/x", "target": "/opt/x/", "order": 250},
        {"type": "tmpfs", "target": "/run/b"},
        {"type": "tmpfs", "target": "/first", "order": 0, "options": "size=10%,mode=0755"},
    ], "elements.demo.mounts")
    targets = [e.target for e in table]
    assert targets[0] == "/first"
    assert targets[-2:] == ["/run/a", "/run/b"]
    assert targets.index("/opt/x") == targets.index("/etc") + 1  # after the 200 band
    assert table[targets.index("/opt/x")].source == "/opt/x"
    assert [e for e in table if e in DEFAULT_MOUNTS] == list(DEFAULT_MOUNTS)
    assert next(e for e in table if e.target == "/run/a").source == "tmpfs"


@pytest.mark.parametrize("entry, key", [
    ({"type": "nfs", "target": "/x"}, "type"),
    ({"type": "tmpfs", "target": "/x", "colour": "red"}, "colour"),
    ({"type": "tmpfs"}, "target"),
    ({"type": "bind", "target": "/x"}, "source"),
    ({"type": "tmpfs", "target": "x"}, "target"),
    ({"type": "tmpfs", "target": "/"}, "target"),
    ({"type": "tmpfs", "target": "/a/../etc"}, "target"),
    ({"type": "tmpfs", "target": "/a b"}, "target"),
    ({"type": "tmpfs", "target": "/x;reboot"}, "target"),
    ({"type": "tmpfs", "target": "/x$(id)"}, "target"),
    ({"type": "bind", "source": "relative", "target": "/x"}, "source"),
    ({"type": "tmpfs", "source": "a b", "target": "/x"}, "source"),
    ({"type": "tmpfs", "source": "`id`", "target": "/x"}, "source"),
    ({"type": "tmpfs", "target": "/x", "options": "size=1G,mode=1777 ro"}, "options"),
    ({"type": "tmpfs", "target": "/x", "options": "a,,b"}, "options"),
    ({"type": "tmpfs", "target": "/x", "options": "-o"}, "options"),
    ({"type": "tmpfs", "target": "/x", "options": "x\ny"}, "options"),
    ({"type": "tmpfs", "target": "/x", "options": "$(reboot)"}, "options"),
    ({"type": "cgroup", "target": "/x", "options": "rw,nosuid"}, "options"),
    ({"type": "tmpfs", "target": "/x", "order": "5"}, "order"),
    ({"type": "tmpfs", "target": "/x", "order": True}, "order"),
    ({"type": "tmpfs", "target": "/x", "order": 10**9}, "order"),
])
def test_bad_contributions_name_where_and_key(entry: dict, key: str) -> None:
    with pytest.raises(UserError) as info:
        mount_table([{"type": "tmpfs", "target": "/ok"}, entry], "elements.e.mounts")
    assert str(info.value).startswith(f"elements.e.mounts[1].{key}: ")
    assert "\n" not in str(info.value)


def test_duplicate_and_non_list() -> None:
    with pytest.raises(UserError, match=r"mounts\[0\]: duplicates"):
        mount_table([{"type": "bind", "source": "/etc", "target": "/etc", "order": 7}], "mounts")
    with pytest.raises(UserError, match="must be a list"):
        mount_table({"type": "tmpfs"}, "mounts")  # type: ignore[arg-type]
    with pytest.raises(UserError, match=r"mounts\[0\]: a mount entry must be a mapping"):
        mount_table(["tmpfs /x"], "mounts")  # type: ignore[list-item]


def test_shadowed_paths() -> None:
    assert SHADOWED_PATHS == ["/var/run", "/var/lib", "/var/cache", "/etc"]
    table = mount_table([{"type": "bind", "source": "/srv", "target": "/srv/data"}], "m")
    assert shadowed_paths(table)[-1] == "/srv/data"
    with_qtfs = shadowed_paths(DEFAULT_MOUNTS, types=("bind", "qtfs"))
    assert "/home/VMs" in with_qtfs and "/proc" in with_qtfs
    assert "/var/lib/libvirt" not in with_qtfs  # inside /var/lib already
