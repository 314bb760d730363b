"""BENCH ONLY: what a timed run records about itself (bench/build.py's
CLI_HOOK and bench/host_only.py install it).

At exit it writes to the JSON file ROOTFS_BENCH_RUSAGE names: the process's
own rusage and that of the children it waited for (qemu, via libguestfs),
and its memory when the rootfs's assembly starts: VmHWM then (the peak of
everything before it: extraction, the layer writer's tables, the cache) and
VmRSS then (what stays: the layer index, the imports).  The difference
between those and the final peak is assembly and compression.  Assembly is
the last assemble.write_tree call of a build (run steps lay trees through
it too, earlier), so the last call's figures are kept.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
from typing import Any


def _status_kb(*fields: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in fields:
                out[key] = int(value.split()[0])
    return out


def install() -> None:
    from builder import assemble

    marks: dict[str, int] = {}
    write_tree = assemble.write_tree

    def marked(*args: Any, **kw: Any) -> Any:
        now = _status_kb("VmHWM", "VmRSS")
        marks["before_assembly_hwm_kb"] = now["VmHWM"]
        marks["at_assembly_rss_kb"] = now["VmRSS"]
        return write_tree(*args, **kw)

    assemble.write_tree = marked  # type: ignore[assignment]

    def dump() -> None:
        s = resource.getrusage(resource.RUSAGE_SELF)
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(os.environ["ROOTFS_BENCH_RUSAGE"], "w") as f:
            json.dump({"self_maxrss_kb": s.ru_maxrss, "self_cpu": s.ru_utime + s.ru_stime,
                       "self_user": s.ru_utime, "self_sys": s.ru_stime,
                       "self_minflt": s.ru_minflt, "self_nvcsw": s.ru_nvcsw,
                       "self_nivcsw": s.ru_nivcsw,
                       "children_maxrss_kb": c.ru_maxrss,
                       "children_cpu": c.ru_utime + c.ru_stime, **marks}, f)

    atexit.register(dump)
