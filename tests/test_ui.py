"""Messages and bars on stderr: through tqdm on a terminal only."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

_RUN = r"""
import io, sys
from builder import ui
if sys.argv[1] == "terminal":
    class Terminal(io.StringIO):
        def isatty(self): return True
    err = sys.stderr = Terminal()
ui.warn("careful")
with ui.bar("working", 10) as bar:
    bar.update(4)
got = err.getvalue() if sys.argv[1] == "terminal" else ""
sys.stderr = sys.__stderr__
print("tqdm" in sys.modules, repr(got))
"""


def _run(where: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _RUN, where], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_not_a_terminal_gets_plain_lines_and_no_tqdm() -> None:
    # a pipeline's stderr: the line as it is, no bar, and tqdm never loaded
    # (its import and first bar took 13-21 ms of a build's start here)
    res = _run("pipe")
    assert res.returncode == 0, res.stderr
    assert res.stderr == "rootfs-build: warning: careful\n"
    assert res.stdout.split()[0] == "False", res.stdout


def test_a_terminal_gets_the_line_through_tqdm() -> None:
    res = _run("terminal")
    assert res.returncode == 0, res.stderr
    loaded, got = res.stdout.split(maxsplit=1)
    assert loaded == "True"
    # the bar writes its own output around the line
    assert "rootfs-build: warning: careful\n" in ast.literal_eval(got)
