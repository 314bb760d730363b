"""builder.assemble against the merge it replaced (tests/reference_assemble.py):
random stacks of small layers give the same bytes, or the same error, and
the same tree (paths, kinds, which layer holds each, small file contents)."""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path
from typing import Any

import reference_assemble as ref
import unit_helpers as h
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from unit_helpers import EPOCH, Item, Stack

from builder import assemble, tarfmt
from builder.errors import UserError
from builder.layer import Layer
from builder.tarfmt import CHR, DIR, LNK, REG, SYM, Member

PARTS = ["a", "b", "usr", "lib"]
NAMES = st.lists(st.sampled_from(PARTS), min_size=1, max_size=3).map("/".join)
MTIMES = st.sampled_from([EPOCH - 10, EPOCH, EPOCH + 10])


@st.composite
def layer_items(draw: st.DrawFn) -> tuple[list[Item], list[str], str]:
    items: list[Item] = []
    regs: list[str] = []
    for _ in range(draw(st.integers(0, 10))):
        name = draw(NAMES | st.just(""))
        kind = draw(st.sampled_from(["reg", "reg", "dir", "dir", "sym", "lnk", "chr"]))
        mtime = draw(MTIMES)
        if kind == "reg" and name:
            data = draw(st.sampled_from([b"", b"x", b"data" * 40,
                                         b"h" + bytes(2 * tarfmt.HOLE_GRAIN)]))
            items.append(Item(Member(name.encode(), REG, 0o644, size=len(data), mtime=mtime),
                              data))
            regs.append(name)
        elif kind == "dir":
            items.append(Item(Member(name.encode(), DIR, 0o755, mtime=mtime,
                                     uid=draw(st.integers(0, 2))),
                              weak=draw(st.booleans()), opaque=draw(st.booleans())))
        elif kind == "sym" and name:
            target = draw(NAMES)
            target = draw(st.sampled_from(["", "/", "../"])) + target
            items.append(Item(Member(name.encode(), SYM, 0o777, mtime=mtime,
                                     linkname=target.encode())))
        elif kind == "lnk" and name and regs:
            target = draw(st.sampled_from(regs))
            if target != name:
                items.append(Item(Member(name.encode(), LNK, 0o644, mtime=mtime,
                                         linkname=target.encode())))
        elif kind == "chr" and name:
            items.append(Item(Member(name.encode(), CHR, 0o600, mtime=mtime, devmajor=1,
                                     devminor=draw(st.integers(0, 3)))))
    deletions = draw(st.lists(NAMES | st.just(""), max_size=2))
    policy = draw(st.sampled_from(["clamp", "epoch"]))
    return items, deletions, policy


class _Listed:
    """A Layer whose entries are one list of objects, as the reference expects
    (it compares entries by identity)."""

    def __init__(self, layer: Layer):
        self._layer = layer
        self.entries = list(layer.entries)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._layer, name)


def _outcome(fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except UserError as e:
        return "error", e.message


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(stack_items=st.lists(layer_items(), min_size=1, max_size=4),
       epoch=st.sampled_from([EPOCH - 5, EPOCH, EPOCH + 5]))
def test_backbone_merge_matches_the_reference(stack_items: list[Any], epoch: int) -> None:
    directory = Path(tempfile.mkdtemp(prefix="unit-model-", dir=h.scratch_dir()))
    stack = Stack(directory)
    try:
        for items, deletions, policy in stack_items:
            try:
                stack.layer(items, deletions=deletions, mtime_policy=policy)
            except UserError:
                return   # the layer writer refused it: nothing to merge
        listed = [_Listed(layer) for layer in stack.layers]

        def new_tree() -> assemble.Tree:
            tree = assemble.Tree()
            for layer in stack.layers:
                tree.apply(layer)
            return tree

        def ref_tree() -> ref.Tree:
            tree = ref.Tree()
            for layer in listed:
                tree.apply(layer)  # type: ignore[arg-type]
            return tree

        def write(make: Any, writer: Any) -> bytes:
            out = io.BytesIO()
            stats = writer(make(), epoch, out)
            return out.getvalue() + repr(stats).encode()

        got = _outcome(lambda: write(new_tree, assemble.write_tree))
        want = _outcome(lambda: write(ref_tree, ref.write_tree))
        assert got == want
        if got[0] == "error":
            return
        tree, reference = new_tree(), ref_tree()
        assert set(tree.nodes) == set(reference.nodes)
        assert len(tree.nodes) == len(reference.nodes)
        for name, node in reference.nodes.items():
            mine = tree.nodes[name]
            assert (mine.type, mine.linkname, mine.group) == (node.type, node.linkname,
                                                               node.group), name
            assert tree.layer_of(name) is (None if node.layer is None
                                           else node.layer._layer)  # type: ignore[attr-defined]
            assert _outcome(lambda n=name: tree.read_file(n)) == \
                _outcome(lambda n=name: reference.read_file(n))
        for probe in (b"usr/lib/a", b"lib/b", b"a/b/usr"):
            assert _outcome(lambda p=probe: tree.resolve(p, follow_last=True)) == \
                _outcome(lambda p=probe: reference.resolve(p, follow_last=True))
    finally:
        stack.close()
        shutil.rmtree(directory)
