"""A signal landing inside a step that must run whole (see builder/interrupts).

The CI run of stop 20 aborted with "double free or corruption" after a
SIGTERM: the interrupt landed between the libguestfs binding freeing a handle
and marking it closed, `except Exception` swallowed it, and __del__ freed
the handle again.  A SIGTERM at the wrong moment inside tqdm's first write
turned the one-line message into an AttributeError traceback.

Each test sends a real SIGTERM at every line, one process per line, of the
step run by the real code (a real libguestfs handle, the real tqdm), the
handlers installed as the command line installs them, and checks the
process ends with the interrupt and nothing worse.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

# Runs `STEP` with a SIGTERM sent to itself at the K-th line executed in a
# file whose path ends with WATCHED (K = -1: only count them).  The handler
# runs in the trace function, so its exception enters the traced frame at
# that line, as it would from the eval loop.
_INJECT = r"""
import os, signal, sys
from builder import interrupts
from builder.errors import BuildInterrupted
WATCHED, K = sys.argv[1], int(sys.argv[2])
interrupts.install(lambda: "testing")
SETUP
lines = 0
def local(frame, event, arg):
    global lines
    if event == "line":
        if lines == K:
            sys.settrace(None)
            os.kill(os.getpid(), signal.SIGTERM)
        lines += 1
    return local
def watch(frame, event, arg):
    return local if frame.f_code.co_filename.endswith(WATCHED) else None
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


def _inject(setup: str, step: str, check: str, watched: str, k: int
            ) -> subprocess.CompletedProcess[str]:
    code = (_INJECT.replace("SETUP", setup).replace("STEP", step)
            .replace("CHECK", check))
    return subprocess.run([sys.executable, "-c", code, watched, str(k)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _every_line(setup: str, step: str, check: str, watched: str) -> int:
    """Inject at each line of `watched` that `step` executes; returns how
    many.  Every run must end interrupted, exit 0 and print nothing else."""
    counted = _inject(setup, step, check, watched, -1)
    assert counted.returncode == 0 and counted.stdout.startswith("finished "), counted
    total = int(counted.stdout.split()[1])
    assert total > 0, f"{step} ran no line of {watched}"
    for k in range(total):
        run = _inject(setup, step, check, watched, k)
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
    # the first write creates tqdm's lock; a later one only takes it
    setup = ("import io\nfrom builder import ui\n"
             + ("" if first else "ui.warn('before')\n")
             + "err = sys.stderr = io.StringIO()")
    check = ("sys.stderr = sys.__stderr__\n"
             "assert err.getvalue() == 'rootfs-build: warning: stopping\\n', err.getvalue()")
    total = _every_line(setup, "ui.warn('stopping')", check, "/tqdm/std.py")
    print(f"SIGTERM at each of the {total} lines of tqdm.write: message whole, interrupted")
