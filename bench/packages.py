"""Benchmark the package step (issue 11) against its peers.

    .venv/bin/python bench/packages.py [--count 200] [--workdir DIR] [--accel tcg|auto]

Makes (cached in the work directory) a Debian bookworm base with rpm and
dnf (mmdebstrap, as the test suite does; also as an openEuler-shaped qcow2
for virt-customize), an aarch64 Debian base with rpm, and COUNT small
noarch RPMs (one spec, COUNT subpackages, each with a file and a %post)
in a repository made with createrepo_c.  Then it times installing all of
them:

    engine dnf      builder.packages.install on the x86_64 base: appliance
                    launch, tree laid out, the rootfs's dnf, layer captured
      in appliance  of which: the dnf run inside the appliance
    host dnf        dnf --installroot on the build host into an extracted
                    copy of the base (the peer: as root, not reproducible)
    virt-customize  --copy-in the repo, --run-command "dnf install ..." on
                    a copy of the qcow2
    rpm x86_64      rpm -U of the RPM files inside the appliance, x86_64 base
    rpm aarch64     the same on the aarch64 base, under qemu-user emulation

and prints each time with its ratio to host dnf, and aarch64 / x86_64 for
the emulated rpm run.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from packages_helpers import (  # noqa: E402
    EPOCH,
    mmdebstrap_tar,
    register_base_provides,
)

from builder import guestfs_io, packages, sampleimage  # noqa: E402
from builder.errors import UserError  # noqa: E402
from builder.layer import build_layer_from_tar  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def bench_spec(count: int) -> str:
    subs = "".join(f"""
%package -n bench-pkg-{i:03d}
Summary: bench {i}
%description -n bench-pkg-{i:03d}
bench {i}
%post -n bench-pkg-{i:03d}
mkdir -p /var/lib/bench
echo {i} > /var/lib/bench/post-{i:03d}
%files -n bench-pkg-{i:03d}
/usr/share/bench/{i:03d}.txt
""" for i in range(count))
    files = "\n".join(f"echo {i} > %{{buildroot}}/usr/share/bench/{i:03d}.txt"
                      for i in range(count))
    return f"""Name: bench
Version: 1.0
Release: 1
Summary: bench
License: MIT
BuildArch: noarch
%description
bench
%install
mkdir -p %{{buildroot}}/usr/share/bench
{files}
{subs}"""


def prepare(work: Path, count: int) -> dict[str, Path]:
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for arch in ("x86_64", "aarch64"):
        tar = work / f"debian-{arch}.tar"
        if not tar.exists():
            log(f"making the {arch} base (mmdebstrap)")
            part = work / f"part-{arch}.tar"
            mmdebstrap_tar(part, arch=arch)
            shutil.rmtree(work / f"bp-{arch}", ignore_errors=True)
            register_base_provides(part, work / f"bp-{arch}", passwd=arch != "x86_64")
            part.rename(tar)
        out[f"base-{arch}"] = tar
    image = work / "debian-x86_64.qcow2"
    if not image.exists():
        log("making the x86_64 qcow2 (openEuler shape) for virt-customize")
        boot = work / "boot.tar"
        boot.write_bytes(sampleimage.boot_tree())
        guestfs_io.make_disk_image(image, fmt="qcow2", size_mib=2048, partitions=[
            guestfs_io.Partition("/boot", 64), guestfs_io.Partition("/", None)],
            trees={"/": out["base-x86_64"], "/boot": boot}, label="bench image")
    out["image"] = image
    repo = work / f"repo-{count}-v2"
    if not (repo / "repodata").is_dir():
        log(f"building {count} RPMs")
        shutil.rmtree(repo, ignore_errors=True)
        shutil.rmtree(work / "rpmbuild", ignore_errors=True)
        (work / "rpmbuild").mkdir()
        build_spec(work / "rpmbuild", bench_spec(count))
        repo.mkdir()
        for f in sorted((work / "rpmbuild").rglob("bench-pkg-*.rpm")):
            shutil.copy(f, repo / f.name)
        subprocess.run(["createrepo_c", "--quiet", "--no-database", str(repo)], check=True)
    out["repo"] = repo
    return out


def build_spec(top: Path, spec: str) -> None:
    """rpmbuild -bb of a spec with subpackages, in its own topdir."""
    (top / "tmp").mkdir(parents=True, exist_ok=True)
    (top / "bench.spec").write_text("%define debug_package %{nil}\n"
                                    "%global __os_install_post %{nil}\n" + spec)
    subprocess.run(["rpmbuild", "-bb", "--quiet", "--define", f"_topdir {top}",
                    "--define", f"_tmppath {top / 'tmp'}", str(top / "bench.spec")],
                   check=True, capture_output=True, env={**os.environ, "LC_ALL": "C"})


def _tree(tar: Path) -> Callable[[BinaryIO], None]:
    def produce(sink: BinaryIO) -> None:
        with open(tar, "rb") as f:
            shutil.copyfileobj(f, sink, 1 << 20)
    return produce


def engine(inputs: dict[str, Path], work: Path, names: list[str], *, arch: str,
           tool: str | None) -> tuple[float, float]:
    """(total, in-appliance install) seconds of one package step."""
    base = inputs[f"base-{arch}"]
    repo = inputs["repo"]
    if tool == "rpm":
        request = packages.PackageRequest(rpm_files=tuple(sorted(repo.glob("*.rpm"))),
                                          gpgcheck=False)
    else:
        request = packages.PackageRequest(repos=(repo,), install=tuple(names), gpgcheck=False)
    layer = work / f"layer-{arch}-{tool}"
    shutil.rmtree(layer, ignore_errors=True)
    start = time.monotonic()
    repo_set = packages.check(request, arch=arch, workdir=work / f"check-{arch}-{tool}")
    drives = packages.repo_drives(repo_set)
    app = guestfs_io.Appliance(f"bench {arch} {tool}")
    app.add_run_scratch(base.stat().st_size)
    for d in drives:
        app.add_drive(d.path, fmt="raw", readonly=True, label=d.label)
    with app:
        session = guestfs_io.TreeSession(app, step="bench", epoch=EPOCH, arch=arch)
        session.lay(_tree(base))
        t0 = time.monotonic()
        summary = packages.install_in_session(session, request, repo_set, drives, tool=tool)
        inside = time.monotonic() - t0
        layer.mkdir(parents=True)
        session.finish(lambda s: build_layer_from_tar(s, layer, mtime_policy="clamp",
                                                      source="bench", overlay_upper=True))
    total = time.monotonic() - start
    assert len(summary.installed) == len(names), summary.installed[:3]
    return total, inside


def host_dnf(inputs: dict[str, Path], work: Path, names: list[str]) -> float:
    root = work / "host-root"
    if root.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=True)
    root.mkdir()
    subprocess.run(["tar", "-x", "-p", "--numeric-owner", "-f", str(inputs["base-x86_64"]),
                    "-C", str(root)], check=True)
    start = time.monotonic()
    subprocess.run(["dnf", "--installroot", str(root), "--releasever=bench", "--assumeyes",
                    "--quiet", "--setopt=reposdir=/nonexistent", "--noplugins",
                    "--setopt=install_weak_deps=0", "--nogpgcheck",
                    f"--repofrompath=bench,{inputs['repo']}", "--repo=bench", "install",
                    *names], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "HOME": "/root"})
    took = time.monotonic() - start
    subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=True)
    return took


def virt_customize(inputs: dict[str, Path], work: Path, names: list[str]) -> float:
    copy = work / "vc.qcow2"
    shutil.copy(inputs["image"], copy)
    # HOME: Debian's rpm keeps its database in $HOME/.rpmdb (the engine sets it too)
    cmd = ("HOME=/root dnf --releasever=bench --assumeyes --quiet --setopt=reposdir=/nonexistent "
           "--noplugins --setopt=install_weak_deps=0 --nogpgcheck "
           f"--repofrompath=bench,/root/{inputs['repo'].name} --repo=bench install "
           + " ".join(names))
    start = time.monotonic()
    subprocess.run(["virt-customize", "-q", "-a", str(copy), "--no-network",
                    "--copy-in", f"{inputs['repo']}:/root", "--run-command", cmd],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    took = time.monotonic() - start
    copy.unlink()
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/rootfs-build-bench-packages"))
    ap.add_argument("--accel", choices=["tcg", "auto"], default="tcg")
    args = ap.parse_args()
    if args.accel == "tcg":
        os.environ["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
    work = args.workdir
    inputs = prepare(work, args.count)
    names = [f"bench-pkg-{i:03d}" for i in range(args.count)]
    rows: dict[str, float] = {}
    failed: dict[str, str] = {}

    def measure(label: str, fn: Callable[[], float]) -> None:
        log(label)
        try:
            rows[label] = fn()
            log(f"{label}: {rows[label]:.1f} s")
        except (subprocess.CalledProcessError, UserError, AssertionError) as e:
            detail = (getattr(e, "stderr", None) or str(e)).strip().splitlines()
            failed[label] = detail[-1] if detail else type(e).__name__
            log(f"{label} failed: {failed[label]}")

    def engine_rows(label: str, inside: str, arch: str, tool: str | None) -> float:
        total, rows[inside] = engine(inputs, work, names, arch=arch, tool=tool)
        return total

    measure("host dnf --installroot", lambda: host_dnf(inputs, work, names))
    measure("engine dnf x86_64 (total)", lambda: engine_rows(
        "engine dnf x86_64 (total)", "  dnf in the appliance", "x86_64", None))
    measure("virt-customize --run-command dnf", lambda: virt_customize(inputs, work, names))
    measure("engine rpm x86_64 (total)", lambda: engine_rows(
        "engine rpm x86_64 (total)", "  rpm -U in the appliance, x86_64", "x86_64", "rpm"))
    measure("engine rpm aarch64 (total)", lambda: engine_rows(
        "engine rpm aarch64 (total)", "  rpm -U in the appliance, aarch64", "aarch64", "rpm"))
    peer = rows.get("host dnf --installroot")
    print(f"\ninstalling {args.count} small RPMs (each with a %post); accel={args.accel}\n")
    print(f"| {'step':<36} | {'s':>7} | {'vs host dnf':>11} |")
    print(f"| {'-' * 36} | {'-' * 7} | {'-' * 11} |")
    for name, took in rows.items():
        ratio = f"{took / peer:10.1f}x" if peer else "-"
        print(f"| {name:<36} | {took:7.1f} | {ratio:>11} |")
    for name, why in failed.items():
        print(f"| {name:<36} | failed: {why}")
    arm, x86 = "  rpm -U in the appliance, aarch64", "  rpm -U in the appliance, x86_64"
    if arm in rows and x86 in rows:
        total = rows["engine rpm aarch64 (total)"] / rows["engine rpm x86_64 (total)"]
        print(f"\naarch64 (qemu-user) / x86_64: rpm -U {rows[arm] / rows[x86]:.1f}x, "
              f"whole step {total:.1f}x")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
