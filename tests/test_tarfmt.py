"""The canonical tar: random member lists normalized through
build_layer_from_tar + assemble, checked against a model of the rules and
read back by Python's tarfile and GNU tar; plus the reader's error paths."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest
import unit_helpers as h
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from unit_helpers import Spec

from builder import tarfmt
from builder.errors import UserError
from builder.tarfmt import REG, Member, TarFormatError

GRAIN = tarfmt.HOLE_GRAIN
QUICK = settings(max_examples=60, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="extraction needs root")
needs_tar = pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar missing")

# ---------------------------------------------------------------------------
# strategies

_PLAIN = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+@%=:,"
_ANY = [c for c in range(1, 256) if c not in (ord("/"), ord(" "))]

component = st.one_of(
    st.lists(st.sampled_from(list(_PLAIN)), min_size=1, max_size=10).map(bytes),
    st.lists(st.sampled_from(_ANY), min_size=1, max_size=10).map(bytes),  # non-UTF-8 too
    st.integers(90, 160).map(lambda n: b"L" * n),  # longer than a ustar name
).filter(lambda c: c not in (b".", b".."))

modes = st.one_of(st.sampled_from([0o644, 0o755, 0o4755, 0o2755, 0o1777, 0o600, 0o000]),
                  st.integers(0, 0o7777))
ids = st.one_of(st.integers(0, 70000), st.just(2**32 - 2), st.integers(0, 2**32 - 2))
mtimes = st.one_of(st.integers(-(2**31), 2**34), st.just(h.EPOCH), st.just(h.EPOCH + 1),
                   st.floats(-5.0, 3e9, allow_nan=False, allow_infinity=False))
xattr_keys = st.tuples(st.sampled_from(["user.", "user.", "trusted."]),
                       st.text("abcxyz0123._", min_size=1, max_size=8)
                       ).map(lambda t: (t[0] + t[1]).encode())
xattrs = st.dictionaries(xattr_keys, st.binary(max_size=40), max_size=3)
targets = st.lists(st.integers(1, 255), min_size=1, max_size=150).map(bytes)


@st.composite
def contents(draw) -> bytes:
    if draw(st.integers(0, 4)):
        return draw(st.binary(max_size=300))
    # runs of zeros and data, not aligned to the 64 KiB grain
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            out += bytes(draw(st.sampled_from([GRAIN, 2 * GRAIN, 3 * GRAIN - 7]))
                         + draw(st.integers(0, 5000)))
        else:
            out += h.pseudo_random(draw(st.integers(0, 99)), draw(st.integers(1, 70000)))
    return out


@st.composite
def member_lists(draw) -> list[Spec]:
    paths = draw(st.lists(st.lists(component, min_size=1, max_size=3).map(tuple),
                          min_size=1, max_size=9, unique=True))
    every = {p[:i] for p in paths for i in range(1, len(p) + 1)}
    inner = {p[:-1] for p in every}
    specs: list[Spec] = []
    regs: list[bytes] = []
    links: list[Spec] = []
    if draw(st.booleans()):
        specs.append(Spec(b"", "dir", draw(modes), draw(ids), draw(ids), draw(mtimes),
                          xattrs=draw(xattrs)))
    for p in sorted(every):
        name = b"/".join(p)
        if p in inner:
            if draw(st.booleans()):  # else the parent is implied
                specs.append(Spec(name, "dir", draw(modes), draw(ids), draw(ids), draw(mtimes),
                                  xattrs=draw(xattrs), noise=draw(st.booleans())))
            continue
        kind = draw(st.sampled_from(["reg", "reg", "reg", "dir", "sym", "lnk", "lnk", "chr",
                                     "blk", "fifo"]))
        sp = Spec(name, kind, draw(modes), draw(ids), draw(ids), draw(mtimes),
                  noise=draw(st.booleans()))
        if kind in ("reg", "dir"):
            sp.xattrs = draw(xattrs)
        if kind == "reg":
            sp.content = draw(contents())
            regs.append(name)
        elif kind == "sym":
            sp.link = draw(targets)
        elif kind in ("chr", "blk"):
            sp.major, sp.minor = draw(st.integers(0, 4095)), draw(st.integers(0, 2**20 - 1))
        elif kind == "lnk":
            links.append(sp)
        specs.append(sp)
    for sp in links:
        if regs:
            sp.link = draw(st.sampled_from(regs))
        else:
            sp.kind, sp.content = "reg", b"was a link"
    return specs


def input_order(specs: list[Spec], keys: list[int]) -> list[Spec]:
    """`specs` shuffled by `keys`, hard links moved after every other member
    (a hard link must follow its target in a tar)."""
    order = sorted(range(len(specs)), key=lambda i: (keys[i % len(keys)], i))
    shuffled = [specs[i] for i in order]
    return ([sp for sp in shuffled if sp.kind != "lnk"]
            + [sp for sp in shuffled if sp.kind == "lnk"])


# ---------------------------------------------------------------------------
# properties


def check_canonical(out: bytes, specs: list[Spec]) -> h.TarView:
    view = h.tarfile_view(out)
    entries, mtimes = h.model_view(specs)
    assert view.entries == entries
    assert view.mtimes == mtimes  # clamped to the epoch, implied parents at the epoch
    # (d) rootfs order: sorted component-wise, unique, parents first, links after anchors
    assert view.order == sorted(view.order, key=h.order_key)
    assert len(set(view.order)) == len(view.order)
    position = {n: i for i, n in enumerate(view.order)}
    for name in view.order:
        if name:
            assert position[name.rpartition(b"/")[0]] < position[name]
        if view.entries[name].kind == "lnk":
            target = view.entries[name].link
            assert view.entries[target].kind == "reg"
            assert position[target] < position[name]
    # (e) no owner names, no atime/ctime, nothing but what the format allows
    allowed = (b"path", b"linkpath", b"uid", b"gid", b"size")
    for records in h.pax_records(out):
        for key in records:
            assert key in allowed or key.startswith((b"SCHILY.xattr.", b"GNU.sparse.")), key
    for ti in view.infos.values():
        assert ti.uname == "" and ti.gname == ""
        assert "atime" not in ti.pax_headers and "ctime" not in ti.pax_headers
    # (f) holes stored as pax sparse 1.0 exactly when the content has a zero grain
    for name, ti in view.infos.items():
        if ti.isreg():
            content = view.entries[name].content
            assert content is not None
            expect_sparse = h.sparse_sizes_ok(content)
            assert (ti.sparse is not None) == expect_sparse, (name, len(content))
            if expect_sparse:
                assert ti.pax_headers.get("GNU.sparse.major") == "1"
                assert ti.pax_headers.get("GNU.sparse.minor") == "0"
                assert int(ti.pax_headers["GNU.sparse.realsize"]) == len(content)
                holes = len(content) - sum(n for _, n in ti.sparse)
                assert holes == GRAIN * h.zero_grains(content)
    return view


@QUICK
@given(specs=member_lists(), keys=st.lists(st.integers(), min_size=1, max_size=30),
       prefix=st.sampled_from(["", "./", "/"]))
@example(specs=[Spec(b"f", "reg", content=b"x" * 100 + bytes(200000) + b"y")], keys=[0],
         prefix="")
def test_normalization_is_canonical(specs: list[Spec], keys: list[int], prefix: str) -> None:
    out = h.normalize(h.write_with_tarfile(input_order(specs, [0]), prefix))
    check_canonical(out, specs)
    # (a) idempotent
    assert h.normalize(out) == out
    # (b) order- and producer-independent: another order, written by tarfmt with
    # a GNU-style 4 KiB sparse map, gives the same bytes
    assert h.normalize(h.write_with_tarfmt(input_order(specs, keys))) == out
    assert h.normalize(h.write_with_tarfile(input_order(specs, [-k for k in keys]),
                                            "./")) == out


@needs_tar
@needs_root
@SLOW
@given(specs=member_lists())
def test_gnu_tar_reads_the_same_tree(specs: list[Spec]) -> None:
    out = h.normalize(h.write_with_tarfile(input_order(specs, [0])))
    entries, mtimes = h.model_view(specs)
    # tar -tv: names, types, modes, owners, sizes, devices, link targets
    listed = {n: dataclasses.replace(e, xattrs=(), content=None if e.content is None
                                     else bytes(len(e.content)))  # size only
              for n, e in entries.items()}
    assert h.gnu_list(out) == listed
    # extraction as root: lstat, content, link targets, xattrs, hard links
    work = Path(tempfile.mkdtemp(prefix="unit-gnu-"))
    try:
        h.gnu_extract(out, work / "root")
        assert h.fs_view(work / "root") == h.without_symlink_modes(entries)
        for name, entry in entries.items():
            if entry.kind in ("reg", "dir", "fifo", "chr", "blk") and not any(
                    e.kind == "lnk" and (n == name or e.link == name)
                    for n, e in entries.items()):
                st_ = os.lstat(work / "root" / os.fsdecode(name)) if name else \
                    os.lstat(work / "root")
                assert int(st_.st_mtime) == mtimes[name], name
    finally:
        shutil.rmtree(work)


def test_sparse_files_round_trip(tmp_path: Path) -> None:
    big = (h.pseudo_random(1, 1000) + bytes(5 * GRAIN) + h.pseudo_random(2, 3 * GRAIN + 5)
           + bytes(2 * GRAIN))
    specs = [
        Spec(b"holes", "reg", content=big),
        Spec(b"all-zero", "reg", content=bytes(4 * GRAIN)),
        Spec(b"zero-tail", "reg", content=b"x" + bytes(3 * GRAIN - 1)),
        Spec(b"small-zero", "reg", content=bytes(GRAIN + 10)),  # under SPARSE_MIN: dense
        Spec(b"unaligned", "reg", content=b"x" * 10 + bytes(GRAIN) + b"y" * 10),  # no grain
    ]
    out = h.normalize(h.write_with_tarfile(specs))
    view = check_canonical(out, specs)
    assert view.infos[b"all-zero"].sparse == [(4 * GRAIN, 0)]
    assert view.infos[b"zero-tail"].sparse == [(0, GRAIN), (3 * GRAIN, 0)]
    assert view.infos[b"small-zero"].sparse is None
    assert view.infos[b"unaligned"].sparse is None
    # every aligned zero grain is a hole: 4 in the middle, 1 at the end
    assert len(big) - sum(n for _, n in view.infos[b"holes"].sparse) == 5 * GRAIN
    # GNU tar agrees on the content
    if shutil.which("tar") and os.geteuid() == 0:
        h.gnu_extract(out, tmp_path / "x")
        assert (tmp_path / "x/holes").read_bytes() == big
        assert (tmp_path / "x/all-zero").read_bytes() == bytes(4 * GRAIN)
        assert (tmp_path / "x/zero-tail").read_bytes() == b"x" + bytes(3 * GRAIN - 1)
    # tarfmt's own reader makes it dense again
    read = {m.name: m for m, _ in tarfmt.read_all(out)}
    assert read[b"holes"].size == len(big)
    assert read[b"holes"].sparse is not None


def test_sparse_input_gives_the_bytes_of_dense_input() -> None:
    # segments that end inside a grain: the hole scan must stay aligned to the file
    content = b"x" * 100 + bytes(200000) + b"y" * 10
    dense = h.normalize(h.write_with_tarfile([Spec(b"f", "reg", content=content)]))
    sparse = h.normalize(h.write_with_tarfmt([Spec(b"f", "reg", content=content)]))
    assert sparse == dense


# ---------------------------------------------------------------------------
# names


def tar_of(*infos: tuple[str, bytes | None], fmt: int = tarfile.PAX_FORMAT,
           **kw: object) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in infos:
            ti = tarfile.TarInfo(name)
            for k, v in kw.items():
                setattr(ti, k, v)
            if data is None:
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("name", ["../etc/passwd", "a/../../b", "a/..", ".."])
def test_dotdot_names_are_refused(name: str) -> None:
    with pytest.raises(UserError, match="'..'") as e:
        h.normalize(tar_of((name, b"x")))
    assert "\n" not in str(e.value)


def test_dotdot_hardlink_target_is_refused() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(tarfile.TarInfo("a"), io.BytesIO(b""))
        ti = tarfile.TarInfo("b")
        ti.type, ti.linkname = tarfile.LNKTYPE, "x/../../a"
        tf.addfile(ti)
    with pytest.raises(UserError, match="hard link target"):
        h.normalize(buf.getvalue())


def test_dotdot_in_symlink_targets_is_kept() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("usr/lib64/x")
        ti.type, ti.linkname = tarfile.SYMTYPE, "../../etc/x"
        tf.addfile(ti)
    view = h.tarfile_view(h.normalize(buf.getvalue()))
    assert view.entries[b"usr/lib64/x"].link == b"../../etc/x"


def test_absolute_and_dotted_names_are_normalized() -> None:
    data = tar_of(("/etc/passwd", b"root"), ("./usr//lib/./x", b"x"), ("/var/", None),
                  ("./", None))
    read = [m.name for m, _ in tarfmt.read_all(data)]
    assert read == [b"etc/passwd", b"usr/lib/x", b"var", b""]
    out = h.normalize(data)
    assert h.raw_names(out) == [".", "./etc", "./etc/passwd", "./usr", "./usr/lib", "./usr/lib/x",
                         "./var"]
    # the raw ustar names: ./path, directories ./path/
    assert out[:2] == b"./" and out[512:512 + 6] == b"./etc/"


def test_sort_is_component_wise() -> None:
    names = [b"a-b", b"a/x", b"a", b"a.b/c", b"a\xff", b"ab", b"a/x/y"]
    assert sorted(names, key=tarfmt.sort_key) == sorted(names, key=h.order_key)
    assert sorted(names, key=tarfmt.sort_key)[:3] == [b"a", b"a/x", b"a/x/y"]


# ---------------------------------------------------------------------------
# damaged input


def test_truncated_stream() -> None:
    data = tar_of(("a", b"x" * 2000), ("b", b"y"))
    for cut in (512 + 100, 512 + 1500, 3 * 512 + 17):
        with pytest.raises(TarFormatError, match="truncat|ends") as e:
            h.normalize(data[:cut])
        assert "\n" not in str(e.value)


def test_truncated_sparse_member() -> None:
    data = h.write_with_tarfmt([Spec(b"f", "reg", content=b"x" + bytes(3 * GRAIN) + b"y")])
    with pytest.raises(TarFormatError):
        h.normalize(data[:3 * 512 + 2])


def test_bad_checksum() -> None:
    data = bytearray(tar_of(("a", b"x")))
    data[10] ^= 0x01  # inside the name
    with pytest.raises(TarFormatError, match="checksum"):
        h.normalize(bytes(data))


def test_not_a_tar() -> None:
    with pytest.raises(TarFormatError, match="checksum"):
        h.normalize(b"PK\x03\x04" + bytes(1020))


def test_empty_input_is_an_empty_rootfs() -> None:
    out = h.normalize(b"")
    assert h.raw_names(out) == ["."]


def test_unsupported_member_types() -> None:
    ti = tarfile.TarInfo("sock")
    ti.type = b"V"  # volume label
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        tf.addfile(ti)
    with pytest.raises(TarFormatError, match="type"):
        h.normalize(buf.getvalue())


def test_hard_link_to_a_later_member_is_refused() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("b")
        ti.type, ti.linkname = tarfile.LNKTYPE, "a"
        tf.addfile(ti)
        tf.addfile(tarfile.TarInfo("a"), io.BytesIO(b""))
    with pytest.raises(UserError, match="hard link 'b'"):
        h.normalize(buf.getvalue())


# ---------------------------------------------------------------------------
# what other writers produce


def test_gnu_long_names_and_links() -> None:
    long_dir = "d" * 120
    long_name = f"{long_dir}/{'n' * 150}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        tf.addfile(tarfile.TarInfo(long_name), io.BytesIO(b""))
        ti = tarfile.TarInfo("s")
        ti.type, ti.linkname = tarfile.SYMTYPE, "/" + "t" * 200
        tf.addfile(ti)
        ti = tarfile.TarInfo("hl")
        ti.type, ti.linkname = tarfile.LNKTYPE, long_name
        tf.addfile(ti)
    data = buf.getvalue()
    assert b"././@LongLink" in data  # really 'L'/'K' records
    read = {m.name: m for m, _ in tarfmt.read_all(data)}
    assert set(read) == {long_name.encode(), b"s", b"hl"}
    assert read[b"s"].linkname == b"/" + b"t" * 200
    assert read[b"hl"].linkname == long_name.encode()
    view = h.tarfile_view(h.normalize(data))
    assert view.entries[b"hl"] == h.Entry("lnk", link=long_name.encode())
    assert view.entries[b"s"].link == b"/" + b"t" * 200


def test_base256_numeric_fields() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo("big-owner")
        ti.uid, ti.gid, ti.mtime, ti.size = 2**32 - 2, 3_000_000, -1000, 1
        tf.addfile(ti, io.BytesIO(b"z"))
    data = buf.getvalue()
    block = data[:512]
    assert block[108] & 0x80 and block[136] & 0x80  # base-256 uid, mtime
    (m, content), = tarfmt.read_all(data)
    assert (m.uid, m.gid, m.mtime, content) == (2**32 - 2, 3_000_000, -1000, b"z")
    out = h.normalize(data)
    view = h.tarfile_view(out)
    assert view.entries[b"big-owner"].uid == 2**32 - 2
    assert view.mtimes[b"big-owner"] == 0  # before 1970: clamped to 0
    assert h.pax_records(out)[0][b"uid"] == b"4294967294"
    assert h.normalize(out) == out


def test_pax_global_header_and_selinux_record() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "global"}) as tf:
        ti = tarfile.TarInfo("etc/shadow")
        ti.pax_headers = {"RHT.security.selinux": "system_u:object_r:shadow_t:s0"}
        tf.addfile(ti, io.BytesIO(b""))
    (m, _), = tarfmt.read_all(buf.getvalue())
    assert m.xattrs == {b"security.selinux": b"system_u:object_r:shadow_t:s0\0"}


def test_encode_header_is_canonical() -> None:
    m = Member(b"usr/bin/x", REG, 0o755, 0, 0, size=3, mtime=5)
    header = tarfmt.encode_header(m)
    assert len(header) == 512
    assert header[:12] == b"./usr/bin/x\0"
    assert header[265:329] == bytes(64)  # empty uname, gname
    # the checksum is what tarfile computes
    ti = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    assert (ti.name, ti.mode, ti.mtime, ti.size) == ("./usr/bin/x", 0o755, 5, 3)


# ---------------------------------------------------------------------------
# fuzz: damaged tars raise UserError, never anything else


FUZZ_BASE = h.write_with_tarfmt([
    Spec(b"d", "dir", 0o755, xattrs={b"user.a": b"1"}),
    Spec(b"d/" + b"n" * 120, "reg", content=b"hello"),
    Spec(b"d/sparse", "reg", content=b"x" + bytes(2 * GRAIN) + b"y"),
    Spec(b"d/l", "lnk", link=b"d/" + b"n" * 120),
    Spec(b"d/s", "sym", link=b"../x"),
    Spec(b"c", "chr", major=3, minor=4),
])


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_damaged_tars_raise_only_user_errors(data: st.DataObject) -> None:
    raw = bytearray(FUZZ_BASE)
    for _ in range(data.draw(st.integers(1, 3))):
        block = data.draw(st.integers(0, len(raw) // 512 - 1))
        offset = data.draw(st.one_of(st.integers(0, 511), st.integers(100, 160),
                                     st.integers(329, 345)))
        raw[block * 512 + offset] = data.draw(st.one_of(
            st.integers(0, 255), st.sampled_from(b"07\n =\x80\xff")))
    cut = data.draw(st.one_of(st.just(len(raw)), st.integers(0, len(raw))))
    try:
        out = h.normalize(bytes(raw[:cut]))
    except UserError as e:
        assert "\n" not in str(e)
        return
    # what is accepted comes out as a well-formed canonical tar
    assert len(out) % 512 == 0
    h.tarfile_view(out)
    assert h.normalize(out) == out


def _replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1 and len(old) == len(new)
    return data.replace(old, new)


def test_malformed_sparse_records() -> None:
    data = h.write_with_tarfmt([Spec(b"f", "reg", content=b"x" + bytes(3 * GRAIN) + b"y")])
    for bad in (_replace_once(data, b"GNU.sparse.realsize", b"GNU.sparse.realsizX"),
                _replace_once(data, b"GNU.sparse.realsize=196610", b"GNU.sparse.realsize=19661X"),
                _replace_once(data, b"2\n0\n4096\n", b"X\n0\n4096\n")):
        with pytest.raises(TarFormatError, match="sparse"):
            h.normalize(bad)


@pytest.mark.parametrize("field", [{"devmajor": 2**22}, {"devminor": 2**21}, {"uid": -5},
                                   {"gid": 2**40}])
def test_numbers_the_canonical_header_cannot_hold_are_refused(field: dict[str, int]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo("dev")
        ti.type = tarfile.CHRTYPE
        for k, v in field.items():
            setattr(ti, k, v)
        tf.addfile(ti)
    with pytest.raises(TarFormatError, match="numeric field"):
        h.normalize(buf.getvalue())
