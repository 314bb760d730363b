"""rootfs-build as users get it: a wheel and an sdist made with `python -m
build`, the wheel installed into a fresh venv outside the checkout (made
from the system python with --system-site-packages, for python3-guestfs),
and that install validating every shipped recipe and building the demo
from a read-only install tree, with the same rootfs the checkout builds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, Build

from builder.hashing import sha256_file

pytestmark = pytest.mark.appliance


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # built from a copy: setuptools writes build/ and *.egg-info into the
    # source directory, and the tests must not write into the checkout
    source = tmp_path_factory.mktemp("source") / "rootfs-build"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
        ".hypothesis", "output"))
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel", "-o", str(out),
                    str(source)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def installed(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("venv") / "v"
    env = _clean_env(venv.parent)
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, env=env, cwd=venv.parent)
    wheel = next(dist.glob("*.whl"))
    res = subprocess.run([str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check",
                          str(wheel)], capture_output=True, text=True, env=env, cwd=venv.parent)
    assert res.returncode == 0, res.stderr
    assert (venv / "bin/rootfs-build").exists(), res.stdout + res.stderr
    return venv


def _clean_env(home: Path) -> dict[str, str]:
    """No trace of the checkout: not its venv, not PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "SOURCE_DATE_EPOCH")}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env["HOME"] = str(home)
    env["XDG_CACHE_HOME"] = str(home / ".cache")
    return env


def test_the_distributions_carry_the_shipped_files(dist: Path) -> None:
    wheel = zipfile.ZipFile(next(dist.glob("*.whl")))
    names = set(wheel.namelist())
    for rel in ("builder/shipped/elements/libvirt-offload/element-deps",
                "builder/shipped/elements/qemu-kvm-shim/qemu-kvm.in",
                "builder/shipped/recipes/demo.yaml",
                "builder/shipped/overlays/demo/usr/share/doc/rootfs-build-demo/README",
                "builder/templates/deploy-prepare.sh"):
        assert rel in names, rel
    with tarfile.open(next(dist.glob("*.tar.gz"))) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    for rel in ("elements/rexec/element.yaml", "recipes/libvirt-offload-x86_64.yaml",
                "overlays/demo/usr/share/doc/rootfs-build-demo/README", "pyproject.toml"):
        assert rel in members, rel


def test_the_installed_wheel_validates_every_shipped_recipe(installed: Path,
                                                            tmp_path: Path) -> None:
    env = _clean_env(tmp_path)
    where = subprocess.run([str(installed / "bin/python"), "-c",
                            "from builder import shipped; print(shipped.path('recipes'))"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    recipes = Path(where.stdout.strip())
    assert not recipes.is_relative_to(REPO), recipes
    shipped = sorted(recipes.glob("*.yaml"))
    assert [p.name for p in shipped] == sorted(p.name for p in (REPO / "recipes").glob("*.yaml"))
    for recipe in shipped:
        res = subprocess.run([str(installed / "bin/rootfs-build"), "validate", str(recipe)],
                             capture_output=True, text=True, env=env, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert "valid" in res.stdout and "Traceback" not in res.stderr
    version = subprocess.run([str(installed / "bin/rootfs-build"), "--version"],
                             capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    from builder import shipped as ours
    assert version.stdout.strip() == f"rootfs-build 0.1.0 (elements {ours.elements_digest()})"


@pytest.mark.root
def test_the_installed_wheel_builds_the_demo_read_only(installed: Path, tmp_path: Path,
                                                       demo_build: Build) -> None:
    """The install tree is a read-only bind mount; the demo's inputs go to
    the cache directory; the rootfs equals the checkout's."""
    env = _clean_env(tmp_path)
    script = (f"mount --bind {installed} {installed}\n"
              f"mount -o remount,bind,ro {installed}\n"
              f"exec {installed}/bin/rootfs-build demo -o {tmp_path}/out --json\n")
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1800)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / ".cache/rootfs-build/demo/recipes/demo-inputs").is_dir()
    assert (sha256_file(tmp_path / "out/demo/rootfs.tar.zst")
            == sha256_file(demo_build.artifact("rootfs.tar.zst")))
