"""The one way rootfs-build starts a program on the build host.

Every tool runs from an absolute path (found with `find_tool`, which names
the Debian package to install when it is missing) with an argument list
(no shell) and, unless a caller says otherwise, an environment built from
scratch (`tool_env`), so the host's TZ, locale or stray variables
(MKE2FS_CONFIG, E2FSPROGS_*) cannot reach the bytes of an output.  `run`
waits for a tool and turns a failure into one line (ToolFailed); `start`
hands back a running process for streaming into it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from .errors import UserError

# tool -> (Debian package, how to install it)
PACKAGES = {
    "gcc": ("gcc", "apt-get install gcc libc6-dev"),
    "patch": ("patch", "apt-get install patch"),
    "ldd": ("libc-bin", "apt-get install libc-bin"),
    "tar2sqfs": ("squashfs-tools-ng", "apt-get install squashfs-tools-ng"),
    "mke2fs": ("e2fsprogs", "apt-get install -t bookworm-backports e2fsprogs libarchive13"),
    "debugfs": ("e2fsprogs", "apt-get install -t bookworm-backports e2fsprogs"),
    "e2fsck": ("e2fsprogs", "apt-get install -t bookworm-backports e2fsprogs"),
    "dumpe2fs": ("e2fsprogs", "apt-get install -t bookworm-backports e2fsprogs"),
    "qemu-img": ("qemu-utils", "apt-get install qemu-utils"),
}

# mke2fs learned to read a tarball (-d file.tar, -d -) in 1.47.1.
MIN_E2FSPROGS = (1, 47, 1)

_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"])


def find_tool(name: str, needed_for: str = "image outputs") -> str:
    """Absolute path of `name`, or a UserError naming the package to install."""
    path = shutil.which(name, path=_SEARCH_PATH)
    if path is None:
        package, how = PACKAGES[name]
        raise UserError(f"{name} is not installed; {needed_for} need it",
                        hint=f"install the Debian package {package}: {how}")
    return path


def tool_env(epoch: int, tmp: Path | None = None, **extra: str) -> dict[str, str]:
    """The whole environment a tool sees (TMPDIR: inside staging)."""
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "TZ": "UTC",
        "LC_ALL": "C",
        "SOURCE_DATE_EPOCH": str(epoch),
    }
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    env.update(extra)
    return env


def last_line(text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


def run(argv: Sequence[str], *, env: dict[str, str] | None, cwd: Path | None = None,
        stdin: IO[bytes] | None = None, what: str, check: bool = True
        ) -> subprocess.CompletedProcess[bytes]:
    """Run a tool to completion, output captured; with `check` a non-zero exit
    becomes a UserError with its last stderr line.  `env=None` keeps the
    caller's environment (for tools whose output is not an artifact)."""
    proc = subprocess.run(list(argv), env=env, cwd=cwd,
                          stdin=stdin if stdin else subprocess.DEVNULL,
                          capture_output=True, check=False)
    if check and proc.returncode != 0:
        raise ToolFailed(what, Path(argv[0]).name, proc.returncode, proc.stderr or proc.stdout)
    return proc


def start(argv: Sequence[str], *, env: dict[str, str], cwd: Path | None = None,
          stdout: IO[bytes] | int | None = subprocess.DEVNULL,
          stderr: IO[bytes] | int | None = subprocess.PIPE) -> subprocess.Popen[bytes]:
    """Start a tool that reads its stdin from the caller (a pipe)."""
    return subprocess.Popen(list(argv), env=env, cwd=cwd, stdin=subprocess.PIPE,
                            stdout=stdout, stderr=stderr)


class ToolFailed(UserError):
    """An image tool exited non-zero; the message carries its last stderr line."""

    def __init__(self, what: str, tool: str, returncode: int, stderr: bytes):
        self.tool = tool
        self.returncode = returncode
        self.stderr = stderr.decode("utf-8", "replace")
        how = f"failed (exit {returncode})" if returncode else "reported an error"
        super().__init__(f"{what}: {tool} {how}: {last_line(stderr)}")


def version(path: str, *args: str) -> str:
    """First line of a tool's version output (stdout or stderr)."""
    proc = subprocess.run([path, *args], env=tool_env(0), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False)
    lines = proc.stdout.decode("utf-8", "replace").strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def version_tuple(text: str) -> tuple[int, ...]:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        return ()
    return tuple(int(g) for g in m.groups() if g is not None)
