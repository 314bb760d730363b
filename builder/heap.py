"""The process's heap policy (glibc malloc), in one place.

The pipelines (pipeline.ReadAhead, the layer writer's batches, assembly's
gathered blocks, the output Tee) move data in blocks of about BLOCK_MAX
bytes (the Tee's up to 1.25 times that), a handful of them in flight at
a time, allocated on one thread and freed on another.  glibc's default
policy maps a block that large on its own and unmaps it when freed, or,
once its adaptive threshold has moved, takes it from the heap and hands
the heap's top back to the kernel as soon as more than twice that is
free: either way the next block is faulted in and zeroed by the kernel
again.  A warm build took ~120k page faults that way, against ~20k for
zstd alone on the same tar.

settle() fixes both thresholds, so blocks come from the heap and a few
blocks' worth of free heap stays for the next ones (a warm build: ~26k
faults).  The memory kept is what blocks in flight used a moment before,
so the peak does not grow (bench/host_only.py on both bench bases: within
the runs' spread).  give_back() returns whatever is free now (after the
layer writer's tables are gone), whatever the thresholds.

Both do nothing where the C library has no such calls (not glibc).
"""

from __future__ import annotations

import gc

from .fileio import libc_function

BLOCK_MAX = 1 << 20              # a pipeline's block (READ_CHUNK, READ_BLOCK, BUFFER)
MMAP_THRESHOLD = 2 * BLOCK_MAX   # blocks come from the heap, not a mapping each
TRIM_THRESHOLD = 8 * BLOCK_MAX   # free heap kept for the next blocks, per arena

_M_TRIM_THRESHOLD = -1           # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3


def settle() -> None:
    """Fix the heap's thresholds for block-sized work (see the module
    docstring): early in the process, before the pipelines start; calling
    it again changes nothing."""
    mallopt = libc_function("mallopt")
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def give_back() -> None:
    """Hand the heap's free memory back to the system now (malloc_trim(0)),
    so what is allocated next does not sit on top of memory nobody uses:
    peak memory stays flat in the number of entries.

    Garbage cycles are collected first: Python's small-object allocator
    returns a 1 MiB arena only once every object in it is gone, and a
    stream leaves a few dozen cycles (closures, parsed members) among its
    short-lived objects that the collector's thresholds may not have
    reached yet."""
    gc.collect()
    malloc_trim = libc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)
