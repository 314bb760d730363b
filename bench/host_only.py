"""BENCH ONLY: a cold build whose base image tree comes from a finished tar
stream instead of the appliance, to measure the host side alone.

    python bench/host_only.py STREAM.tar BASEINFO.json -- ROOTFS-BUILD-ARGS...

Runs builder.cli.main with ROOTFS-BUILD-ARGS, but the base step's appliance
is replaced by a stand-in that "launches" at once, reports the inspection
recorded in BASEINFO.json (bench/appliance_runs.py stream) and streams
STREAM.tar (what tar_out sent for that image) through a pipe fed by `cat`,
as libguestfs feeds it.  Everything after -- parsing, normalizing, hashing,
the layer, the cache entry, assembly, compression, publishing -- is the
tool's own code.  Not a production option: nothing in builder/ knows it.
Records the process's rusage like the other timed runs (ROOTFS_BENCH_RUSAGE).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rusage_hook  # noqa: E402

from builder import guestfs_io, steps  # noqa: E402

T = TypeVar("T")


class StreamAppliance:
    """Stands in for guestfs_io.Appliance in the base step."""

    stream: Path
    info: dict[str, Any]

    def __init__(self, label: str, **_: Any):
        self.label = label

    def add_drive(self, *_: Any, **__: Any) -> None:
        pass

    def __enter__(self) -> StreamAppliance:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def inspect_base(self, image: str, *, mount: bool = True) -> guestfs_io.BaseInfo:
        return guestfs_io.BaseInfo(**self.info)

    def tar_out(self, directory: str, consume: Callable[[BinaryIO], T]) -> T:
        r, w = os.pipe()
        guestfs_io._widen_pipe(w)
        cat = subprocess.Popen(["cat", str(self.stream)], stdout=w)
        os.close(w)
        with os.fdopen(r, "rb", buffering=1 << 20) as f:
            value = consume(f)
            while f.read(1 << 20):
                pass
        if cat.wait() != 0:
            raise SystemExit(f"cat {self.stream} failed")
        return value


def main() -> int:
    stream, info, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: host_only.py STREAM.tar BASEINFO.json -- ARGS..."
    StreamAppliance.stream = Path(stream)
    StreamAppliance.info = json.loads(Path(info).read_text())
    real: Callable[..., Any] = steps.StepContext.appliance

    def appliance(self: steps.StepContext, label: str, **kw: Any) -> Any:
        if label.startswith("base image "):
            return StreamAppliance(label)
        return real(self, label, **kw)

    steps.StepContext.appliance = appliance  # type: ignore[method-assign]
    if "ROOTFS_BENCH_RUSAGE" in os.environ:
        rusage_hook.install()
    sys.argv = ["rootfs-build", *args]
    from builder.cli import main as cli_main
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
