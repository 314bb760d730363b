"""The oci output format without the appliance: layout, layer bytes,
config, recipe checks (issue 14).  The demo build's layout is checked end
to end in test_oci_e2e.py."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import zstandard
from conftest import one_error_line, run_cli
from oci_helpers import EPOCH, make_output

from builder import oci
from builder.errors import UserError


def _tar_of(out: Path) -> bytes:
    with open(out / "rootfs.tar.zst", "rb") as f:
        return zstandard.ZstdDecompressor().stream_reader(f).read()


def test_zstd_layer_is_the_builds_tar_zst_and_config_names_the_tar(tmp_path: Path) -> None:
    out = make_output(tmp_path, seed="zstd", arch="aarch64")
    image = oci.read_layout(out / oci.LAYOUT_DIR)
    [layer] = image.layers
    assert layer.media_type == "application/vnd.oci.image.layer.v1.tar+zstd"
    assert image.blob_path(layer).read_bytes() == (out / "rootfs.tar.zst").read_bytes()
    config = json.loads(image.blob_path(image.config).read_bytes())
    assert config["rootfs"] == {"type": "layers", "diff_ids": [
        "sha256:" + hashlib.sha256(_tar_of(out)).hexdigest()]}
    assert (config["architecture"], config["variant"], config["os"]) == ("arm64", "v8", "linux")
    assert config["created"] == "2023-11-14T22:13:20Z" == oci.rfc3339(EPOCH)
    manifest = json.loads(image.manifest_bytes)
    assert manifest["annotations"] == {"org.opencontainers.image.title": "demo",
                                       "org.opencontainers.image.created": oci.rfc3339(EPOCH)}
    assert image.manifest_bytes == oci.canonical_json(manifest)
    index = json.loads((out / oci.LAYOUT_DIR / "index.json").read_bytes())
    assert index["manifests"][0]["platform"] == {"architecture": "arm64", "os": "linux",
                                                 "variant": "v8"}
    assert json.loads((out / oci.LAYOUT_DIR / "oci-layout").read_bytes()) == {
        "imageLayoutVersion": "1.0.0"}
    for p in (out / oci.LAYOUT_DIR).rglob("*"):
        assert p.stat().st_mode & 0o777 == (0o755 if p.is_dir() else 0o644), p


def test_gzip_layer_for_older_runtimes(tmp_path: Path) -> None:
    a = make_output(tmp_path / "a", seed="gz", compression="gzip")
    b = make_output(tmp_path / "b", seed="gz", compression="gzip")
    image = oci.read_layout(a / oci.LAYOUT_DIR)
    assert image.layers[0].media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert gzip.decompress(image.blob_path(image.layers[0]).read_bytes()) == _tar_of(a)
    # gzip with mtime 0 and no name: the same bytes again
    assert oci.read_layout(b / oci.LAYOUT_DIR).manifest == image.manifest


def test_layout_from_a_tar_file_is_what_the_build_writes(tmp_path: Path) -> None:
    out = make_output(tmp_path / "out", seed="from-file")
    (tmp_path / "rootfs.tar").write_bytes(_tar_of(out))
    info = oci.ImageInfo(arch="x86_64", epoch=EPOCH, title="demo")
    again = oci.layout_from_tar(tmp_path / "rootfs.tar", tmp_path / "layout", info)
    assert again.manifest == oci.read_layout(out / oci.LAYOUT_DIR).manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layout", "out", "rootfs.tar"]


def test_annotations_from_the_recipe() -> None:
    info = oci.ImageInfo(arch="x86_64", epoch=0, title="dpu", description="DPU rootfs",
                         version="1.2.3", revision="abc123", base_digest="ab" * 32)
    assert info.annotations() == {
        "org.opencontainers.image.title": "dpu",
        "org.opencontainers.image.created": "1970-01-01T00:00:00Z",
        "org.opencontainers.image.description": "DPU rootfs",
        "org.opencontainers.image.version": "1.2.3",
        "org.opencontainers.image.revision": "abc123",
        "org.opencontainers.image.base.digest": "sha256:" + "ab" * 32}


def test_an_arch_without_an_oci_name_is_refused_before_writing(tmp_path: Path) -> None:
    info = oci.ImageInfo(arch="elf-machine-4242", epoch=EPOCH, title="demo")
    sinks: list = []
    with pytest.raises(UserError, match="has no OCI platform name"):
        oci.layer_sink(tmp_path, info, ["oci"], sinks)
    assert sinks == [] and list(tmp_path.iterdir()) == []


def test_a_damaged_layout_is_refused(tmp_path: Path) -> None:
    out = make_output(tmp_path, seed="damaged")
    image = oci.read_layout(out / oci.LAYOUT_DIR)
    manifest = image.blob_path(image.manifest)
    manifest.write_bytes(manifest.read_bytes().replace(b'"schemaVersion":2', b'"schemaVersion":3'))
    with pytest.raises(UserError, match="the manifest blob does not match its digest"):
        oci.read_layout(out / oci.LAYOUT_DIR)
    manifest.write_bytes(image.manifest_bytes)
    image.blob_path(image.config).unlink()
    with pytest.raises(UserError, match=f"blob {image.config.digest} is missing"):
        oci.read_layout(out / oci.LAYOUT_DIR)


@pytest.mark.parametrize("sets, message", [
    (["output.oci_compression=gzip"], "output.oci_compression is set but output.formats has "
                                      "no oci"),
    (["output.formats=[oci]"], "the deployment bundle needs a tar or image format besides oci"),
    (["output.formats=[tar.zst, oci]", "output.oci_compression=lz4"],
     "output.oci_compression: 'lz4' is not one of zstd, gzip"),
    (["output.formats=[tar.zst, oci]", "output.oci_version=1.2"],
     "output.oci_version: 1.2 is not a string"),
])
def test_recipe_oci_keys_are_checked_before_any_work(demo_files: Path, tmp_path: Path,
                                                     sets: list[str], message: str) -> None:
    args = [x for s in sets for x in ("--set", s)]
    res = run_cli(demo_files, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache", *args,
                  "--json")
    assert res.returncode == 2
    assert message in one_error_line(res.stderr)
    assert res.json["appliance_launches"] == 0
    assert not (tmp_path / "out" / "demo").exists()
