"""Helpers for the deploy tests: a small fake rootfs, rendering, and running
driver scripts inside a private mount namespace.

Safety rules the tests follow:
- prepare/teardown only ever run inside ``unshare -m --propagation private``,
  the whole prepare/check/teardown sequence in ONE driver, so every mount
  dies with the namespace even if a test fails half-way;
- inside the namespace, /var/lib is covered by a tmpfs (the rootfs binds the
  machine's /var/lib and prepare creates /var/lib/libvirt through it) and
  directories prepare creates in the machine's devtmpfs are removed again;
- temporary trees are removed with ``rm -rf --one-file-system`` semantics
  (``remove_tree``), never following a mount.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.deploy import DeployConfig, mount_table, render_deploy
from builder.deploy.mounts import MountEntry

HOST_BINARIES = ("/usr/bin/bash", "/usr/bin/sleep")
ROOTFS_DIRS = ("boot", "dev", "etc", "home", "mnt", "opt", "proc", "root", "run", "sys",
               "local_proc", "tmp", "usr/bin", "usr/sbin", "usr/libexec", "var/lib",
               "var/cache", "var/log")


def have_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "true"],
                       capture_output=True)
    return r.returncode == 0


def _libs(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"(/\S+)", line.split("=>")[-1])
        if m:
            libs.append(m.group(1))
    return libs


def _copy_in(root: Path, path: str) -> None:
    dest = root / path.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        shutil.copy2(os.path.realpath(path), dest)


def make_fake_rootfs(root: Path) -> Path:
    """The directories the procedure creates, var/run -> ../run as in openEuler,
    bash and sleep with their libraries (so chroot ROOT /usr/bin/bash works)."""
    root.mkdir(parents=True)
    for d in ROOTFS_DIRS:
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "var/run").symlink_to("../run")
    for binary in HOST_BINARIES:
        _copy_in(root, binary)
        for lib in _libs(binary):
            _copy_in(root, lib)
    return root


def add_fake_daemons(root: Path, pidfiles: bool = False) -> None:
    """virtlogd/libvirtd stand-ins: with -d they start a copy of sleep named like
    the daemon (so its comm matches) holding the chroot's /dev/null open, and
    write their CMD_NET_ADDR and USE_TLS to /tmp/<name>.env; with `pidfiles`
    also /var/run/<name>.pid, as the real daemons do."""
    fake = root / "usr/libexec/fake"
    fake.mkdir(parents=True, exist_ok=True)
    for name in ("virtlogd", "libvirtd"):
        shutil.copy2("/usr/bin/sleep", fake / name)
        pidfile = f"  echo $! > /var/run/{name}.pid\n" if pidfiles else ""
        script = root / "usr/sbin" / name
        script.write_text(
            "#!/usr/bin/bash\n"
            'if [ "${1:-}" = -d ]; then\n'
            f'  printf "%s %s\\n" "${{CMD_NET_ADDR:-}}" "${{USE_TLS-unset}}" > /tmp/{name}.env\n'
            f"  /usr/libexec/fake/{name} 300 </dev/null >/dev/null 2>&1 &\n"
            f"{pidfile}"
            "fi\n")
        script.chmod(0o755)


@dataclass
class Rendered:
    out: Path
    cfg: DeployConfig
    table: list[MountEntry]

    @property
    def dpu(self) -> Path:
        return self.out / "dpu"


def render(tmp: Path, root: Path, mounts: Sequence[dict] = (),
           table: Sequence[MountEntry] | None = None, **kw) -> Rendered:
    """dpu/ and host/ for the fake rootfs `root`: the default table plus
    `mounts`, or exactly `table`; `kw` are element params."""
    params = {"host_ip": "192.168.1.1", "dpu_ip": "192.168.1.2", "rexec_port": 7777,
              "rootfs_path": str(root)}
    params.update(kw)
    cfg = DeployConfig.from_params("demo", params)
    entries = list(table) if table is not None else mount_table(list(mounts), "mounts")
    out = tmp / "out" / "demo"
    render_deploy(out, cfg, entries)
    return Rendered(out, cfg, entries)


DRIVER_HEAD = r"""
set -u
mount --make-rprivate /
# snap NAME: the mount table and prepare's state (a real deployment's in
# $W/state, a rehearsal's in $W/host/.rehearsal) as they are now
snap() {
  cat /proc/self/mountinfo > "$W/$1"
  rm -rf "$W/$1.state" "$W/$1.rehearsal"
  cp -r "$W/state" "$W/$1.state" 2>/dev/null || true
  cp -r "$W/host/.rehearsal" "$W/$1.rehearsal" 2>/dev/null || true
}
"""

# A safety net for tests about other things: the machine's /var/lib and /dev
# stay out of reach even if a rehearsal wrote through to them (the test of
# point 4 of issue 13 runs without it and checks that no rehearsal does).
SHIELD = r"""
mount -t tmpfs tmpfs /var/lib
DEV_BEFORE=$(ls -A /dev)
cleanup_dev() {
  local d
  for d in hugepages mqueue vfio; do
    if ! grep -qx "$d" <<<"$DEV_BEFORE" && [ -d "/dev/$d" ]; then rmdir "/dev/$d" 2>/dev/null; fi
  done
}
trap cleanup_dev EXIT
"""

# systemctl for machines where systemd is not running (this one): a stand-in
# that records its calls in $W/systemd/log and keeps unit state in
# $W/systemd: units/U (the unit exists), active/U (the pid it runs as),
# masked/U.  Starting a unit is the test's business (it writes active/U).
SYSTEMCTL = r"""
mkdir -p $W/systemd/units $W/systemd/active $W/systemd/masked
cat > /usr/local/sbin/systemctl <<'EOF'
#!/bin/bash
S=$W/systemd
echo "$*" >> $S/log
stop() {
  local p
  p=$(cat "$S/active/$1" 2>/dev/null) && kill "$p" 2>/dev/null
  rm -f "$S/active/$1"
}
cmd=$1; shift
now=0 units=()
for a; do
  case $a in --runtime | --quiet | -- | -p | --value) ;; --now) now=1 ;; *) units+=("$a") ;; esac
done
case $cmd in
show) u=${units[-1]}
  if [ -e "$S/masked/$u" ]; then echo masked
  elif [ -e "$S/units/$u" ]; then echo loaded
  else echo not-found; fi ;;
is-active) p=$(cat "$S/active/${units[0]}" 2>/dev/null) && kill -0 "$p" 2>/dev/null ;;
mask) for u in "${units[@]}"; do touch "$S/masked/$u"; [ $now = 0 ] || stop "$u"; done ;;
unmask) for u in "${units[@]}"; do rm -f "$S/masked/$u"; done ;;
stop | disable) for u in "${units[@]}"; do stop "$u"; done ;;
start | restart | enable)
  for u in "${units[@]}"; do
    [ ! -e "$S/masked/$u" ] || { echo "$u is masked" >&2; exit 1; }
  done ;;
esac
exit 0
EOF
chmod 0755 /usr/local/sbin/systemctl
"""

# A DPU in a mount namespace, for the scripts' real (not rehearsal) mode on a
# machine without qtfs: /run and /etc are private (tmpfs; an overlay whose
# upper layer $W/etc-upper shows what was written), qtfs counts as loaded
# (/sys/module/qtfs in a tmpfs), systemd as running (/run/systemd/system), and
# /usr/local/sbin (first on the scripts' PATH) holds stand-ins: rmmod records
# its call and unloads the stand-in module; systemctl is SYSTEMCTL's.
REAL_DPU = r"""
mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/system $W/etc-upper $W/etc-work
mount -t overlay sandbox -o lowerdir=/etc,upperdir=$W/etc-upper,workdir=$W/etc-work /etc
mount -t tmpfs tmpfs /sys/module
mkdir /sys/module/qtfs
mount -t tmpfs tmpfs /usr/local/sbin
cat > /usr/local/sbin/rmmod <<'EOF'
#!/bin/bash
echo "rmmod $*" >> "$W/rmmod.log"
rmdir "/sys/module/$1"
EOF
chmod 0755 /usr/local/sbin/rmmod
""" + SYSTEMCTL

# A host in namespaces (run_ns with net=True): /etc, /usr, /var and /home are
# overlays whose upper layers ($W/upper/<dir>) catch every write, /run is a
# tmpfs, systemctl is SYSTEMCTL's stand-in, and the network namespace is the
# driver's own (nft loads nothing into the machine's ruleset).
HOST_SANDBOX = r"""
for d in etc usr var home; do
  mkdir -p $W/upper/$d $W/work/$d
  mount -t overlay sandbox -o lowerdir=/$d,upperdir=$W/upper/$d,workdir=$W/work/$d /$d
done
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /usr/local/sbin
ip link set lo up
""" + SYSTEMCTL


def run_ns(driver: str, work: Path, env: dict[str, str] | None = None,
           timeout: int = 60, shield: bool = True, net: bool = False,
           pidns: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a bash driver in a fresh private mount namespace; $W is `work`.

    ``pidns``: also a fresh pid namespace, whose pid 1 is the driver: every
    process it starts dies with it, even when the test fails or times out
    (and pgrep sees only them).  ``net``: that, and a fresh network namespace
    (with every network namespace its processes hold)."""
    script = work / "driver.sh"
    script.write_text(DRIVER_HEAD + (SHIELD if shield else "") + driver)
    full_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "W": str(work),
                "ROOTFS_BUILD_STATE_DIR": str(work / "state"), "LC_ALL": "C"}
    full_env.update(env or {})
    cmd = ["unshare", "-m", "--propagation", "private"]
    if net:
        cmd += ["-n"]
    if net or pidns:
        cmd += ["-p", "--fork", "--kill-child", "--mount-proc"]
    return subprocess.run([*cmd, "bash", str(script)],
                          capture_output=True, text=True, env=full_env, timeout=timeout)


@dataclass(frozen=True)
class MountInfo:
    id: int
    parent: int
    path: str
    fstype: str
    line: str


def parse_mountinfo(text: str) -> list[MountInfo]:
    out = []
    for line in text.splitlines():
        fields = line.split()
        sep = fields.index("-")
        path = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
        path = path.replace("\\134", "\\")
        out.append(MountInfo(int(fields[0]), int(fields[1]), path, fields[sep + 1], line))
    return out


def mounts_below(text: str, root: Path) -> list[MountInfo]:
    prefix = str(root).rstrip("/") + "/"
    return [m for m in parse_mountinfo(text) if m.path.startswith(prefix)]


def resolve_in_root(root: Path, target: str) -> str:
    """Where a table target lands in the fake rootfs (its symlinks are relative)."""
    return os.path.realpath(str(root) + target)


def remove_tree(path: Path) -> None:
    """rm -rf --one-file-system, after checking nothing is mounted below path."""
    if not path.exists():
        return
    text = Path("/proc/self/mountinfo").read_text()
    prefix = str(path.resolve()) + "/"
    busy = [m.path for m in parse_mountinfo(text) if m.path.startswith(prefix)]
    assert not busy, f"refusing to remove {path}: mounts below it: {busy}"
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=True)


def state_dir(base: Path, root: Path) -> Path:
    """Where prepare keeps the state of `root` below `base`: a hash of the path."""
    return base / hashlib.sha256(str(root).encode()).hexdigest()[:32]


def read_info(work: Path, root: Path, snap: str | None = None,
              rehearsal: bool = True) -> dict[str, str]:
    """The state's info file (table, mode, root, cgroup.N decisions)."""
    d = state_dir(_state_base(work, snap, rehearsal), root)
    info = {}
    if (d / "info").exists():
        for line in (d / "info").read_text().splitlines():
            key, _, value = line.partition("=")
            info[key] = value
    return info


def _state_base(work: Path, snap: str | None, rehearsal: bool) -> Path:
    if rehearsal:
        return work / f"{snap}.rehearsal" if snap else work / "host" / ".rehearsal"
    return work / f"{snap}.state" if snap else work / "state"


def read_state(work: Path, root: Path, snap: str | None = None,
               rehearsal: bool = True) -> tuple[list[str], dict[int, str]]:
    """(recorded mount paths in order, skipped entries idx -> reason) of a
    prepare run: a rehearsal's (in $W/host/.rehearsal) or a real one's (in
    $ROOTFS_BUILD_STATE_DIR), as it is now or in the copy `snap` made."""
    d = state_dir(_state_base(work, snap, rehearsal), root)
    mounts = []
    if (d / "mounts").exists():
        for line in (d / "mounts").read_text().splitlines():
            tag, _, path = line.partition("\t")
            if tag.isdigit() or tag == "image":
                mounts.append(path)
    skipped = {}
    if (d / "skipped").exists():
        for line in (d / "skipped").read_text().splitlines():
            idx, _, reason = line.partition("\t")
            skipped[int(idx)] = reason
    return mounts, skipped


# ---------------------------------------------------------------------------
# bundle helpers


def make_rootfs_tar(path: Path, extra: Sequence[tarfile.TarInfo] = ()) -> list[tarfile.TarInfo]:
    """A small pax rootfs tar: dirs, files with owners/modes, an xattr, a char
    device, a fifo, a hard link and symlinks.  Returns its members."""
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def add(name: str, kind: bytes, mode: int, data: bytes | None = None, **kw) -> None:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode
        ti.mtime = 1_700_000_000
        for k, v in kw.items():
            setattr(ti, k, v)
        if data is not None:
            ti.size = len(data)
        members.append((ti, data))

    add("./", tarfile.DIRTYPE, 0o755)
    add("./etc", tarfile.DIRTYPE, 0o755)
    add("./etc/hostname", tarfile.REGTYPE, 0o644, b"dpu\n")
    add("./etc/localtime", tarfile.SYMTYPE, 0o777, linkname="/usr/share/zoneinfo/UTC")
    add("./usr", tarfile.DIRTYPE, 0o755)
    add("./usr/bin", tarfile.DIRTYPE, 0o755)
    add("./usr/bin/prog", tarfile.REGTYPE, 0o4755, b"#!/bin/sh\necho hi\n")
    add("./usr/bin/prog-link", tarfile.LNKTYPE, 0o4755, linkname="./usr/bin/prog")
    add("./bin", tarfile.SYMTYPE, 0o777, linkname="usr/bin")
    add("./home", tarfile.DIRTYPE, 0o755)
    add("./home/user", tarfile.DIRTYPE, 0o700, uid=1000, gid=1000)
    add("./home/user/notes", tarfile.REGTYPE, 0o600, b"x" * 3000, uid=1000, gid=1001,
        pax_headers={"SCHILY.xattr.user.x": "hello", "SCHILY.xattr.user.empty": ""})
    add("./dev", tarfile.DIRTYPE, 0o755)
    add("./dev/null", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3)
    add("./dev/initctl", tarfile.FIFOTYPE, 0o600)
    add("./var", tarfile.DIRTYPE, 0o755)
    add("./var/empty", tarfile.DIRTYPE, 0o711, uid=12, gid=34)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for ti, data in members:
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
        for ti in extra:
            t.addfile(ti)
    return [ti for ti, _ in members]


def write_sums(out: Path) -> None:
    lines = []
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and rel != "SHA256SUMS":
            digest = subprocess.run(["sha256sum", str(p)], capture_output=True, text=True,
                                    check=True).stdout.split()[0]
            lines.append(f"{digest}  {rel}\n")
    (out / "SHA256SUMS").write_text("".join(lines))


def check_tree_is_tar(target: Path, tar: Path) -> int:
    """target holds exactly the tar's members: types, owners, modes, mtimes,
    xattrs, devices, hard links, symlinks, content (sha256).  Returns the count."""
    expected: set[str] = set()
    with tarfile.open(tar) as t:
        for m in t:
            rel = posixpath.normpath(m.name)
            path = target if rel == "." else target / rel
            expected.add(rel)
            st = os.lstat(path)
            if m.isdir():
                assert stat.S_ISDIR(st.st_mode), rel
            elif m.issym():
                assert stat.S_ISLNK(st.st_mode) and os.readlink(path) == m.linkname, rel
            elif m.islnk():
                other = target / posixpath.normpath(m.linkname)
                assert stat.S_ISREG(st.st_mode) and st.st_ino == os.lstat(other).st_ino, rel
            elif m.isreg():
                f = t.extractfile(m)
                assert f is not None
                with f, path.open("rb") as g:
                    assert (hashlib.file_digest(g, "sha256").digest()
                            == hashlib.file_digest(f, "sha256").digest()), rel
                assert stat.S_ISREG(st.st_mode) and st.st_size == m.size, rel
            elif m.ischr() or m.isblk():
                assert (stat.S_ISCHR if m.ischr() else stat.S_ISBLK)(st.st_mode), rel
                assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (m.devmajor, m.devminor)
            elif m.isfifo():
                assert stat.S_ISFIFO(st.st_mode), rel
            else:
                raise AssertionError(f"unexpected member type {m.type!r}: {rel}")
            assert (st.st_uid, st.st_gid) == (m.uid, m.gid), rel
            if not m.issym():
                assert stat.S_IMODE(st.st_mode) == m.mode, (rel, oct(st.st_mode), oct(m.mode))
                assert int(st.st_mtime) == int(m.mtime), rel
            want_x = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
                      for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
            got_x = {k: os.getxattr(path, k, follow_symlinks=False)
                     for k in os.listxattr(path, follow_symlinks=False)
                     if not k.startswith("system.posix_acl_")}
            assert got_x == want_x, rel
    found = {"."}
    for top, dirs, files in os.walk(target):
        for n in dirs + files:
            found.add(os.path.relpath(os.path.join(top, n), target))
    assert found == expected
    return len(expected)
