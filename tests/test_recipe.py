"""Recipes: loading, path resolution, --set overrides, and errors that are
one line naming file:line (or the --set option)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import unit_helpers as h
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.errors import UserError
from builder.recipe import apply_overrides, load_recipe, load_yaml

MINIMAL = """\
name: dpu
base:
  image: openEuler-22.03-LTS-x86_64.qcow2
"""


def write(directory: Path, text: str | bytes, name: str = "recipe.yaml") -> Path:
    return h.write_file(directory / name, text)


def error_of(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(UserError) as e:
        load_recipe(path, overrides)
    return h.one_line(e.value)


# ---------------------------------------------------------------------------
# loading


def test_minimal_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "recipes", MINIMAL)
    monkeypatch.chdir(tmp_path)
    r = load_recipe(path)
    assert r.name == "dpu"
    b, o = r.spec.base, r.spec.output
    assert b.image == tmp_path / "recipes/openEuler-22.03-LTS-x86_64.qcow2"
    assert (b.sha256, b.arch, b.filesystems, r.spec.epoch) == (None, None, "all", None)
    assert (r.spec.elements, r.spec.overlays, r.spec.params, r.spec.allow_shadowed) == (
        (), (), {}, ())
    assert o.formats == ("tar",)
    assert (o.size, o.headroom, o.qcow2_compressed, o.bundle) == (None, 0.2, False, True)
    assert r.where("base", "image") == f"{path}:3"
    assert r.where("base", "nothing", 3) == f"{path}:2"
    assert r.ctx.overridden == frozenset()


def test_full_recipe(tmp_path: Path) -> None:
    path = write(tmp_path, """\
name: full-1.0_x
description: everything
base:
  image: /abs/base.qcow2
  sha256: ABCDEF0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789
  arch: aarch64
  filesystems: root
epoch: 1700000000
elements: [libvirt-offload, qtfs]
overlays:
  - overlay
  - {path: ../shared/etc, dest: /etc, uid: 0, gid: 10, modes: {"sbin/*": "0750", x: "600"}}
params:
  host_ip: 10.0.0.2
  ports: [1, 2]
  none: null
allow_shadowed: [/etc/motd]
output:
  formats: [tar.zst, qcow2]
  size: 1.5G
  headroom: 0.5
  qcow2_compressed: true
  bundle: false
""")
    r = load_recipe(path)
    b, out = r.spec.base, r.spec.output
    assert b.image == Path("/abs/base.qcow2")
    assert b.sha256 == "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"
    assert (b.arch, b.filesystems, r.spec.epoch) == ("aarch64", "root", 1700000000)
    assert r.spec.overlays[0].path == tmp_path / "overlay" and r.spec.overlays[0].dest == "/"
    o = r.spec.overlays[1]
    assert (o.path, o.dest, o.uid, o.gid) == (tmp_path / "../shared/etc", "/etc", 0, 10)
    assert o.modes == {"sbin/*": 0o750, "x": 0o600}
    assert r.spec.params == {"host_ip": "10.0.0.2", "ports": [1, 2], "none": None}
    assert out.formats == ("tar.zst", "qcow2")
    assert out.size == int(1.5 * (1 << 30))
    assert (out.headroom, out.qcow2_compressed, out.bundle) == (0.5, True, False)
    assert r.resolve_path("inputs/x.ko", "params", "host_ip") == tmp_path / "inputs/x.ko"
    assert r.resolve_path("/abs/x.ko", "params", "host_ip") == Path("/abs/x.ko")


def test_load_yaml_marks(tmp_path: Path) -> None:
    path = write(tmp_path, "a:\n  b:\n    - x\n    - {c: 1}\n")
    data, marks = load_yaml(path)
    assert data == {"a": {"b": ["x", {"c": 1}]}}
    assert marks[("a",)] == f"{path}:1"
    assert marks[("a", "b", 1, "c")] == f"{path}:4"
    assert load_yaml(write(tmp_path, "", "empty.yaml")) == ({}, {})


# ---------------------------------------------------------------------------
# --set


def test_set_values_resolve_against_the_current_directory(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    path = write(tmp_path / "recipes", MINIMAL + "overlays: [ov]\nparams: {f: in.txt}\n")
    monkeypatch.chdir(tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    r = load_recipe(path, ["base.image=images/other.qcow2", "overlays.1=ov2",
                           "params.g=given.txt"])
    assert r.spec.base.image == tmp_path / "images/other.qcow2"
    assert [o.path for o in r.spec.overlays] == [tmp_path / "recipes/ov", tmp_path / "ov2"]
    assert r.resolve_path("in.txt", "params", "f") == tmp_path / "recipes/in.txt"
    assert r.resolve_path("given.txt", "params", "g") == tmp_path / "given.txt"
    assert r.where("base", "image") == "--set base.image"
    # a whole mapping given with --set: everything in it is relative to cwd
    r = load_recipe(path, ["base={image: b.qcow2, arch: x86_64}"])
    assert r.spec.base.image == tmp_path / "b.qcow2" and r.spec.base.arch == "x86_64"


def test_set_lists_nested_keys_and_indexes(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "elements: [a, b]\n")
    r = load_recipe(path, ["output.formats=[tar,tar.zst]", "output.bundle=false",
                           "elements.1=c", "elements.2=d", "epoch=5", "params.x=[1, two]",
                           "description=", "params.empty=~"])
    assert r.spec.output.formats == ("tar", "tar.zst")
    assert r.spec.output.bundle is False
    assert r.spec.elements == ("a", "c", "d")
    assert r.spec.epoch == 5
    assert r.spec.params == {"x": [1, "two"], "empty": None}
    assert r.spec.description == ""
    assert ("output", "formats") in r.ctx.overridden and ("elements", 1) in r.ctx.overridden
    # the last --set wins
    assert load_recipe(path, ["epoch=1", "epoch=2"]).spec.epoch == 2
    # a value YAML cannot read is taken as text
    assert load_recipe(path, ["params.v=!!int abc", "params.w=*x"]).spec.params == {
        "v": "!!int abc", "w": "*x"}


@pytest.mark.parametrize(("sets", "expect"), [
    (["noequals"], "--set noequals: expected KEY.PATH=VALUE"),
    (["=x"], "--set =x: expected KEY.PATH=VALUE"),
    (["elements.5=x"], "--set elements.5: cannot set elements[5]"),
    (["name.x=1"], None),  # name is replaced by a mapping: a type error below
    (["epoch=soon"], "--set epoch: epoch: 'soon' is not an integer"),
    (["output.fomats=[tar]"], "--set output.fomats: unknown key output.fomats "
                              "(did you mean 'formats'?)"),
    (["x.y.z=1"], "--set x.y.z: unknown key x"),
    (["output.formats=[tar,zip]"], "--set output.formats: output.formats[1]: 'zip'"),
])
def test_set_errors_name_the_option(tmp_path: Path, sets: list[str], expect: str | None
                                    ) -> None:
    text = error_of(write(tmp_path, MINIMAL + "elements: [a]\n"), sets)
    if expect is not None:
        assert text.startswith(expect), text
    else:
        assert text.startswith("--set name.x:"), text


def test_apply_overrides_marks(tmp_path: Path) -> None:
    data = {"a": [1, {"b": 2}]}
    marks: dict = {("a",): "f:1", ("a", 1, "b"): "f:2"}
    touched = apply_overrides(data, ["a.1.b=3", "c.d.e=x"], marks)
    assert data == {"a": [1, {"b": 3}], "c": {"d": {"e": "x"}}}
    assert touched == {("a", 1, "b"), ("c", "d", "e")}
    assert marks[("a", 1, "b")] == "--set a.1.b" and marks[("a",)] == "f:1"
    assert marks[("c",)] == marks[("c", "d")] == "--set c.d.e"


# ---------------------------------------------------------------------------
# errors: one line, file:line


@pytest.mark.parametrize(("text", "line", "wanted"), [
    (MINIMAL + "elemnts: [x]\n", 4, "elements"),
    (MINIMAL + "output:\n  fomats: [tar]\n", 5, "formats"),
    (MINIMAL + "output:\n  bundel: true\n", 5, "bundle"),
    ("name: dpu\nbase:\n  image: a\n  sha265: abc\n", 4, "sha256"),
    (MINIMAL + "overlays:\n  - path: x\n    dst: /etc\n", 6, None),  # oneOf: no suggestion
])
def test_unknown_keys(tmp_path: Path, text: str, line: int, wanted: str | None) -> None:
    path = write(tmp_path, text)
    msg = error_of(path)
    assert msg.startswith(f"{path}:{line}: "), msg
    if wanted:
        assert "unknown key" in msg and f"did you mean '{wanted}'?" in msg


BAD = {
    "wrong type": (MINIMAL + "epoch: soon\n", 4, "epoch: 'soon' is not an integer"),
    "wrong nested type": (MINIMAL + "output:\n  headroom: lots\n", 5, "output.headroom"),
    "name is a list": ("name: [a]\nbase: {image: a}\n", 1, "name: a list is not a string"),
    "string for list": (MINIMAL + "elements: libvirt\n", 4, "elements"),
    "mapping expected": ("name: dpu\nbase: a.qcow2\n", 2, "base"),
    "bad name chars": ("name: 'my rootfs'\nbase: {image: a}\n", 1, "may only hold"),
    "name ..": ("name: ..\nbase: {image: a}\n", 1, "may only hold"),
    "bad element name": (MINIMAL + "elements: [a, 'b/c']\n", 4, "elements[1]"),
    "missing base.image": ("name: dpu\nbase:\n  arch: x86_64\n", 2, "base.image is required"),
    "missing name": ("base:\n  image: a\n", 1, "name is required"),
    "duplicate key": ("name: dpu\nbase:\n  image: a\nname: again\n", 4, "name is given twice"),
    "duplicate nested key": (MINIMAL + "  image: b\n", 4, "base.image is given twice"),
    "alias": ("name: &n dpu\nbase:\n  image: *n\n", 3, "base.image: YAML aliases are not allowed"),
    "merge key": ("name: dpu\nbase:\n  <<: {image: a}\n", 3, "merge keys"),
    "non-mapping list": ("- name: dpu\n", 1, "a recipe is a mapping"),
    "non-mapping scalar": ("\n\ndpu\n", 3, "a recipe is a mapping"),
    "syntax": ("name: dpu\nbase: {image: a\n", 3, "invalid YAML"),
    "tab": ("name: dpu\n\tbase: {}\n", 2, "invalid YAML"),
    "indentation": ("name: dpu\nbase:\n  image: a\n arch: x\n", 4, "invalid YAML"),
    "two documents": ("name: a\n---\nname: b\n", 2, "invalid YAML"),
    "control character": ("name: dpu\nbase: {image: \x07}\n", 2, "invalid YAML"),
    "bad !!int": ("name: dpu\nepoch: !!int abc\n", 2, "epoch"),
    "bad !!timestamp": ("name: dpu\nepoch: !!timestamp x\n", 2, "epoch"),
    "bad !!bool": ("name: dpu\nepoch: !!bool x\n", 2, "epoch"),
    "python tag": ("name: !!python/name:os.system ''\n", 1, "constructor"),
    "empty !!int": ("name: dpu\nepoch: !!int\n", 2, "epoch"),
    "tagged key": ("name: dpu\n!foo k: v\n", 2, "constructor"),
    "binary key": ("name: dpu\n!!binary xx: v\n", 2, "base64"),
    "int key": ("name: dpu\n1: x\n", 2, "must be a string"),
    "too deep": ("a:" + " [" * 80 + "]" * 80 + "\n", 1, "nested too deeply"),
    "size": (MINIMAL + "output:\n  size: infG\n", 5, "not a size"),
    "bad size": (MINIMAL + "output:\n  size: lots\n", 5, "not a size"),
    "overlay dest": (MINIMAL + "overlays:\n  - {path: o, dest: /a/../b}\n", 5, "'..'"),
    "overlay mode": (MINIMAL + "overlays:\n  - {path: o, modes: {x: '0999'}}\n", 5, "mode"),
    "overlay item": (MINIMAL + "overlays:\n  - 5\n", 5, "overlays[0].path: 5 is not a path"),
    "overlay int mode": (MINIMAL + "overlays:\n  - {path: o, modes: {x: 755}}\n", 5,
                         "755 is a number; write a mode as quoted octal text"),
    "overlay octal mode": (MINIMAL + "overlays:\n  - {path: o, modes: {x: 0755}}\n", 5,
                           "493 is a number"),
    "param name": (MINIMAL + "params:\n  Host: 1\n", 5, "'Host' is not a param name"),
    "param value": (MINIMAL + "params:\n  host: {a: 1}\n", 5, "params.host"),
    "format": (MINIMAL + "output:\n  formats: [tar, zip]\n", 5, "'zip'"),
    "sha256": (MINIMAL + "  sha256: xyz\n", 4, "base.sha256"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_errors_are_one_line_with_file_and_line(tmp_path: Path, case: str) -> None:
    text, line, needle = BAD[case]
    path = write(tmp_path, text)
    msg = error_of(path)
    assert msg.startswith(f"{path}:{line}: "), msg
    assert needle in msg, msg


def test_non_utf8_recipe(tmp_path: Path) -> None:
    path = write(tmp_path, b"name: dpu\nbase:\n  image: caf\xe9.qcow2\n")
    msg = error_of(path)
    assert msg.startswith(f"{path}:3: ") and "UTF-8" in msg


def test_unreadable_recipes(tmp_path: Path) -> None:
    assert "not found" in error_of(tmp_path / "missing.yaml")
    assert "is a directory" in error_of(tmp_path)
    big = write(tmp_path, "# " + "x" * (1 << 20) + "\n", "big.yaml")
    assert "larger than" in error_of(big)


def test_empty_recipe(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, "# nothing\n"))
    assert "name is required" in msg


# ---------------------------------------------------------------------------
# fuzz: anything at all gives a UserError or a recipe

TOKENS = ["name", "base", "image", "output", "formats", "size", "epoch", "params",
          "overlays", "elements", "modes", "dest", ": ", ":", "- ", "\n", "\n  ", "  ", "{",
          "}", "[", "]", ", ", "'", '"', "&a ", "*a", "<<: ", "? ", "!!int ", "!!float ",
          "!!bool ", "!!timestamp ", "!!binary ", "!!python/name:os.system ", "!foo ", "|",
          ">", "#", "---", "...", "%YAML 1.1", "%TAG ! x", "\t", "1", "-1", "0o17", "1e999",
          "G", "infG", "tar", "x.qcow2", "null", "~", "true", "\x00", "\x85", "\ufeff", "é",
          "\\", "@", "`", "%"]


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _only_user_errors(path: Path, sets: list[str] | None = None) -> None:
    for load in (lambda: load_yaml(path), lambda: load_recipe(path, sets)):
        try:
            load()
        except UserError as e:
            h.one_line(e)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS), max_size=40).map("".join))
def test_fuzz_yaml_token_soup(fuzz_dir: Path, text: str) -> None:
    path = fuzz_dir / "soup.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    _only_user_errors(path)


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(
    lambda t: t.encode("utf-8", "surrogatepass"))))
def test_fuzz_random_bytes(fuzz_dir: Path, raw: bytes) -> None:
    path = fuzz_dir / "random.yaml"
    path.write_bytes(raw)
    _only_user_errors(path)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from(["name", "base", "image", "output",
                                                    "formats", "0", "1", "params", "x",
                                                    "elements", ""]), min_size=1,
                                   max_size=4).map(".".join),
                          st.sampled_from(["", "1", "[a, b]", "{x: 1}", "!!int x", "&a [*a]",
                                           "*a", "[", "x.qcow2", "~", "true"])),
                max_size=4).map(lambda kv: [f"{k}={v}" for k, v in kv]))
def test_fuzz_set_options(fuzz_dir: Path, sets: list[str]) -> None:
    path = fuzz_dir / "base.yaml"
    if not path.exists():
        path.write_text(MINIMAL + "elements: [a]\noutput: {formats: [tar]}\n")
    try:
        load_recipe(path, sets)
    except UserError as e:
        h.one_line(e)


def test_recipe_errors_do_not_depend_on_cwd(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, MINIMAL + "elemnts: []\n")
    first = error_of(path)
    monkeypatch.chdir(tmp_path)
    assert error_of(path) == first
    assert os.path.isabs(first.split(":")[0])
