"""Symlink resolution confined to a tree, the way a chroot resolves a path.

One walk for every tree the tool resolves paths in: the merged layers on the
build host (assemble.Tree) and the base image inside the appliance
(guestfs_io.Appliance.guest_realpath).  `..` stops at the root, an absolute
link target restarts from the root, and nothing ever leaves the tree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

P = TypeVar("P", str, bytes)

MAX_SYMLINK_HOPS = 40


class SymlinkLoop(Exception):
    """More than MAX_SYMLINK_HOPS links on one path."""


def resolve(path: P, readlink: Callable[[P], P | None], *, follow_last: bool) -> P:
    """`path` (relative to the tree's root, or absolute) with its symlinks
    resolved, as a path relative to the root without a leading separator.

    readlink(candidate) gives a symlink's target, or None for anything else
    (it may raise to stop the walk, e.g. for a missing component).  The last
    component is followed only with `follow_last`."""
    text = isinstance(path, str)
    sep: P = "/" if text else b"/"  # type: ignore[assignment]
    dot: P = "." if text else b"."  # type: ignore[assignment]
    dotdot: P = ".." if text else b".."  # type: ignore[assignment]
    todo = [p for p in reversed(path.split(sep)) if p]
    done: list[P] = []
    hops = 0
    while todo:
        part = todo.pop()
        if part == dot:
            continue
        if part == dotdot:
            if done:
                done.pop()
            continue
        candidate = sep.join(done + [part])
        target = readlink(candidate) if (todo or follow_last) else None
        if target is not None:
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise SymlinkLoop(candidate)
            if target.startswith(sep):
                done = []
            todo.extend(p for p in reversed(target.split(sep)) if p)
            continue
        done.append(part)
    return sep.join(done)
