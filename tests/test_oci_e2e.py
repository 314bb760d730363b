"""End to end: the demo built with the oci format, pushed, pulled, and its
layer cache shared through a real registry (issue 14).

Every build here starts from a copy of the session's demo_build cache (no
appliance launch), or from an empty cache filled from the registry (which
must launch nothing); the registry is CNCF distribution on 127.0.0.1 with
TLS and htpasswd (conftest.registry), or a private one where a test damages
or stops it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard
from conftest import Build, CliResult, registry_args, run_cli
from oci_helpers import tree_files

from builder import oci
from builder.localregistry import LocalRegistry, free_port

pytestmark = pytest.mark.appliance

FORMATS = "output.formats=[tar.zst, oci]"
REPO = Path(__file__).resolve().parent.parent


def warm_cache(demo_build: Build, dest: Path) -> Path:
    shutil.copytree(demo_build.cache, dest)
    return dest


def build(recipe: Path, out: Path, cache: Path, *extra: str | Path,
          env: dict[str, str] | None = None, umask: int | None = None) -> CliResult:
    return run_cli(recipe, "-o", out, "--cache-dir", cache, "--json", "--set", FORMATS, *extra,
                   env=env, umask=umask)


def elsewhere(demo_inputs: Path, dest: Path) -> Path:
    """The demo (recipe, overlay, inputs) copied to another directory: the
    recipe's path there."""
    shutil.copytree(demo_inputs.parent.parent, dest)
    return dest / demo_inputs.relative_to(demo_inputs.parent.parent)


def warnings_of(res: CliResult) -> list[str]:
    return [line for line in res.stderr.splitlines() if "warning:" in line
            and "KVM" not in line]


@pytest.fixture(scope="module")
def reference(demo_build: Build, demo_inputs: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Path:
    """Machine A's output root: the demo with tar.zst and oci (TZ=UTC)."""
    work = tmp_path_factory.mktemp("oci-reference")
    res = build(demo_inputs, work / "out", warm_cache(demo_build, work / "cache"),
                env={"TZ": "UTC", "LC_ALL": "C.UTF-8"}, umask=0o022)
    assert res.returncode == 0, res.stderr
    assert res.json["appliance_launches"] == 0
    return work / "out"


def test_oci_output_same_digest_in_another_dir_and_tz(reference: Path, demo_build: Build,
                                                      demo_inputs: Path, tmp_path: Path) -> None:
    recipe = elsewhere(demo_inputs, tmp_path / "other" / "checkout")
    out = tmp_path / "out-b"
    res = build(recipe, out, warm_cache(demo_build, tmp_path / "cache"),
                env={"TZ": "Asia/Kolkata", "LC_ALL": "C"}, umask=0o077)
    assert res.returncode == 0, res.stderr
    a = oci.read_layout(reference / "demo" / oci.LAYOUT_DIR)
    b = oci.read_layout(out / "demo" / oci.LAYOUT_DIR)
    assert a.manifest.digest == b.manifest.digest
    assert tree_files(out) == tree_files(reference)
    artifact = next(x for x in res.json["artifacts"] if x["format"] == "oci")
    assert artifact["sha256"] == b.manifest.hex
    # the layer is rootfs.tar.zst, byte for byte
    assert b.blob_path(b.layers[0]).read_bytes() == (out / "demo" / "rootfs.tar.zst").read_bytes()
    # skopeo reads the layout: platform, created = the epoch, annotations
    manifest = json.loads((out / "demo" / "manifest.json").read_text())
    info = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{out / 'demo' / 'rootfs.oci'}"],
                                     check=True, capture_output=True, text=True).stdout)
    assert (info["Architecture"], info["Os"]) == ("amd64", "linux")
    assert info["Created"] == "2023-11-14T22:13:20Z" == oci.rfc3339(manifest["epoch"])
    assert info["Labels"]["org.opencontainers.image.title"] == "demo"
    assert info["Labels"]["org.opencontainers.image.base.digest"] == \
        "sha256:" + manifest["base"]["sha256"]
    config = json.loads(subprocess.run(
        ["skopeo", "inspect", "--config", f"oci:{out / 'demo' / 'rootfs.oci'}"],
        check=True, capture_output=True, text=True).stdout)
    with open(out / "demo" / "rootfs.tar.zst", "rb") as f:
        tar = zstandard.ZstdDecompressor().stream_reader(f).read()
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(tar).hexdigest()]


def test_skopeo_round_trip_keeps_the_digest(reference: Path, registry, tmp_path: Path) -> None:
    layout = reference / "demo" / oci.LAYOUT_DIR
    digest = oci.read_layout(layout).manifest.digest
    auth, certs = str(registry.auth_file("builder")), str(registry.cert_dir)
    dest = f"docker://{registry.host}/roundtrip/demo:1"
    subprocess.run(["skopeo", "copy", "--quiet", "--authfile", auth, "--dest-cert-dir", certs,
                    f"oci:{layout}", dest], check=True)
    subprocess.run(["skopeo", "copy", "--quiet", "--authfile", auth, "--src-cert-dir", certs,
                    dest, f"oci:{tmp_path / 'back'}:1"], check=True)
    for ref, extra in ((dest, ["--authfile", auth, "--cert-dir", certs]),
                       (f"oci:{tmp_path / 'back'}:1", [])):
        raw = subprocess.run(["skopeo", "inspect", "--raw", *extra, ref], check=True,
                             capture_output=True).stdout
        assert oci.sha256_digest(raw) == digest


def test_build_push_then_pull_on_a_second_machine(reference: Path, demo_build: Build,
                                                  demo_inputs: Path, registry,
                                                  tmp_path: Path) -> None:
    ref = f"{registry.host}/release/demo:1.0"
    res = build(demo_inputs, tmp_path / "a", warm_cache(demo_build, tmp_path / "cache-a"),
                "--push", ref, *registry_args(registry))
    assert res.returncode == 0, res.stderr
    digest = oci.read_layout(reference / "demo" / oci.LAYOUT_DIR).manifest.digest
    assert res.json["push"]["digest"] == digest
    # machine B: no cache, no inputs, another output directory, another HOME
    pulled = tmp_path / "machine-b" / "site"
    env = {"HOME": str(tmp_path / "machine-b"), "XDG_CACHE_HOME": str(tmp_path / "b-cache")}
    res = run_cli("pull", ref, "-o", pulled, *registry_args(registry), "--json", env=env)
    assert res.returncode == 0, res.stderr
    assert tree_files(pulled) == tree_files(reference)
    # the bundle's install.sh from the pulled directory checks everything
    (tmp_path / "unpacked").mkdir()
    subprocess.run(["tar", "-xf", str(pulled / "demo.bundle.tar"), "-C",
                    str(tmp_path / "unpacked")], check=True)
    dry = subprocess.run([str(tmp_path / "unpacked" / "demo" / "install.sh"), "--target",
                          str(tmp_path / "dpu-root"), "--dry-run"],
                         capture_output=True, text=True)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "rootfs.tar.zst" in dry.stdout + dry.stderr


def test_cache_from_on_an_empty_cache_launches_nothing(reference: Path, demo_build: Build,
                                                      demo_inputs: Path, registry,
                                                      tmp_path: Path) -> None:
    repo = f"{registry.host}/cache/from-empty"
    a = build(demo_inputs, tmp_path / "a", warm_cache(demo_build, tmp_path / "cache-a"),
              "--cache-to", repo, *registry_args(registry))
    assert a.returncode == 0, a.stderr
    keys = [layer["key"] for layer in a.json["layers"]]
    assert a.json["remote_cache"]["to"]["pushed"] == keys
    assert registry.tags("cache/from-empty") == sorted(keys)
    # machine B: the inputs elsewhere, an empty cache
    recipe = elsewhere(demo_inputs, tmp_path / "machine-b")
    b = build(recipe, tmp_path / "b", tmp_path / "cache-b", "--cache-from", repo,
              *registry_args(registry), env={"TZ": "America/New_York"})
    assert b.returncode == 0, b.stderr
    assert b.json["appliance_launches"] == 0
    assert [layer["cache"] for layer in b.json["layers"]] == ["remote"] * len(keys)
    assert b.json["remote_cache"]["from"]["fetched"] == keys
    assert not warnings_of(b)
    assert tree_files(tmp_path / "b") == tree_files(reference)
    # and the fetched entries are in B's cache: a rebuild needs no registry
    c = build(recipe, tmp_path / "c", tmp_path / "cache-b")
    assert c.returncode == 0 and [x["cache"] for x in c.json["layers"]] == ["hit"] * len(keys)


def test_damaged_cache_blob_is_discarded_and_built_here(reference: Path, demo_build: Build,
                                                       demo_inputs: Path,
                                                       tmp_path: Path) -> None:
    with LocalRegistry(tmp_path / "reg", tls=False) as reg:     # its own: blobs get damaged
        repo = f"{reg.host}/cache/demo"
        a = build(demo_inputs, tmp_path / "a", warm_cache(demo_build, tmp_path / "cache-a"),
                  "--cache-to", repo, "--insecure")
        assert a.returncode == 0, a.stderr
        element = next(x for x in a.json["layers"] if x["kind"] == "element")
        manifest = json.loads(subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false",
             f"docker://{repo}:{element['key']}"], check=True, capture_output=True).stdout)
        blob = reg.blob_file(next(x["digest"] for x in manifest["layers"]
                                  if x["annotations"][oci.ANN + "title"] == "layer.tar"))
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0x55
        blob.write_bytes(bytes(data))
        b = build(demo_inputs, tmp_path / "b", tmp_path / "cache-b", "--cache-from", repo,
                  "--insecure")
    assert b.returncode == 0, b.stderr
    assert b.json["appliance_launches"] == 0
    origin = {x["key"]: x["cache"] for x in b.json["layers"]}
    assert origin.pop(element["key"]) == "built"
    assert set(origin.values()) == {"remote"}
    [warning] = warnings_of(b)
    # zstd's checksum or the blob digest, whichever notices first
    assert f"cache entry {element['key'][:12]} is damaged" in warning
    assert "does not match its digest" in warning or "does not unpack" in warning, warning
    assert tree_files(tmp_path / "b") == tree_files(reference)


def test_two_builds_push_the_same_cache_at_once(reference: Path, demo_build: Build,
                                               demo_inputs: Path, registry,
                                               tmp_path: Path) -> None:
    repo = f"{registry.host}/cache/concurrent"
    procs = []
    for name in ("one", "two"):
        cmd = [sys.executable, "-m", "builder.cli", str(demo_inputs), "-o",
               str(tmp_path / f"out-{name}"), "--cache-dir",
               str(warm_cache(demo_build, tmp_path / f"cache-{name}")), "--json", "--set",
               FORMATS, "--cache-to", repo, *registry_args(registry)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = [CliResult(p.wait(timeout=600), p.stdout.read(), p.stderr.read())  # type: ignore
               for p in procs]
    for res in results:
        assert res.returncode == 0, res.stderr
        assert not warnings_of(res)
    keys = sorted(x["key"] for x in results[0].json["layers"])
    assert registry.tags("cache/concurrent") == keys
    c = build(demo_inputs, tmp_path / "out-c", tmp_path / "cache-c", "--cache-from", repo,
              *registry_args(registry))
    assert c.returncode == 0, c.stderr
    assert c.json["appliance_launches"] == 0 and not warnings_of(c)
    assert tree_files(tmp_path / "out-c") == tree_files(reference)


def test_registry_down_during_cache_to_is_a_warning(reference: Path, demo_build: Build,
                                                   demo_inputs: Path, tmp_path: Path) -> None:
    port = free_port()   # nothing listens there
    start = time.monotonic()
    res = build(demo_inputs, tmp_path / "out", warm_cache(demo_build, tmp_path / "cache"),
                "--cache-to", f"127.0.0.1:{port}/cache/demo", "--cache-from",
                f"127.0.0.1:{port}/cache/demo", "--ca-file", str(tmp_path / "none.pem"))
    assert res.returncode != 0, "a missing --ca-file is the user's error, not the registry's"
    res = build(demo_inputs, tmp_path / "out", tmp_path / "cache",
                "--cache-to", f"127.0.0.1:{port}/cache/demo", "--cache-from",
                f"127.0.0.1:{port}/cache/demo")
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - start < 120
    warnings = warnings_of(res)
    assert len(warnings) == 2, warnings    # one per flag, not one per layer
    for w in warnings:
        assert f"127.0.0.1:{port}: cannot reach the registry (Connection refused)" in w
        assert "going on without the remote cache" in w
    assert res.json["remote_cache"]["to"]["pushed"] == []
    assert tree_files(tmp_path / "out") == tree_files(reference)


def test_registry_that_does_not_answer_is_a_warning_after_the_timeout(
        reference: Path, demo_build: Build, demo_inputs: Path, tmp_path: Path) -> None:
    with socket.socket() as silent:      # accepts connections, never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        host = f"127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        res = build(demo_inputs, tmp_path / "out", warm_cache(demo_build, tmp_path / "cache"),
                    "--cache-to", f"{host}/cache/demo", "--registry-timeout", "2")
        took = time.monotonic() - start
    assert res.returncode == 0, res.stderr
    [warning] = warnings_of(res)
    assert f"{host}: no answer within 2 s" in warning
    assert took < 60
    assert tree_files(tmp_path / "out") == tree_files(reference)


def test_push_needs_the_oci_format_and_checks_access_before_building(
        demo_build: Build, demo_inputs: Path, registry, tmp_path: Path) -> None:
    res = run_cli(demo_inputs, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache",
                  "--push", f"{registry.host}/x/demo:1", *registry_args(registry))
    assert res.returncode == 2 and "--push needs the oci format" in res.stderr
    creds = registry.auth_file("builder", "not-the-password", name="bad")
    res = build(demo_inputs, tmp_path / "out", tmp_path / "cache", "--push",
                f"{registry.host}/x/demo:1", "--ca-file", str(registry.ca_file),
                "--creds-file", str(creds))
    assert res.returncode == 2 and "refused the credentials" in res.stderr
    assert "not-the-password" not in res.stdout + res.stderr
    assert not (tmp_path / "out").exists() and not any((tmp_path / "cache").glob("entries/*"))
