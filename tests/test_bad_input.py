"""Bad input catalog: each case runs the real CLI and must fail with exactly
one line (no traceback) that names the file:line, key or path and ends with
what to do, publish nothing in the output root, and, where the problem can be
seen without the appliance, start none.

Function-level checks of the same loaders live in test_recipe.py and
test_elements.py; wrong-architecture inputs in test_offload.py.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bad_input_helpers import (
    demo_image,
    demo_recipe,
    refused,
    run_in_mount_namespace,
    write_element,
)
from conftest import Build, run_cli, write_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder import elements, sampleimage, values
from builder.errors import UserError
from builder.recipe import load_recipe

PLAIN = "name: t\nbase: {image: img.qcow2}\n"


def _cli(recipe: Path, tmp: Path, *extra: str | Path, cache: Path | None = None):
    return run_cli(recipe, "-o", tmp / "out", "--cache-dir", cache or tmp / "cache", "--json",
                   *extra, timeout=300)


# ---------------------------------------------------------------------------
# the recipe

BOMB = "".join(
    ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"]
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10)]) + PLAIN

# case -> (recipe content, or None for no file; needles with {r} = the recipe path)
RECIPES: dict[str, tuple[str | bytes | None, list[str]]] = {
    "yaml syntax": (PLAIN + "elements: [a, b\n", ["{r}:4:", "invalid YAML"]),
    "wrong type": (PLAIN + "epoch: soon\n", ["{r}:3:", "epoch", "integer"]),
    "wrong nested type": (PLAIN + "output:\n  formats: tar\n", ["{r}:4:", "output.formats"]),
    "scalar for a mapping": ("name: t\nbase: img.qcow2\n", ["{r}:2:", "base"]),
    "unknown top-level key": (PLAIN + "elemnts: []\n", ["{r}:3:", "unknown key elemnts",
                                                       "did you mean 'elements'"]),
    "unknown nested key": (PLAIN + "output:\n  formats: [tar]\n  compress: yes\n",
                           ["{r}:5:", "unknown key output.compress"]),
    "missing name": ("base: {image: img.qcow2}\n", ["{r}:1:", "name is required"]),
    "missing base.image": ("name: t\nbase: {arch: x86_64}\n", ["{r}:2:", "base.image is required"]),
    "extra field in base": ("name: t\nbase: {image: a.qcow2, size: 10G}\n",
                            ["{r}:2:", "unknown key base.size"]),
    "extra field in an overlay": (PLAIN + "overlays:\n  - {path: o, dest: /srv, owner: root}\n",
                                  ["{r}:4:", "overlays[0]"]),
    "name ../x": ("name: ../x\nbase: {image: img.qcow2}\n", ["{r}:1:", "'../x'"]),
    "name with a space": ("name: a b\nbase: {image: img.qcow2}\n", ["{r}:1:", "'a b'"]),
    "alias bomb": (BOMB, ["{r}:2:", "l1[0]: YAML aliases are not allowed"]),
    "non-UTF-8": (b"name: t\nbase: {image: caf\xe9.qcow2}\n", ["{r}:2:", "UTF-8"]),
    "empty file": ("", ["{r}", "name is required"]),
    "a directory": (None, ["{r}", "is a directory"]),
    "missing file": (None, ["{r}", "not found"]),
}


@pytest.mark.parametrize("case", list(RECIPES))
def test_bad_recipe(tmp_path: Path, case: str) -> None:
    content, needles = RECIPES[case]
    recipe = tmp_path / "recipe.yaml"
    if case == "a directory":
        recipe.mkdir()
    elif isinstance(content, bytes):
        recipe.write_bytes(content)
    elif content is not None:
        recipe.write_text(content)
    res = _cli(recipe, tmp_path)
    refused(res, tmp_path / "out", *(n.format(r=recipe) for n in needles))
    assert not (tmp_path / "x").exists()  # name: ../x


# ---------------------------------------------------------------------------
# elements

# case -> (elements: line, {element: (element.yaml, {file: content})}, needles)
ELEMENTS: dict[str, tuple[str, dict[str, tuple[str | None, dict[str, str]]], list[str]]] = {
    "missing element": ("[no-such-element]", {}, [
        "element 'no-such-element' not found (required by {r}:3)"]),
    "dependency cycle": ("[a]", {"a": (None, {"element-deps": "b\n"}),
                                 "b": (None, {"element-deps": "a\n"})},
                         ["cycle: a -> b -> a", "{e}/a/element-deps"]),
    "element.yaml syntax": ("[broken]", {"broken": ("files:\n  - {src: a, dest: /a\n", {})},
                            ["{e}/broken/element.yaml:3:", "invalid YAML"]),
    "element.yaml unknown key": ("[typo]", {"typo": ("description: x\nfils: []\n", {})},
                                 ["{e}/typo/element.yaml:2:", "unknown key fils"]),
    "element.yaml bad param type": ("[p]", {"p": ("params:\n  port: {type: float}\n", {})},
                                    ["{e}/p/element.yaml:2:", "params.port.type"]),
    "element.yaml bad default": ("[d]", {"d": ("params:\n  port: {type: port, default: "
                                               "lots}\n", {})},
                                 ["{e}/d/element.yaml:2:", "params.port", "'lots'"]),
    "missing element file": ("[f]", {"f": ("files:\n  - {src: nope, dest: /etc/nope}\n", {})},
                             ["{e}/f/element.yaml:2:", "nope", "not found"]),
    "host-phase directory": ("[h]", {"h": (None, {"root.d/10-x": "#!/bin/sh\ntouch /x\n"})},
                             ["{e}/h/root.d", "build host"]),
}


@pytest.mark.parametrize("case", list(ELEMENTS))
def test_bad_element(tmp_path: Path, case: str) -> None:
    listed, els, needles = ELEMENTS[case]
    for name, (spec, files) in els.items():
        write_element(tmp_path, name, spec, files)
    recipe = write_recipe(tmp_path / "recipe.yaml", PLAIN + f"elements: {listed}\n")
    res = _cli(recipe, tmp_path)
    refused(res, tmp_path / "out",
            *(n.format(r=recipe, e=tmp_path / "elements") for n in needles))


# ---------------------------------------------------------------------------
# inputs


@dataclass
class Ctx:
    tmp: Path
    request: pytest.FixtureRequest

    @property
    def demo(self) -> Path:
        """The demo's inputs with a blank base image (no appliance needed)."""
        return self.request.getfixturevalue("demo_files")

    @property
    def real_demo(self) -> Path:
        return self.request.getfixturevalue("demo_inputs")

    @property
    def cached(self) -> Path:
        """A cache that holds the demo's base layer."""
        build: Build = self.request.getfixturevalue("demo_build")
        return build.cache


def _plain(ctx: Ctx, image: Path, extra: str = "") -> Path:
    return write_recipe(ctx.tmp / "recipe.yaml", f"name: t\nbase:\n  image: {image}\n{extra}")


def _base_missing(ctx: Ctx) -> tuple[Path, list[str]]:
    r = _plain(ctx, ctx.tmp / "none.qcow2")
    return r, [f"{r}:3:", f"{ctx.tmp / 'none.qcow2'} not found"]


def _base_directory(ctx: Ctx) -> tuple[Path, list[str]]:
    (ctx.tmp / "imgdir").mkdir()
    r = _plain(ctx, ctx.tmp / "imgdir")
    return r, [f"{r}:3:", f"{ctx.tmp / 'imgdir'} is not a file"]


def _wrong_sha256(ctx: Ctx) -> tuple[Path, list[str]]:
    image = ctx.tmp / "img.raw"
    image.write_bytes(os.urandom(4096))
    r = _plain(ctx, image, f"  sha256: '{'0a' * 32}'\n")
    return r, [f"{r}:4:", "has sha256"]


def _backing_file(ctx: Ctx) -> tuple[Path, list[str]]:
    base, top = ctx.tmp / "backing.qcow2", ctx.tmp / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(top)], check=True)
    return _plain(ctx, top), [f"{top}: qcow2 image has a backing file"]


def _truncated_qcow2(ctx: Ctx) -> tuple[Path, list[str]]:
    whole = demo_image(ctx.real_demo).read_bytes()
    half = ctx.tmp / "half.qcow2"
    half.write_bytes(whole[:len(whole) // 2])
    return _plain(ctx, half), [f"{half}", "damaged"]


def _param_file_missing(ctx: Ctx) -> tuple[Path, list[str]]:
    r = demo_recipe(ctx.tmp / "recipe.yaml", ctx.demo,
                    params={"rexec_bin": str(ctx.tmp / "no-rexec")})
    return r, [f"params.rexec_bin: {ctx.tmp / 'no-rexec'}", str(r)]


def _param_file_is_a_directory(ctx: Ctx) -> tuple[Path, list[str]]:
    (ctx.tmp / "rexec").mkdir()
    r = demo_recipe(ctx.tmp / "recipe.yaml", ctx.demo, params={"rexec_bin": str(ctx.tmp / "rexec")})
    return r, [f"params.rexec_bin: {ctx.tmp / 'rexec'}", str(r)]


def _not_a_kernel_module(ctx: Ctx) -> tuple[Path, list[str]]:
    ko = ctx.tmp / "qtfs_server.ko"
    ko.write_text("#!/bin/sh\necho not a module\n")
    r = demo_recipe(ctx.tmp / "recipe.yaml", ctx.demo, params={"qtfs_server_ko": str(ko)})
    return r, [f"{r}:", "qtfs_server_ko", str(ko)]


INPUTS: dict[str, Callable[[Ctx], tuple[Path, list[str]]]] = {
    "base image missing": _base_missing,
    "base image is a directory": _base_directory,
    "wrong base.sha256": _wrong_sha256,
    "qcow2 with a backing file": _backing_file,
    "truncated qcow2": _truncated_qcow2,
    "param file missing": _param_file_missing,
    "param file is a directory": _param_file_is_a_directory,
    "param file is not a kernel module": _not_a_kernel_module,
}


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=[pytest.mark.appliance] if c == "truncated qcow2" else [])
    for c in INPUTS])
def test_bad_input_file(tmp_path: Path, request: pytest.FixtureRequest, case: str) -> None:
    recipe, needles = INPUTS[case](Ctx(tmp_path, request))
    res = _cli(recipe, tmp_path)
    refused(res, tmp_path / "out", *needles)


def _shell_script_as_rexec(tmp: Path) -> tuple[dict[str, str], list[str]]:
    script = tmp / "rexec"
    script.write_text("#!/bin/sh\nexec ssh \"$@\"\n")
    return {"rexec_bin": str(script)}, [f"{script} is not an ELF binary (expected one for x86_64)"]


def _aarch64_qtfs_ko(tmp: Path) -> tuple[dict[str, str], list[str]]:
    ko = tmp / "qtfs.ko"  # the right vermagic, the wrong machine
    ko.write_bytes(sampleimage.fake_module("qtfs", "5.10.0-60.18.0.50.oe2203.x86_64", 183))
    return {"qtfs_ko": str(ko)}, [
        f"params.qtfs_ko: {ko} is built for aarch64, but the rootfs is x86_64"]


@pytest.mark.appliance
@pytest.mark.parametrize("make", [_shell_script_as_rexec, _aarch64_qtfs_ko],
                         ids=["script as rexec_bin", "aarch64 qtfs_ko"])
def test_program_for_the_wrong_architecture(tmp_path: Path, demo_inputs: Path,
                                            demo_build: Build,
                                            make: Callable[[Path], tuple[dict[str, str],
                                                                         list[str]]]) -> None:
    """Checked against the base's architecture: refused after the (cached)
    base layer, without any appliance (test_offload has rexec for aarch64)."""
    params, needles = make(tmp_path)
    recipe = demo_recipe(tmp_path / "recipe.yaml", demo_inputs, params=params)
    res = _cli(recipe, tmp_path, cache=demo_build.cache)
    refused(res, tmp_path / "out", *needles, f"{recipe}:")


def _random_raw(tmp: Path) -> Path:
    image = tmp / "random.img"
    image.write_bytes(os.urandom(4 << 20))
    return image


def _blank_qcow2(tmp: Path) -> Path:
    image = tmp / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    return image


@pytest.mark.appliance
@pytest.mark.parametrize("make", [_random_raw, _blank_qcow2], ids=["random bytes", "blank qcow2"])
def test_image_without_an_os(tmp_path: Path, make: Callable[[Path], Path]) -> None:
    image = make(tmp_path)
    recipe = write_recipe(tmp_path / "recipe.yaml", f"name: t\nbase: {{image: {image}}}\n")
    res = _cli(recipe, tmp_path)
    refused(res, tmp_path / "out", f"{image}: no operating system found", launches=1)
    assert not list((tmp_path / "cache" / "entries").iterdir())
    assert not (tmp_path / "out").exists()  # -o DIR left as it was: absent


# ---------------------------------------------------------------------------
# params that would reach scripts: refused at validation, before any appliance

M = "{marker}"
PARAMS: list[tuple[str, Any]] = [
    ("host_ip", f"; touch {M}"),
    ("host_ip", f"$(touch {M})"),
    ("host_ip", f"`touch {M}`"),
    ("host_ip", f"192.168.122.1\ntouch {M}"),
    ("host_ip", f"fe80::1%$(touch {M})"),  # an IPv6 zone is free text
    ("rexec_port", 0),
    ("qmp_port", 70000),
    ("rexec_port", f"22; touch {M}"),
    ("rootfs_path", "/another rootfs"),
    ("rootfs_path", "/another_rootfs/../etc"),
    ("rootfs_path", f"/another_rootfs\ntouch {M}"),
    ("rootfs_path", "another_rootfs"),
    ("dpu_kernel", "5.10.0/../../boot/x"),
    ("dpu_kernel", "5.10.0 x"),
    ("rexec_listen", f"0.0.0.0:7777; touch {M}"),
    ("rexec_whitelist", [f"ls; touch {M}"]),
]


@pytest.mark.parametrize(("key", "value"), PARAMS,
                         ids=[f"{k}={v!r}" for k, v in PARAMS])
def test_param_is_refused_at_validation(tmp_path: Path, demo_files: Path, key: str,
                                        value: Any) -> None:
    marker = tmp_path / "marker"
    if isinstance(value, str):
        value = value.format(marker=marker)
    elif isinstance(value, list):
        value = [v.format(marker=marker) for v in value]
    recipe = demo_recipe(tmp_path / "recipe.yaml", demo_files, params={key: value})
    res = _cli(recipe, tmp_path)
    err = refused(res, tmp_path / "out", f"params.{key}", f"{recipe}:", launches=0)
    assert res.json["phase"] == "validation", err
    assert not marker.exists()
    assert not list((tmp_path / "cache" / "entries").iterdir())


# ---------------------------------------------------------------------------
# the environment


def _small_recipe(tmp: Path) -> Path:
    image = tmp / "img.raw"
    image.write_bytes(os.urandom(4096))
    return write_recipe(tmp / "recipe.yaml", f"name: t\nbase: {{image: {image}}}\n")


def test_output_root_under_a_regular_file(tmp_path: Path) -> None:
    recipe = _small_recipe(tmp_path)
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"
    res = run_cli(recipe, "-o", out, "--cache-dir", tmp_path / "cache", "--json")
    refused(res, None, f"{out}: output directory is not writable", "-o DIR")
    assert (tmp_path / "file").read_text() == "x"


def test_cache_dir_under_a_regular_file(tmp_path: Path) -> None:
    recipe = _small_recipe(tmp_path)
    (tmp_path / "file").write_text("x")
    cache = tmp_path / "file" / "cache"
    res = run_cli(recipe, "-o", tmp_path / "out", "--cache-dir", cache, "--json")
    refused(res, tmp_path / "out", f"{cache}: cache directory is not usable", "--cache-dir")
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.root
def test_read_only_output_root(tmp_path: Path) -> None:
    """Root ignores mode 0500; a read-only bind mount stops it."""
    recipe = _small_recipe(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    res = run_in_mount_namespace(
        f"mount --bind {out} {out}\nmount -o remount,bind,ro {out}",
        [recipe, "-o", out, "--cache-dir", tmp_path / "cache", "--json"])
    refused(res, out, f"{out}: output directory is not writable", "-o DIR")
    assert list(out.iterdir()) == []


@pytest.mark.root
@pytest.mark.appliance
def test_disk_full_while_writing_the_output(tmp_path: Path, demo_inputs: Path,
                                            demo_build: Build) -> None:
    """A 2 MiB tmpfs as the output root: the uncompressed demo tar (several
    MiB) cannot fit.  The base layer comes from the demo build's cache."""
    recipe = demo_recipe(tmp_path / "recipe.yaml", demo_inputs, output={"formats": ["tar"]})
    out, listing = tmp_path / "out", tmp_path / "listing"
    out.mkdir()
    res = run_in_mount_namespace(
        f"mount -t tmpfs -o size=2m tmpfs {out}",
        [recipe, "-o", out, "--cache-dir", demo_build.cache, "--json"],
        after=f"ls -A {out} > {listing}; df -k {out} >> {listing}")
    refused(res, out, f"{out}: no space left on device", launches=0)
    lines = listing.read_text().splitlines()
    assert lines[0].startswith("Filesystem"), lines  # ls -A printed nothing: all removed
    used = int(lines[1].split()[2])
    assert used < 64, lines  # KiB: the partial tar was removed


# ---------------------------------------------------------------------------
# fuzz: --set values pushed into a valid recipe give a UserError or safe values

FUZZ_KEYS = ["params.host_ip", "params.qtfs_server_ip", "params.rexec_port", "params.qmp_port",
             "params.rootfs_path", "params.dpu_kernel", "params.host_kernel",
             "params.qtfs_log_level", "params.libvirt_mode", "params.engine_args",
             "params.rexec_whitelist", "params.rexec_listen", "params.libvirt_rpms",
             "params.rexec_bin", "params.no_such_param", "params.Bad", "base.image",
             "base.arch", "base.sha256", "elements", "elements.0", "elements.1", "overlays",
             "overlays.0", "output.formats", "output.size", "epoch", "name", "params",
             "allow_shadowed.0"]
NASTY = ["; touch /tmp/x", "$(id)", "`id`", "a\nb", "../..", "/a/../b", "/a b", "",
         "0", "-1", "70000", "65535", "1e9", "0x16", "::1", "fe80::1%eth0", "10.0.0.1",
         "192.168.1.256", "fe80::1%$(id)", "fe80::1%eth0\nx", "[1, 2]", "[a, 'b c']",
         "{a: 1}", "~", "null", "true", "!!int x",
         "&a [*a]", "*a", "[", "'", "\"\\x00\"", "\\", "/another_rootfs", "5.10.0-1.x86_64",
         "INFO", "LOUD", "source", "prebuilt", "[tar]", "[zip]", "2G", "lots", "é", "\x85",
         "a" * 300, "libvirt-offload", "../x", "@x", "%"]


@pytest.fixture(scope="module")
def fuzz_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fuzz-set")
    return write_recipe(d / "recipe.yaml", """\
name: fuzz
base: {image: img.qcow2}
elements: [libvirt-offload]
params:
  host_ip: 192.168.122.1
  rexec_bin: inputs/rexec
  libvirt_tree: inputs/libvirt-tree
  dpu_kernel: 5.10.0-60.18.0.50.oe2203.x86_64
output: {formats: [tar.zst]}
""")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(FUZZ_KEYS),
                          st.one_of(st.sampled_from(NASTY), st.text(max_size=30))),
                min_size=1, max_size=4))
def test_fuzz_set_values_into_a_valid_recipe(fuzz_recipe: Path, sets: list[tuple[str, str]]
                                             ) -> None:
    overrides = [f"{k}={v}" for k, v in sets]
    try:
        recipe = load_recipe(fuzz_recipe, overrides)
        es = elements.load(recipe)
        elements.required_missing(es)
    except UserError as e:
        assert "\n" not in str(e) and str(e).strip(), repr(str(e))
        return
    # What got through is what the checks accept: nothing a shell would act on.
    for name, spec in es.specs.items():
        value = es.params.get(name)
        if value is None:
            continue
        if spec.type in values.CHECKS:
            assert values.CHECKS[spec.type](value) == value
            assert not set(str(value)) & set(" \t\n;$`'\"\\|&<>()*?[]{}!#")
