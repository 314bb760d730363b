"""SIGINT and SIGTERM: how they end a command, and the steps they must not cut.

`install()` makes SIGINT raise KeyboardInterrupt and SIGTERM raise
BuildInterrupted in the main thread, at the next bytecode wherever it is;
the `finally` blocks and `__exit__`s on the way out kill the appliance and
remove what was half-written (Python runs signal handlers on the main thread
only, so worker threads never see these exceptions: the main thread stops
them).

A few steps must not be cut in half by that exception, because the state
they leave between two bytecodes is worse than either end:

- closing a libguestfs handle: the binding frees the C handle, then marks
  the Python object closed.  An exception between the two leaves a freed
  handle that the object's __del__ frees again ("double free or corruption",
  an abort instead of the one-line message);
- starting a libguestfs call on its worker thread: Thread.start() waits
  for the thread, and handlers run in waits; cut there, the call runs on
  with nobody to stop it, and the handle is freed under it at exit
  (guestfs_io.Appliance._start records the call in the same step);
- a line written to stderr through tqdm: tqdm creates its lock lazily, then
  releases it in a `finally`; cut in between, the release raises and the
  traceback replaces the message.

Such a step runs inside `deferred()`: a signal that arrives meanwhile is
raised when the outermost deferred() block ends.  Invariant: at most one
interrupt is pending, and it is raised exactly once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

from .errors import BuildInterrupted

_depth = 0                                  # deferred() blocks open on the main thread
_pending: BaseException | None = None       # the interrupt they hold back
_phase: Callable[[], str] = lambda: "startup"  # noqa: E731 - replaced by install()


def install(phase: Callable[[], str]) -> None:
    """Handle SIGINT and SIGTERM for the rest of the process; `phase()` names
    where the command is, for BuildInterrupted."""
    global _phase
    _phase = phase
    # a SIGINT ignored by whoever started us (a shell's background job) stays
    # ignored, as Python itself leaves it
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    global _pending
    interrupt = (KeyboardInterrupt() if signum == signal.SIGINT
                 else BuildInterrupted(signum, _phase()))
    if _depth:
        _pending = _pending or interrupt
        return
    _pending = None
    raise interrupt


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Run the block whole: SIGINT/SIGTERM arriving inside it are raised
    when it ends (on another thread than the main one it changes nothing)."""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending is not None:
            interrupt, _pending = _pending, None
            raise interrupt
