"""The appliance's share of a cold build, measured apart (bench/build.py runs
this as a child process and times it).

    python bench/appliance_runs.py floor IMAGE
        launch, inspect and mount as the tool does, then in the appliance
        `tar ... -cf - . | cat >/dev/null` with tar_out's own tar command and
        flags: the libguestfs floor (nothing leaves the appliance)
    python bench/appliance_runs.py transfer IMAGE
        the same, but the tree leaves through tar_out into this process,
        which reads and drops it: the floor plus the transfer
    python bench/appliance_runs.py stream IMAGE OUT.tar OUT.json
        tar_out into OUT.tar (what the host side of a cold build reads) and
        what inspection found into OUT.json, for bench/host_only.py

Each prints one JSON object with seconds per phase, and the appliance's
memory size (libguestfs' default, which the tool does not change).  The
launch policy, vCPUs (2) and tar_out flags are the tool's
(builder.guestfs_io.Appliance).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import BinaryIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder import guestfs_io  # noqa: E402

# guestfsd's tar_out runs "tar -C /sysroot/DIR [--numeric-owner] [--xattrs]
# [--selinux] [--acls] -cf - ." (libguestfs daemon/tar.c); the tool asks for
# all four.
TAR = "tar -C /sysroot/ --numeric-owner --xattrs --selinux --acls -cf - ."


def main() -> int:
    mode, image = sys.argv[1], Path(sys.argv[2])
    times: dict[str, float] = {}
    t0 = time.monotonic()
    app = guestfs_io.Appliance(f"bench {mode}")
    app.add_drive(image, fmt=guestfs_io.image_format(image), readonly=True)
    with app:
        times["launch"] = time.monotonic() - t0
        info = app.inspect_base(str(image))
        times["inspect"] = time.monotonic() - t0 - times["launch"]
        memsize = app.call("get_memsize")
        smp = app.call("get_smp")
        t1 = time.monotonic()
        size = 0
        if mode == "floor":
            app.call("debug", "sh", [f"{TAR} | cat >/dev/null"])
        elif mode == "transfer":
            def drop(stream: BinaryIO) -> int:
                n = 0
                while chunk := stream.read(1 << 20):
                    n += len(chunk)
                return n
            size = app.tar_out("/", drop)
        elif mode == "stream":
            out, meta = Path(sys.argv[3]), Path(sys.argv[4])

            def save(stream: BinaryIO) -> int:
                n = 0
                with open(out, "wb") as f:
                    while chunk := stream.read(1 << 20):
                        f.write(chunk)
                        n += len(chunk)
                return n
            size = app.tar_out("/", save)
            meta.write_text(json.dumps(info.to_json(), indent=1) + "\n")
        else:
            raise SystemExit(f"unknown mode {mode}")
        times["read"] = time.monotonic() - t1
        t2 = time.monotonic()
    times["shutdown"] = time.monotonic() - t2
    times["total"] = time.monotonic() - t0
    print(json.dumps({"mode": mode, "seconds": times, "bytes": size, "memsize_mb": memsize,
                      "smp": smp, "command": shlex.split(TAR)[0] if mode == "floor" else ""}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
