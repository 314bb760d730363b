"""Issue 11 at the engine level: packages installed by the rootfs's own dnf
and rpm inside the appliance, from real repositories of real RPMs built
here, reproducibly; run steps normalized; foreign-arch steps under an
emulator registered in the appliance only.

Appliance launches are batched: one x86_64 session runs every failing case
(each after a reset of the step's changes), the good install twice with the
clock on different days, the older-rpm path and the useradd steps;
a second launch repeats the good install.  The aarch64 case goes through
the CLI: a qcow2 of the aarch64 base and a recipe whose element runs a
script and installs an RPM file, both under emulation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from bad_input_helpers import refused, write_element
from conftest import run_cli, write_recipe
from packages_helpers import (
    DAY,
    EPOCH,
    RPMDB,
    append_files,
    build_all,
    corrupt_payload,
    layer_members,
    make_gpg,
    make_iso,
    make_repo,
    mmdebstrap_tar,
    register_base_provides,
    rpm_qa,
    tamper_first_file_mode,
)

from builder import emulation, guestfs_io, packages
from builder.errors import UserError
from builder.layer import build_layer_from_tar
from builder.session import Session

pytestmark = pytest.mark.appliance


@dataclasses.dataclass
class Inputs:
    work: Path
    rpms: dict[str, Path]
    good: Path          # repo: rb-lib, rb-app, rb-weak and the failing ones
    iso: Path           # repo as an ISO: rb-iso-only
    corrupt: Path       # repo whose rb-corrupt was damaged after indexing
    tampered: Path      # repo indexed with rb-tampered's header altered
    signed: Path        # repo: rb-signed (suite key), rb-otherkey (other key)
    key: Path           # the suite's public key
    base_x86: Path      # Debian tar with rpm and dnf
    base_arm: Path      # Debian aarch64 tar with rpm only


@pytest.fixture(scope="module")
def inputs(session_dir: Path) -> Inputs:
    start = time.monotonic()
    work = session_dir / "packages"
    work.mkdir()
    rpms = build_all(work / "rpmbuild")
    good = make_repo(work / "repo-good", [rpms[n] for n in (
        "rb-lib", "rb-app", "rb-weak", "rb-needs-absent", "rb-conflict-a", "rb-conflict-b",
        "rb-dirlink", "rb-badpre")])
    iso_src = make_repo(work / "iso-src", [rpms["rb-iso-only"]])
    iso = make_iso(iso_src, work / "repo.iso")
    corrupt = make_repo(work / "repo-corrupt", [rpms["rb-corrupt"]])
    corrupt_payload(corrupt / rpms["rb-corrupt"].name, corrupt / rpms["rb-corrupt"].name)
    tampered = work / "repo-tampered"
    tampered.mkdir()
    tamper_first_file_mode(rpms["rb-tampered"], tampered / rpms["rb-tampered"].name)
    signed = work / "repo-signed"
    signed.mkdir()
    suite, other = make_gpg(work / "gpg-suite", "suite"), make_gpg(work / "gpg-other", "other")
    try:
        for name, key in (("rb-signed", suite), ("rb-otherkey", other)):
            shutil.copy(rpms[name], signed / rpms[name].name)
            key.sign(signed / rpms[name].name)
    finally:
        suite.stop()
        other.stop()
    for repo in (tampered, signed):
        subprocess.run(["createrepo_c", "--quiet", "--no-database", str(repo)], check=True)
    base_x86 = mmdebstrap_tar(work / "debian-x86_64.tar", arch="x86_64")
    register_base_provides(base_x86, work / "bp-x86", passwd=False)
    # config files an admin edited before the package came (point 7)
    append_files(base_x86, work / "edited", {"etc/rb-app.conf": b"keep=edited-by-admin\n",
                                             "etc/rb-app-plain.conf": b"plain=edited-by-admin\n"})
    base_arm = mmdebstrap_tar(work / "debian-aarch64.tar", arch="aarch64")
    register_base_provides(base_arm, work / "bp-arm", passwd=True)
    print(f"[inputs] {time.monotonic() - start:.1f} s")
    return Inputs(work, rpms, good, iso, corrupt, tampered, signed, suite.public,
                  base_x86, base_arm)


def _tree(tar: Path) -> Callable[[BinaryIO], None]:
    def produce(sink: BinaryIO) -> None:
        with open(tar, "rb") as f:
            shutil.copyfileobj(f, sink, 1 << 20)
    return produce


def _consumer(dest: Path) -> Callable[[BinaryIO], dict[str, Any]]:
    def consume(stream: BinaryIO) -> dict[str, Any]:
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        return build_layer_from_tar(stream, dest, mtime_policy="clamp", source=dest.name,
                                    overlay_upper=True)
    return consume


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Everything the x86_64 session does, in order: (case, request, options).
# A case with an expected error line part fails there and is reset.
GOOD_INSTALL = ("rb-app", "rb-iso-only")
FAILING: dict[str, tuple[str, dict[str, Any], str]] = {
    "missing dependency": ("good", {"install": ("rb-needs-absent",)},
                           "rb-needs-absent-1.0-1.noarch needs libabsent-feature"),
    "file conflict": ("good", {"install": ("rb-conflict-a", "rb-conflict-b")},
                      "file conflict: "),
    "directory replaced by a symlink": (
        "good", {"install": ("rb-dirlink",)},
        "rb-dirlink-1.0-1.noarch: it has a file or symlink at /usr/lib64, which is a "
        "directory in the rootfs"),
    "failing %pre": ("good", {"install": ("rb-badpre",)},
                     "the %prein scriptlet of rb-badpre-1.0-1.noarch failed (exit status 3)"),
    "corrupt RPM": ("corrupt", {"install": ("rb-corrupt",)},
                    "does not match its repository's checksum"),
    "tampered header": ("tampered", {"install": ("rb-tampered",)}, "digests are BAD"),
    "unsigned with gpgcheck": ("good", {"install": ("rb-lib",), "gpgcheck": True, "key": True},
                               "is not signed, and gpgcheck is on"),
    "signed with another key": ("signed", {"install": ("rb-otherkey",), "gpgcheck": True,
                                           "key": True}, "not among gpgkeys"),
    "remove what is not installed": ("good", {"remove": ("rb-weak",)},
                                     "rb-weak is not installed, so it cannot be removed"),
}


@dataclasses.dataclass
class X86Session:
    errors: dict[str, str]
    layers: dict[str, Path]
    summaries: dict[str, packages.PackageSummary]
    rewritten: dict[str, bool]
    not_reproducible: dict[str, list[str]]
    launches: int
    times: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def _request(inputs: Inputs, repo: str, opts: dict[str, Any]) -> packages.PackageRequest:
    repos = {"good": (inputs.good, inputs.iso), "corrupt": (inputs.corrupt,),
             "tampered": (inputs.tampered,), "signed": (inputs.signed,)}[repo]
    return packages.PackageRequest(
        repos=repos, install=opts.get("install", ()), remove=opts.get("remove", ()),
        gpgcheck=opts.get("gpgcheck", False),
        gpgkeys=(inputs.key,) if opts.get("key") else ())


_USERADD = (b"#!/bin/bash\nset -e\n@ENV@useradd -m -u 1234 builder\nldconfig\n"
            b"echo 0123456789abcdef0123456789abcdef > /etc/machine-id\n"
            b"mkdir -p /var/lib/systemd && echo seed > /var/lib/systemd/random-seed\n")


def _session(inputs: Inputs, name: str, repo_set: packages.RepoSet, drives: list[Any],
             steps: list[tuple[str, Callable[[guestfs_io.TreeSession], Any]]]
             ) -> X86Session:
    """One appliance on the x86_64 base; each step gets the session after a
    reset (the first after lay)."""
    result = X86Session({}, {}, {}, {}, {}, 0)
    counter = Session()
    app = guestfs_io.Appliance(name, session=counter)
    app.add_run_scratch(inputs.base_x86.stat().st_size)
    for d in drives:
        app.add_drive(d.path, fmt="raw", readonly=True, label=d.label)
    with app:
        session = guestfs_io.TreeSession(app, step=name, epoch=EPOCH, arch="x86_64")
        t = time.monotonic()
        session.lay(_tree(inputs.base_x86))
        print(f"[{name}] launch and lay: {time.monotonic() - t:.1f} s")
        for i, (case, step) in enumerate(steps):
            t = time.monotonic()
            if i:
                session.reset()
            step(session)
            print(f"[{name}] {case}: {time.monotonic() - t:.1f} s")
    result.launches = counter.launches
    return result


def _all_repos(inputs: Inputs) -> tuple[packages.RepoSet, list[packages.RepoDrive]]:
    """One repo set holding every repository the x86 cases use, so all
    drives are attached to the one appliance; each case asks for its own
    subset (the labels follow the repositories' order)."""
    request = packages.PackageRequest(
        repos=(inputs.good, inputs.iso, inputs.corrupt, inputs.tampered, inputs.signed),
        install=("rb-app",), gpgcheck=False)
    repo_set = packages.check(request, arch="x86_64", workdir=inputs.work / "check-all")
    return repo_set, packages.repo_drives(repo_set)


def _subset(repo_set: packages.RepoSet, drives: list[packages.RepoDrive],
            request: packages.PackageRequest, inputs: Inputs
            ) -> tuple[packages.RepoSet, list[packages.RepoDrive]]:
    order = [inputs.good, inputs.iso, inputs.corrupt, inputs.tampered, inputs.signed]
    picked = [order.index(r) for r in request.repos]
    keys = tuple(packages._check_key(k, None) for k in request.gpgkeys)
    return (dataclasses.replace(repo_set, repos=tuple(repo_set.repos[i] for i in picked),
                                keys=keys),
            [drives[i] for i in picked])


def _install_step(inputs: Inputs, out: X86Session, case: str, request: packages.PackageRequest,
                  repo_set: packages.RepoSet, drives: list[packages.RepoDrive], *,
                  clock: int | None = None, rpm_ignores_epoch: bool = False,
                  expect: str | None = None) -> Callable[[guestfs_io.TreeSession], None]:
    rs, ds = _subset(repo_set, drives, request, inputs)

    def step(session: guestfs_io.TreeSession) -> None:
        if clock is not None:
            session.reset(clock=clock)
        session.not_reproducible.clear()
        session.step = case
        try:
            summary = packages.install_in_session(session, request, rs, ds,
                                                  rpm_ignores_epoch=rpm_ignores_epoch)
        except UserError as e:
            out.errors[case] = str(e)
            return
        out.summaries[case] = summary
        if expect is not None:
            out.errors[case] = f"no error (expected {expect!r})"
            return
        # what rpm recorded, before capture() normalizes it
        out.times[case] = sorted(session.command(
            ["rpm", "-qa", "--qf", "%{NAME} %{INSTALLTIME} %{INSTALLTID}\\n"]).splitlines())
        rewrites = len(session.rpmdb_rewrites)
        session.capture(_consumer(inputs.work / "layers" / case))
        out.rewritten[case] = len(session.rpmdb_rewrites) > rewrites
        out.layers[case] = inputs.work / "layers" / case
        out.not_reproducible[case] = list(session.not_reproducible)
    return step


def _run_step(inputs: Inputs, out: X86Session, case: str, script: bytes, *, clock: int
              ) -> Callable[[guestfs_io.TreeSession], None]:
    def step(session: guestfs_io.TreeSession) -> None:
        session.reset(clock=clock)
        session.step = case
        session.run_scripts([("useradd", script)], {})
        session.capture(_consumer(inputs.work / "layers" / case))
        out.layers[case] = inputs.work / "layers" / case
    return step


GOOD_OLD = "good install, rpm ignoring SOURCE_DATE_EPOCH"


@pytest.fixture(scope="module")
def x86(inputs: Inputs) -> X86Session:
    repo_set, drives = _all_repos(inputs)
    out = X86Session({}, {}, {}, {}, {}, 0)
    steps: list[tuple[str, Callable[[guestfs_io.TreeSession], Any]]] = []
    for case, (repo, opts, expect) in FAILING.items():
        steps.append((case, _install_step(inputs, out, case, _request(inputs, repo, opts),
                                          repo_set, drives, expect=expect)))
    good = _request(inputs, "good", {"install": GOOD_INSTALL})
    signed = _request(inputs, "signed", {"install": ("rb-signed",), "gpgcheck": True,
                                         "key": True})
    steps += [
        ("signed", _install_step(inputs, out, "signed", signed, repo_set, drives)),
        ("good", _install_step(inputs, out, "good", good, repo_set, drives,
                               clock=EPOCH + 100)),
        # the %pre's useradd does not see SOURCE_DATE_EPOCH either here (with
        # a real rpm 4.17 it would): the run stays on the epoch's day
        (GOOD_OLD, _install_step(inputs, out, GOOD_OLD, good, repo_set, drives,
                                 clock=EPOCH + 11,
                                 rpm_ignores_epoch=True)),
        ("useradd", _run_step(inputs, out, "useradd", _USERADD.replace(b"@ENV@", b""),
                              clock=EPOCH + 10)),
        ("useradd, 4 days later", _run_step(inputs, out, "useradd, 4 days later",
                                            _USERADD.replace(b"@ENV@", b""),
                                            clock=EPOCH + 4 * DAY + 10)),
        ("useradd without SOURCE_DATE_EPOCH, 4 days later", _run_step(
            inputs, out, "useradd without SOURCE_DATE_EPOCH, 4 days later",
            _USERADD.replace(b"@ENV@", b"env -u SOURCE_DATE_EPOCH "), clock=EPOCH + 4 * DAY)),
    ]
    session = _session(inputs, "x86_64 package cases", repo_set, drives, steps)
    out.launches = session.launches
    return out


@dataclasses.dataclass
class Again:
    layer: Path
    summary: packages.PackageSummary


@pytest.fixture(scope="module")
def x86_again(inputs: Inputs, x86: X86Session) -> Again:
    """The good install again, through packages.install (the API a build
    calls): its own appliance launch and scratch filesystems, the clock
    where the epoch is (the other was 100 s later)."""
    request = _request(inputs, "good", {"install": GOOD_INSTALL})
    repo_set = packages.check(request, arch="x86_64", workdir=inputs.work / "check-again")
    layer = inputs.work / "layers" / "good, second launch"
    _upper, summary = packages.install(
        request, repo_set, tree=_tree(inputs.base_x86),
        tree_bytes=inputs.base_x86.stat().st_size, epoch=EPOCH, arch="x86_64",
        consume_upper=_consumer(layer), step="good, second launch")
    return Again(layer, summary)


# -- the good install --------------------------------------------------------------

def test_rpm_qa_lists_exactly_the_requested_packages_and_their_dependencies(
        x86: X86Session, inputs: Inputs, tmp_path: Path) -> None:
    listed = rpm_qa(x86.layers["good"], tmp_path)
    assert listed == ["base-provides-1-1.noarch", "rb-app-1.0-1.noarch",
                      "rb-iso-only-1.0-1.noarch", "rb-lib-1.0-1.noarch"]  # no rb-weak
    summary = x86.summaries["good"]
    assert summary.tool == "dnf" and summary.rpm_version == "4.18.0"
    assert [(p.name, p.version, p.arch) for p in summary.installed] == [
        ("rb-app", "1.0", "noarch"), ("rb-iso-only", "1.0", "noarch"),
        ("rb-lib", "1.0", "noarch")]
    for p in summary.installed:
        assert p.sha256 == _sha(inputs.rpms[p.name]), p
    assert summary.removed == [] and summary.keys_imported == []


def test_pre_user_post_file_caps_setuid_hard_links_on_disk(x86: X86Session) -> None:
    m = layer_members(x86.layers["good"])
    passwd = m["etc/passwd"][1].decode()
    user = next(line.split(":") for line in passwd.splitlines()
                if line.startswith("rbsvc:"))
    group = next(line.split(":") for line in m["etc/group"][1].decode().splitlines()
                 if line.startswith("rbsvc:"))
    assert int(user[2]) < 1000 and user[3] == group[2]   # -r: a system user and group
    # the package's own directory belongs to the user its %pre made
    info = m["var/lib/rb-app"][0]
    assert (info.uid, info.gid, info.mode & 0o7777) == (int(user[2]), int(group[2]), 0o750)
    assert m["var/lib/rb-app/post-ran"][1] == b"post ran for 1\n"
    assert m["usr/bin/rb-app"][0].mode & 0o7777 == 0o4755
    caps = m["usr/sbin/rb-ping"][0].pax_headers.get("SCHILY.xattr.security.capability")
    assert caps is not None and caps.encode("latin-1", "surrogateescape")[5] & 0x20  # bit 13
    a, b = m["usr/share/rb-app/a"][0], m["usr/share/rb-app/b"][0]
    assert {a.type, b.type} == {tarfile.REGTYPE, tarfile.LNKTYPE}
    assert "usr/share/rb-iso-only/x" in m          # from the ISO
    assert not any(n.startswith("usr/share/rb-weak") for n in m)  # weak deps off


def test_config_noreplace_writes_rpmnew_and_config_saves_rpmorig(x86: X86Session) -> None:
    """Point 7: the base has both files, edited by an admin.  The edited
    %config(noreplace) file is kept and the packaged one lands in .rpmnew;
    the edited %config file is replaced and kept as .rpmorig, as a real
    `rpm -i` does."""
    m = layer_members(x86.layers["good"])
    assert "etc/rb-app.conf" not in m      # the base's edited file, untouched
    assert m["etc/rb-app.conf.rpmnew"][1] == b"keep=packaged\n"
    assert m["etc/rb-app-plain.conf"][1] == b"plain=packaged\n"
    assert m["etc/rb-app-plain.conf.rpmorig"][1] == b"plain=edited-by-admin\n"


def test_nothing_of_the_session_reaches_the_layer(x86: X86Session) -> None:
    m = layer_members(x86.layers["good"])
    assert not [n for n in m if n.startswith((".rootfs-build-run", "var/cache/dnf",
                                              "var/lib/dnf", "var/log/dnf", "tmp/"))]
    assert not [n for n in m if "qemu" in n or n.endswith((".rpm.lock", "-shm", "-wal"))]
    assert f"{RPMDB}/rpmdb.sqlite" in m
    assert max(info.mtime for info, _ in m.values()) <= EPOCH


# -- reproducible --------------------------------------------------------------------

def _diff(a: Path, b: Path) -> list[str]:
    ma, mb = layer_members(a), layer_members(b)
    out = sorted(set(ma) ^ set(mb))
    for name in sorted(set(ma) & set(mb)):
        (ia, da), (ib, db) = ma[name], mb[name]
        if da != db or ia.get_info() != ib.get_info() or ia.pax_headers != ib.pax_headers:
            out.append(name)
    return out


def test_two_installs_are_bit_identical_rpm_database_included(x86: X86Session,
                                                               x86_again: Again) -> None:
    """Another appliance launch (new scratch filesystems), the clock twenty
    days later: the same layer bytes, rpmdb.sqlite included.  rpm 4.18 took
    the transaction id from SOURCE_DATE_EPOCH and gave the n-th package
    SOURCE_DATE_EPOCH + n as install time; those are clamped to the epoch."""
    first, other = x86.layers["good"], x86_again.layer
    assert _diff(first, other) == []
    assert _sha(first / "layer.tar") == _sha(other / "layer.tar")
    recorded = {line.split()[0]: (int(line.split()[1]), int(line.split()[2]))
                for line in x86.times["good"]}
    assert {n: tid for n, (_t, tid) in recorded.items() if n.startswith("rb-")} == {
        "rb-app": EPOCH, "rb-iso-only": EPOCH, "rb-lib": EPOCH}
    assert sorted(t for n, (t, _tid) in recorded.items() if n.startswith("rb-")) == [
        EPOCH, EPOCH + 1, EPOCH + 2]
    assert x86.rewritten["good"]
    assert x86.not_reproducible["good"] == [] and x86_again.summary.not_reproducible == []
    assert x86_again.summary.to_json() == x86.summaries["good"].to_json()


def test_older_rpm_path_is_bit_identical_too(x86: X86Session, tmp_path: Path) -> None:
    """rpm and dnf run without SOURCE_DATE_EPOCH (for rpm's install times
    that is how rpm 4.17 on openEuler 22.03 behaves): the database records
    the clock, is rewritten from an export, and gives the same bytes as the
    rpm 4.18 path's install at another time: the database depends neither
    on the clock nor on which rpm made it."""
    old = x86.layers[GOOD_OLD]
    assert x86.rewritten[GOOD_OLD]
    recorded = [int(line.split()[2]) for line in x86.times[GOOD_OLD] if line.startswith("rb-")]
    assert all(EPOCH + 11 <= tid < EPOCH + 11 + 600 for tid in recorded), recorded
    times = rpm_qa(old, tmp_path, fmt="%{NAME} %{INSTALLTIME} %{INSTALLTID}\\n")
    assert times == ["base-provides 1699913600 1699913600", f"rb-app {EPOCH} {EPOCH}",
                     f"rb-iso-only {EPOCH} {EPOCH}", f"rb-lib {EPOCH} {EPOCH}"]
    assert _diff(old, x86.layers["good"]) == []  # "good" ran at EPOCH + 100
    assert _sha(old / "layer.tar") == _sha(x86.layers["good"] / "layer.tar")


def test_useradd_gives_the_same_shadow_on_different_days(x86: X86Session) -> None:
    same = layer_members(x86.layers["useradd"])
    later = layer_members(x86.layers["useradd, 4 days later"])
    shadow = same["etc/shadow"][1]
    assert shadow == later["etc/shadow"][1]
    day = next(line.split(b":")[2] for line in shadow.splitlines()
               if line.startswith(b"builder:"))
    assert int(day) == EPOCH // DAY
    # the control: without SOURCE_DATE_EPOCH useradd writes the clock's day
    control = layer_members(x86.layers["useradd without SOURCE_DATE_EPOCH, 4 days later"])
    assert control["etc/shadow"][1] != shadow
    assert _diff(x86.layers["useradd"], x86.layers["useradd, 4 days later"]) == []


def test_run_steps_leave_no_cache_seed_or_machine_id(x86: X86Session) -> None:
    m = layer_members(x86.layers["useradd"])
    assert "var/cache/ldconfig/aux-cache" not in m
    assert "var/lib/systemd/random-seed" not in m
    assert m["etc/machine-id"][1] == b""
    assert "etc/.pwd.lock" not in m
    assert "home/builder" in m


# -- one line per mistake ------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(FAILING))
def test_each_bad_case_is_one_line(x86: X86Session, case: str) -> None:
    line = x86.errors[case]
    assert FAILING[case][2] in line, line
    assert "\n" not in line and line.startswith(case + ": ")
    assert case not in x86.layers


def test_signed_package_with_its_key(x86: X86Session) -> None:
    summary = x86.summaries["signed"]
    assert [p.name for p in summary.installed] == ["rb-signed"]
    assert len(summary.keys_imported) == 1 and summary.keys_imported[0].startswith("gpg-pubkey-")


# -- foreign architecture ------------------------------------------------------------

def _no_emulator_trace(tf: tarfile.TarFile) -> None:
    emulator = Path("/usr/bin/qemu-aarch64-static").read_bytes()
    for member in tf.getmembers():
        assert "qemu" not in member.name and "binfmt" not in member.name, member.name
        if member.isfile() and member.size == len(emulator):
            f = tf.extractfile(member)
            assert f is not None and f.read() != emulator, member.name


# -- through the CLI: the qcow2 fixture and build.py's run step -------------------------

def _qcow2(inputs: Inputs, tree: Path, arch: str) -> Path:
    """A Debian base tar in the openEuler qcow2 shape (MBR, /boot ext4, / ext4)."""
    from builder import sampleimage

    boot = inputs.work / f"boot-{arch}.tar"
    boot.write_bytes(sampleimage.boot_tree())
    image = inputs.work / f"debian-{arch}.qcow2"
    guestfs_io.make_disk_image(image, fmt="qcow2", size_mib=1024, partitions=[
        guestfs_io.Partition("/boot", 64), guestfs_io.Partition("/", None)],
        trees={"/": tree, "/boot": boot}, label=f"{arch} fixture image")
    return image


@pytest.fixture(scope="module")
def arm_image(inputs: Inputs) -> Path:
    """The aarch64 base (rpm, no dnf) as a qcow2."""
    return _qcow2(inputs, inputs.base_arm, "aarch64")


def test_aarch64_base_runs_scripts_and_rpm_under_emulation(arm_image: Path, inputs: Inputs,
                                                           demo_inputs: Path,
                                                           tmp_path: Path) -> None:
    """The aarch64 Debian base (rpm, no dnf) built by the CLI on this x86_64
    host: an install.d script and an RPM file's %post run under qemu-user,
    the rootfs's rpm records the package, and nothing of the emulator reaches
    the output.  Without an emulator the run step is refused, and so is an
    x86_64 rexec for this rootfs, both before any appliance starts."""
    if not emulation.can_run("aarch64"):
        pytest.fail("qemu-user-static is missing: setup.sh installs it")
    write_element(tmp_path, "uname", "params:\n  arm_rpms: {type: files}\n"
                  "rpms:\n  - {src: '@arm_rpms'}\n", {
                      "install.d/10-uname": "#!/bin/bash\nset -e\nuname -m > /etc/built-for\n"})
    os.chmod(tmp_path / "elements/uname/install.d/10-uname", 0o755)
    recipe = write_recipe(tmp_path / "r.yaml", f"""\
name: armrun
base: {{image: {arm_image}}}
epoch: {EPOCH}
elements: [uname]
params: {{arm_rpms: [{inputs.rpms["rb-arm"]}, {inputs.rpms["rb-lib"]}]}}
packages: {{gpgcheck: false}}
output: {{formats: [tar]}}
""")
    cache = tmp_path / "cache"
    res = run_cli(recipe, "-o", tmp_path / "out", "--cache-dir", cache, "--json", timeout=900)
    assert res.returncode == 0, res.stderr
    assert [la["kind"] for la in res.json["layers"]] == ["base", "packages", "run"]
    out = tmp_path / "out" / "armrun"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base"]["arch"] == "aarch64"
    # two packages: rpm 4.18 gives the second SOURCE_DATE_EPOCH + 1, so the
    # database is rewritten, with nothing but bash, coreutils and rpm there
    assert [(p["name"], p["arch"]) for p in manifest["packages"]["installed"]] == [
        ("rb-arm", "aarch64"), ("rb-lib", "noarch")]
    with tarfile.open(out / "rootfs.tar") as tf:
        for name in ("./etc/built-for", "./var/lib/rb-arm/post-uname"):
            member = tf.extractfile(name)
            assert member is not None and member.read() == b"aarch64\n", name
        _no_emulator_trace(tf)
    tree = tmp_path / "tree"
    tree.mkdir()
    subprocess.run(["tar", "-C", str(tree), "-xf", str(out / "rootfs.tar"), f"./{RPMDB}"],
                   check=True)
    names = subprocess.run(["rpm", "--dbpath", str(tree / RPMDB), "-qa"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert sorted(names) == ["base-provides-1-1.noarch", "rb-arm-1.0-1.aarch64",
                             "rb-lib-1.0-1.noarch"]
    times = subprocess.run(["rpm", "--dbpath", str(tree / RPMDB), "-qa", "--qf",
                            "%{INSTALLTIME}\\n"], capture_output=True, text=True,
                           check=True).stdout.split()
    assert all(int(t) <= EPOCH for t in times), times
    # the same script without an emulator: refused, no appliance started
    write_element(tmp_path, "script-only", None, {
        "install.d/10-uname": "#!/bin/bash\nuname -m > /etc/built-for\n"})
    os.chmod(tmp_path / "elements/script-only/install.d/10-uname", 0o755)
    recipe = write_recipe(tmp_path / "r2.yaml", f"""\
name: armrun2
base: {{image: {arm_image}}}
elements: [script-only]
""")
    empty = tmp_path / "no-qemu"
    empty.mkdir()
    res = run_cli(recipe, "-o", tmp_path / "out2", "--cache-dir", cache, "--json",
                  env={"ROOTFS_BUILD_QEMU_DIR": str(empty)}, timeout=900)
    refused(res, tmp_path / "out2", "install.d/10-uname", "there is no emulator for aarch64",
            launches=0)
    recipe = write_recipe(tmp_path / "r3.yaml", f"""\
name: armrexec
base: {{image: {arm_image}}}
elements: [rexec]
params: {{rexec_bin: {demo_inputs.parent / "demo-inputs" / "rexec"}}}
""")
    res = run_cli(recipe, "-o", tmp_path / "out3", "--cache-dir", cache, "--json")
    refused(res, tmp_path / "out3", "built for x86_64, but the rootfs is aarch64", launches=0)


# ---------------------------------------------------------------------------
# the package step in a build: the recipe's packages:, an element's
# package-installs.yaml (pkg-map, build-only), a deployment hiding /etc


@pytest.fixture(scope="module")
def x86_image(inputs: Inputs) -> Path:
    """The x86_64 base (rpm, dnf) as a qcow2."""
    return _qcow2(inputs, inputs.base_x86, "x86_64")


def test_recipe_packages_are_installed_by_the_build(inputs: Inputs, x86_image: Path,
                                                   tmp_path: Path) -> None:
    write_element(tmp_path, "pk", None, {
        # DIB's format: a generic name mapped by pkg-map, a build-only package
        "package-installs.yaml": "app-library:\nrb-weak:\n  build-only: true\n",
        "pkg-map": '{"family": {"debian": {"app-library": "rb-lib"}}}',
        "install.d/10-during": "#!/bin/bash\nset -e\nmkdir -p /var/lib/pk\n"
                               "rpm -q rb-weak > /var/lib/pk/during\n"})
    os.chmod(tmp_path / "elements/pk/install.d/10-during", 0o755)
    recipe = write_recipe(tmp_path / "r.yaml", f"""\
name: pk
base: {{image: {x86_image}}}
epoch: {EPOCH}
elements: [pk, offload-deploy]
params: {{host_ip: 10.0.0.1, dpu_ip: 10.0.0.2}}
packages:
  repos: [{inputs.good}]
  install: [rb-app]
  gpgcheck: false
output: {{formats: [tar], bundle: false}}
""")
    cache = tmp_path / "cache"
    res = run_cli(recipe, "-o", tmp_path / "out", "--cache-dir", cache, "--json", timeout=1800)
    assert res.returncode == 0, res.stderr
    kinds = [la["kind"] for la in res.json["layers"]]
    assert kinds == ["base", "packages", "run"], kinds
    out = tmp_path / "out/pk"
    # what rpm says, read on the host from the output tree
    tree = tmp_path / "tree"
    tree.mkdir()
    subprocess.run(["tar", "-C", str(tree), "-xf", str(out / "rootfs.tar")], check=True)
    names = subprocess.run(["rpm", "--dbpath", str(tree / RPMDB), "-qa", "--qf", "%{NAME}\\n"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert {"rb-app", "rb-lib"} <= set(names) and "rb-weak" not in names, names
    # the build-only package was there while the scripts ran, then removed
    assert (tree / "var/lib/pk/during").read_text().startswith("rb-weak-1.0")
    manifest = json.loads((out / "manifest.json").read_text())
    installed = {p["name"]: p for p in manifest["packages"]["installed"]}
    assert set(installed) == {"rb-app", "rb-lib"}, installed
    assert installed["rb-app"]["sha256"] == _sha(inputs.rpms["rb-app"])
    assert [r.split("-1.0")[0] for r in manifest["packages"]["removed"]] == ["rb-weak"]
    # files packages put where the deployment bind-mounts the DPU's own dirs
    # are listed and summed up in one warning, not refused
    hidden = manifest["packages"]["hidden_at_run_time"]
    assert "/var/lib/rb-app/post-ran" in hidden and "/etc/rb-app-plain.conf" in hidden, hidden
    assert "files that packages installed lie under paths the deployment" in res.stderr
    # a warm rebuild installs nothing
    again = run_cli(recipe, "-o", tmp_path / "out2", "--cache-dir", cache, "--json")
    assert again.returncode == 0, again.stderr
    assert again.json["appliance_launches"] == 0
    assert (tmp_path / "out2/pk/rootfs.tar").read_bytes() == (out / "rootfs.tar").read_bytes()
