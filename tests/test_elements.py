"""Elements: resolution through diskimage-builder, element.yaml, typed params,
conditions, and the file layers planned from elements and overlays."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import unit_helpers as h
from unit_helpers import make_element, make_recipe

from builder import elements, filelayers
from builder.element_spec import Condition, ElementSpec
from builder.errors import UserError
from builder.layer import Layer
from builder.recipe import OverlaySpec, load_recipe
from builder.tarfmt import DIR, FIFO, LNK, REG, SYM


@pytest.fixture(autouse=True)
def _no_elements_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ELEMENTS_PATH", raising=False)


def load(root: Path, names: list[str], params: str = "") -> elements.ElementSet:
    return elements.load(load_recipe(make_recipe(root, names, params)))


def error(root: Path, names: list[str], params: str = "") -> str:
    with pytest.raises(UserError) as e:
        load(root, names, params)
    return h.one_line(e.value)


# ---------------------------------------------------------------------------
# resolution


def test_dependencies_come_first(tmp_path: Path) -> None:
    e = tmp_path / "elements"
    make_element(e, "top", deps=["mid", "side"])
    make_element(e, "mid", deps=["leaf"])
    make_element(e, "side", deps=["leaf"])
    make_element(e, "leaf")
    make_element(e, "unused")
    es = load(tmp_path, ["top"])
    assert es.names() == ["rootfs-base", "leaf", "mid", "side", "top"]
    assert es.search_path[0] == tmp_path / "elements"


def test_recipe_elements_dir_is_searched_first(tmp_path: Path) -> None:
    # a local element shadows the project's element of the same name
    make_element(tmp_path / "elements", "qtfs", spec="description: local qtfs\n")
    es = load(tmp_path, ["qtfs"])
    qtfs = es.elements[-1]
    assert qtfs.path == tmp_path / "elements/qtfs"
    assert qtfs.spec == ElementSpec(description="local qtfs")


def test_elements_path_is_searched_after_the_recipe_dir(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    make_element(tmp_path / "elsewhere", "extra")
    monkeypatch.setenv("ELEMENTS_PATH", str(tmp_path / "elsewhere"))
    assert load(tmp_path / "r", ["extra"]).names() == ["rootfs-base", "extra"]


def test_cycles_are_named(tmp_path: Path) -> None:
    e = tmp_path / "elements"
    make_element(e, "a", deps=["b"])
    make_element(e, "b", deps=["c"])
    make_element(e, "c", deps=["a"])
    assert "element dependency cycle: a -> b -> c -> a" in error(tmp_path, ["a"])


def test_self_dependency_is_a_cycle(tmp_path: Path) -> None:
    make_element(tmp_path / "elements", "a", deps=["a"])
    assert "cycle: a -> a" in error(tmp_path, ["a"])


def test_missing_element_names_who_required_it(tmp_path: Path) -> None:
    e = tmp_path / "elements"
    make_element(e, "a", deps=["ghost"])
    msg = error(tmp_path, ["a"])
    assert "element 'ghost' not found (required by element-deps of a)" in msg
    assert str(e) in msg
    msg = error(tmp_path, ["nope"])
    assert f"element 'nope' not found (required by {tmp_path / 'recipe.yaml'}:4)" in msg


def test_provides(tmp_path: Path) -> None:
    e = tmp_path / "elements"
    make_element(e, "impl-a", provides=["virtual"])
    make_element(e, "impl-b", provides=["virtual"])
    make_element(e, "user", deps=["virtual"])
    # a dependency on a virtual element is met by the listed provider
    assert load(tmp_path, ["impl-a", "user"]).names() == ["rootfs-base", "impl-a", "user"]
    msg = error(tmp_path, ["impl-a", "impl-b"])
    assert msg.startswith(f"{tmp_path / 'recipe.yaml'}:4: an element is provided twice: ")
    assert "virtual" in msg and "impl-a" in msg
    msg = error(tmp_path, ["impl-a", "virtual"])
    assert "virtual is listed in the recipe and also provided by impl-a" in msg
    # nothing provides it
    assert "element 'virtual' not found (required by element-deps of user)" in error(
        tmp_path, ["user"])


def test_operating_system_is_provided_once(tmp_path: Path) -> None:
    make_element(tmp_path / "elements", "my-os", provides=["operating-system"])
    assert "operating-system" in error(tmp_path, ["my-os"])


@pytest.mark.parametrize("phase", ["root.d", "extra-data.d", "cleanup.d", "finalise.d",
                                   "block-device.d", "pre-finalise.d"])
def test_host_phases_are_refused(tmp_path: Path, phase: str) -> None:
    make_element(tmp_path / "elements", "a", files={f"{phase}/10-run": "#!/bin/sh\n"})
    msg = error(tmp_path, ["a"])
    assert (f"{tmp_path / 'elements/a' / phase}: phase {phase} of element a would run on "
            "the build host") in msg
    # through a dependency, the message names the chain that pulled it in
    make_element(tmp_path / "elements", "top", deps=["mid"])
    make_element(tmp_path / "elements", "mid", deps=["a"])
    msg = error(tmp_path, ["top"])
    assert f"phase {phase} of element a (pulled in by top -> mid) would run" in msg


def test_run_scripts(tmp_path: Path) -> None:
    make_element(tmp_path / "elements", "a", files={"install.d/20-b": "b", "install.d/10-a": "a",
                                                    "post-install.d/10-c": "c",
                                                    "pre-install.d/01-z": "z"})
    el = load(tmp_path, ["a"]).elements[-1]
    assert [(p, s.name) for p, s in el.run_scripts()] == [
        ("pre-install.d", "01-z"), ("install.d", "10-a"), ("install.d", "20-b"),
        ("post-install.d", "10-c")]


# ---------------------------------------------------------------------------
# element.yaml


@pytest.mark.parametrize(("spec", "line", "needle"), [
    ("description: x\nfils:\n  - {src: a, dest: /a}\n", 2, "unknown key fils"),
    ("files:\n  - src: a\n    dest: /a\n    mdoe: '0644'\n", 4, "unknown key files[0].mdoe"),
    ("params:\n  p: {type: float}\n", 2, "params.p.type"),
    ("params:\n  p:\n    type: str\n    required: maybe\n", 4, "params.p.required"),
    ("files:\n  - {src: a, dest: relative/a}\n", 2, "files[0].dest"),
    ("dirs:\n  - {path: /d, mode: [1]}\n", 2, "dirs[0].mode"),
    ("description: x\ndescription: y\n", 2, "given twice"),
    ("params: &p {}\nrun: *p\n", 2, "run: YAML aliases"),
])
def test_element_yaml_errors_name_file_and_line(tmp_path: Path, spec: str, line: int,
                                                needle: str) -> None:
    d = make_element(tmp_path / "elements", "a", spec=spec)
    msg = error(tmp_path, ["a"])
    assert msg.startswith(f"{d / 'element.yaml'}:{line}: "), msg
    assert needle in msg


def test_element_yaml_must_be_a_mapping(tmp_path: Path) -> None:
    make_element(tmp_path / "elements", "a", spec="- a\n")
    assert "element.yaml must be a mapping" in error(tmp_path, ["a"])


def test_empty_element_yaml(tmp_path: Path) -> None:
    make_element(tmp_path / "elements", "a", spec="# nothing yet\n")
    assert load(tmp_path, ["a"]).elements[-1].spec == ElementSpec()


# ---------------------------------------------------------------------------
# params

TYPED = """\
params:
  ip: {type: ip}
  port: {type: port, default: 7777}
  root: {type: path, default: /another_rootfs}
  mode: {type: enum, values: [prebuilt, source], default: prebuilt}
  peers: {type: list, items: ip, default: []}
  names: {type: list}
  ko: {type: file}
  kos: {type: files}
  tree: {type: dir}
  count: {type: int, default: 3}
  flag: {type: bool, default: false}
  level: {type: enum, values: [NONE, ERROR, WARN, INFO, DEBUG], default: INFO}
  kernel: {type: kernel}
  label: {type: str, required: true}
"""


def test_params_are_typed(tmp_path: Path) -> None:
    make_element(tmp_path / "elements", "typed", spec=TYPED)
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs/qtfs.ko").write_bytes(b"ko")
    es = load(tmp_path, ["typed"], """\
ip: 192.168.1.1
port: "6666"
peers: [10.0.0.1, "::1"]
names: [a, 1]
ko: inputs/qtfs.ko
kos: [inputs/qtfs.ko, /abs/x.ko]
tree: inputs
flag: true
kernel: 5.10.0-60.18.0.50.oe2203.x86_64
label: 7
""")
    p = es.params
    assert p["ip"] == "192.168.1.1"
    assert p["port"] == 6666
    assert p["root"] == "/another_rootfs"
    assert p["mode"] == "prebuilt"
    assert p["peers"] == ["10.0.0.1", "::1"]
    assert p["names"] == ["a", "1"]
    assert p["ko"] == tmp_path / "inputs/qtfs.ko"  # relative to the recipe
    assert p["kos"] == [tmp_path / "inputs/qtfs.ko", Path("/abs/x.ko")]
    assert p["tree"] == tmp_path / "inputs"
    assert (p["count"], p["flag"], p["level"], p["label"]) == (3, True, "INFO", "7")
    assert es.missing_inputs == ["params.kos: /abs/x.ko"]
    assert es.specs["ip"].declared_by == "typed"
    assert elements.required_missing(es) == []


@pytest.mark.parametrize(("given", "needle"), [
    ("ip: dpu.example.com", "params.ip: 'dpu.example.com' is not an IP address"),
    ("port: 70000", "params.port: 70000 is not a port number"),
    ("port: true", "params.port: True is not a port number"),
    ("root: /a b", "params.root: '/a b' is not an absolute path"),
    ("root: relative", "is not an absolute path"),
    ("root: /a/../b", "no '..'"),
    ("mode: binary", "params.mode: 'binary' is not one of prebuilt, source"),
    ("peers: [10.0.0.1, nope]", "params.peers: 'nope' is not an IP address"),
    ("peers: 10.0.0.1", "params.peers: '10.0.0.1' is not a list"),
    ("count: '3'", "params.count: '3' is not an integer"),
    ("flag: 'yes'", "params.flag: 'yes' is not true or false"),
    ("level: LOUD", "params.level: 'LOUD' is not one of NONE, ERROR, WARN, INFO, DEBUG"),
    ("kernel: '5.10 x'", "is not a kernel release"),
    ("ko: ''", "params.ko: '' is not a path"),
    ("label: [a]", "params.label: ['a'] is not a string"),
])
def test_bad_param_values(tmp_path: Path, given: str, needle: str) -> None:
    make_element(tmp_path / "elements", "typed", spec=TYPED)
    msg = error(tmp_path, ["typed"], given)
    assert msg.startswith(f"{tmp_path / 'recipe.yaml'}:6: "), msg
    assert needle in msg


def test_unknown_param_suggests_the_close_one(tmp_path: Path) -> None:
    make_element(tmp_path / "elements", "a", spec="params:\n  host_ip: {type: ip}\n")
    msg = error(tmp_path, ["a"], "host_pi: 10.0.0.1")
    assert msg == (f"{tmp_path / 'recipe.yaml'}:6: unknown param params.host_pi "
                   "(did you mean 'host_ip'?)")
    msg = error(tmp_path, ["a"], "zzz: 1")
    assert "no element in this recipe declares it" in msg


def test_param_declared_twice_with_other_types(tmp_path: Path) -> None:
    e = tmp_path / "elements"
    make_element(e, "a", spec="params:\n  p: {type: ip}\n")
    make_element(e, "b", deps=["a"], spec="params:\n  p: {type: port}\n")
    msg = error(tmp_path, ["b"])
    assert "param p is declared as ip by a and as port by b" in msg
    assert msg.startswith(f"{e / 'b/element.yaml'}:2: ")


def test_enum_needs_values(tmp_path: Path) -> None:
    make_element(tmp_path / "elements", "a", spec="params:\n  p: {type: enum}\n")
    assert "an enum needs 'values'" in error(tmp_path, ["a"])


def test_bad_default_is_reported(tmp_path: Path) -> None:
    d = make_element(tmp_path / "elements", "a",
                     spec="params:\n  p:\n    type: port\n    default: 0\n")
    msg = error(tmp_path, ["a"])
    assert msg == f"{d / 'element.yaml'}:4: params.p: 0 is not a port number (1-65535)"


# ---------------------------------------------------------------------------
# requires and when

RULES = """\
params:
  mode: {type: enum, values: [prebuilt, source, tree], default: prebuilt}
  rpms: {type: files, default: []}
  source: {type: file}
  patches: {type: files, default: []}
  tree: {type: dir}
  a: {type: str}
  b: {type: str}
requires:
  - {when: {param: mode, is: prebuilt}, all_of: [rpms]}
  - when: {param: mode, is: source}
    all_of: [source, patches]
  - when: [{param: mode, in: [tree]}, {param: a, set: false}]
    any_of: [tree, b]
  - any_of: [a, b]
"""


def missing(tmp_path: Path, params: str) -> list[str]:
    make_element(tmp_path / "elements", "rules", spec=RULES)
    recipe = load_recipe(make_recipe(tmp_path, ["rules"], params))
    return elements.required_missing(elements.load(recipe))


def test_requires_all_of_any_of(tmp_path: Path) -> None:
    assert missing(tmp_path, "a: x") == ["params.rpms (because mode is prebuilt)"]
    assert missing(tmp_path, "a: x\nrpms: [x.rpm]") == []
    assert missing(tmp_path, "rpms: [x.rpm]") == ["params.a or params.b"]
    assert missing(tmp_path, "mode: source\nb: y\nsource: s.tar.xz") == [
        "params.patches (because mode is source)"]
    # a list `when` must hold entirely
    assert missing(tmp_path, "mode: tree\nb: y") == []
    assert missing(tmp_path, "mode: tree\na: x") == []
    assert missing(tmp_path, "mode: tree") == ["params.tree or params.b",
                                               "params.a or params.b"]


def test_required_params(tmp_path: Path) -> None:
    make_element(tmp_path / "elements", "a",
                 spec="params:\n  x: {type: str, required: true}\n  y: {type: str}\n")
    recipe = load_recipe(make_recipe(tmp_path, ["a"]))
    assert elements.required_missing(elements.load(recipe)) == ["params.x"]


@pytest.mark.parametrize(("when", "params", "holds"), [
    (None, {}, True),
    ({"param": "m", "is": "a"}, {"m": "a"}, True),
    ({"param": "m", "is": "a"}, {"m": "b"}, False),
    ({"param": "m", "in": ["a", "b"]}, {"m": "b"}, True),
    ({"param": "m", "in": ["a", "b"]}, {"m": None}, False),
    ({"param": "m", "set": True}, {"m": []}, False),
    ({"param": "m", "set": True}, {"m": ["x"]}, True),
    ({"param": "m", "set": False}, {"m": ""}, True),
    ({"param": "m"}, {"m": True}, True),
    ({"param": "m"}, {"m": False}, False),
    ([{"param": "m", "is": 1}, {"param": "n", "is": 2}], {"m": 1, "n": 2}, True),
    ([{"param": "m", "is": 1}, {"param": "n", "is": 2}], {"m": 1, "n": 3}, False),
    ([], {}, True),
])
def test_condition_holds(when: object, params: dict, holds: bool) -> None:
    conds = [] if when is None else when if isinstance(when, list) else [when]
    parsed = tuple(Condition(c["param"], **{{"is": "is_", "in": "in_"}.get(k, k): v
                                            for k, v in c.items() if k != "param"})
                   for c in conds)  # type: ignore[union-attr]
    assert all(c.holds(params) for c in parsed) is holds


def test_when_naming_an_unknown_param(tmp_path: Path) -> None:
    d = make_element(tmp_path / "elements", "a", spec="""\
params:
  x: {type: str}
dirs:
  - {path: /d, when: {param: y, is: 1}}
""")
    msg = error(tmp_path, ["a"])
    assert msg.startswith(f"{d / 'element.yaml'}:4: dirs[0].when: unknown param y"), msg
    d = make_element(tmp_path / "elements", "a", spec="requires:\n  - {any_of: [nope]}\n")
    assert "requires[0]: unknown param nope" in error(tmp_path, ["a"])


# ---------------------------------------------------------------------------
# element content: files, templates, dirs, symlinks


def plan(tmp_path: Path, spec: str, params: str = "", files: dict | None = None,
         name: str = "a") -> filelayers.FilePlan:
    make_element(tmp_path / "elements", name, spec=spec, files=files)
    es = load(tmp_path, [name], params)
    return filelayers.plan_element(es.elements[-1], es)


def by_name(p: filelayers.FilePlan) -> dict[bytes, filelayers.Item]:
    return {i.member.name: i for i in p.items}


TEMPLATED = """\
params:
  host_ip: {type: ip, default: 192.168.1.1}
  port: {type: port, default: 7777}
  note: {type: str, default: "it's a $HOME `x` thing"}
  peers: {type: list, items: ip, default: [10.0.0.1, 10.0.0.2]}
  enabled: {type: bool, default: true}
  unset: {type: str}
templates:
  - {src: run.in, dest: /usr/bin/run, mode: "0755"}
"""

TEMPLATE = """\
#!/bin/bash
set -euo pipefail
addr=@{host_ip}:@{port}
note=@{note_q}
peers=(@{peers_q})
lines='@{peers}'
on=@{enabled} unset=@{unset_q} raw='@{unset}'
exec /usr/bin/real "$@" ${HOME} $1 @@{host_ip} user@host @ @{ @x
"""


def test_templates(tmp_path: Path) -> None:
    p = plan(tmp_path, TEMPLATED, files={"run.in": TEMPLATE})
    item = by_name(p)[b"usr/bin/run"]
    assert item.member.mode == 0o755 and item.member.type == REG
    text = (item.data or b"").decode()
    assert "addr=192.168.1.1:7777\n" in text
    assert "note='it'\"'\"'s a $HOME `x` thing'\n" in text
    assert "peers=(10.0.0.1 10.0.0.2)\nlines='10.0.0.1\n10.0.0.2'\n" in text
    assert "on=true unset='' raw=''\n" in text
    # shell's own syntax and anything that is not @{param} stays as it is
    assert 'exec /usr/bin/real "$@" ${HOME} $1 @{host_ip} user@host @ @{ @x\n' in text
    assert item.member.size == len(item.data or b"")
    # the quoted value survives the shell
    out = subprocess.run(["bash", "-c", text.split("\n")[3] + '\nprintf %s "$note"'],
                         capture_output=True, text=True, check=True).stdout
    assert out == "it's a $HOME `x` thing"


def test_template_with_unknown_param(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"template uses @\{nope\}, which is not a param"):
        plan(tmp_path, "templates:\n  - {src: t.in, dest: /t}\n", files={"t.in": "@{nope}\n"})


def test_file_items(tmp_path: Path) -> None:
    p = plan(tmp_path, """\
params:
  ko: {type: file}
  with_extra: {type: bool, default: false}
files:
  - {src: files/conf, dest: /etc/app.conf}
  - {src: files/tool, dest: /usr/bin/tool, mode: "0750", uid: 0, gid: 10}
  - {src: "@ko", dest: /lib/modules/qtfs.ko}
  - {src: files/extra, dest: /etc/extra, when: {param: with_extra}}
dirs:
  - {path: /var/lib/app}
  - {path: /var/lib/secret, mode: "0700"}
symlinks:
  - {path: /usr/bin/tool2, target: tool}
deletions: [/etc/motd]
""", "ko: inputs/qtfs.ko", files={"files/conf": "a=1\n", "files/tool": b"\x7fELF",
                                  "files/extra": "x", "../../inputs/qtfs.ko": b"ko"})
    items = by_name(p)
    conf = items[b"etc/app.conf"]
    assert (conf.member.mode, conf.member.uid, conf.member.size) == (0o644, 0, 4)
    tool = items[b"usr/bin/tool"].member
    assert (tool.mode, tool.uid, tool.gid) == (0o750, 0, 10)
    assert items[b"lib/modules/qtfs.ko"].path == tmp_path / "inputs/qtfs.ko"
    assert b"etc/extra" not in items  # `when` does not hold
    assert items[b"var/lib/app"].weak and not items[b"var/lib/secret"].weak
    assert items[b"var/lib/secret"].member.mode == 0o700
    assert items[b"usr/bin/tool2"].member.type == SYM
    assert items[b"usr/bin/tool2"].member.linkname == b"tool"
    assert p.deletions == [b"etc/motd"]
    assert str(tmp_path / "inputs/qtfs.ko") in p.inputs


@pytest.mark.parametrize("src", ["../outside", "files/../../outside", "/etc/passwd",
                                 "link-out/x"])
def test_element_sources_stay_in_the_element(tmp_path: Path, src: str) -> None:
    (tmp_path / "outside").write_text("secret")
    d = make_element(tmp_path / "elements", "a", files={"files/x": "x"})
    if src.startswith("link-out"):
        (d / "link-out").symlink_to(tmp_path)
    with pytest.raises(UserError, match="must stay inside the element directory"):
        plan(tmp_path, f"files:\n  - {{src: files/x, dest: /ok}}\n  - {{src: '{src}', dest: /x}}\n")


def test_source_param_must_be_a_file_param(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no file or dir param named p"):
        plan(tmp_path, "params:\n  p: {type: str}\nfiles:\n  - {src: '@p', dest: /x}\n",
             "p: x")
    with pytest.raises(UserError, match="params.f is not set"):
        plan(tmp_path, "params:\n  f: {type: file}\nfiles:\n  - {src: '@f', dest: /x}\n",
             name="b")


@pytest.mark.parametrize("key", ["files", "templates", "dirs", "symlinks", "deletions"])
def test_destinations_with_dotdot_are_refused(tmp_path: Path, key: str) -> None:
    spec = {
        "files": "files:\n  - {src: f, dest: /etc/../../x}\n",
        "templates": "templates:\n  - {src: f, dest: /etc/../../x}\n",
        "dirs": "dirs:\n  - {path: /a/../..}\n",
        "symlinks": "symlinks:\n  - {path: /../x, target: y}\n",
        "deletions": "deletions: [/a/../../b]\n",
    }[key]
    with pytest.raises(UserError, match=r"'\.\.'") as e:
        plan(tmp_path, spec, files={"f": "f"})
    assert str(tmp_path / "elements/a/element.yaml") in h.one_line(e.value)


def test_plan_key_follows_content(tmp_path: Path) -> None:
    spec = "files:\n  - {src: f, dest: /f}\n"
    k1 = plan(tmp_path, spec, files={"f": "one"}).key()
    assert plan(tmp_path, spec, files={"f": "one"}).key() == k1
    k2 = plan(tmp_path, spec, files={"f": "two"}).key()
    assert k2 != k1
    assert plan(tmp_path, spec.replace("/f}", "/g}"), files={"f": "two"}).key() != k2


# ---------------------------------------------------------------------------
# overlays


@pytest.fixture
def overlay_src(tmp_path: Path) -> Iterator[Path]:
    src = tmp_path / "overlay"
    (src / "etc/app").mkdir(parents=True)
    (src / "usr/bin").mkdir(parents=True)
    (src / "etc/app/conf").write_text("conf")
    (src / "etc/app/conf").chmod(0o600)
    (src / "usr/bin/tool").write_text("#!/bin/sh\n")
    (src / "usr/bin/tool").chmod(0o700)
    (src / "usr/bin/setuid").write_text("s")
    (src / "usr/bin/setuid").chmod(0o4775)
    os.link(src / "usr/bin/tool", src / "usr/bin/tool-hard")
    os.link(src / "usr/bin/tool", src / "etc/app/a-hard")
    (src / "etc/app/link").symlink_to("/etc/passwd")
    (src / "etc/app/dirlink").symlink_to(tmp_path)  # never followed
    (src / "etc/app/dangling").symlink_to("nowhere")
    os.mkfifo(src / "etc/app/fifo")
    if os.geteuid() == 0:
        for p in [src, *src.rglob("*")]:
            os.lchown(p, 1234, 1234)
    yield src


def test_overlay_plan(overlay_src: Path) -> None:
    p = filelayers.plan_overlay(OverlaySpec(path=overlay_src), 0, "recipe.yaml:5")
    items = by_name(p)
    m = {n: i.member for n, i in items.items()}
    assert m[b"etc/app/conf"].mode == 0o644  # 0600 in the checkout: normalized
    assert m[b"etc/app/a-hard"].mode == 0o755  # the data of usr/bin/tool (0700)
    assert m[b"usr/bin/setuid"].mode == 0o755
    assert all(x.uid == 0 and x.gid == 0 for x in m.values())  # owners are root
    assert m[b"etc/app/link"].type == SYM and m[b"etc/app/link"].linkname == b"/etc/passwd"
    assert m[b"etc/app/dirlink"].type == SYM
    assert not [n for n in m if n.startswith(b"etc/app/dirlink/")]
    assert m[b"etc/app/dangling"].linkname == b"nowhere"
    assert m[b"etc/app/fifo"].type == FIFO
    # hard links: the first name in rootfs order holds the data
    assert m[b"etc/app/a-hard"].type == REG
    assert (m[b"usr/bin/tool"].type, m[b"usr/bin/tool"].linkname) == (LNK, b"etc/app/a-hard")
    assert m[b"usr/bin/tool-hard"].linkname == b"etc/app/a-hard"
    assert m[b"etc"].type == DIR and items[b"etc"].weak
    assert b"" not in m  # the overlay root says nothing about /


def test_overlay_modes_owners_and_dest(overlay_src: Path) -> None:
    ov = OverlaySpec(path=overlay_src, dest="/opt/x", uid=5, gid=6,
                 modes={"etc/app/conf": 0o640, "usr/bin/*": 0o4711, "etc": 0o750})
    p = filelayers.plan_overlay(ov, 1, "recipe.yaml:5")
    items = by_name(p)
    m = {n: i.member for n, i in items.items()}
    assert m[b"opt/x/etc/app/conf"].mode == 0o640
    assert m[b"opt/x/usr/bin/setuid"].mode == 0o4711
    assert m[b"opt/x/etc"].mode == 0o750 and not items[b"opt/x/etc"].weak
    assert items[b"opt/x/usr"].weak
    assert all((x.uid, x.gid) == (5, 6) for x in m.values())
    assert m[b"opt/x/usr/bin/tool"].linkname == b"opt/x/etc/app/a-hard"


def test_overlay_written_as_a_layer(overlay_src: Path, tmp_path: Path) -> None:
    p = filelayers.plan_overlay(OverlaySpec(path=overlay_src), 0, "recipe.yaml:5")
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    p.write(work)
    stack = h.Stack(tmp_path / "stack")
    try:
        stack.layer([h.dir_(""), h.dir_("etc", mode=0o700)])
        stack.layers.append(Layer(work, "overlays[0]"))
        data, _ = stack.output()
    finally:
        stack.close()
    v = h.tarfile_view(data)
    assert v.entries[b"etc"].mode == 0o700  # overlay dirs are weak
    assert v.entries[b"etc/app/a-hard"].content == b"#!/bin/sh\n"
    assert v.entries[b"usr/bin/tool"] == h.Entry("lnk", link=b"etc/app/a-hard")
    assert all(v.mtimes[n] == h.EPOCH for n in v.order)


def test_overlay_refuses_sockets(tmp_path: Path) -> None:
    src = tmp_path / "ov"
    src.mkdir()
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(src / "sock"))
        with pytest.raises(UserError, match="sockets"):
            filelayers.plan_overlay(OverlaySpec(path=src), 0, "here")
    finally:
        sock.close()


def test_overlay_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="overlay directory not found"):
        filelayers.plan_overlay(OverlaySpec(path=tmp_path / "nope"), 0, "here")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="must be a directory"):
        filelayers.plan_overlay(OverlaySpec(path=tmp_path / "file"), 0, "here")
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(UserError, match="must be a directory"):
        filelayers.plan_overlay(OverlaySpec(path=tmp_path / "link"), 0, "here")


def test_element_trees(tmp_path: Path) -> None:
    p = plan(tmp_path, "trees:\n  - {src: tree, dest: /srv, uid: 3}\n",
             files={"tree/a/b": "b", "tree/x": "x"})
    m = {n: i.member for n, i in by_name(p).items()}
    assert set(m) == {b"srv/a", b"srv/a/b", b"srv/x"}
    assert all(x.uid == 3 for x in m.values())


def test_template_values_keep_list_items_apart() -> None:
    vals = filelayers.template_values({"a": "x y", "b": None, "c": [1, "two words"],
                                       "d": False, "e": 5})
    assert vals == {"a": "x y", "a_q": "'x y'", "b": "", "b_q": "''",
                    "c": "1\ntwo words", "c_q": "1 'two words'", "d": "false", "d_q": "false",
                    "e": "5", "e_q": "5"}
    assert shlex.split(vals["a_q"]) == ["x y"]
    # a bash array of a list param has one element per item, spaces and all
    out = subprocess.run(["bash", "-c", f'arr=({vals["c_q"]}); printf "%s|" "${{arr[@]}}"'],
                         capture_output=True, text=True, check=True).stdout
    assert out == "1|two words|"
    assert vals["c"].splitlines() == ["1", "two words"]
