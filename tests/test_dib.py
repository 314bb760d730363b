"""diskimage-builder compatibility: DIB's execution model for the in-rootfs
phases (phase by phase across elements, dib-run-parts' rules,
environment.d, bin/, static/, the hooks tree, DIB's variables), and nothing
in an element ignored silently."""

from __future__ import annotations

from pathlib import Path

import pytest
import unit_helpers as h
from conftest import Build, read_tar, run_cli, write_recipe
from unit_helpers import make_element, make_recipe

from builder import elements, steps
from builder.errors import UserError
from builder.recipe import load_recipe


@pytest.fixture(autouse=True)
def _no_elements_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ELEMENTS_PATH", raising=False)


def _error(root: Path, names: list[str]) -> str:
    with pytest.raises(UserError) as e:
        elements.load(load_recipe(make_recipe(root, names)))
    return h.one_line(e.value)


def test_run_parts_order_is_numeric_then_bytewise() -> None:
    names = ["100-b", "9-a", "10-c", "a", "09-z", "10-b", "Z", "-1-neg"]
    assert steps.run_parts_order(names) == ["-1-neg", "Z", "a", "09-z", "9-a", "10-b",
                                            "10-c", "100-b"]


def test_a_script_name_in_two_elements_is_refused(tmp_path: Path) -> None:
    e = tmp_path / "elements"
    make_element(e, "one", files={"install.d/50-x": "#!/bin/bash\n"})
    make_element(e, "two", files={"install.d/50-x": "#!/bin/bash\n"})
    recipe = load_recipe(make_recipe(tmp_path, ["one", "two"]))
    es = elements.load(recipe)
    ctx = steps.StepContext(recipe, None, None, None, 2)  # type: ignore[arg-type]
    with pytest.raises(UserError) as err:
        steps.PhasesStep.plan(es, ctx)
    msg = h.one_line(err.value)
    assert "element two and element one both have install.d/50-x" in msg
    assert "diskimage-builder refuses duplicated hooks too" in msg


@pytest.mark.parametrize(("entry", "needle"), [
    ("svc-map", "uses svc-map, which rootfs-build does not support"),
    ("source-repository-foo", "uses source-repository*, which rootfs-build does not support"),
    ("binary-deps.d/x", "uses binary-deps.d"),
    ("notes.txt", "has notes.txt, which rootfs-build would not use"),
    ("extra/data", "has extra, which rootfs-build would not use"),
])
def test_nothing_in_an_element_is_ignored(tmp_path: Path, entry: str, needle: str) -> None:
    make_element(tmp_path / "elements", "a", files={entry: "x"})
    msg = _error(tmp_path, ["a"])
    assert msg.startswith(str(tmp_path / "elements/a" / entry.split("/")[0])), msg
    assert needle in msg


def test_what_an_element_may_hold(tmp_path: Path) -> None:
    # documentation and DIB's test files are allowed; data next to scripts
    # is for the scripts; files element.yaml names are placed
    make_element(tmp_path / "elements", "a", spec="files:\n  - {src: conf/x, dest: /x}\n",
                 files={"README.rst": "doc", "test-elements/t/README.rst": "t",
                        "conf/x": "x"})
    make_element(tmp_path / "elements", "b", files={"install.d/10-s": "#!/bin/bash\n",
                                                    "udev.d/rules": "data the script reads"})
    assert elements.load(load_recipe(make_recipe(tmp_path, ["a", "b"]))).names()[-2:] == [
        "a", "b"]


def test_an_operating_system_from_a_dependency_names_the_chain(tmp_path: Path) -> None:
    e = tmp_path / "elements"
    make_element(e, "distro", provides=["operating-system"])
    make_element(e, "tools", deps=["distro"])
    make_element(e, "app", deps=["tools"])
    msg = _error(tmp_path, ["app"])
    assert "operating-system is provided by distro (pulled in by app -> tools)" in msg
    assert "the base image is the operating system" in msg


# ---------------------------------------------------------------------------
# the execution model, in the appliance

LOG = "/var/lib/dib-test/log"


def _script(body: str) -> str:
    return "#!/bin/bash\nset -eu\n" + body


def _dib_elements(root: Path) -> Path:
    e = root / "elements"
    a = make_element(e, "order-a", files={
        "pre-install.d/10-pre-a": _script(f"mkdir -p /var/lib/dib-test\necho pre-a >> {LOG}\n"),
        "install.d/9-a": _script(f"echo 9-a >> {LOG}\n"),
        "install.d/100-b": _script(f"echo 100-b >> {LOG}\n"),
        "install.d/x.sh": _script(f"echo x.sh >> {LOG}\n"),
        "install.d/not-executable": _script(f"echo not-executable >> {LOG}\n"),
        "install.d/data.txt": "data next to the scripts\n",
        "install.d/50-data-and-env": _script(
            'cat "$(dirname "$0")/data.txt" > /var/lib/dib-test/data\n'
            "helper-tool > /var/lib/dib-test/helper\n"
            "for v in DIB_RELEASE DISTRO_NAME ARCH TMP_HOOKS_PATH FROM_ENV_D root RUNLEVEL "
            "PARAM_GREETING SOURCE_DATE_EPOCH; do\n"
            '  echo "$v=${!v-unset}"\ndone > /var/lib/dib-test/env\n'),
        "post-install.d/10-post-a": _script(f"echo post-a >> {LOG}\n"),
        "environment.d/10-vars": "export FROM_ENV_D=sourced\n",
        "bin/helper-tool": _script("echo helper ran from bin\n"),
        "static/usr/share/dib-test/static.txt": "static content\n",
    }, spec="params:\n  greeting: {type: str, default: hello there}\n")
    for p in ("pre-install.d/10-pre-a", "install.d/9-a", "install.d/100-b", "install.d/x.sh",
              "install.d/50-data-and-env", "post-install.d/10-post-a", "bin/helper-tool"):
        (a / p).chmod(0o755)
    b = make_element(e, "order-b", files={
        "pre-install.d/20-pre-b": _script(f"echo pre-b >> {LOG}\n"),
        "install.d/60-b": _script(f"echo 60-b >> {LOG}\n"),
    })
    for p in ("pre-install.d/20-pre-b", "install.d/60-b"):
        (b / p).chmod(0o755)
    return e


# Real elements of the installed diskimage-builder (not copies), with a small
# element of ours making the directories they expect in a real distribution.
DIB_ELEMENTS = ["selinux-permissive", "disable-selinux", "journal-to-console",
                "cloud-init-nocloud", "install-bin", "sysctl"]


def _recipe(root: Path, image: Path, order: list[str]) -> Path:
    make_element(root / "elements", "distro-dirs",
                 spec="dirs:\n  - {path: /etc/selinux}\n  - {path: /etc/cloud/cloud.cfg.d}\n"
                      "  - {path: /usr/local/bin}\n")
    return write_recipe(root / "dib.yaml", f"""\
name: dib
base: {{image: {image}}}
epoch: 1700000000
elements: [distro-dirs, {", ".join(order)}]
dib_env: {{DIB_RELEASE: testrel}}
""")


@pytest.mark.appliance
def test_phases_run_across_elements_as_dib_runs_them(tmp_path: Path, demo_inputs: Path,
                                                      demo_build: Build) -> None:
    image = demo_inputs.parent / "demo-inputs" / "openEuler-22.03-LTS-demo-x86_64.qcow2"
    _dib_elements(tmp_path)
    first = _recipe(tmp_path, image, ["order-a", "order-b", *DIB_ELEMENTS])
    res = run_cli(first, "-o", tmp_path / "out", "--cache-dir", demo_build.cache, "--json")
    assert res.returncode == 0, res.stderr
    assert res.json["appliance_launches"] == 1  # the base layer is the demo's
    tar = read_tar(tmp_path / "out/dib/rootfs.tar")
    # phase by phase across both elements; dib-run-parts order and names
    assert tar["./var/lib/dib-test/log"][1] == b"pre-a\npre-b\n9-a\n60-b\n100-b\npost-a\n"
    assert tar["./var/lib/dib-test/data"][1] == b"data next to the scripts\n"
    assert tar["./var/lib/dib-test/helper"][1] == b"helper ran from bin\n"
    env = dict(line.split("=", 1) for line in
               tar["./var/lib/dib-test/env"][1].decode().splitlines())  # type: ignore[union-attr]
    assert env == {"DIB_RELEASE": "testrel", "DISTRO_NAME": "openeuler", "ARCH": "amd64",
                   "TMP_HOOKS_PATH": "/tmp/in_target.d", "FROM_ENV_D": "sourced",
                   "root": "unset", "RUNLEVEL": "unset", "PARAM_GREETING": "hello there",
                   "SOURCE_DATE_EPOCH": "1700000000"}
    assert tar["./usr/share/dib-test/static.txt"][1] == b"static content\n"
    # diskimage-builder's own elements did what they do in DIB: selinux-
    # permissive (pre-install) then disable-selinux (post-install) gives
    # "disabled" whatever the recipe's order; cloud-init-nocloud's
    # environment.d reaches cloud-init-datasources' script; install-bin
    # installs every element's bin/ (sysctl's helpers among them)
    selinux = tar["./etc/selinux/config"][1]
    assert selinux == b"SELINUX=disabled\nSELINUXTYPE=targeted\n", selinux
    assert tar["./etc/systemd/journald.conf.d/log-to-console.conf"][1] == (
        b"[Journal]\nForwardToConsole=true\n")
    assert b"NoCloud" in tar["./etc/cloud/cloud.cfg.d/91-dib-cloud-init-datasources.cfg"][1]
    assert "./var/lib/cloud/seed/nocloud/meta-data" in tar
    sysctl = tar["./usr/local/bin/sysctl-set-value"][0]
    assert sysctl.mode == 0o755  # type: ignore[attr-defined]
    # the hooks tree stays out of the rootfs
    assert not [n for n in tar if n.startswith("./tmp/") and n != "./tmp/"]
    # the recipe's element order does not change what the scripts do: the
    # plan is the same (same keys, no appliance) and so are the bytes
    (tmp_path / "b").mkdir()
    (tmp_path / "b/elements").symlink_to(tmp_path / "elements")
    second = _recipe(tmp_path / "b", image, [*reversed(DIB_ELEMENTS), "order-b", "order-a"])
    again = run_cli(second, "-o", tmp_path / "out-b", "--cache-dir", demo_build.cache, "--json")
    assert again.returncode == 0, again.stderr
    assert again.json["appliance_launches"] == 0
    run_keys = [la["key"] for la in again.json["layers"] if la["kind"] == "run"]
    assert run_keys == [la["key"] for la in res.json["layers"] if la["kind"] == "run"]
    assert ((tmp_path / "out-b/dib/rootfs.tar").read_bytes()
            == (tmp_path / "out/dib/rootfs.tar").read_bytes())


# ---------------------------------------------------------------------------
# package-installs.yaml and pkg-map, read with DIB's semantics

PACKAGE_INSTALLS = """\
libxml2:
grub2:
  phase: pre-install.d
networkmanager:
  uninstall: True
gcc:
  build-only: True
linux-image-amd64:
  arch: amd64
dmidecode:
  not-arch: arm64, ppc64el
os-collect-config:
  installtype: package
package-a:
  when: DIB_USE_A = 1
package-b:
  when: DIB_USE_A != 1
py2-only:
  dib_python_version: 2
"""

PKG_MAP = """{
  "default": {"libxml2": "libxml2-default", "gcc": "gcc gcc-c++"},
  "family": {"redhat": {"libxml2": "libxml2-rh"}},
  "distro": {"openeuler": {"dmidecode": ""}},
  "release": {"openeuler": {"22.03-LTS": {"libxml2": "libxml2-oe2203"}}}
}"""


def test_package_installs_follow_dib(tmp_path: Path) -> None:
    from builder import dib_packages
    d = make_element(tmp_path, "pk", files={"package-installs.yaml": PACKAGE_INSTALLS,
                                            "pkg-map": PKG_MAP})
    env = {"ARCH": "amd64", "DISTRO_NAME": "openeuler", "DIB_RELEASE": "22.03-LTS",
           "DIB_DEFAULT_INSTALLTYPE": "source", "DIB_USE_A": "1"}
    got = dib_packages.read_element("pk", d, env)
    assert got is not None
    phases = {p: (v.install, v.uninstall) for p, v in got.phases.items()}
    assert phases == {
        "pre-install.d": (["grub2"], []),
        "install.d": (["libxml2", "gcc", "linux-image-amd64", "dmidecode", "package-a"],
                      ["networkmanager", "gcc"]),
        "post-install.d": ([], []),
    }
    # the most specific pkg-map section wins; "" drops a name; unmapped pass
    assert dib_packages.map_names("pk", d, phases["install.d"][0], env) == [
        "libxml2-oe2203", "gcc", "gcc-c++", "linux-image-amd64", "package-a"]
    on_arm = dib_packages.read_element("pk", d, {**env, "ARCH": "arm64", "DIB_USE_A": "0"})
    assert on_arm is not None
    assert on_arm.phases["install.d"].install == ["libxml2", "gcc", "package-b"]
    with pytest.raises(UserError) as e:
        dib_packages.read_element("pk", d, {k: v for k, v in env.items() if k != "DIB_USE_A"})
    assert "when: DIB_USE_A is not set" in h.one_line(e.value)
    assert f"{d / 'package-installs.yaml'}:14:" in h.one_line(e.value)
    (d / "package-installs.yaml").write_text("x:\n  phse: install.d\n")
    with pytest.raises(UserError) as e:
        dib_packages.read_element("pk", d, env)
    assert "x: unknown option 'phse'" in h.one_line(e.value)
