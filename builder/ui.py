"""What the user sees on stderr: warnings, -v details, progress bars."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

_verbose = False
_warned: set[str] = set()


def set_verbose(on: bool) -> None:
    global _verbose
    _verbose = on


def verbose() -> bool:
    return _verbose


def warn(message: str, *, once_key: str | None = None) -> None:
    key = once_key or message
    if key in _warned:
        return
    _warned.add(key)
    tqdm.write(f"rootfs-build: warning: {message}", file=sys.stderr)


def info(message: str) -> None:
    """A detail shown with -v only."""
    if _verbose:
        tqdm.write(f"rootfs-build: {message}", file=sys.stderr)


def step(message: str) -> None:
    """A phase starting; shown on a terminal or with -v, silent in pipelines."""
    if _verbose or sys.stderr.isatty():
        tqdm.write(f"rootfs-build: {message}", file=sys.stderr)


def bar(desc: str, total: int | None, unit: str = "B") -> Any:
    """A tqdm bar on a terminal; a silent stand-in elsewhere."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024,
                disable=not sys.stderr.isatty(), leave=False, file=sys.stderr)
