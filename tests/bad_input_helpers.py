"""Helpers for the bad-input and hostile-input tests: the refusal check every
case shares, demo-based recipes with absolute paths, hostile tarballs and a
hostile base image made without the appliance (mkfs.ext4 -d)."""

from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import yaml
from conftest import CliResult, one_error_line
from unit_helpers import make_element

from builder import sampleimage

# A line says what to do: it ends with a hint in parentheses.
HINT = re.compile(r"\([^()]*(\([^()]*\)[^()]*)*\)$")

DEMO_FILE_PARAMS = ("rexec_bin", "rexec_server_bin", "libvirt_tree", "qtfs_ko",
                    "qtfs_server_ko", "engine_bin")


def published(out: Path) -> list[str]:
    """What a failed build left in the output root: nothing at all, not even
    a lock file (a root that did not exist before must not exist after)."""
    if not out.exists():
        return []
    return sorted(p.name for p in out.iterdir())


def refused(res: CliResult, out: Path | None, *needles: str,
            launches: int | None = 0) -> str:
    """The run failed with one line holding every needle and ending with a
    hint, left nothing in `out`, and (with --json) started `launches`
    appliances.  Returns the line."""
    assert res.returncode not in (0, None), res.stdout
    err = one_error_line(res.stderr)
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert HINT.search(err), f"no hint saying what to do: {err}"
    if res.stdout.strip():
        obj = res.json
        assert f"rootfs-build: {obj['error']}" == err
        if launches is not None:
            assert obj["appliance_launches"] == launches, obj
    if out is not None:
        assert published(out) == [], published(out)
    return err


def demo_recipe(path: Path, demo_yaml: Path, *, params: dict[str, Any] | None = None,
                **top: Any) -> Path:
    """The demo recipe written to `path` with its input paths made absolute,
    `params` merged in (None deletes a key) and top-level keys replaced."""
    data = yaml.safe_load(demo_yaml.read_text())
    base = demo_yaml.parent
    data["base"]["image"] = str(base / data["base"]["image"])
    data["overlays"] = [str(base / o) for o in data.get("overlays", [])]
    for key in DEMO_FILE_PARAMS:
        if key in data["params"]:
            data["params"][key] = str(base / data["params"][key])
    for key, value in (params or {}).items():
        if value is None:
            data["params"].pop(key, None)
        else:
            data["params"][key] = value
    for key, value in top.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def demo_image(demo_yaml: Path) -> Path:
    data = yaml.safe_load(demo_yaml.read_text())
    return demo_yaml.parent / data["base"]["image"]


def write_element(root: Path, name: str, spec: str | None = None,
                  files: dict[str, str | bytes] | None = None) -> Path:
    """elements/<name>/ under `root` with element.yaml `spec` and `files`."""
    return make_element(root / "elements", name, spec=spec, files=files)


def run_in_mount_namespace(setup: str, args: list[str | Path], after: str = "",
                           timeout: float = 600) -> CliResult:
    """`setup` (sh), then `rootfs-build ARGS`, then `after`, in a private
    mount namespace; the CLI's exit status is the result's."""
    cli = " ".join(shlex.quote(str(a)) for a in [sys.executable, "-m", "builder.cli", *args])
    script = f"set -e\n{setup}\nset +e\n{cli}\nrc=$?\n{after}\nexit $rc\n"
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=timeout, env=env)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


# ---------------------------------------------------------------------------
# hostile inputs


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]], compression: str = ""
              ) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, *, link: str = "",
           dev: tuple[int, int] = (0, 0), mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = mode
    info.devmajor, info.devminor = dev
    info.mtime = 1_700_000_000
    return info


def make_ext4_image(path: Path, tree_tar: bytes, extra: dict[str, str | bytes | tuple[str]],
                    size_mib: int = 64) -> None:
    """A whole-disk ext4 image of `tree_tar` plus `extra` (path -> content, or
    (target,) for a symlink), made on the host with mkfs.ext4 -d: no appliance."""
    work = path.parent / f".{path.name}.tree"
    work.mkdir(parents=True)
    subprocess.run(["tar", "-C", str(work), "--numeric-owner", "-xpf", "-"], input=tree_tar,
                   check=True)
    for rel, content in extra.items():
        p = work / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink() or p.exists():
            p.unlink()
        if isinstance(content, tuple):
            p.symlink_to(content[0])
        elif isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "rootfs", "-d", str(work), str(path)],
                   check=True, capture_output=True)
    subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=True)


def hostile_root_tar(arch: str = "aarch64") -> bytes:
    """The sample root tree for `arch` (ELF headers only, nothing runnable here)."""
    return sampleimage.root_tree(fidelity=False, arch=arch)
