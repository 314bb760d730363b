"""Fixtures for the package tests, all made by the suite: Debian bases with
Debian's rpm (and dnf) made with mmdebstrap, RPMs built with rpmbuild,
signed with a gpg key made here, indexed with createrepo_c, an ISO made
with bsdtar; and readers for what a package step produced.

A Debian base has no RPM database of its own: a package that provides what
the test RPMs' scriptlets need (/bin/sh, useradd...) is registered in it
with `rpm -i --justdb`, as the real openEuler base would have them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
import subprocess
import tarfile
import textwrap
from pathlib import Path

from rpm_helpers import build_rpm

EPOCH = 1_700_000_000
DAY = 86400
RPMDB = "root/.rpmdb"   # Debian's rpm keeps its database in $HOME/.rpmdb

BASE_PROVIDES = """\
Name: base-provides
Version: 1
Release: 1
Summary: what the Debian base has that RPMs require
License: MIT
BuildArch: noarch
Provides: /bin/sh /bin/bash /usr/bin/sh /usr/bin/bash /usr/sbin/useradd
Provides: /usr/sbin/groupadd /usr/bin/getent /usr/sbin/nologin /sbin/nologin
%description
Registered with --justdb: the files come from Debian packages.
%files
"""


def mmdebstrap_tar(dest: Path, *, arch: str) -> Path:
    """A Debian bookworm rootfs tar: for x86_64 with rpm, dnf and passwd
    (essential variant); for aarch64 with rpm, bash, dash and coreutils
    (extract variant: made without emulation)."""
    args = ["mmdebstrap", "--quiet", "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*"]
    if arch == "x86_64":
        args += ["--variant=essential", "--include=rpm,dnf,passwd"]
    else:
        # Nothing runs perl, iconv modules or libmagic there (rpm -U and sh
        # scripts do not): left out, the tree is 40% of the size, and each
        # appliance that lays it out or reads it back is that much quicker.
        machine = "arm64" if arch == "aarch64" else arch
        triplet = {"arm64": "aarch64-linux-gnu"}.get(machine, f"{machine}-linux-gnu")
        args += [f"--arch={machine}", "--variant=extract",
                 "--include=rpm,dash,bash,coreutils,base-files",
                 "--dpkgopt=path-exclude=/usr/share/perl/*",
                 f"--dpkgopt=path-exclude=/usr/lib/{triplet}/perl/*",
                 f"--dpkgopt=path-exclude=/usr/lib/{triplet}/gconv/*",
                 "--dpkgopt=path-exclude=/usr/lib/file/*"]
    tmp = dest.with_name(".tmp-" + dest.name)  # mmdebstrap picks the format by the suffix
    proc = subprocess.run([*args, "bookworm", str(tmp)], capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tmp.rename(dest)
    return dest


def register_base_provides(tar: Path, work: Path, *, passwd: bool) -> None:
    """Append to `tar` an rpm database holding base-provides (and, for an
    extract-variant tree, /etc/passwd and /etc/group)."""
    pkg = build_rpm(work, BASE_PROVIDES)
    stage = work / "stage"
    (stage / RPMDB).mkdir(parents=True)
    proc = subprocess.run(["rpm", "--root", str(stage), "--dbpath", f"/{RPMDB}", "-i",
                           "--justdb", "--nodeps", "--ignorearch", str(pkg)],
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH - DAY)})
    assert proc.returncode == 0, proc.stderr
    for junk in (".rpm.lock", "rpmdb.sqlite-shm", "rpmdb.sqlite-wal"):
        (stage / RPMDB / junk).unlink(missing_ok=True)
    members = [f"./{RPMDB}"]
    if passwd:
        (stage / "etc").mkdir()
        (stage / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n"
                                          "nobody:x:65534:65534:nobody:/:/usr/sbin/nologin\n")
        (stage / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
        members += ["./etc/passwd", "./etc/group"]
    subprocess.run(["tar", "--numeric-owner", "--owner=0", "--group=0", "--mtime=@"
                    f"{EPOCH - DAY}", "-rf", str(tar), "-C", str(stage), *members], check=True)


def append_files(tar: Path, work: Path, files: dict[str, bytes]) -> None:
    """Append regular files (root-owned, 0644) to `tar`."""
    stage = work / "stage-files"
    for name, data in files.items():
        (stage / name).parent.mkdir(parents=True, exist_ok=True)
        (stage / name).write_bytes(data)
    subprocess.run(["tar", "--numeric-owner", "--owner=0", "--group=0", "--mode=0644",
                    f"--mtime=@{EPOCH - DAY}", "-rf", str(tar), "-C", str(stage),
                    *[f"./{n}" for n in files]], check=True)


# -- RPMs -----------------------------------------------------------------------

def _spec(name: str, body: str, *, version: str = "1.0", arch: str | None = "noarch",
          requires: str = "", extra: str = "") -> str:
    head = textwrap.dedent(f"""\
        Name: {name}
        Version: {version}
        Release: 1
        Summary: {name}
        License: MIT
        """)
    if arch:
        head += f"BuildArch: {arch}\n"
    return head + requires + f"%description\n{name}\n" + extra + body


SPECS: dict[str, str] = {
    # a library the application needs
    "rb-lib": _spec("rb-lib", """\
%install
mkdir -p %{buildroot}/usr/share/rb-lib
echo lib > %{buildroot}/usr/share/rb-lib/lib.txt
%files
/usr/share/rb-lib/lib.txt
""", requires="Provides: rb-lib-api = 1\n"),
    # weak dependency of rb-app: not installed unless weak_deps
    "rb-weak": _spec("rb-weak", """\
%install
mkdir -p %{buildroot}/usr/share/rb-weak
echo weak > %{buildroot}/usr/share/rb-weak/weak.txt
%files
/usr/share/rb-weak/weak.txt
"""),
    # everything rpm does: %pre user and group, %post file, config files,
    # caps, setuid, hard links, a directory owned by the package's own user
    "rb-app": _spec("rb-app", """\
%install
mkdir -p %{buildroot}/usr/bin %{buildroot}/usr/sbin %{buildroot}/etc \\
         %{buildroot}/usr/share/rb-app %{buildroot}/var/lib/rb-app
echo app > %{buildroot}/usr/bin/rb-app
echo ping > %{buildroot}/usr/sbin/rb-ping
echo keep=packaged > %{buildroot}/etc/rb-app.conf
echo plain=packaged > %{buildroot}/etc/rb-app-plain.conf
echo linked > %{buildroot}/usr/share/rb-app/a
ln %{buildroot}/usr/share/rb-app/a %{buildroot}/usr/share/rb-app/b
%pre
getent group rbsvc >/dev/null || groupadd -r rbsvc
getent passwd rbsvc >/dev/null || useradd -r -g rbsvc -d /var/lib/rb-app -s /usr/sbin/nologin rbsvc
%post
echo "post ran for $1" > /var/lib/rb-app/post-ran
%files
%attr(4755,root,root) /usr/bin/rb-app
%caps(cap_net_raw=ep) %attr(0755,root,root) /usr/sbin/rb-ping
%config(noreplace) /etc/rb-app.conf
%config /etc/rb-app-plain.conf
/usr/share/rb-app/a
/usr/share/rb-app/b
%dir %attr(0750,rbsvc,rbsvc) /var/lib/rb-app
""", requires="Requires: rb-lib-api\nRecommends: rb-weak\nRequires(pre): /usr/sbin/useradd\n"
              "Requires(pre): /usr/sbin/groupadd /usr/bin/getent\n"),
    # needs something no repository has
    "rb-needs-absent": _spec("rb-needs-absent", """\
%install
mkdir -p %{buildroot}/usr/share/rb-needs-absent
echo x > %{buildroot}/usr/share/rb-needs-absent/x
%files
/usr/share/rb-needs-absent/x
""", requires="Requires: libabsent-feature\n"),
    # two packages owning one path with different content
    "rb-conflict-a": _spec("rb-conflict-a", """\
%install
mkdir -p %{buildroot}/usr/share/rb-conflict
echo a > %{buildroot}/usr/share/rb-conflict/same
%files
/usr/share/rb-conflict/same
"""),
    "rb-conflict-b": _spec("rb-conflict-b", """\
%install
mkdir -p %{buildroot}/usr/share/rb-conflict
echo b > %{buildroot}/usr/share/rb-conflict/same
%files
/usr/share/rb-conflict/same
"""),
    # a symlink where the base has a directory (the dynamic loader's)
    "rb-dirlink": _spec("rb-dirlink", """\
%install
mkdir -p %{buildroot}/usr
ln -s lib %{buildroot}/usr/lib64
%files
/usr/lib64
"""),
    # only in the ISO repository
    "rb-iso-only": _spec("rb-iso-only", """\
%install
mkdir -p %{buildroot}/usr/share/rb-iso-only
echo iso > %{buildroot}/usr/share/rb-iso-only/x
%files
/usr/share/rb-iso-only/x
"""),
    # to be signed with the suite's key / another key
    "rb-signed": _spec("rb-signed", """\
%install
mkdir -p %{buildroot}/usr/share/rb-signed
echo signed > %{buildroot}/usr/share/rb-signed/x
%files
/usr/share/rb-signed/x
"""),
    "rb-otherkey": _spec("rb-otherkey", """\
%install
mkdir -p %{buildroot}/usr/share/rb-otherkey
echo other > %{buildroot}/usr/share/rb-otherkey/x
%files
/usr/share/rb-otherkey/x
"""),
    # to be damaged after building
    "rb-tampered": _spec("rb-tampered", """\
%install
mkdir -p %{buildroot}/usr/bin
echo tool > %{buildroot}/usr/bin/rb-tampered
%files
%attr(0755,root,root) /usr/bin/rb-tampered
"""),
    "rb-corrupt": _spec("rb-corrupt", """\
%install
mkdir -p %{buildroot}/usr/share/rb-corrupt
yes corrupt-me | head -c 200000 > %{buildroot}/usr/share/rb-corrupt/data
%files
/usr/share/rb-corrupt/data
"""),
    # a %pre that fails
    "rb-badpre": _spec("rb-badpre", """\
%install
mkdir -p %{buildroot}/usr/share/rb-badpre
echo x > %{buildroot}/usr/share/rb-badpre/x
%pre
echo "refusing on purpose" >&2
exit 3
%files
/usr/share/rb-badpre/x
"""),
    # for the aarch64 base: an arch package whose %post runs under emulation
    "rb-arm": _spec("rb-arm", """\
%install
mkdir -p %{buildroot}/usr/share/rb-arm
echo arm > %{buildroot}/usr/share/rb-arm/x
%post
mkdir -p /var/lib/rb-arm
uname -m > /var/lib/rb-arm/post-uname
%files
/usr/share/rb-arm/x
""", arch=None),
}


def build_all(work: Path) -> dict[str, Path]:
    """Every package of SPECS, built (rb-arm for aarch64)."""
    out = {}
    for name, spec in SPECS.items():
        out[name] = build_rpm(work, spec, target="aarch64" if name == "rb-arm" else None)
    return out


@dataclasses.dataclass
class Gpg:
    home: Path
    key_id: str
    public: Path

    def sign(self, rpm: Path) -> None:
        proc = subprocess.run(["rpmsign", "--addsign", "--define", f"_gpg_name {self.key_id}",
                               "--define", f"__gpg {shutil.which('gpg')}",
                               "--define", f"_gpg_path {self.home}", str(rpm)],
                              capture_output=True, text=True, check=False,
                              env={**os.environ, "GNUPGHOME": str(self.home)})
        assert proc.returncode == 0, proc.stderr

    def stop(self) -> None:
        """gpg starts an agent: stop it (no process is left behind)."""
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "all"], check=False,
                       capture_output=True)


def make_gpg(home: Path, name: str) -> Gpg:
    home.mkdir(parents=True, mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    uid = f"rootfs-build test {name} <{name}@test.invalid>"
    subprocess.run(["gpg", "--batch", "--quiet", "--passphrase", "", "--quick-gen-key", uid,
                    "rsa2048", "sign", "never"], check=True, env=env, capture_output=True)
    out = subprocess.run(["gpg", "--batch", "--with-colons", "--list-keys", uid], check=True,
                         env=env, capture_output=True, text=True).stdout
    key_id = next(line.split(":")[4] for line in out.splitlines() if line.startswith("pub:"))
    public = home / f"{name}.asc"
    public.write_bytes(subprocess.run(["gpg", "--batch", "--armor", "--export", key_id],
                                      check=True, env=env, capture_output=True).stdout)
    return Gpg(home, key_id, public)


def make_repo(directory: Path, rpms: list[Path], *, index: bool = True) -> Path:
    directory.mkdir(parents=True)
    for r in rpms:
        shutil.copy(r, directory / r.name)
    if index:
        subprocess.run(["createrepo_c", "--quiet", "--no-database", str(directory)], check=True)
    return directory


def make_iso(source: Path, iso: Path) -> Path:
    subprocess.run(["bsdtar", "-c", "-f", str(iso), "--format", "iso9660", "-C", str(source),
                    "."], check=True)
    return iso


# -- damaging RPMs on purpose ------------------------------------------------------

def _main_header_offset(data: bytes) -> int:
    """Offset of the main header: after the 96-byte lead and the signature
    header (padded to 8 bytes)."""
    count, size = struct.unpack_from(">II", data, 96 + 8)
    sig_end = 96 + 16 + 16 * count + size
    return sig_end + (-sig_end % 8)


def tamper_first_file_mode(rpm: Path, out: Path, mode: int = 0o104777) -> Path:
    """`rpm` with the first file's mode changed in the header (rpm -K then
    says the header digest is BAD)."""
    data = bytearray(rpm.read_bytes())
    pos = _main_header_offset(data)
    count, _size = struct.unpack_from(">II", data, pos + 8)
    store = pos + 16 + 16 * count
    for i in range(count):
        tag, _kind, offset, _n = struct.unpack_from(">IIiI", data, pos + 16 + 16 * i)
        if tag == 1030:  # RPMTAG_FILEMODES, INT16
            struct.pack_into(">H", data, store + offset, mode)
            break
    else:
        raise AssertionError("no FILEMODES tag")
    out.write_bytes(bytes(data))
    return out


def corrupt_payload(rpm: Path, out: Path) -> Path:
    """`rpm` with bytes in the middle of its compressed payload flipped."""
    data = bytearray(rpm.read_bytes())
    pos = _main_header_offset(data)
    count, size = struct.unpack_from(">II", data, pos + 8)
    payload = pos + 16 + 16 * count + size
    middle = payload + (len(data) - payload) // 2
    for i in range(middle, min(middle + 64, len(data))):
        data[i] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


# -- reading a step's layer ----------------------------------------------------------

def layer_members(layer_dir: Path) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    """name -> (TarInfo, content of regular files) of a layer's tar."""
    out: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}
    with tarfile.open(layer_dir / "layer.tar") as tf:
        for m in tf.getmembers():
            f = tf.extractfile(m) if m.isreg() else None
            out[m.name.removeprefix("./")] = (m, f.read() if f else None)
    return out


def rpm_qa(layer_dir: Path, work: Path, dbpath: str = RPMDB,
           fmt: str = "%{NEVRA}\\n") -> list[str]:
    """`rpm -qa` on the host, reading the rpm database of the layer (the
    whole database is in the layer once a step changed it)."""
    db = work / "rpmdb"
    if db.exists():
        shutil.rmtree(db)
    db.mkdir(parents=True)
    prefix = dbpath.strip("/") + "/"
    for name, (m, data) in layer_members(layer_dir).items():
        if name.startswith(prefix) and m.isreg() and data is not None:
            (db / name[len(prefix):]).write_bytes(data)
    proc = subprocess.run(["rpm", "--dbpath", str(db), "-qa", "--qf", fmt],
                          capture_output=True, text=True, check=True)
    return sorted(line for line in proc.stdout.splitlines() if line)
