"""Helpers for the reliability tests: real builds in separate processes,
signals, the process tree they leave, caches copied from the session's demo
build, and checks that nothing half-made is visible."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from conftest import REPO, Build

from builder.demo import BASE_IMAGE

POLL = 0.02  # seconds between looks at a running build


def demo_image(demo: Build) -> Path:
    return demo.recipe.parent / "demo-inputs" / BASE_IMAGE


def recipe(path: Path, name: str, image: Path, *, elements: list[str] | None = None,
           overlays: list[Path] | None = None, params: dict[str, object] | None = None,
           formats: tuple[str, ...] = ("tar",)) -> Path:
    """A small recipe on the demo base image (its base layer is in the demo cache)."""
    lines = [f"name: {name}", f"base: {{image: {image}}}",
             f"elements: [{', '.join(elements or [])}]",
             f"overlays: [{', '.join(str(o) for o in overlays or [])}]",
             f"output: {{formats: [{', '.join(formats)}]}}"]
    if params:
        lines.append("params: {" + ", ".join(f"{k}: {v}" for k, v in params.items()) + "}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def sleepy_element(elements_dir: Path) -> str:
    """An element whose install.d script sleeps $PARAM_NAP seconds inside the
    rootfs, then leaves /opt/slept."""
    el = elements_dir / "sleepy"
    (el / "install.d").mkdir(parents=True, exist_ok=True)
    (el / "element.yaml").write_text("params:\n  nap: {type: int, default: 0}\n")
    script = el / "install.d" / "10-sleep"
    script.write_text('#!/bin/bash\nset -eu\nsleep "$PARAM_NAP"\nmkdir -p /opt\n'
                      'echo "slept $PARAM_NAP" > /opt/slept\n')
    script.chmod(0o755)
    return "sleepy"


def random_overlay(path: Path, size: int, marker: str, *, seed: bytes = b"") -> Path:
    """An overlay with `size` bytes of incompressible data and /etc/which = marker.
    Deterministic for a given seed, so its cache key is stable."""
    (path / "etc").mkdir(parents=True, exist_ok=True)
    (path / "etc" / "which").write_text(marker + "\n")
    data = path / "srv" / "noise.bin"
    data.parent.mkdir(parents=True, exist_ok=True)
    block = hashlib.sha256(seed or marker.encode()).digest()
    with open(data, "wb") as f:
        done = 0
        while done < size:
            # SHAKE output: incompressible, reproducible, fast enough (~400 MB/s)
            chunk = hashlib.shake_256(block + done.to_bytes(8, "big")).digest(1 << 20)
            chunk = chunk[:size - done]
            f.write(chunk)
            done += len(chunk)
    return path


def copy_cache(src: Path, dest: Path) -> Path:
    """A private copy of a cache's entries and remembered hashes."""
    dest.mkdir(parents=True, exist_ok=True)
    for sub in ("entries", "hashes"):
        if (src / sub).is_dir():
            shutil.copytree(src / sub, dest / sub, dirs_exist_ok=True)
    return dest




def sums_verify(directory: Path) -> bool:
    """True when `directory` has a SHA256SUMS that `sha256sum -c --strict` accepts."""
    if not (directory / "SHA256SUMS").is_file():
        return False
    res = subprocess.run(["sha256sum", "-c", "--strict", "--quiet", "SHA256SUMS"],
                         cwd=directory, capture_output=True)
    return res.returncode == 0


# -- processes ----------------------------------------------------------------

@dataclass(frozen=True)
class Proc:
    pid: int
    start: int   # start time in clock ticks: tells a reused pid apart
    comm: str


def _stat(pid: int) -> tuple[int, str, str, int] | None:
    """(ppid, comm, state, starttime) of a process, None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    head, _, rest = text.rpartition(")")
    fields = rest.split()
    return int(fields[1]), head.split("(", 1)[1], fields[0], int(fields[19])


def descendants(root: int) -> set[Proc]:
    """Every live process below `root`."""
    table: dict[int, tuple[int, str, str, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            table[int(entry)] = st
    out: set[Proc] = set()
    parents = {root}
    while parents:
        kids = {pid for pid, st in table.items() if st[0] in parents and st[2] != "Z"}
        out |= {Proc(pid, table[pid][3], table[pid][1]) for pid in kids}
        parents = kids
    return out


def alive(p: Proc) -> bool:
    st = _stat(p.pid)
    return st is not None and st[3] == p.start and st[2] not in ("Z", "X")


@dataclass
class Running:
    """A build started with start_build; stdout/stderr go to files."""

    proc: subprocess.Popen
    out_path: Path
    err_path: Path
    seen: set[Proc] = field(default_factory=set)
    ended_at: float | None = None
    frozen: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def look(self) -> None:
        """Remember the processes below the build (qemu, libguestfs helpers)."""
        if self.proc.poll() is None:
            self.seen |= descendants(self.pid)

    def qemus(self) -> set[Proc]:
        return {p for p in self.seen if p.comm.startswith("qemu")}

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def json(self) -> dict:
        return json.loads(self.stdout)

    def wait_for(self, cond: Callable[[], object], what: str, timeout: float = 600) -> object:
        """Poll `cond` until true; fails if the build ends first."""
        deadline = time.monotonic() + timeout
        while True:
            self.look()
            value = cond()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"build ended (rc {self.proc.returncode}) before {what}:\n"
                                     f"{self.stderr}\n{self.stdout}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.stderr}")
            time.sleep(POLL)

    def finish(self, timeout: float = 900) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            self.look()
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"build did not end within {timeout} s:\n{self.stderr}")
            time.sleep(POLL)
        self.ended_at = self.ended_at or time.monotonic()
        return self.proc.returncode

    def freeze(self) -> None:
        """SIGSTOP the build, to look at its files at a moment of our choosing."""
        self.look()
        os.kill(self.pid, signal.SIGSTOP)
        self.frozen = True

    def signal(self, signum: int) -> float:
        """Send `signum` (to a frozen build: then let it go on, so the signal
        arrives at the moment it was frozen); returns the seconds until the
        build exited."""
        self.look()
        os.kill(self.pid, signum)
        t0 = time.monotonic()
        if self.frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
            self.frozen = False
        self.finish(timeout=120)
        return time.monotonic() - t0


def start_build(*args: str | Path, logs: Path, env: dict[str, str] | None = None,
                seam: str | None = None) -> Running:
    """`rootfs-build ARGS` as its own process, the way a pipeline starts it;
    `seam` names a wrapper in tests/seams/ that runs it with a test hook."""
    logs.mkdir(parents=True, exist_ok=True)
    n = len(list(logs.glob("*.err")))
    out_path, err_path = logs / f"{n}.out", logs / f"{n}.err"
    full_env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    full_env.update(env or {})
    entry = (["-m", "builder.cli"] if seam is None
             else [str(REPO / "tests" / "seams" / f"{seam}.py")])
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, *entry, *map(str, args)], cwd=REPO, env=full_env,
            stdout=out, stderr=err, stdin=subprocess.DEVNULL,
            # a pipeline's SIGINT reaches us even if pytest was started with it ignored
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return Running(proc, out_path, err_path)


def gone_within(procs: set[Proc], seconds: float) -> set[Proc]:
    """The processes of `procs` still alive after up to `seconds`."""
    deadline = time.monotonic() + seconds
    while (left := {p for p in procs if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def error_lines(stderr: str) -> list[str]:
    """stderr without warnings and libguestfs trace lines (tests turn tracing on
    to see which appliance call is running)."""
    return [line for line in stderr.splitlines()
            if line and not line.startswith(("rootfs-build: warning:", "libguestfs: trace:"))]


# -- what a build leaves behind ----------------------------------------------------

def leftovers(out_root: Path, name: str, cache: Path) -> list[str]:
    """Staging, lock and temporary files a finished or interrupted build must
    not leave (everything a build keeps beside its outputs is `.NAME~*`)."""
    found = [p.name for p in out_root.glob(f".{name}~*")]
    found += [f"cache tmp/{p.name}" for p in (cache / "tmp").iterdir()] \
        if (cache / "tmp").is_dir() else []
    return sorted(found)


def entries_of_kind(cache: Path, kind: str) -> list[str]:
    out = []
    for d in sorted((cache / "entries").iterdir()):
        try:
            if json.loads((d / "entry.json").read_text()).get("kind") == kind:
                out.append(d.name)
        except (OSError, ValueError):
            out.append(d.name)
    return out


def layer_cache(summary: dict, kind: str) -> list[str]:
    """'built'/'hit' of the layers of one kind in a --json summary."""
    return [layer["cache"] for layer in summary["layers"] if layer["kind"] == kind]
