"""Build small real RPMs with rpmbuild (Debian's `rpm` package) for tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

# The main fixture package: every kind of file rpm can carry.
FULL_SPEC = """\
Name: rbtest
Version: 1.0
Release: 1
Summary: rootfs-build rpm test package
License: MIT
%description
Test package.
%install
mkdir -p %{buildroot}/usr/bin %{buildroot}/var/lib/rbtest %{buildroot}/etc
mkdir -p %{buildroot}/usr/share/rbtest/empty
printf 'hello\\n' > %{buildroot}/usr/bin/tool
ln %{buildroot}/usr/bin/tool %{buildroot}/usr/bin/tool-link
ln -s tool %{buildroot}/usr/bin/tool-sym
printf 'setuid\\n' > %{buildroot}/usr/bin/suid
printf 'pinger\\n' > %{buildroot}/usr/bin/pinger
printf 'conf=1\\n' > %{buildroot}/etc/rbtest.conf
seq 1 40000 > %{buildroot}/usr/share/rbtest/big.txt
ln %{buildroot}/usr/share/rbtest/big.txt %{buildroot}/usr/share/rbtest/a-big-link.txt
: > %{buildroot}/usr/share/rbtest/empty.txt
%post
echo configured
%files
%attr(0755,root,root) /usr/bin/tool
%attr(0755,root,root) /usr/bin/tool-link
/usr/bin/tool-sym
%attr(4755,root,root) /usr/bin/suid
%caps(cap_net_raw=ep) %attr(0755,root,root) /usr/bin/pinger
%dir %attr(0750,qemu,kvm) /var/lib/rbtest
%attr(0640,root,qemu) %config(noreplace) /etc/rbtest.conf
%ghost %attr(0600,qemu,qemu) /var/lib/rbtest/state
%attr(0666,root,root) %dev(c,1,3) /usr/share/rbtest/null
%dir /usr/share/rbtest
%dir /usr/share/rbtest/empty
/usr/share/rbtest/big.txt
/usr/share/rbtest/a-big-link.txt
/usr/share/rbtest/empty.txt
"""

# rpmbuild's --define for each payload compressor
PAYLOADS = {"zstd": "w19.zstdio", "gzip": "w9.gzdio", "xz": "w6.xzdio", "lzma": "w6.lzdio",
            "bzip2": "w9.bzdio", "none": "w0.ufdio"}

_QUIET = """\
%define debug_package %{nil}
%global __os_install_post %{nil}
%global _build_id_links none
"""


def simple_spec(name: str, files: dict[str, str], *, scripts: str = "",
                attrs: str = "%attr(0644,root,root)", dirs: tuple[str, ...] = (),
                version: str = "1.0") -> str:
    """A spec installing `files` (path -> content) and `dirs`."""
    install = "\n".join(
        [f"mkdir -p %{{buildroot}}{d}" for d in dirs]
        + [f"mkdir -p %{{buildroot}}{os.path.dirname(p)}\n"
           f"printf '{c}' > %{{buildroot}}{p}" for p, c in files.items()])
    listed = "\n".join([f"%dir {d}" for d in dirs] + [f"{attrs} {p}" for p in files])
    return textwrap.dedent(f"""\
        Name: {name}
        Version: {version}
        Release: 1
        Summary: test
        License: MIT
        BuildArch: noarch
        %description
        test
        %install
        """) + install + "\n" + scripts + "\n%files\n" + listed + "\n"


def rpmbuild_or_skip() -> str:
    tool = shutil.which("rpmbuild")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("rpmbuild is missing: setup.sh must `apt-get install -y rpm`")
        pytest.skip("rpmbuild not installed (apt-get install -y rpm)")
    return tool


def build_rpm(tmp: Path, spec: str, *, target: str | None = None, payload: str = "zstd",
              source: bool = False, defines: dict[str, str] | None = None) -> Path:
    """Run rpmbuild on `spec` in a private topdir under `tmp`; the built package."""
    tool = rpmbuild_or_skip()
    top = tmp / f"top-{len(list(tmp.glob('top-*')))}"
    (top / "tmp").mkdir(parents=True)
    spec_path = top / "test.spec"
    spec_path.write_text(_QUIET + spec)
    macros = {"_topdir": str(top), "_tmppath": str(top / "tmp"),
              "_binary_payload": PAYLOADS[payload], **(defines or {})}
    cmd = [tool, "-bs" if source else "-bb", "--quiet"]
    for k, v in macros.items():
        cmd += ["--define", f"{k} {v}"]
    if target:
        cmd += ["--target", target]
    env = {**os.environ, "LC_ALL": "C", "HOME": str(top)}
    proc = subprocess.run(cmd + [str(spec_path)], capture_output=True, text=True, env=env,
                          timeout=120)
    if proc.returncode:
        raise AssertionError(f"rpmbuild failed:\n{proc.stdout}\n{proc.stderr}")
    built = sorted((top / ("SRPMS" if source else "RPMS")).rglob("*.rpm"))
    assert len(built) == 1, built
    return built[0]
