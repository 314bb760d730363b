"""The element model: declarations that one generic mechanism acts on,
cache keys that do not depend on where things are, and the defects a review
of the pipeline found (each test here failed before its fix)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import unit_helpers as h
from bad_input_helpers import refused
from conftest import Build, read_tar, run_cli, write_recipe
from reliability_helpers import copy_cache
from unit_helpers import make_element, make_recipe

from builder import checks, elements, outputs, sampleimage
from builder.errors import UserError
from builder.recipe import load_recipe


@pytest.fixture(autouse=True)
def _no_elements_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ELEMENTS_PATH", raising=False)


def _error(fn: object) -> str:
    with pytest.raises(UserError) as e:
        fn()  # type: ignore[operator]
    return h.one_line(e.value)


# ---------------------------------------------------------------------------
# output directory: one name never touches another's files; a failed build
# leaves -o DIR as it found it


def test_a_build_never_removes_the_staging_of_another_name(tmp_path: Path) -> None:
    """`demo` and `demo.v2` into one output root: starting `demo` used to
    delete the live staging directory of `demo.v2` (its cleanup glob
    `.demo.*-*` matched `.demo.v2.staging-*`)."""
    v2 = outputs.OutputDir(tmp_path, "demo.v2")
    (v2.staging / "rootfs.tar").write_bytes(b"half written")
    held = sorted(p.name for p in tmp_path.iterdir())
    demo = outputs.OutputDir(tmp_path, "demo")
    try:
        assert (v2.staging / "rootfs.tar").read_bytes() == b"half written"
        assert set(held) <= {p.name for p in tmp_path.iterdir()}
    finally:
        demo.close()
        v2.close()
    assert list(tmp_path.iterdir()) == []  # both left nothing behind


def test_a_build_that_fails_early_leaves_no_output_root(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", f"name: t\nbase: {{image: {tmp_path}/none}}\n")
    res = run_cli(recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache", "--json")
    refused(res, tmp_path / "out", "base image", "not found")
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    res = run_cli(recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert res.returncode != 0 and list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------------------
# modes are octal text


def test_a_bare_integer_mode_is_refused_in_an_element(tmp_path: Path) -> None:
    """`mode: 755` used to become 0o1363 silently, `644` 0o1204."""
    d = make_element(tmp_path / "elements", "a",
                     spec="files:\n  - {src: f, dest: /f, mode: 755}\n", files={"f": "x"})
    msg = _error(lambda: elements.load(load_recipe(make_recipe(tmp_path, ["a"]))))
    assert msg.startswith(f"{d / 'element.yaml'}:2: files[0].mode: 755 is a number"), msg
    assert "'0755'" in msg


# ---------------------------------------------------------------------------
# declared checks act for any element


def _module_element(tmp_path: Path, kernel: str) -> Path:
    make_element(tmp_path / "elements", "mymod", spec="""\
params:
  mod: {type: file, vermagic: kern}
  kern: {type: kernel}
  tool: {type: file, elf_arch: true}
""")
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs/m.ko").write_bytes(sampleimage.fake_module("m", "6.1.0-18-arm64"))
    (tmp_path / "inputs/tool").write_bytes(sampleimage.fake_module("t", "x"))  # an x86_64 ELF
    return make_recipe(tmp_path, ["mymod"],
                       f"mod: inputs/m.ko\nkern: {kernel}\ntool: inputs/tool")


def test_vermagic_declared_by_any_element_is_checked(tmp_path: Path) -> None:
    recipe = load_recipe(_module_element(tmp_path, "6.6.0"))
    es = elements.load(recipe)
    msg = _error(lambda: checks.check_kernel_modules(es))
    assert msg.startswith(f"{recipe.path}:6: params.mod: "), msg  # the line of mod:
    assert "was built for kernel 6.1.0-18-arm64, but kern is 6.6.0" in msg
    ok = elements.load(load_recipe(_module_element(tmp_path / "b", "6.1.0-18-arm64")))
    checks.check_kernel_modules(ok)


def test_elf_arch_declared_by_any_element_is_checked(tmp_path: Path) -> None:
    es = elements.load(load_recipe(_module_element(tmp_path, "6.1.0-18-arm64")))
    checks.check_elf_arch(es, "x86_64")
    msg = _error(lambda: checks.check_elf_arch(es, "aarch64"))
    assert "params.tool:" in msg and "is built for x86_64, but the rootfs is aarch64" in msg


def test_a_check_on_a_param_that_is_not_a_file_is_refused(tmp_path: Path) -> None:
    make_element(tmp_path / "elements", "a", spec="params:\n  p: {type: str, elf_arch: true}\n")
    msg = _error(lambda: elements.load(load_recipe(make_recipe(tmp_path, ["a"]))))
    assert "params.p: elf_arch and vermagic apply to file params" in msg


# ---------------------------------------------------------------------------
# generated outputs only where an element asks for them


def test_mounts_without_a_deployment_are_refused(tmp_path: Path) -> None:
    make_element(tmp_path / "elements", "m",
                 spec="mounts:\n  - {type: tmpfs, target: /scratch}\n")
    image = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    recipe = make_recipe(tmp_path, ["m"])
    recipe.write_text(recipe.read_text().replace("base.qcow2", str(image)))
    res = run_cli(recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache", "--json")
    refused(res, tmp_path / "out", "element m adds a deployment mount, but no element",
            launches=0)


def test_unknown_generator_is_refused(tmp_path: Path) -> None:
    make_element(tmp_path / "elements", "g", spec="generate: [nope]\n")
    image = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    recipe = make_recipe(tmp_path, ["g"])
    recipe.write_text(recipe.read_text().replace("base.qcow2", str(image)))
    res = run_cli(recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache", "--json")
    refused(res, tmp_path / "out", "unknown generator 'nope'", "offload-deployment",
            launches=0)


@pytest.mark.appliance
def test_only_an_element_that_asks_gets_the_deployment(tmp_path: Path, demo_inputs: Path,
                                                        demo_build: Build) -> None:
    """A recipe with qemu-kvm-shim alone (it has a host_ip param) used to get
    the whole deployment and bundle."""
    recipe = tmp_path / "shim.yaml"
    recipe.write_text(f"""\
name: shim
base: {{image: {demo_inputs.parent / "demo-inputs" / "openEuler-22.03-LTS-demo-x86_64.qcow2"}}}
epoch: 1700000000
elements: [qemu-kvm-shim]
params: {{host_ip: 10.1.2.3}}
""")
    res = run_cli(recipe, "-o", tmp_path / "out", "--cache-dir", demo_build.cache, "--json")
    assert res.returncode == 0, res.stderr
    assert res.json["appliance_launches"] == 0  # the base layer is the demo's
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["shim"]
    assert sorted(p.name for p in (out / "shim").iterdir()) == [
        "SHA256SUMS", "manifest.json", "rootfs.tar"]
    assert json.loads((out / "shim/manifest.json").read_text())["generated"] == {}
    shim = read_tar(out / "shim/rootfs.tar")["./usr/bin/qemu-kvm"][1]
    assert shim is not None and b"host=10.1.2.3" in shim


# ---------------------------------------------------------------------------
# cache keys are content, not places; params reach scripts item by item

SCRIPT = """\
#!/bin/bash
set -eu
mkdir -p /var/lib/probe
printf '%s' "$PARAM_WORDS" > /var/lib/probe/words
cat "$PARAM_DATA" > /var/lib/probe/data
mapfile -t items <<< "$PARAM_WORDS"
echo "${#items[@]}" > /var/lib/probe/count
"""


def _probe_area(root: Path, demo_inputs: Path) -> Path:
    make_element(root / "elements", "probe", spec="""\
params:
  words: {type: list, default: []}
  data: {type: file}
""", files={"install.d/50-probe": SCRIPT})
    (root / "elements/probe/install.d/50-probe").chmod(0o755)
    (root / "inputs").mkdir(parents=True)
    (root / "inputs/data.txt").write_text("file param content\n")
    shutil.copy(demo_inputs.parent / "demo-inputs" / "openEuler-22.03-LTS-demo-x86_64.qcow2",
                root / "inputs/base.qcow2")
    return write_recipe(root / "probe.yaml", """\
name: probe
base: {image: inputs/base.qcow2}
epoch: 1700000000
elements: [probe]
params:
  words: [one, two words, "three  spaced"]
  data: inputs/data.txt
""")


@pytest.mark.appliance
def test_moving_the_inputs_keeps_every_cache_key(tmp_path: Path, demo_inputs: Path,
                                                 demo_build: Build) -> None:
    """A run step's key used to hold the build host's absolute paths of its
    file params, so moving a checkout rebuilt the most expensive layer."""
    cache = copy_cache(demo_build.cache, tmp_path / "cache")  # the base layer is cached
    first = _probe_area(tmp_path / "a", demo_inputs)
    res = run_cli(first, "-o", tmp_path / "a/out", "--cache-dir", cache, "--json")
    assert res.returncode == 0, res.stderr
    assert [la["kind"] for la in res.json["layers"]] == ["base", "run"]
    tar = read_tar(tmp_path / "a/out/probe/rootfs.tar")
    # a list param keeps its items apart; a file param arrives as a file
    assert tar["./var/lib/probe/words"][1] == b"one\ntwo words\nthree  spaced"
    assert tar["./var/lib/probe/count"][1] == b"3\n"
    assert tar["./var/lib/probe/data"][1] == b"file param content\n"
    assert not [n for n in tar if n.startswith("./tmp/") and n != "./tmp/"]

    shutil.move(tmp_path / "a", tmp_path / "elsewhere")
    moved = tmp_path / "elsewhere/probe.yaml"
    again = run_cli(moved, "-o", tmp_path / "out2", "--cache-dir", cache, "--json")
    assert again.returncode == 0, again.stderr
    assert again.json["appliance_launches"] == 0
    assert [la["key"] for la in again.json["layers"]] == [la["key"] for la in res.json["layers"]]
    assert ((tmp_path / "out2/probe/rootfs.tar").read_bytes()
            == (tmp_path / "elsewhere/out/probe/rootfs.tar").read_bytes())
    # the content of a file param is part of the key
    (tmp_path / "elsewhere/inputs/data.txt").write_text("other\n")
    changed = run_cli(moved, "-o", tmp_path / "out3", "--cache-dir", cache, "--json")
    assert changed.returncode == 0, changed.stderr
    assert changed.json["layers"][-1]["cache"] == "built"


# ---------------------------------------------------------------------------
# ACLs: one canonical form, so images of a base with ACLs can be written


@pytest.mark.appliance
def test_a_base_with_acls_becomes_a_raw_image(fixture_build: Build, tmp_path: Path) -> None:
    """The fixture image has a POSIX ACL on /srv/acl (as a stock Debian
    systemd rootfs has on /var/log/journal).  Extraction used to record it
    twice, and the ext4 writer refused the raw xattr copy."""
    res = run_cli(fixture_build.recipe, "-o", tmp_path / "out", "--cache-dir",
                  fixture_build.cache, "--json", "--set", "output.formats=[raw]")
    assert res.returncode == 0, res.stderr
    assert res.json["appliance_launches"] == 0
    raw = tmp_path / "out/tricky/rootfs.raw"
    listed = subprocess.run(["debugfs", "-R", "ea_list /srv/acl", str(raw)],
                            capture_output=True, text=True, check=True).stdout
    assert "system.posix_acl_access" in listed, listed
