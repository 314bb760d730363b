"""Merging layers: small hand-made layers (LayerWriter) stacked and written
with assemble.write_tree, the result read back with Python's tarfile."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import unit_helpers as h
from unit_helpers import EPOCH, Entry, Stack, dir_, hardlink, reg, sym

from builder import assemble, tarfmt
from builder.errors import UserError
from builder.tarfmt import CHR, Member

needs_root_tar = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("tar") is None,
                                    reason="extraction needs root and GNU tar")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    directory = Path(tempfile.mkdtemp(prefix="unit-assemble-", dir=h.scratch_dir() or tmp_path))
    s = Stack(directory)
    try:
        yield s
    finally:
        s.close()
        shutil.rmtree(directory)


def view(stack: Stack) -> h.TarView:
    data, _ = stack.output()
    return h.tarfile_view(data)


def base_layer(stack: Stack) -> None:
    stack.layer([
        dir_(""), dir_("etc", mode=0o750, uid=5, gid=6),
        reg("etc/x", b"old", mode=0o644), reg("etc/keep", b"keep"),
        dir_("usr"), dir_("usr/lib"), dir_("usr/bin"), dir_("usr/lib64"),
        sym("lib", "usr/lib"), sym("bin", "usr/bin"), sym("lib64", "/usr/lib64"),
        dir_("opt"), dir_("opt/d"), reg("opt/d/a", b"a"), dir_("opt/d/sub"),
        reg("opt/d/sub/b", b"b"),
    ], label="base")


# ---------------------------------------------------------------------------
# replacing


def test_upper_file_replaces_lower(stack: Stack) -> None:
    base_layer(stack)
    stack.layer([reg("etc/x", b"new", mode=0o600, uid=3)])
    v = view(stack)
    assert v.entries[b"etc/x"] == Entry("reg", 0o600, 3, 0, b"new")
    assert v.entries[b"etc/keep"].content == b"keep"


def test_non_dir_over_dir_removes_the_subtree(stack: Stack) -> None:
    base_layer(stack)
    stack.layer([reg("opt/d", b"now a file"), sym("etc", "/srv/etc")])
    v = view(stack)
    assert v.entries[b"opt/d"].kind == "reg"
    assert v.entries[b"etc"] == Entry("sym", 0o777, 0, 0, link=b"/srv/etc")
    assert not [n for n in v.order if n.startswith((b"opt/d/", b"etc/"))]


def test_file_over_symlink_replaces_the_symlink(stack: Stack) -> None:
    base_layer(stack)
    stack.layer([reg("bin", b"x")])
    v = view(stack)
    assert v.entries[b"bin"].kind == "reg"
    assert v.entries[b"usr/bin"].kind == "dir"


def test_deletions_remove_subtrees(stack: Stack) -> None:
    base_layer(stack)
    stack.layer([reg("usr/lib/libx.so", b"x"), reg("usr/lib/liby.so", b"y")])
    stack.layer([], deletions=["opt/d", "etc/x", "not/there", "lib/libx.so"])
    v = view(stack)
    assert b"opt" in v.order
    assert not [n for n in v.order if n.startswith(b"opt/d")]
    assert b"etc/x" not in v.order and b"etc/keep" in v.order
    # a deletion resolves symlinks in its parents: /lib/libx.so is /usr/lib/libx.so
    assert b"usr/lib/libx.so" not in v.order and b"usr/lib/liby.so" in v.order
    assert v.entries[b"lib"].kind == "sym"


def test_deleting_a_symlink_keeps_its_target(stack: Stack) -> None:
    base_layer(stack)
    stack.layer([], deletions=["lib"])
    v = view(stack)
    assert b"lib" not in v.order and v.entries[b"usr/lib"].kind == "dir"


# ---------------------------------------------------------------------------
# symlinks in the base


def test_usr_merge(stack: Stack) -> None:
    base_layer(stack)
    stack.layer([dir_("lib"), reg("lib/x", b"x"), dir_("lib/modules", weak=True),
                 reg("lib/modules/m.ko", b"ko"), sym("lib/libz.so", "libz.so.1"),
                 reg("lib64/ld.so", b"ld"), dir_("bin", weak=True), reg("bin/sh", b"sh")])
    v = view(stack)
    # the symlinks stay symlinks; what went "through" them is in /usr
    assert v.entries[b"lib"] == Entry("sym", 0o777, 0, 0, link=b"usr/lib")
    assert v.entries[b"bin"] == Entry("sym", 0o777, 0, 0, link=b"usr/bin")
    assert v.entries[b"lib64"].kind == "sym"
    assert v.entries[b"usr/lib/x"].content == b"x"
    assert v.entries[b"usr/lib/modules"].kind == "dir"
    assert v.entries[b"usr/lib/modules/m.ko"].content == b"ko"
    assert v.entries[b"usr/lib/libz.so"].link == b"libz.so.1"
    assert v.entries[b"usr/lib64/ld.so"].content == b"ld"  # absolute link target
    assert v.entries[b"usr/bin/sh"].content == b"sh"
    assert not [n for n in v.order if n.startswith((b"lib/", b"bin/", b"lib64/"))]


def test_usr_merge_hard_links(stack: Stack, tmp_path: Path) -> None:
    base_layer(stack)
    stack.layer([reg("lib/a", b"data", mode=0o755), hardlink("lib/b", "lib/a"),
                 hardlink("lib/0", "lib/a")])
    v = view(stack)
    assert v.entries[b"usr/lib/0"] == Entry("reg", 0o755, 0, 0, b"data")
    assert v.entries[b"usr/lib/a"] == Entry("lnk", link=b"usr/lib/0")
    assert v.entries[b"usr/lib/b"] == Entry("lnk", link=b"usr/lib/0")


def test_symlink_loops_are_refused(stack: Stack) -> None:
    stack.layer([sym("a", "b"), sym("b", "/a"), sym("self", "self")])
    stack.layer([reg("a/x", b"x")], label="layer up")
    with pytest.raises(UserError, match="too many levels of symbolic links") as e:
        stack.tree()
    assert "/a/x" in str(e.value)
    stack.layers.pop().close()
    tree = stack.tree()
    with pytest.raises(UserError, match="symbolic links"):
        tree.read_file(b"self")


def test_symlinks_stay_inside_the_rootfs(stack: Stack) -> None:
    stack.layer([dir_("etc"), sym("etc/up", "../../../.."), sym("abs", "/../../etc")])
    stack.layer([reg("etc/up/x", b"x"), reg("abs/y", b"y")])
    v = view(stack)
    assert v.entries[b"x"].content == b"x"  # ../.. above the root stays at the root
    assert v.entries[b"etc/y"].content == b"y"


# ---------------------------------------------------------------------------
# directories


def test_weak_dirs_keep_existing_metadata_explicit_dirs_replace_it(stack: Stack) -> None:
    base_layer(stack)
    stack.layer([dir_("etc", weak=True, mode=0o755), dir_("opt", weak=True, mode=0o700),
                 dir_("srv", weak=True, mode=0o711, uid=9)])
    v = view(stack)
    assert v.entries[b"etc"] == Entry("dir", 0o750, 5, 6)
    assert v.entries[b"opt"] == Entry("dir", 0o755, 0, 0)
    assert v.entries[b"srv"] == Entry("dir", 0o711, 9, 0)  # nothing there: it is made
    stack.layer([dir_("etc", mode=0o700, uid=7)])
    v = view(stack)
    assert v.entries[b"etc"] == Entry("dir", 0o700, 7, 0)
    assert v.entries[b"etc/keep"].content == b"keep"  # the subtree stays


def test_missing_parents_are_made_root_0755(stack: Stack) -> None:
    stack.layer([reg("x/y/first", b"1", uid=4, mtime=5)], mtime_policy="clamp")
    stack.layer([reg("a/b/c/file", b"f", uid=3)])
    v = view(stack)
    for d in (b"", b"x", b"x/y", b"a", b"a/b", b"a/b/c"):
        assert v.entries[d] == Entry("dir", 0o755, 0, 0), d
        assert v.mtimes[d] == EPOCH
    assert v.mtimes[b"x/y/first"] == 5
    assert v.mtimes[b"a/b/c/file"] == EPOCH  # "epoch" layers: every mtime is the epoch


def test_parent_that_is_a_file_is_an_error(stack: Stack) -> None:
    base_layer(stack)
    stack.layer([reg("etc/x/sub/y", b"y")], label="overlays[0] (/src)")
    with pytest.raises(UserError) as e:
        stack.tree()
    text = h.one_line(e.value)
    assert "/etc/x/sub/y" in text and "/etc/x " in text and "file" in text
    assert "overlays[0]" in text


# ---------------------------------------------------------------------------
# hard links


def hard_link_base(stack: Stack) -> None:
    stack.layer([dir_("usr"), dir_("usr/bin"),
                 reg("usr/bin/a", b"DATA", mode=0o4755, uid=2, xattrs={b"user.k": b"v"}),
                 hardlink("usr/bin/b", "usr/bin/a"), hardlink("usr/bin/c", "usr/bin/a"),
                 reg("usr/bin/z", b"Z"), hardlink("usr/bin/y", "usr/bin/z")],
                mtime_policy="clamp")


def test_hard_links_anchor_to_the_first_name(stack: Stack) -> None:
    hard_link_base(stack)
    v = view(stack)
    assert v.entries[b"usr/bin/y"] == Entry("reg", 0o644, 0, 0, b"Z")
    assert v.entries[b"usr/bin/z"] == Entry("lnk", link=b"usr/bin/y")
    assert v.entries[b"usr/bin/b"] == Entry("lnk", link=b"usr/bin/a")


@pytest.mark.parametrize("how", ["replace", "delete", "dir"])
def test_hard_link_group_reanchors_when_its_data_holder_goes(stack: Stack, how: str,
                                                            tmp_path: Path) -> None:
    hard_link_base(stack)
    if how == "replace":
        stack.layer([reg("usr/bin/a", b"NEW")])
    elif how == "delete":
        stack.layer([], deletions=["usr/bin/a"])
    else:
        stack.layer([dir_("usr/bin/a")])
    data, _ = stack.output()
    v = h.tarfile_view(data)
    # b is the next surviving name: it carries the original inode (data, mode, xattrs)
    assert v.entries[b"usr/bin/b"] == Entry("reg", 0o4755, 2, 0, b"DATA",
                                            xattrs=((b"user.k", b"v"),))
    assert v.entries[b"usr/bin/c"] == Entry("lnk", link=b"usr/bin/b")
    assert {"replace": "reg", "delete": None, "dir": "dir"}[how] == (
        v.entries[b"usr/bin/a"].kind if b"usr/bin/a" in v.entries else None)
    if how == "replace":
        assert v.entries[b"usr/bin/a"].content == b"NEW"
    assert h.normalize(data) == data
    if os.geteuid() == 0 and shutil.which("tar"):
        h.gnu_extract(data, tmp_path / "x")
        b, c = os.lstat(tmp_path / "x/usr/bin/b"), os.lstat(tmp_path / "x/usr/bin/c")
        assert (b.st_ino, b.st_nlink) == (c.st_ino, 2)
        assert (tmp_path / "x/usr/bin/c").read_bytes() == b"DATA"


def test_hard_link_group_with_one_survivor_becomes_a_plain_file(stack: Stack) -> None:
    stack.layer([reg("a", b"A"), hardlink("b", "a")])
    stack.layer([], deletions=["a"])
    v = view(stack)
    assert v.entries[b"b"] == Entry("reg", 0o644, 0, 0, b"A")


def test_replacing_a_link_keeps_the_rest_of_the_group(stack: Stack) -> None:
    hard_link_base(stack)
    stack.layer([reg("usr/bin/b", b"other")])
    v = view(stack)
    assert v.entries[b"usr/bin/a"].content == b"DATA"
    assert v.entries[b"usr/bin/b"].content == b"other"
    assert v.entries[b"usr/bin/c"] == Entry("lnk", link=b"usr/bin/a")


def test_a_hard_link_target_made_a_hard_link_later_is_refused(stack: Stack) -> None:
    """Found by test_assemble_model: a member that makes a hard link's target
    a hard link itself left the group without data, and assembly failed with
    a KeyError instead of the writer refusing the layer, as it does when the
    target becomes a directory or a symlink."""
    with pytest.raises(UserError, match="'usr' is the target of a hard link earlier in the "
                                        "stream, and a later member makes it a hardlink"):
        stack.layer([reg("usr"), reg("a"), hardlink("b", "usr"), hardlink("usr", "a")])


def test_a_hard_link_to_itself_is_refused(stack: Stack) -> None:
    """The same gap without a second name: the file replaced by a link to
    itself left a group without data (a KeyError in assembly)."""
    with pytest.raises(UserError, match="hard link 'a' points to itself"):
        stack.layer([reg("a", b"A"), hardlink("a", "a")])


# ---------------------------------------------------------------------------
# overlayfs upper directories


def overlay_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        def add(name: str, kind: bytes, data: bytes = b"", **kw: object) -> None:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            ti.mtime = 100
            for k, v in kw.items():
                setattr(ti, k, v)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data else None)

        add("./", tarfile.DIRTYPE, mode=0o700, uid=1000,
            pax_headers={"SCHILY.xattr.trusted.overlay.origin": "\x00\x01"})
        add("./etc/", tarfile.DIRTYPE, mode=0o750, uid=5, gid=6,
            pax_headers={"SCHILY.xattr.trusted.overlay.impure": "y"})
        add("./etc/x", tarfile.CHRTYPE, devmajor=0, devminor=0)  # whiteout
        add("./etc/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
        add("./etc/c", tarfile.REGTYPE, b"C", mode=0o600, pax_headers={
            "SCHILY.xattr.trusted.overlay.origin": "abc", "SCHILY.xattr.user.keep": "1",
            "SCHILY.xattr.trusted.overlay.metacopy": ""})
        add("./opt/d/", tarfile.DIRTYPE, mode=0o755,
            pax_headers={"SCHILY.xattr.trusted.overlay.opaque": "y"})
        add("./opt/d/new", tarfile.REGTYPE, b"new")
        add("./lib/", tarfile.DIRTYPE, mode=0o755)
        add("./lib/fromupper", tarfile.REGTYPE, b"u")
    return buf.getvalue()


def test_overlay_upper_layers(stack: Stack) -> None:
    base_layer(stack)
    stack.from_tar(overlay_tar(), overlay_upper=True)
    v = view(stack)
    assert b"etc/x" not in v.order  # 0/0 character device: deleted
    assert v.entries[b"etc/null"] == Entry("chr", 0o666, 0, 0, dev=(1, 3))
    assert v.entries[b"etc/keep"].content == b"keep"
    assert v.entries[b"etc/c"] == Entry("reg", 0o600, 0, 0, b"C", xattrs=((b"user.keep", b"1"),))
    assert v.entries[b"etc"] == Entry("dir", 0o750, 5, 6)  # trusted.overlay.impure dropped
    # opaque: the lower directory's content is gone, the upper's is there
    assert [n for n in v.order if n.startswith(b"opt/d/")] == [b"opt/d/new"]
    # the upper root says nothing about the rootfs root
    assert v.entries[b""] == Entry("dir", 0o755, 0, 0)
    # an upper directory over the usr-merge symlink goes through it
    assert v.entries[b"lib"].kind == "sym" and v.entries[b"usr/lib/fromupper"].content == b"u"
    for ti in v.infos.values():
        assert not [k for k in ti.pax_headers if "overlay" in k]


def test_overlay_whiteout_only_in_overlay_mode() -> None:
    out = h.normalize(overlay_tar())
    v = h.tarfile_view(out)
    assert v.entries[b"etc/x"] == Entry("chr", 0o644, 0, 0, dev=(0, 0))
    assert (b"trusted.overlay.opaque", b"y") in v.entries[b"opt/d"].xattrs


def test_opaque_directory_replacing_a_symlink(stack: Stack) -> None:
    base_layer(stack)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("lib")
        ti.type, ti.mode = tarfile.DIRTYPE, 0o755
        ti.pax_headers = {"SCHILY.xattr.trusted.overlay.opaque": "y"}
        tf.addfile(ti)
    stack.from_tar(buf.getvalue(), overlay_upper=True)
    v = view(stack)
    assert v.entries[b"lib"].kind == "dir" and v.entries[b"usr/lib"].kind == "dir"


# ---------------------------------------------------------------------------
# output and reading


def test_unchanged_base_is_copied_verbatim(stack: Stack) -> None:
    items = [dir_("", mtime=10)]
    for i in range(40):
        items.append(dir_(f"d{i}", mtime=10))
        items += [reg(f"d{i}/f{j}", b"x" * (j * 100), mtime=20) for j in range(5)]
    items += [reg("big", b"a" * 50 + bytes(3 * tarfmt.HOLE_GRAIN), mtime=30),
              hardlink("big2", "big"), sym("s", "big", mtime=40)]
    stack.layer(items, mtime_policy="clamp")
    data, stats = stack.output()
    assert stats.entries == stats.copied_verbatim == len(items)
    assert stats.tar_bytes == len(data)
    stack.layer([reg("d3/f1", b"changed"), reg("new/file", b"n")])
    data, stats = stack.output()
    # the base: all but d3/f1; the upper file and the made-up parent are written anew
    assert stats.copied_verbatim == len(items) - 1
    assert stats.entries == len(items) + 2
    assert h.tarfile_view(data).entries[b"d3/f1"].content == b"changed"


def test_mtimes_clamped_to_the_epoch(stack: Stack) -> None:
    stack.layer([reg("old", b"o", mtime=EPOCH - 5), reg("new", b"n", mtime=EPOCH + 5),
                 hardlink("new2", "new", mtime=EPOCH + 9)], mtime_policy="clamp")
    stack.layer([reg("epoch", b"e", mtime=123)], mtime_policy="epoch")
    data, stats = stack.output()
    v = h.tarfile_view(data)
    assert v.mtimes == {b"": EPOCH, b"old": EPOCH - 5, b"new": EPOCH, b"new2": EPOCH,
                        b"epoch": EPOCH}
    assert stats.copied_verbatim == 1  # only "old" kept its header


def test_read_file(stack: Stack) -> None:
    stack.layer([dir_("usr"), dir_("usr/lib"), reg("usr/lib/os-release", b"ID=openEuler\n"),
                 dir_("etc"), sym("etc/os-release", "../usr/lib/os-release"),
                 sym("etc/abs", "/etc/os-release"), sym("lib", "usr/lib"),
                 hardlink("usr/lib/hl", "usr/lib/os-release"),
                 reg("big", b"b" * 2000), reg("sparse", b"s" + bytes(3 * tarfmt.HOLE_GRAIN)),
                 sym("dangling", "nowhere")])
    stack.layer([reg("usr/lib/os-release", b"ID=new\n")])
    tree = stack.tree()
    assert tree.read_file(b"etc/os-release") == b"ID=new\n"
    assert tree.read_file(b"etc/abs") == b"ID=new\n"
    assert tree.read_file(b"lib/os-release") == b"ID=new\n"
    assert tree.read_file(b"usr/lib/hl") == b"ID=openEuler\n"  # the link keeps its inode
    assert tree.read_file(b"big") == b"b" * 2000
    assert tree.read_file(b"big", limit=100) is None
    assert tree.read_file(b"sparse") is None
    assert tree.read_file(b"dangling") is None
    assert tree.read_file(b"usr") is None
    assert tree.read_file(b"missing/x") is None


def test_layer_writer_refuses_bad_hard_links(stack: Stack) -> None:
    with pytest.raises(UserError, match="not a regular file earlier"):
        stack.layer([dir_("d"), hardlink("x", "d")])


def test_made_up_root_when_the_base_has_none(stack: Stack) -> None:
    stack.layer([reg("only", b"1")])
    data, _ = stack.output()
    v = h.tarfile_view(data)
    assert h.raw_names(data)[0] == "." and v.order[0] == b""
    assert (v.entries[b""], v.mtimes[b""]) == (Entry("dir", 0o755, 0, 0), EPOCH)


def test_member_roundtrip_through_layer_index(stack: Stack) -> None:
    lay = stack.layer([reg("a", b"x", mode=0o640, uid=7, xattrs={b"user.y": b"\0"}),
                       h.Item(Member(b"dev", CHR, 0o600, devmajor=4, devminor=1))])
    got = {e.name: lay.member(e) for e in lay.entries}
    assert got[b"a"].xattrs == {b"user.y": b"\0"} and got[b"a"].uid == 7
    assert (got[b"dev"].devmajor, got[b"dev"].devminor) == (4, 1)


@needs_root_tar
def test_merged_output_extracts(stack: Stack, tmp_path: Path) -> None:
    base_layer(stack)
    hard_link_base(stack)
    stack.from_tar(overlay_tar(), overlay_upper=True)
    data, _ = stack.output()
    h.gnu_extract(data, tmp_path / "x")
    fs = h.fs_view(tmp_path / "x")
    assert fs == h.without_symlink_modes(h.tarfile_view(data).entries)


# ---------------------------------------------------------------------------
# memory


class _ResidentSink:
    """Drops what is written; every 1 MiB of it, notes how much of `path`
    is resident in this process's memory, keeping the largest."""

    def __init__(self, path: Path):
        self.path, self.written, self.most = path, 0, 0

    def write(self, data: bytes) -> None:
        before, self.written = self.written, self.written + len(data)
        if before >> 20 != self.written >> 20:
            self.most = max(self.most, _resident_kib(self.path))


def _resident_kib(path: Path) -> int:
    """KiB of `path`'s pages resident in this process's mappings of it."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):     # a mapping's first line
                inside = line.rstrip("\n").endswith(" " + str(path))
            elif inside and head == "Rss:":
                total += int(line.split()[1])
    return total


@pytest.mark.parametrize("newer", [True, False], ids=["entry by entry", "copied in runs"])
def test_assembly_does_not_keep_the_index_pages_it_walked(stack: Stack, newer: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # entries newer than the epoch under "clamp" are written one by one
    # (every column of index.bin is read); the others are copied in one run
    # (offsets and lengths are read)
    entries = 60_000
    mtime = EPOCH + 1 if newer else EPOCH
    base = stack.layer([dir_("", mtime=mtime)] + [dir_(f"d{i:06d}", mtime=mtime)
                                                  for i in range(entries)],
                       mtime_policy="clamp")
    index = base.directory / "index.bin"

    def walk() -> int:
        base.release_index_pages()
        sink = _ResidentSink(index)
        stats = assemble.write_tree(stack.tree(), EPOCH, sink)
        assert stats.entries == entries + 1
        return sink.most

    with monkeypatch.context() as m:
        m.setattr(assemble, "RELEASE_INDEX_EVERY", entries * 2)
        kept = walk()           # the baseline: nothing dropped on the way
    assert kept > 1000          # big enough that keeping it shows
    # what is held is what was walked since the last drop (with the pages
    # the kernel maps around each fault), not what the walk touched so far
    assert walk() < kept // 2
