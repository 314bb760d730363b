"""A signal landing inside a step that must run whole (see builder/interrupts).

The CI run of stop 20 aborted with "double free or corruption" after a
SIGTERM.  Rehearsing it found three windows: an interrupt while a call's
worker thread starts (Thread.start() waits, and handlers run in waits) left
the launch running, and libguestfs freed its handle under it at exit (the CI
abort); one between the binding freeing a handle and marking it closed,
swallowed by `except Exception`, let __del__ free the handle again; one
inside tqdm's first write turned the one-line message into an
AttributeError traceback.

The window tests send a real SIGTERM at every line, one process per line,
of the step run by the real code (a real libguestfs handle and qemu probes,
the real tqdm), the handlers installed as the command line installs them,
and check the process ends with the interrupt and nothing worse.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

# Runs `STEP` with a SIGTERM sent to itself at the K-th line executed on
# the main thread in a file whose path ends with one of WATCHED (K = -1:
# only count them), counting from the first call of the function ARM ("" for
# at once) and leaving out the functions named in SKIP ("file:function").
# A line containing END, in count mode, gets the signal too: a step that
# would run on (a launch that never connects) ends there.  The handler runs
# in the trace function, so its exception enters the traced frame at that
# line, as it would from the eval loop.
_INJECT = r"""
import linecache, os, signal, sys
from builder import interrupts
from builder.errors import BuildInterrupted
WATCHED, K, ARM, END = sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3], sys.argv[4]
SKIP = {tuple(pair.split(":")) for pair in sys.argv[5].split(",") if pair}
interrupts.install(lambda: "testing")
SETUP
lines, armed = 0, not ARM
def local(frame, event, arg):
    global lines
    if event == "line" and armed:
        if lines == K or (K < 0 and END and END in linecache.getline(
                frame.f_code.co_filename, frame.f_lineno)):
            sys.settrace(None)
            os.kill(os.getpid(), signal.SIGTERM)
            return None
        lines += 1
    return local
def watch(frame, event, arg):
    global armed
    armed = armed or frame.f_code.co_name == ARM
    if (os.path.basename(frame.f_code.co_filename), frame.f_code.co_name) in SKIP:
        return None
    return local if frame.f_code.co_filename.endswith(tuple(WATCHED)) else None
sys.settrace(watch)
try:
    STEP
    outcome = "finished"
except BuildInterrupted:
    outcome = "interrupted"
sys.settrace(None)
CHECK
print(outcome, lines)
"""


def _inject(setup: str, step: str, check: str, watched: str, k: int, arm: str = "",
            end: str = "", skip: str = "", env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    code = (_INJECT.replace("SETUP", setup).replace("STEP", step)
            .replace("CHECK", check))
    return subprocess.run([sys.executable, "-c", code, watched, str(k), arm, end, skip],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def _every_line(setup: str, step: str, check: str, watched: str, arm: str = "",
                end: str = "", skip: str = "", env: dict[str, str] | None = None) -> int:
    """Inject at each line (of the comma-separated `watched` files) that
    `step` executes; returns how many.  Every run must end interrupted,
    exit 0 and print no traceback."""
    counted = _inject(setup, step, check, watched, -1, arm, end, skip, env)
    assert counted.returncode == 0, counted
    assert counted.stdout.startswith("interrupted " if end else "finished "), counted
    total = int(counted.stdout.split()[1])
    assert total > 0, f"{step} ran no line of {watched}"
    for k in range(total):
        run = _inject(setup, step, check, watched, k, arm, end, skip, env)
        where = f"SIGTERM at line {k + 1} of {total} in {watched}"
        assert run.returncode == 0, f"{where}: exit {run.returncode}\n{run.stderr}"
        assert run.stdout.startswith("interrupted "), f"{where}: {run.stdout}{run.stderr}"
        assert "Traceback" not in run.stderr, f"{where}:\n{run.stderr}"
    return total


def test_sigterm_while_a_libguestfs_handle_closes() -> None:
    # a real handle made the way a launch makes it; closed as an
    # interrupted or failed launch closes it
    setup = ("from builder.guestfs_io import Appliance\n"
             "app = Appliance('t'); app.g = app._new_handle(True); g = app.g")
    check = ("assert app.g is None, 'the appliance kept its handle'\n"
             "assert g._o is None, 'the handle was freed but not marked closed'")
    total = _every_line(setup, "app.close(shutdown=False)", check, "/guestfs.py")
    print(f"SIGTERM at each of the {total} lines of the binding's close: interrupted, no abort")


@pytest.mark.parametrize("first", [True, False], ids=["first-write", "later-write"])
def test_sigterm_while_a_message_is_written(first: bool) -> None:
    # On a terminal a message goes through tqdm: the first write imports it
    # and makes its lock, a later one only takes the lock.  (Elsewhere it
    # is one plain write, with no state to break.)
    setup = ("import io\nfrom builder import ui\n"
             "class Terminal(io.StringIO):\n    def isatty(self): return True\n"
             "err = sys.stderr = Terminal()\n"
             + ("" if first else "ui.warn('before'); err.seek(0); err.truncate()\n"))
    check = ("sys.stderr = sys.__stderr__\n"
             "assert err.getvalue() == 'rootfs-build: warning: stopping\\n', err.getvalue()")
    total = _every_line(setup, "ui.warn('stopping')", check, "/tqdm/std.py")
    print(f"SIGTERM at each of the {total} lines of tqdm.write: message whole, interrupted")


@pytest.mark.appliance   # launches (a qemu that never boots): ~25 s
def test_sigterm_while_a_call_starts(tmp_path: Path, hv_dir: Path) -> None:
    """Starting a libguestfs call on its worker thread, up to the loop that
    waits for it: wherever the interrupt lands, the call is stopped before
    the process goes on (CI of stop 20: a launch left running after the
    interrupt, its handle freed under it at exit, "double free").  The
    call is a launch whose qemu never connects (the probes are real qemu)."""
    import guestfs

    hv = hv_dir / "qemu-system-x86_64"   # qemu by name: found and killed as qemu
    hv.write_text("#!/bin/sh\n"
                  'case " $* " in *" -kernel "*) while :; do sleep 0.2; done;; esac\n'
                  f'exec {guestfs.GuestFS().get_hv()} "$@"\n')
    hv.chmod(0o755)
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    setup = ("import threading\n"
             "from builder.guestfs_io import Appliance, _qemu_children\n"
             f"app = Appliance('t'); app.add_drive({str(disk)!r}, fmt='raw')")
    step = "with app: pass"
    check = ("import time\n"
             "calls = [t for t in threading.enumerate() if t.name.startswith('guestfs-')]\n"
             "deadline = time.monotonic() + 5\n"
             "while any(t.is_alive() for t in calls) and time.monotonic() < deadline:\n"
             "    time.sleep(0.05)\n"
             "assert not any(t.is_alive() for t in calls), 'a libguestfs call still runs'\n"
             "assert not _qemu_children(), 'qemu still runs'\n"
             "assert app.g is None, 'the handle was not closed'")
    total = _every_line(setup, step, check, "/builder/guestfs_io.py,/threading.py",
                        arm="_start", end="while not worker.wait(0.2)",
                        # constructors of threading's objects start nothing
                        skip="threading.py:__init__,threading.py:_make_invoke_excepthook",
                        env={"LIBGUESTFS_HV": str(hv),
                             "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"})
    print(f"SIGTERM at each of the {total} lines starting the launch: stopped, closed")


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_sigint_ignored_by_the_parent_stays_ignored(inherited: str) -> None:
    """A shell starts background jobs with SIGINT ignored; Python keeps it so,
    and installing the interrupt handlers must not undo it."""
    code = ("import os, signal\n"
            "from builder import interrupts\n"
            "interrupts.install(lambda: 'testing')\n"
            "try:\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    print('running on')\n"
            "except KeyboardInterrupt:\n"
            "    print('interrupted')\n")
    handler = signal.SIG_IGN if inherited == "ignored" else signal.SIG_DFL
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=60,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, handler))
    assert run.returncode == 0, run.stderr
    assert run.stdout == ("running on\n" if inherited == "ignored" else "interrupted\n")
