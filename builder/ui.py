"""What the user sees on stderr: warnings, -v details, progress bars.

Messages go through the standard `logging` logger "rootfs-build" (its level
is the one place verbosity lives: INFO by default, DEBUG with -v).  On a
terminal they are written with tqdm so they do not tear a progress bar;
elsewhere there are no bars and tqdm is not imported: on the dev VM its
import and its first bar (a multiprocessing lock, a monitor thread) took
13-21 ms of a build's start (about 0.1 s in a warm rebuild), and
`validate` ran in 110 ms instead of 122 (medians of 30).  A warning is
shown once per key and process.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from . import interrupts

LOG = logging.getLogger("rootfs-build")


class _StderrHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        if not sys.stderr.isatty():   # no bar to tear: one plain write
            sys.stderr.write(line + "\n")
            return
        # whole: an interrupt inside tqdm's import or write breaks its lock
        # (see interrupts)
        with interrupts.deferred():
            from tqdm import tqdm
            tqdm.write(line, file=sys.stderr)


class _Once(logging.Filter):
    """Drops a warning whose once-key was shown before."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = getattr(record, "once_key", None)
        if key is None:
            return True
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


if not LOG.handlers:
    _handler = _StderrHandler()
    _handler.setFormatter(logging.Formatter("rootfs-build: %(message)s"))
    _handler.addFilter(_Once())
    LOG.addHandler(_handler)
    LOG.propagate = False
    LOG.setLevel(logging.INFO)


def set_verbose(on: bool) -> None:
    LOG.setLevel(logging.DEBUG if on else logging.INFO)


def verbose() -> bool:
    return LOG.isEnabledFor(logging.DEBUG)


def warn(message: str, *, once_key: str | None = None) -> None:
    LOG.warning(f"warning: {message}", extra={"once_key": once_key or message})


def info(message: str) -> None:
    """A detail shown with -v only."""
    LOG.debug(message)


def step(message: str) -> None:
    """A phase starting; shown on a terminal or with -v, silent in pipelines."""
    if verbose() or sys.stderr.isatty():
        LOG.info(message)


def bar(desc: str, total: int | None, unit: str = "B") -> Any:
    """A tqdm bar on a terminal; a silent stand-in elsewhere."""
    if not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024,
                leave=False, file=sys.stderr)


class _NoBar:
    """What bar() gives when stderr is not a terminal: what callers use of a
    bar (a `with` block and update()), doing nothing."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: float = 1) -> None:
        pass
