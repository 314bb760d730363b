"""Session fixtures: real images made with libguestfs, real builds via the CLI.

Appliance launches are the expensive part (~10-20 s each under TCG), so
images and builds are made once per session and shared.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict:
        return json.loads(self.stdout)


def run_cli(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None,
            umask: int | None = None, timeout: float = 900) -> CliResult:
    """Run `rootfs-build ARGS` as a separate process, as a pipeline would."""
    full_env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "builder.cli", *map(str, args)], cwd=cwd, env=full_env,
        capture_output=True, text=True, timeout=timeout,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def hv_dir() -> Iterator[Path]:
    """A directory for a stand-in hypervisor (LIBGUESTFS_HV) at a short path
    of fixed length, /tmp/rb-hv-XXXXXXXX, not in tmp_path.  libguestfs 1.48
    corrupts its heap ("corrupted size vs. prev_size" in a realloc from 272
    to 512 bytes) while a launch first probes a hypervisor whose path is 90
    characters long: under pytest-xdist tmp_path made the stand-in's path
    exactly that long (/tmp/pytest-of-root/pytest-N/popen-gwK/...), and every
    launch with it aborted.  In trials here, 90 characters aborted every
    time; the other lengths tried, from 33 to 101, never did."""
    path = Path(tempfile.mkdtemp(prefix="rb-hv-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


def write_recipe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def fixture_image(session_dir: Path) -> Path:
    """The openEuler-22.03-shaped qcow2 holding every fidelity case."""
    from builder import sampleimage

    path = session_dir / "images" / "openEuler-fixture.qcow2"
    path.parent.mkdir(exist_ok=True)
    sampleimage.make(path, fidelity=True)
    return path


FIXTURE_RECIPE = """\
name: tricky
base:
  image: {image}
elements: []
overlays: []
params: {{}}
output:
  formats: [tar, tar.gz, tar.zst]
"""


@dataclass
class Build:
    recipe: Path
    out: Path
    cache: Path
    result: CliResult

    @property
    def dir(self) -> Path:
        return self.out / self.result.json["name"]

    def artifact(self, name: str) -> Path:
        return self.dir / name


@pytest.fixture(scope="session")
def fixture_build(session_dir: Path, fixture_image: Path) -> Build:
    """A cold build of the fixture (tar, tar.gz, tar.zst) with its own cache."""
    work = session_dir / "build-a"
    recipe = write_recipe(work / "recipe" / "tricky.yaml",
                          FIXTURE_RECIPE.format(image=fixture_image))
    res = run_cli(recipe, "-o", work / "out", "--cache-dir", work / "cache", "--json",
                  env={"TZ": "UTC", "LC_ALL": "C.UTF-8"}, umask=0o022)
    assert res.returncode == 0, res.stderr
    return Build(recipe, work / "out", work / "cache", res)


@pytest.fixture(scope="session")
def demo_inputs(session_dir: Path) -> Path:
    """The demo laid out in the session (recipe, overlay, fresh inputs): the
    recipe's path."""
    from builder import demo

    return demo.prepare(session_dir / "demo")


@pytest.fixture(scope="session")
def demo_files(session_dir: Path) -> Path:
    """Like demo_inputs, but the base image is a blank qcow2 (made without the
    appliance): enough for everything that is checked before the image is read."""
    from builder import demo

    work = session_dir / "demo-files"
    inputs = work / demo.INPUTS
    inputs.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(inputs / demo.BASE_IMAGE),
                    "64M"], check=True)
    return demo.prepare(work)


@pytest.fixture(scope="session")
def demo_build(session_dir: Path, demo_inputs: Path) -> Build:
    work = session_dir / "demo-build-a"
    res = run_cli(demo_inputs, "-o", work / "out", "--cache-dir", work / "cache", "--json",
                  "--set", "output.formats=[tar, tar.zst, squashfs, raw, qcow2]")
    assert res.returncode == 0, res.stderr
    return Build(demo_inputs, work / "out", work / "cache", res)


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root` in this mount namespace."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4]
            if target == str(root) or target.startswith(str(root) + "/"):
                out.append(target)
    return out


def extract_tar(tar: Path, dest: Path) -> None:
    """Extract a rootfs tar as root, keeping owners, modes, xattrs, devices."""
    dest.mkdir(parents=True, exist_ok=True)
    args = ["tar", "--numeric-owner", "-p", "--xattrs", "--xattrs-include=*", "--acls",
            "-C", str(dest), "-xf", str(tar)]
    if tar.suffix == ".zst":
        args[-2:-2] = ["--zstd"]
    subprocess.run(args, check=True)


def remove_tree(path: Path) -> None:
    """Delete a rootfs tree without crossing into anything mounted in it."""
    assert not mounts_under(path), f"{path} still has mounts: {mounts_under(path)}"
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def one_error_line(stderr: str) -> str:
    """The single error line of a failed run (warnings aside); fails otherwise."""
    lines = [line for line in stderr.strip().splitlines() if line]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in lines if not line.startswith("rootfs-build: warning:")]
    assert len(errors) == 1, stderr
    assert errors[0].startswith("rootfs-build: "), errors[0]
    return errors[0]


def read_tar(path: Path) -> dict[str, tuple[object, bytes | None]]:
    """name -> (TarInfo, content of regular files) of a .tar / .tar.gz / .tar.zst."""
    import io
    import tarfile

    import zstandard

    raw = path.read_bytes()
    if path.suffix == ".zst":
        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    out: dict[str, tuple[object, bytes | None]] = {}
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:*") as tf:
        for m in tf.getmembers():
            data = tf.extractfile(m).read() if m.isreg() else None  # type: ignore[union-attr]
            out[m.name] = (m, data)
    return out


# -- registries (issue 14) ------------------------------------------------------

REGISTRY_USER = "builder"
REGISTRY_PASSWORD = "s3cret-Pa55-for-tests"


@pytest.fixture(scope="session")
def registry(session_dir: Path):
    """A real registry (CNCF distribution) on 127.0.0.1: TLS from a throwaway
    CA, htpasswd authentication."""
    from builder.localregistry import LocalRegistry

    with LocalRegistry(session_dir / "registry", tls=True,
                       users={REGISTRY_USER: REGISTRY_PASSWORD}) as reg:
        yield reg


def registry_args(reg, creds: Path | None = None) -> list[str]:
    """The CLI options that reach `reg` with the test user's credentials."""
    return ["--ca-file", str(reg.ca_file),
            "--creds-file", str(creds or reg.auth_file(REGISTRY_USER))]
