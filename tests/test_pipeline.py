"""builder.pipeline: files written on a worker thread and streams read ahead
keep every byte and every error; the layer writer's sparse case, which takes
data the worker already wrote back out of layer.tar."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import resource
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import unit_helpers as h
from unit_helpers import Spec

from builder import pipeline, tarfmt
from builder.layer import Layer, build_layer_from_tar
from builder.pipeline import BATCH, HASH_EVERY, HashedFile, ReadAhead, written_digest


def test_hashed_file_keeps_order_hash_and_size(tmp_path: Path) -> None:
    pieces = [os.urandom(n) for n in (1, 100, BATCH - 1, BATCH, 3 * BATCH + 7, 5, 0, 4096)]
    f = HashedFile(tmp_path / "out")
    for p in pieces:
        f.write(memoryview(p) if len(p) % 2 else p)
    f.close()
    whole = b"".join(pieces)
    assert (tmp_path / "out").read_bytes() == whole
    assert f.size == len(whole) and f.sha.hexdigest() == hashlib.sha256(whole).hexdigest()
    assert written_digest(tmp_path / "out") == f.sha.hexdigest()
    os.utime(tmp_path / "out", ns=(0, 0))   # changed since: not vouched for any more
    assert written_digest(tmp_path / "out") is None


def test_many_small_pieces_in_one_batch(tmp_path: Path) -> None:
    """More pieces than one writev takes (IOV_MAX), all below BATCH: the
    file still holds them in order."""
    pieces = [bytes([i % 251]) * (1 + i % 3) for i in range(3 * pipeline._IOV_MAX + 5)]
    assert sum(map(len, pieces)) < BATCH
    f = HashedFile(tmp_path / "out")
    for p in pieces:
        f.write(p)
    f.close()
    assert (tmp_path / "out").read_bytes() == b"".join(pieces)


def test_a_short_writev_is_finished_piece_by_piece(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel may write less than asked (a signal, a nearly full disk):
    the rest follows, from the middle of the piece where it stopped."""
    real = os.writev

    def short(fd: int, buffers: list) -> int:
        whole = b"".join(bytes(b) for b in buffers)
        return real(fd, [whole[:len(whole) // 2 + 1]])

    monkeypatch.setattr(pipeline.os, "writev", short)
    pieces = [os.urandom(n) for n in (3, 1000, 70000, 5, BATCH)]
    f = HashedFile(tmp_path / "out")
    for p in pieces:
        f.write(p)
    f.close()
    assert (tmp_path / "out").read_bytes() == b"".join(pieces)
    assert f.sha.hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()


@pytest.mark.parametrize("tail_size", [3 * BATCH, 3 * HASH_EVERY + 11])
def test_hashed_file_rollback_copies_out_and_leaves_the_cut_unhashed(
        tmp_path: Path, tail_size: int) -> None:
    """Rolled back after more than the hasher takes at a time was written
    past the mark: what the cut took was never hashed."""
    f = HashedFile(tmp_path / "out")
    f.write(b"head")
    mark = f.mark()
    f.write(b"HDR!")
    tail = os.urandom(tail_size)
    f.write(tail)
    with open(tmp_path / "spool", "w+b") as spool:
        f.rollback(mark, spool=spool, keep_from=mark.size + 4)
        spool.seek(0)
        assert spool.read() == tail
    f.write(b"again")
    f.close()
    assert (tmp_path / "out").read_bytes() == b"headagain"
    assert f.sha.hexdigest() == hashlib.sha256(b"headagain").hexdigest()


def test_a_released_mark_lets_the_hash_go_on(tmp_path: Path) -> None:
    """The bytes after a released mark stay and are hashed, the ones
    written before the mark too."""
    head, body = os.urandom(2 * HASH_EVERY), os.urandom(3 * HASH_EVERY)
    f = HashedFile(tmp_path / "out")
    f.write(head)
    mark = f.mark()
    f.write(body)
    f.release(mark)
    mark = f.mark()          # a second mark, left live at close
    f.write(b"end")
    f.close()
    assert f.sha.hexdigest() == hashlib.sha256(head + body + b"end").hexdigest()
    assert written_digest(tmp_path / "out") == f.sha.hexdigest()


def test_a_full_disk_surfaces_as_the_callers_error() -> None:
    f = HashedFile(Path("/dev/full"))
    with pytest.raises(OSError) as info:
        for _ in range(64):
            f.write(bytes(BATCH))
        f.close()
    assert info.value.errno == errno.ENOSPC


def test_read_ahead_returns_the_stream_and_its_errors() -> None:
    data = os.urandom(5 * 1024 * 1024 + 3)
    ahead = ReadAhead(io.BytesIO(data), block=1 << 20)
    got = []
    while chunk := ahead.read(300_000):
        got.append(chunk)
    assert b"".join(got) == data and ahead.read() == b""

    class Broken(io.RawIOBase):
        def readinto(self, b: bytearray) -> int:  # type: ignore[override]
            raise OSError(errno.EIO, "the appliance went away")

    ahead = ReadAhead(Broken())  # type: ignore[arg-type]
    with pytest.raises(OSError, match="appliance went away"):
        ahead.read()


def test_a_hole_found_after_the_writer_took_megabytes(tmp_path: Path) -> None:
    """The first all-zero grain comes after several read chunks, which the
    worker already hashed and wrote: they come back out of layer.tar, and the
    layer is what a dense read of the whole file gives."""
    content = os.urandom(3 * tarfmt.READ_CHUNK + 5) + bytes(3 * tarfmt.HOLE_GRAIN) + b"end"
    dense = h.normalize(h.write_with_tarfile([Spec(b"f", "reg", content=content),
                                              Spec(b"g", "reg", content=b"after")]))
    got = {m.name: (m, data) for m, data in tarfmt.read_all(dense)}
    m, data = got[b"f"]
    expected = tarfmt.spool_and_scan(io.BytesIO(content).read, len(content), io.BytesIO())
    assert expected is not None and m.sparse == expected
    assert data == b"".join(content[o:o + n] for o, n in expected)
    assert got[b"g"][1] == b"after"
    d = tmp_path / "layer"
    d.mkdir()
    summary = build_layer_from_tar(io.BytesIO(h.write_with_tarfile(
        [Spec(b"f", "reg", content=content)])), d, mtime_policy="clamp", source="t")
    assert summary["tar_sha256"] == hashlib.sha256((d / "layer.tar").read_bytes()).hexdigest()
    lay = Layer(d, "t")
    try:
        (entry,) = [e for e in lay.entries if e.name == b"f"]
        assert lay.member(entry).sparse == m.sparse
    finally:
        lay.close()


class _Trickle(io.RawIOBase):
    """A stream that hands out at most `n` bytes per read, as a pipe may."""

    def __init__(self, data: bytes, n: int):
        self.data, self.pos, self.n = data, 0, n

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        k = self.n if size < 0 else min(size, self.n)
        out = self.data[self.pos:self.pos + k]
        self.pos += len(out)
        return out


@pytest.mark.parametrize("n", [1, 7, 511, 512, 513, 4096, 65537])
def test_tar_reader_reads_the_same_from_any_chunking(n: int) -> None:
    """Headers, pax records, sparse maps and data straddling every possible
    chunk boundary parse as from one piece."""
    specs = [Spec(b"d", "dir"), Spec(b"d/" + b"long" * 40, "reg", content=b"x" * 1000),
             Spec(b"s", "sym", link=b"t" * 150), Spec(b"z", "reg",
                                                      content=b"a" + bytes(200000) + b"b"),
             Spec(b"x", "reg", content=b"labelled", xattrs={b"user.k": b"v" * 300})]
    for data in (h.write_with_tarfile(specs), h.write_with_tarfmt(specs)):
        whole = tarfmt.read_all(data)
        reader = tarfmt.TarReader(_Trickle(data, n), source="t", chunk=n)  # type: ignore[arg-type]
        pieces = []
        for m in reader:
            content = b""
            while chunk := reader.read_data(n + 3):
                content += chunk
            pieces.append((m, content))
        assert pieces == whole


def test_memory_is_given_back_after_the_per_entry_tables_are_gone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """build_layer_from_tar trims the heap for the assembly that follows;
    the layer writer's per-entry tables (~200 bytes an entry) must already
    be freed then, or the trim returns nothing and peak memory grows with
    the number of entries."""
    import tracemalloc

    from builder import heap
    count = 20000
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for i in range(count):
            info = tarfile.TarInfo(f"usr/share/doc/package-{i:05d}/copyright-file")
            info.type = tarfile.DIRTYPE if i % 2 else tarfile.REGTYPE
            t.addfile(info, io.BytesIO(b""))
    data = buf.getvalue()
    live_at_trim: list[int] = []
    monkeypatch.setattr(heap, "give_back",
                        lambda: live_at_trim.append(tracemalloc.get_traced_memory()[0]))
    (tmp_path / "layer").mkdir()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        build_layer_from_tar(io.BytesIO(data), tmp_path / "layer", mtime_policy="clamp",
                             source="test")
    finally:
        tracemalloc.stop()
    assert live_at_trim, "the heap was never trimmed"
    per_entry = (live_at_trim[0] - before) / count
    assert per_entry < 100, f"{per_entry:.0f} bytes an entry still held when trimming"


def test_nothing_the_parser_makes_during_a_stream_outlives_it(tmp_path: Path) -> None:
    """An object that outlives a stream was made among its short-lived
    per-member objects, and keeps the pymalloc arena (1 MiB) around it from
    going back when the heap is trimmed: on the 1 GB bench base the header
    caches' last entries and a few dozen uncollected cycles held about 6 MB
    that way.  After build_layer_from_tar nothing tarfmt made is left."""
    import tracemalloc
    specs = [Spec(b"d", "dir")]
    for i in range(3000):
        specs.append(Spec(b"d/" + b"long-name-%05d-" % i + b"x" * 90, "reg", content=b"c",
                          xattrs={b"security.selinux": b"system_u:object_r:t%d:s0" % (i % 300)}))
    data = h.write_with_tarfile(specs)
    (tmp_path / "layer").mkdir()
    tracemalloc.start(1)
    try:
        build_layer_from_tar(io.BytesIO(data), tmp_path / "layer", mtime_policy="clamp",
                             source="test")
        left = [t for t in tracemalloc.take_snapshot().traces
                if t.traceback[0].filename == tarfmt.__file__]
    finally:
        tracemalloc.stop()
    assert not left, f"{len(left)} objects tarfmt made outlive the stream, e.g. {left[0]}"


_CHURN = """
import resource, sys
sys.path.insert(0, sys.argv[1])
from builder import heap
if sys.argv[2] == "settled":
    heap.settle()
ROUNDS = int(sys.argv[3])
IN_FLIGHT = int(sys.argv[4])
def round_():
    blocks = [bytearray(heap.BLOCK_MAX) for _ in range(IN_FLIGHT)]
    del blocks
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(ROUNDS):
    round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.parametrize("policy", ["default", "settled"])
def test_blocks_in_flight_are_reused_not_faulted_in_again(policy: str) -> None:
    """The pipelines keep a handful of 1 MiB blocks in flight and free
    them as they go.  glibc's default policy hands such a freed heap top
    back to the kernel, so every new block is faulted in (and zeroed by the
    kernel) again: a warm build took ~120k page faults where zstd alone
    takes ~20k.  After heap.settle(), rounds of as many blocks as its trim
    threshold leaves room for fault at most a few pages, while the default
    re-faults most of them (which shows the measurement sees the churn)."""
    from builder import heap

    root = str(Path(__file__).resolve().parent.parent)
    rounds, in_flight = 20, heap.TRIM_THRESHOLD // heap.BLOCK_MAX - 2
    out = subprocess.run([sys.executable, "-c", _CHURN, root, policy, str(rounds),
                          str(in_flight)], capture_output=True, text=True, check=True)
    faults = int(out.stdout)
    every_block_again = rounds * in_flight * (heap.BLOCK_MAX // resource.getpagesize())
    if policy == "default":
        assert faults > every_block_again // 2, faults
    else:
        assert faults < every_block_again // 20, faults


def test_the_c_library_is_found_without_starting_a_process(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """cli.main settles the heap first thing, before its signal handlers
    are in place: a child started there (ctypes.util.find_library runs
    ldconfig) is a window where ^C gives a traceback, and looked to the
    interrupt tests like the appliance's first helper."""
    from builder import fileio

    def no_process(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(fileio, "_libc", None)
    monkeypatch.setattr(subprocess, "Popen", no_process)
    assert fileio.libc_function("mallopt") is not None
    assert fileio.libc_function("no_such_function_here") is None
