"""Benchmark a whole build against its floors (issues 2 and 15).

    .venv/bin/python bench/build.py [--size-gb 1.0] [--files 50000] [--small-gb 0.25]
        [--image QCOW2] [--small-image QCOW2] [--workdir DIR] [--keep] [--repeat N]
        [--warm-repeat N] [--skip-virt-tar-out] [--profile] [--accel tcg|auto]
        [--no-selinux] [--quiet-wait SECONDS]

Makes (once, cached in the work directory) an openEuler-shaped qcow2 --
MBR, p1 /boot ext4, p2 / ext4, usr-merged, openEuler os-release, a working
bash -- whose root holds about SIZE GB in about FILES regular files copied
from this host's /usr, picked deterministically, each with an SELinux
label the way openEuler ships them.  Then, in one run, it times:

    A      virt-tar-out -a IMAGE / out.tar  (guestfish's default: 1 vCPU)
    F      the libguestfs floor: the tool's appliance launched, inspected,
           mounted, then in-guest tar | cat >/dev/null (2 vCPUs)
    T      F with the tree sent to the host (tar_out)
    cold   rootfs-build RECIPE (tar.zst) with an empty cache      vs A and F
    H      the same build fed the stream tar instead of the appliance  vs ZB
    ZB     zstd -3 -T2 of the stream tar
    N, N'  the stream tar dd'd into a new file after the wait every
           timed step gets, then again at once (what new memory costs)
    warm   the cold build's command again, nothing changed        vs Z
    warm'  again after changing one file of a small overlay       vs Z
    Z      zstd -3 -T2 of the finished uncompressed tar (the floor)

and the peak RSS of the rootfs-build Python process (its own, read with
getrusage(RUSAGE_SELF) at exit; qemu is a separate process and is shown
apart).  It also shows the CPU every step used and what the rest of the
machine used meanwhile: on a shared 2-core machine someone else's tests can
double a step's time.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, BinaryIO

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from builder import guestfs_io, sampleimage, tarfmt  # noqa: E402
from builder.tarfmt import DIR, REG, SYM, Member  # noqa: E402

BENCH_VERSION = 1
PYTHON = REPO / ".venv" / "bin" / "python"
PY_SPY = REPO / ".venv" / "bin" / "py-spy"
HOST_ROOTS = ("/usr/bin", "/usr/sbin", "/usr/lib", "/usr/libexec", "/usr/share", "/usr/include")
MAX_FILE = 32 << 20          # no single host file larger than this
MTIME = sampleimage.MTIME
# The timed steps in the order they run: key in `results`, label in the report.
STEPS = (("A", "A"), ("F", "F"), ("T", "T"), ("cold", "cold"), ("H", "H"), ("ZB", "ZB"),
         ("N", "N"), ("N'", "N'"), ("warm", "warm"), ("warm2", "warm'"), ("zstd", "Z"),
         ("small", "small"))
TARGETS = {"cold": 0.55, "cold_floor": 1.25, "host": 2.0, "warm": 1.2, "rss_mb": 150,
           "rss_flat": 0.10}

# Runs builder.cli.main (what .venv/bin/rootfs-build runs) with
# bench/rusage_hook.py installed: at exit, the process's own rusage, that of
# the children it waited for (qemu, via libguestfs), and its memory when the
# assembly started.
CLI_HOOK = rf"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import rusage_hook
rusage_hook.install()
sys.argv[0] = "rootfs-build"
from builder.cli import main
sys.exit(main())
"""


def byte_compile() -> None:
    """Compile builder/'s modules, as pip does when it installs the tool:
    where PYTHONDONTWRITEBYTECODE is set (as on the dev VM) an editable
    install never writes them, and every timed run would compile ~12,000
    lines again (60-80 ms of each start)."""
    subprocess.run([str(PYTHON), "-m", "compileall", "-q", str(REPO / "builder")], check=True)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# choosing host files


@dataclasses.dataclass
class Pick:
    arcname: bytes
    host: bytes
    size: int
    mode: int
    mtime_ns: int
    linkname: bytes = b""   # set for symlinks


def _rank(name: bytes) -> bytes:
    return hashlib.sha256(name).digest()[:8]


def _walk(top: bytes, out: list[Pick]) -> None:
    try:
        it = os.scandir(top)
    except OSError:
        return
    with it:
        for e in it:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            arc = e.path.lstrip(b"/")
            if e.is_symlink():
                with contextlib.suppress(OSError):
                    out.append(Pick(arc, e.path, 0, 0o777, st.st_mtime_ns, os.readlink(e.path)))
            elif e.is_dir(follow_symlinks=False):
                _walk(e.path, out)
            elif e.is_file(follow_symlinks=False) and st.st_size <= MAX_FILE \
                    and os.access(e.path, os.R_OK):
                out.append(Pick(arc, e.path, st.st_size, st.st_mode & 0o7777, st.st_mtime_ns))


def choose_host_files(total: int, nfiles: int, skip: set[bytes]) -> tuple[list[Pick], int]:
    """About `nfiles` regular files adding up to about `total` bytes, plus the
    symlinks met on the way.  Candidates are visited in an order given by a
    hash of their path (a uniform, reproducible sample of the host's /usr);
    a file is taken when it keeps the running size on the line from 0 to
    `total`, so a few big files cannot eat the budget."""
    cands: list[Pick] = []
    for root in HOST_ROOTS:
        _walk(os.fsencode(root), cands)
    cands.sort(key=lambda p: _rank(p.arcname))
    slack = max(total // 50, 8 << 20)
    picks: list[Pick] = []
    size = count = 0
    for p in cands:
        if count >= nfiles:
            break
        if p.arcname in skip:
            continue
        if p.linkname:
            picks.append(p)
            continue
        if size + p.size > total * (count + 1) // nfiles + slack:
            continue
        picks.append(p)
        size += p.size
        count += 1
    return picks, len(cands)


# ---------------------------------------------------------------------------
# writing the trees (streamed to files: the root tar is ~1 GB)


_LABELS = ((b"usr/bin/", b"bin_t"), (b"usr/sbin/", b"bin_t"), (b"usr/libexec/", b"bin_t"),
           (b"usr/lib/", b"lib_t"), (b"usr/lib64/", b"lib_t"), (b"etc/", b"etc_t"),
           (b"usr/share/", b"usr_t"), (b"usr/include/", b"usr_t"), (b"boot/", b"boot_t"),
           (b"tmp", b"tmp_t"), (b"var/", b"var_t"), (b"root", b"admin_home_t"))


def selinux_label(name: bytes) -> bytes:
    kind = next((t for prefix, t in _LABELS if name.startswith(prefix) or name + b"/" == prefix),
                b"default_t" if name else b"root_t")
    return b"system_u:object_r:" + kind + b":s0\0"


class StreamTar(sampleimage.TarStream):
    """The sample image's tar writer, with openEuler-like SELinux labels and
    counts of what went in."""

    def __init__(self, f: BinaryIO, *, selinux: bool):
        super().__init__(f)
        self.selinux = selinux
        self.files = 0
        self.data_bytes = 0

    def add(self, m: Member, data: BinaryIO | None = None) -> None:
        if self.selinux:
            m.xattrs.setdefault(b"security.selinux", selinux_label(m.name))
        if m.type == REG:
            self.files += 1
            self.data_bytes += m.size
        super().add(m, data)


def write_root_tar(path: Path, picks: list[Pick], *, selinux: bool) -> StreamTar:
    import io
    with open(path, "wb") as f:
        t = StreamTar(f, selinux=selinux)
        # The sample image's skeleton: dirs, usr-merge links, os-release, bash.
        for m, data in tarfmt.read_all(sampleimage.root_tree(fidelity=False), "skeleton"):
            t.add(m, io.BytesIO(data))
        for p in picks:
            if p.arcname in t.names:
                continue
            if p.linkname:
                t.add(Member(p.arcname, SYM, 0o777, mtime=MTIME, linkname=p.linkname))
                continue
            with open(p.host, "rb") as src:
                size = os.fstat(src.fileno()).st_size
                t.add(Member(p.arcname, REG, p.mode, size=size, mtime=MTIME), src)
        t.close()
    return t


def write_boot_tar(path: Path, *, selinux: bool) -> int:
    import glob
    import io
    with open(path, "wb") as f:
        t = StreamTar(f, selinux=selinux)
        kver = "5.10.0-60.18.0.50.oe2203.x86_64"
        kernels = sorted(glob.glob("/boot/vmlinuz-*"))
        if kernels and os.access(kernels[-1], os.R_OK):
            with open(kernels[-1], "rb") as src:
                size = os.fstat(src.fileno()).st_size
                t.add(Member(f"vmlinuz-{kver}".encode(), REG, 0o755, size=size, mtime=MTIME), src)
        cfg = b"# openEuler-shaped bench image\nset default=0\n"
        t.add(Member(b"grub2", DIR, 0o700, mtime=MTIME))
        t.add(Member(b"grub2/grub.cfg", REG, 0o600, size=len(cfg), mtime=MTIME), io.BytesIO(cfg))
        t.close()
    return t.data_bytes


def base_image(workdir: Path, size_gb: float, nfiles: int, *, selinux: bool,
               env: dict[str, str]) -> tuple[Path, dict[str, Any]]:
    """The cached base image for these parameters (made when missing)."""
    total = int(size_gb * (1 << 30))
    skeleton = sampleimage.root_tree(fidelity=False)
    skip = {m.name for m, _ in tarfmt.read_all(skeleton, "skeleton")}
    t0 = time.monotonic()
    picks, candidates = choose_host_files(total, nfiles, skip)
    files = [p for p in picks if not p.linkname]
    doc = {"v": BENCH_VERSION, "selinux": selinux, "skeleton": hashlib.sha256(skeleton).hexdigest(),
           "picks": hashlib.sha256(b"".join(
               p.arcname + b"\0" + p.linkname + b"\0%d\0%d\0%o\n" % (p.size, p.mtime_ns, p.mode)
               for p in picks)).hexdigest()}
    key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]
    image = workdir / f"base-{size_gb:g}g-{nfiles}f-{key}.qcow2"
    file_bytes = sum(p.size for p in files)
    info: dict[str, Any] = {"image": str(image), "files": len(files),
                            "symlinks": len(picks) - len(files), "file_bytes": file_bytes,
                            "host_candidates": candidates, "selinux_labels": selinux}
    log(f"picked {len(files)} files ({file_bytes / 1e6:.0f} MB) and "
        f"{info['symlinks']} symlinks from {candidates} host candidates in "
        f"{time.monotonic() - t0:.1f} s")
    meta = image.with_suffix(".json")
    if image.exists() and meta.exists():
        log(f"base image cached: {image}")
        return image, json.loads(meta.read_text())
    trees = Path(tempfile.mkdtemp(prefix="trees-", dir=workdir))
    try:
        t0 = time.monotonic()
        root = write_root_tar(trees / "root.tar", picks, selinux=selinux)
        boot_bytes = write_boot_tar(trees / "boot.tar", selinux=selinux)
        tar_bytes = (trees / "root.tar").stat().st_size
        log(f"root tree: {len(root.names)} entries, {root.files} files, "
            f"{tar_bytes / 1e6:.0f} MB tar, written in {time.monotonic() - t0:.1f} s")
        size_mib = 64 + ((tar_bytes + len(root.names) * 4096) * 5 // 4 >> 20) + 256
        t0 = time.monotonic()
        log(f"writing {image.name} ({size_mib} MiB disk) with the appliance; under TCG "
            "this takes a few minutes")
        saved = os.environ.get("LIBGUESTFS_BACKEND_SETTINGS")
        if "LIBGUESTFS_BACKEND_SETTINGS" in env:
            os.environ["LIBGUESTFS_BACKEND_SETTINGS"] = env["LIBGUESTFS_BACKEND_SETTINGS"]
        try:
            guestfs_io.make_disk_image(
                image, fmt="qcow2", size_mib=size_mib,
                partitions=[guestfs_io.Partition("/boot", 64), guestfs_io.Partition("/", None)],
                trees={"/": trees / "root.tar", "/boot": trees / "boot.tar"},
                label=f"bench image {image.name}")
        finally:
            if saved is None:
                os.environ.pop("LIBGUESTFS_BACKEND_SETTINGS", None)
            else:
                os.environ["LIBGUESTFS_BACKEND_SETTINGS"] = saved
        info.update(entries=len(root.names), root_tar_bytes=tar_bytes, boot_bytes=boot_bytes,
                    disk_mib=size_mib, qcow2_bytes=image.stat().st_size,
                    made_in_s=round(time.monotonic() - t0, 1))
        meta.write_text(json.dumps(info, indent=1) + "\n")
        log(f"base image written in {info['made_in_s']} s: {image.stat().st_size / 1e6:.0f} MB")
        return image, info
    finally:
        shutil.rmtree(trees, ignore_errors=True)


# ---------------------------------------------------------------------------
# running and timing


@dataclasses.dataclass
class Run:
    seconds: float
    rc: int
    cpu: float                      # user+sys of the process and its waited children
    system: float = 0.0             # the system (kernel) part of `cpu`
    others: float = 0.0             # CPU seconds the rest of the machine used meanwhile
    rusage: dict[str, Any] = dataclasses.field(default_factory=dict)   # from CLI_HOOK
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)  # --json output
    timeline: list[str] = dataclasses.field(default_factory=list)      # stamped stderr lines


_current: subprocess.Popen[bytes] | None = None
_TICK = os.sysconf("SC_CLK_TCK")


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
    guest = sum(fields[8:10])                                    # already in user/nice
    return (sum(fields) - idle - guest) / _TICK


QUIET_WAIT = 0.0   # --quiet-wait


def wait_until_quiet(limit: float) -> None:
    """Wait (at most `limit` s) until the rest of the machine stays below
    0.15 busy cores for 3 s, so a step does not share the CPU with someone
    else's tests."""
    deadline = time.monotonic() + limit
    said = False
    while True:
        b0 = busy_cpu_seconds()
        time.sleep(3)
        load = (busy_cpu_seconds() - b0) / 3
        if load < 0.15:
            return
        if time.monotonic() > deadline:
            log(f"machine still busy ({load:.2f} cores); going ahead")
            return
        if not said:
            log(f"machine busy ({load:.2f} cores used by others); waiting up to {limit:.0f} s")
            said = True


# A fixed amount of single-threaded Python work (~1.4 s on the dev VM).
_SPIN = "x = 0\nfor i in range(20_000_000):\n    x += i\n"


def core_sharing(rounds: int = 3) -> tuple[float, float]:
    """Median seconds the same CPU-bound Python loop takes alone, and in each
    of two copies run at once (`rounds` of each, alternating).  Two cores
    that share a physical core (SMT) or a busy host slow each other down:
    the CPU seconds a step measures with both cores busy are then inflated
    by that much, and two busy threads do less than two cores' work."""
    def timed(n: int) -> list[float]:
        t0 = time.monotonic()
        procs = [subprocess.Popen([sys.executable, "-c", _SPIN]) for _ in range(n)]
        walls = []
        for p in procs:
            p.wait()
            walls.append(time.monotonic() - t0)
        return walls

    alone: list[float] = []
    together: list[float] = []
    for _ in range(rounds):
        wait_until_quiet(QUIET_WAIT)
        alone += timed(1)
        together += timed(2)
    return statistics.median(alone), statistics.median(together)


def run(cmd: list[str], *, env: dict[str, str], log_to: Path, stdout: Path | None = None,
        rusage_file: Path | None = None, shown: str | None = None,
        timeline: list[str] | None = None, quiet: bool = True) -> Run:
    """Run `cmd` to completion; wall time, and CPU time from wait4.  With
    `timeline`, stderr lines are collected there stamped with seconds since
    the start (costs a pipe; only the profiling runs use it)."""
    global _current
    full_env = {**os.environ, **env}
    if rusage_file is not None:
        full_env["ROOTFS_BENCH_RUSAGE"] = str(rusage_file)
    if quiet:
        # What the steps before wrote is written back now, not during
        # this step: the untimed `zstd -d` of the rootfs tar just before
        # the first H leaves 1.2 GB dirty (/proc/vmstat nr_dirty), which
        # the kernel would otherwise write back while H runs.
        os.sync()
    if QUIET_WAIT > 0 and quiet:
        wait_until_quiet(QUIET_WAIT)
    with open(log_to, "ab") as err, open(stdout or os.devnull, "wb") as out:
        err.write(f"$ {shown or ' '.join(cmd)}\n".encode())
        err.flush()
        busy0 = busy_cpu_seconds()
        start = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE if timeline is not None
                             else err, env=full_env, cwd=REPO)
        _current = p
        if timeline is not None:
            assert p.stderr is not None
            for raw in p.stderr:
                line = raw.decode("utf-8", "replace").rstrip()
                stamped = f"[{time.perf_counter() - start:7.1f} s] {line}"
                timeline.append(stamped)
                err.write(stamped.encode() + b"\n")
        _, status, ru = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - start
        busy = busy_cpu_seconds() - busy0
        p.returncode = os.waitstatus_to_exitcode(status)
        _current = None
    cpu = ru.ru_utime + ru.ru_stime
    r = Run(seconds, p.returncode, cpu, system=ru.ru_stime, others=max(busy - cpu, 0.0),
            timeline=timeline or [])
    if r.rc != 0:
        raise SystemExit(f"bench: {shown or cmd[0]} failed (exit {r.rc}); see {log_to}")
    if rusage_file is not None and rusage_file.exists():
        r.rusage = json.loads(rusage_file.read_text())
    if stdout is not None and stdout.exists():
        text = stdout.read_text().strip()
        if text.startswith("{"):
            r.summary = json.loads(text.splitlines()[-1])
    return r


# Runs ARGV and writes its peak RSS (KiB) to the file ROOTFS_BENCH_CHILD_RSS
# names.  A command spawned straight from the bench would report the bench's
# own peak: the kernel carries the spawning process's peak over an exec
# (subprocess uses vfork), so it is forked from this small process instead.
CHILD_RSS = r"""
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, ru = os.wait4(pid, 0)
with open(os.environ["ROOTFS_BENCH_CHILD_RSS"], "w") as f:
    f.write(str(ru.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def zstd_peak_rss_kb(tar: Path) -> int:
    """Peak RSS of `zstd -3 -T2` compressing `tar` (output dropped)."""
    with tempfile.NamedTemporaryFile("r") as f:
        subprocess.run([sys.executable, "-c", CHILD_RSS, "zstd", "-3", "-T2", "-q", "-c",
                        str(tar)], stdout=subprocess.DEVNULL, check=True,
                       env={**os.environ, "ROOTFS_BENCH_CHILD_RSS": f.name})
        return int(f.read())


def cli_cmd(recipe: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [str(PYTHON), "-c", CLI_HOOK, str(recipe), "-o", str(out), "--cache-dir", str(cache),
            "--json", *extra]


def host_only_cmd(stream: Path, baseinfo: Path, recipe: Path, out: Path, cache: Path,
                  *extra: str) -> list[str]:
    return [str(PYTHON), str(REPO / "bench" / "host_only.py"), str(stream), str(baseinfo), "--",
            str(recipe), "-o", str(out), "--cache-dir", str(cache), "--json", *extra]


def appliance_cmd(mode: str, image: Path, *extra: Path) -> list[str]:
    return [str(PYTHON), str(REPO / "bench" / "appliance_runs.py"), mode, str(image),
            *map(str, extra)]


def cli_shown(cmd: list[str]) -> str:
    """How the log shows a cli_cmd: as the rootfs-build command it is."""
    if CLI_HOOK not in cmd:
        return " ".join(cmd)
    i = cmd.index(CLI_HOOK)
    return " ".join([*cmd[:i - 2], "rootfs-build", *cmd[i + 1:]])


def rss_split(big: Run, little: Run, d_entries: int) -> list[str]:
    """The peak RSS of the two cold builds cut where the assembly starts
    (bench/rusage_hook.py): what the extraction and the layer index cost per
    extra entry, and what assembly and compression add on top."""
    def mb(r: Run, key: str) -> float:
        return float(r.rusage.get(key, 0)) / 1024

    if not (big.rusage.get("at_assembly_rss_kb") and little.rusage.get("at_assembly_rss_kb")):
        return []

    def per_entry(key: str) -> str:
        a, b = mb(big, key), mb(little, key)
        return (f"{a:.0f} / {b:.0f} MB, {(a - b) * 1024 * 1024 / d_entries:.0f} bytes per "
                "extra entry")

    top_big = mb(big, "self_maxrss_kb") - mb(big, "at_assembly_rss_kb")
    top_little = mb(little, "self_maxrss_kb") - mb(little, "at_assembly_rss_kb")
    return [f"  peak before the assembly (extraction, layer writer): "
            f"{per_entry('before_assembly_hwm_kb')}",
            f"  RSS when the assembly starts (layer index, imports): "
            f"{per_entry('at_assembly_rss_kb')}",
            f"  the assembly and zstd on top of that: {top_big:.0f} / {top_little:.0f} MB"]


def median(runs: list[Run]) -> Run:
    """The run with the median time (lower median for an even count)."""
    ordered = sorted(runs, key=lambda r: r.seconds)
    return ordered[(len(ordered) - 1) // 2]


# ---------------------------------------------------------------------------
# profiling (py-spy, extra runs: the timed runs are never sampled)


def profile_summary(raw: Path, rate: int, top: int = 12) -> list[str]:
    """Self and inclusive CPU seconds per function from py-spy's raw
    (collapsed stack) output; py-spy leaves idle samples out, so these are
    seconds the Python process spent running, not waiting on the appliance."""
    self_s: dict[str, int] = defaultdict(int)
    incl: dict[str, int] = defaultdict(int)
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, samples = line.rpartition(" ")
        if not samples.isdigit():
            continue
        count = int(samples)
        frames = []
        for f in stack.split(";"):
            func, paren, where = f.partition(" (")
            if not paren:
                continue
            path = where.rstrip(")").rpartition(":")[0].replace(f"{REPO}/", "")
            if "builder/" not in path:
                path = path.rpartition("/")[2]
            frames.append(f"{func} ({path})")
        if not frames:
            continue
        total += count
        self_s[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    lines = [f"  {total / rate:.1f} s of Python CPU sampled (@{rate} Hz; idle waits excluded)",
             "  self time, by function:"]
    for fn, n in sorted(self_s.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {n / rate:7.2f} s {100 * n / max(total, 1):5.1f}%  {fn}")
    lines.append("  inclusive, builder/ functions:")
    shown = [(fn, n) for fn, n in incl.items() if "builder/" in fn and not fn.startswith("main ")]
    for fn, n in sorted(shown, key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {n / rate:7.2f} s {100 * n / max(total, 1):5.1f}%  {fn}")
    return lines


# ---------------------------------------------------------------------------
# main


def made_image(image: Path) -> dict[str, Any]:
    """What base_image() recorded about an image it made (the .json beside it)."""
    meta = image.with_suffix(".json")
    if not meta.is_file():
        raise SystemExit(f"bench: {meta} not found: --image takes an image this script made")
    info: dict[str, Any] = json.loads(meta.read_text())
    info["image"] = str(image.resolve())
    log(f"base image given: {image}")
    return info


def stream_tar(workdir: Path, image: Path, env: dict[str, str], logf: Path
               ) -> tuple[Path, Path]:
    """What tar_out sends for `image` (and what inspection found), made once
    with the tool's Appliance and kept beside the image: the host-only run's
    input and the ZB floor's."""
    tar, meta = image.with_suffix(".stream.tar"), image.with_suffix(".stream.json")
    if not (tar.exists() and meta.exists()):
        log(f"making {tar.name} (tar_out of the image, once; not timed)")
        run(appliance_cmd("stream", image, tar, meta), env=env, log_to=logf, quiet=False)
    return tar, meta


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def artifact(r: Run) -> dict[str, Any]:
    arts = r.summary.get("artifacts", [])
    return arts[0] if arts else {}


def base_entry(cache: Path) -> dict[str, Any]:
    """The base layer's entry.json in `cache` (one build's cache holds one)."""
    for d in (cache / "entries").iterdir():
        meta: dict[str, Any] = json.loads((d / "entry.json").read_text())
        if meta.get("kind") == "base":
            return meta
    raise SystemExit(f"bench: no base layer in {cache}")


def index_bytes_per_entry(meta: dict[str, Any]) -> float:
    files = meta["files"]
    size = sum(files[n]["size"] for n in files if n.startswith("index"))
    return float(size) / max(meta["info"]["summary"]["entries"], 1)


def add_base_options(ap: argparse.ArgumentParser) -> None:
    """The base image's and the timing's options (bench/oci.py has them too)."""
    ap.add_argument("--size-gb", type=float, default=1.0, help="bytes of file data (GiB)")
    ap.add_argument("--files", type=int, default=50000, help="regular files in the base")
    ap.add_argument("--small-gb", type=float, default=0.25, metavar="G",
                    help="also build a base of G GiB of the same shape (files in proportion) "
                         "for the peak RSS comparison (0: skip)")
    ap.add_argument("--image", type=Path, metavar="QCOW2",
                    help="use this base image made by an earlier run (its .json beside it) "
                         "instead of picking host files: the comparison stays on the same "
                         "image when the host's /usr changed meanwhile")
    ap.add_argument("--small-image", type=Path, metavar="QCOW2",
                    help="the same for the small base")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/rootfs-build-bench"),
                    help="where the base images are cached and runs happen")
    ap.add_argument("--keep", action="store_true", help="keep this run's outputs and caches")
    ap.add_argument("--accel", choices=("tcg", "auto"), default="tcg",
                    help="tcg: LIBGUESTFS_BACKEND_SETTINGS=force_tcg for every appliance "
                         "(baselines and builds alike); auto: let libguestfs/the tool choose")
    ap.add_argument("--selinux", action=argparse.BooleanOptionalAction, default=True,
                    help="label every file with security.selinux, as openEuler does")
    ap.add_argument("--quiet-wait", type=float, default=180, metavar="SECONDS",
                    help="before each timed step, wait up to this long for other processes "
                         "to leave the CPU (0: do not wait)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_base_options(ap)
    ap.add_argument("--repeat", type=int, default=1, help="runs per step; medians are shown")
    ap.add_argument("--warm-repeat", type=int, default=3, metavar="N",
                    help="per --repeat, time the short steps (host side, warm builds, zstd "
                         "floors) N times; medians are shown")
    ap.add_argument("--skip-virt-tar-out", action="store_true",
                    help="leave out A (the slowest step); the cold ratio is then against F")
    ap.add_argument("--profile", action="store_true",
                    help="afterwards, run cold, host-only and warm once more under py-spy")
    args = ap.parse_args()
    global QUIET_WAIT
    QUIET_WAIT = args.quiet_wait
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    env = {"LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"} if args.accel == "tcg" else {}
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.image:
        image, info = args.image.resolve(), made_image(args.image)
    else:
        image, info = base_image(workdir, args.size_gb, args.files, selinux=args.selinux,
                                 env=env)
    small: tuple[Path, dict[str, Any]] | None = None
    if args.small_image:
        small = args.small_image.resolve(), made_image(args.small_image)
    elif args.small_gb > 0:
        small = base_image(workdir, args.small_gb,
                           max(1, round(args.files * args.small_gb / args.size_gb)),
                           selinux=args.selinux, env=env)
    rundir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    logf = rundir / "log.txt"
    log(f"run directory {rundir} (commands and their stderr in log.txt)")
    stream, baseinfo = stream_tar(workdir, image, env, logf)
    byte_compile()
    results: dict[str, list[Run]] = defaultdict(list)
    profiles: dict[str, list[str]] = {}
    sizes: dict[str, int] = {"stream tar": stream.stat().st_size}
    hashes: dict[str, str] = {}
    load: list[str] = []
    machine: dict[str, float] = {}   # core_sharing(): seconds alone, and each of two at once
    try:
        overlay = rundir / "overlay"
        (overlay / "etc" / "bench").mkdir(parents=True)
        for i in range(3):
            (overlay / "etc" / "bench" / f"file{i}.conf").write_text(f"setting = {i}\n")
        (overlay / "etc" / "bench" / "changing.conf").write_text("generation = 0\n")

        def recipe_for(img: Path, name: str) -> Path:
            path = rundir / f"{name}.yaml"
            path.write_text(
                "name: bench\n"
                f"base:\n  image: {json.dumps(str(img))}\n"
                f"overlays:\n  - {json.dumps(str(overlay))}\n"
                "output:\n  formats: [tar.zst]\n  bundle: false\n")
            return path

        recipe = recipe_for(image, "bench")
        out_dir = rundir / "out"
        floor_dir = rundir / "floor"
        floor_dir.mkdir()
        changes = 0
        load.append(f"before: {uptime()}")
        log("C: the same CPU-bound loop alone and twice at once (how independent the cores are)")
        machine["alone"], machine["together"] = core_sharing()
        for rep in range(args.repeat):
            tag = f" ({rep + 1}/{args.repeat})" if args.repeat > 1 else ""
            if not args.skip_virt_tar_out:
                base_out = rundir / "baseline.tar"
                log(f"A: virt-tar-out{tag}")
                results["A"].append(run(["virt-tar-out", "-a", str(image), "/",
                                         str(base_out)], env=env, log_to=logf))
                base_out.unlink()
            log(f"F: libguestfs floor (launch, inspect, in-guest tar | cat){tag}")
            results["F"].append(run(appliance_cmd("floor", image), env=env, log_to=logf,
                                    stdout=rundir / "floor.json"))
            log(f"T: the floor plus the transfer to the host{tag}")
            results["T"].append(run(appliance_cmd("transfer", image), env=env, log_to=logf,
                                    stdout=rundir / "transfer.json"))
            cache = rundir / f"cache-{rep}"
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir()
            log(f"cold build{tag}")
            cmd = cli_cmd(recipe, out_dir, cache, "-v")
            r = run(cmd, env=env, log_to=logf, stdout=rundir / "cold.json",
                    rusage_file=rundir / "cold.rusage", shown=cli_shown(cmd), timeline=[])
            results["cold"].append(r)
            hashes["cold rootfs.tar.zst (generation 0)"] = artifact(r).get("sha256", "?")
            base = base_entry(cache)
            hashes["cold base layer.tar"] = base["files"]["layer.tar"]["sha256"]
            sizes["layer.tar"] = base["files"]["layer.tar"]["size"]
            sizes["index bytes per entry"] = int(index_bytes_per_entry(base))
            plain = floor_dir / "rootfs.tar"
            zst = out_dir / "bench" / "rootfs.tar.zst"
            subprocess.run(["zstd", "-d", "-q", "-f", str(zst), "-o", str(plain)], check=True)
            sizes["rootfs.tar"] = plain.stat().st_size
            sizes["rootfs.tar.zst"] = zst.stat().st_size
            hashes["cold rootfs.tar (generation 0)"] = sha256_of(plain)
            for w in range(args.warm_repeat):
                wtag = f"{tag} [{w + 1}/{args.warm_repeat}]" if args.warm_repeat > 1 else tag
                hcache = rundir / "cache-host"
                shutil.rmtree(hcache, ignore_errors=True)
                hcache.mkdir()
                # the base image's sha256 is remembered as a real second build would
                shutil.copytree(cache / "hashes", hcache / "hashes", dirs_exist_ok=True)
                (overlay / "etc" / "bench" / "changing.conf").write_text("generation = 0\n")
                log(f"H: host side only (cold build fed from the stream tar){wtag}")
                hcmd = host_only_cmd(stream, baseinfo, recipe, rundir / "out-host", hcache, "-v")
                r = run(hcmd, env=env, log_to=logf, stdout=rundir / "host.json",
                        rusage_file=rundir / "host.rusage", timeline=[])
                results["H"].append(r)
                hashes["host-only rootfs.tar.zst (generation 0)"] = artifact(r).get("sha256", "?")
                hashes["host-only base layer.tar"] = \
                    base_entry(hcache)["files"]["layer.tar"]["sha256"]
                shutil.rmtree(hcache)
                log(f"ZB: zstd -3 -T2 of the stream tar{wtag}")
                results["ZB"].append(run(["zstd", "-3", "-T2", "-q", "-f", str(stream), "-o",
                                          str(floor_dir / "stream.tar.zst")],
                                         env={}, log_to=logf))
                (floor_dir / "stream.tar.zst").unlink()
                # What memory that sat free costs here: the same bytes
                # written into a new file after the wait every timed step
                # gets, then at once into the page cache the first copy
                # just gave back (no sync, no wait).  H pays N's price for
                # the layer.tar it writes; ZB only for its compressed output.
                copy = floor_dir / "new-memory.bin"
                dd = ["dd", f"if={stream}", f"of={copy}", "bs=256K", "status=none"]
                log(f"N: the stream tar written into a new file; N': again at once{wtag}")
                results["N"].append(run(dd, env={}, log_to=logf))
                copy.unlink()
                results["N'"].append(run(dd, env={}, log_to=logf, quiet=False))
                copy.unlink()
                log(f"warm rebuild, nothing changed{wtag}")
                cmd = cli_cmd(recipe, out_dir, cache, "-v")
                r = run(cmd, env=env, log_to=logf, stdout=rundir / "warm.json",
                        rusage_file=rundir / "warm.rusage", shown=cli_shown(cmd), timeline=[])
                results["warm"].append(r)
                hashes["warm rootfs.tar.zst (generation 0)"] = artifact(r).get("sha256", "?")
                built = [x for x in r.summary.get("layers", []) if x["cache"] == "built"]
                if built or r.summary.get("appliance_launches"):
                    log(f"WARNING: warm build rebuilt {built} / launched the appliance")
                changes += 1
                (overlay / "etc" / "bench" / "changing.conf").write_text(
                    f"generation = {changes}\n")
                log(f"warm rebuild, one overlay file changed{wtag}")
                r = run(cmd, env=env, log_to=logf, stdout=rundir / "warm2.json",
                        rusage_file=rundir / "warm2.rusage", shown=cli_shown(cmd), timeline=[])
                results["warm2"].append(r)
                hashes[f"warm' rootfs.tar.zst (generation {changes})"] = \
                    artifact(r).get("sha256", "?")
                built = [x["kind"] for x in r.summary.get("layers", [])
                         if x["cache"] == "built"]
                if built != ["overlay"]:
                    log(f"WARNING: expected only the overlay layer rebuilt, got {built}")
                log(f"Z: zstd -3 -T2 of the finished tar{wtag}")
                results["zstd"].append(run(["zstd", "-3", "-T2", "-q", "-f", str(plain), "-o",
                                            str(floor_dir / "rootfs.tar.zst")],
                                           env={}, log_to=logf))
            (overlay / "etc" / "bench" / "changing.conf").write_text("generation = 0\n")
            if small is not None:
                scache = rundir / "cache-small"
                shutil.rmtree(scache, ignore_errors=True)
                scache.mkdir()
                log(f"cold build of the {args.small_gb:g} GB base (peak RSS){tag}")
                cmd = cli_cmd(recipe_for(small[0], "small"), rundir / "out-small", scache, "-v")
                results["small"].append(run(cmd, env=env, log_to=logf,
                                            stdout=rundir / "small.json",
                                            rusage_file=rundir / "small.rusage",
                                            shown=cli_shown(cmd), timeline=[]))
                shutil.rmtree(scache)
                # The compressor's own peak on each finished tar (untimed):
                # the same library runs inside the build, so its memory is
                # part of the Python process's peak.
                small_plain = floor_dir / "small.tar"
                subprocess.run(["zstd", "-d", "-q", "-f",
                                str(rundir / "out-small" / "bench" / "rootfs.tar.zst"),
                                "-o", str(small_plain)], check=True)
                log("peak RSS of zstd -3 -T2 alone on both finished tars")
                sizes["zstd peak RSS KiB, base"] = max(
                    sizes.get("zstd peak RSS KiB, base", 0), zstd_peak_rss_kb(plain))
                sizes["zstd peak RSS KiB, small base"] = max(
                    sizes.get("zstd peak RSS KiB, small base", 0), zstd_peak_rss_kb(small_plain))
                small_plain.unlink()
            if not args.keep and rep + 1 < args.repeat:
                shutil.rmtree(cache)
        load.append(f"after: {uptime()}")

        if args.profile:
            profiles.update(run_profiles(rundir, recipe, out_dir, stream, baseinfo, env, logf,
                                         workdir))
    except KeyboardInterrupt:
        if _current is not None and _current.poll() is None:
            _current.terminate()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(_current.pid, 0)
        log("interrupted")
        return 130
    finally:
        if args.keep:
            log(f"kept {rundir}")
        else:
            shutil.rmtree(rundir, ignore_errors=True)

    report(args, info, small[1] if small else None, results, sizes, hashes, profiles, load,
           machine, workdir)
    return 0


def uptime() -> str:
    with open("/proc/loadavg") as f:
        one, five, fifteen = f.read().split()[:3]
    return f"load average {one}, {five}, {fifteen}"


def run_profiles(rundir: Path, recipe: Path, out_dir: Path, stream: Path, baseinfo: Path,
                 env: dict[str, str], logf: Path, workdir: Path) -> dict[str, list[str]]:
    """py-spy on extra, untimed runs: a cold build, the host side alone, a warm build."""
    rate = 100
    profiles: dict[str, list[str]] = {}
    cache = rundir / "cache-profile"
    for name in ("cold", "host", "warm"):
        if name != "warm":
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir()
        raw = workdir / f"profile-{name}.txt"
        log(f"py-spy record: {name} build (not timed)")
        cmd = (host_only_cmd(stream, baseinfo, recipe, out_dir, cache, "-v") if name == "host"
               else cli_cmd(recipe, out_dir, cache, "-v"))
        r = run([str(PY_SPY), "record", "--nonblocking", "--threads", "-r", str(rate), "-f",
                 "raw", "-o", str(raw), "--", *cmd], env=env, log_to=logf,
                rusage_file=rundir / "profile.rusage", timeline=[],
                shown=f"py-spy record ... -- {cli_shown(cmd)}")
        profiles[name] = [f"py-spy, {name} build, {r.seconds:.1f} s wall ({raw}):",
                          *profile_summary(raw, rate)]
    return profiles


# ---------------------------------------------------------------------------
# the report


_STAMP = re.compile(r"^\[\s*([0-9.]+) s\] (.*)$")


def timeline_events(r: Run) -> dict[str, Any]:
    """Times (s from the start) of the -v lines that mark phases, and the
    numbers of the extraction profile line."""
    ev: dict[str, Any] = {}
    for line in r.timeline:
        m = _STAMP.match(line)
        if not m:
            continue
        t, text = float(m.group(1)), m.group(2)
        if "starting the appliance for base image" in text and "launch" not in ev:
            ev["launch"] = t
        elif "extraction profile:" in text:
            ev["profile_at"] = t
            ev["profile"] = {k: float(v) for k, v in
                             re.findall(r"(\w+)=([0-9.]+)", text.split("profile:", 1)[1])}
        elif re.search(r"rootfs-build: base layer .*: (built|from cache)", text):
            ev["base_done"] = t
        elif "rootfs-build: writing rootfs." in text:
            ev["assembly"] = t
        elif "rootfs-build: wrote rootfs." in text:
            ev["written"] = t
            m2 = re.search(r"\(([0-9.]+) s of it finishing", text)
            ev["drain"] = float(m2.group(1)) if m2 else 0.0
    return ev


def phase_rows(r: Run, label: str) -> list[str]:
    """The phases of a cold build (or the host-only run) from its -v lines."""
    ev = timeline_events(r)
    p = ev.get("profile")
    if p is None:
        return [f"  ({label}: no -v timeline)"]
    # the profile's times count from the launch's start, which its line's
    # arrival (when the appliance had closed) dates
    t0 = ev["profile_at"] - p["appliance_closed"]
    rows = [("before the appliance (recipe, base image sha256, qemu-img check)", 0.0, t0)]
    at = t0
    for key, what in (("launch", "appliance launch"), ("inspect", "inspection and mounts")):
        rows.append((what, at, at + p[key]))
        at += p[key]
    first, last = t0 + p["stream_first"], t0 + p["stream_last"]
    rows.append(("in-guest tar until its first bytes arrive", at, first))
    rows.append(("stream: in-guest read + transfer, host side overlapped", first, last))
    rows.append(("host side after the stream's end (rest of the layer, index, fsync)", last,
                 t0 + p["layer_done"]))
    rows.append(("appliance shutdown", t0 + p["layer_done"], t0 + p["appliance_closed"]))
    asm = ev.get("assembly", r.seconds)
    rows.append(("cache entry, other layers, tree", t0 + p["appliance_closed"], asm))
    written = ev.get("written", r.seconds)
    rows.append(("assembly + zstd + sha256 + writing rootfs.tar.zst", asm, written))
    rows.append(("manifest, SHA256SUMS, fsync, publish, exit", written, r.seconds))
    out = [f"  {label} phases (s from start; -v timeline):"]
    for what, a, b in rows:
        out.append(f"    {a:7.1f} -> {b:7.1f}  {b - a:6.1f}  {what}")
    host = p["read_cpu"] + p["parse_cpu"] + p["write_cpu"] + p["hash_cpu"]
    span = max(p["stream_last"] - p["stream_first"], 1e-9)
    out.append(f"    overlap: during the {span:.1f} s stream the host side used {host:.1f} s "
               f"of CPU (read {p['read_cpu']:.1f}; parse+normalize {p['parse_cpu']:.1f} and "
               f"write {p['write_cpu']:.1f} on one thread; hash {p['hash_cpu']:.1f}) on 3 threads "
               f"and waited {p['waited']:.1f} s for data; index {p['index_cpu']:.2f} s CPU "
               f"after it; compression drained {ev.get('drain', 0.0):.1f} s after the last "
               "byte assembled")
    return out


def warm_phases(r: Run, label: str, z: float) -> str:
    """A warm build's three phases from its -v lines: everything before the
    assembly starts, the assembly with compression and hashing (Z's work,
    plus reading the layers and the sha256), and publishing until exit."""
    ev = timeline_events(r)
    if "assembly" not in ev or "written" not in ev:
        return f"  ({label}: no -v timeline)"
    start, written = ev["assembly"], ev["written"]
    return (f"  {label}: start {start:.2f} s (interpreter, recipe, cache lookups), assembly "
            f"+ zstd + sha256 {written - start:.2f} s ({(written - start) / z:.2f}x Z), "
            f"publishing and exit {r.seconds - written:.2f} s")


def new_memory_lines(n_fresh: float, n_reused: float, h: float, zb: float, zb_sys: float,
                     sizes: dict[str, int]) -> list[str]:
    """What N and N' say about H against ZB.  Where the kernel reports free
    pages to the hypervisor (virtio-balloon free page reporting), memory
    that sat free a few seconds is taken back, and the first touch of each
    page faults it in again: a write into new page-cache pages then costs
    N, not N'.  H writes layer.tar and rootfs.tar.zst into new pages; the
    estimate takes that out of H at N's extra rate per byte.  ZB is taken
    as measured: it writes only its compressed output, and whether it paid
    for that shows in its system time, printed beside it (zstd's own work
    is nearly all user time)."""
    extra = (n_fresh - n_reused) / (sizes["stream tar"] / 1e9)   # s per GB
    h_bytes = sizes["layer.tar"] + sizes["rootfs.tar.zst"]
    h_cost = extra * h_bytes / 1e9
    lines = [f"    new memory: N wrote the stream tar ({sizes['stream tar'] / 1e9:.2f} GB) "
             f"into a new file in {n_fresh:.1f} s after the wait every timed step gets, N' "
             f"the same in {n_reused:.1f} s at once into the pages N had freed: memory that "
             f"sat free costs {extra:.2f} s per GB more to write here"]
    if extra > 0.2:
        lines.append(f"    H writes layer.tar and rootfs.tar.zst ({h_bytes / 1e9:.2f} GB) into "
                     f"new pages: at that rate about {h_cost:.1f} s of H; H less it: "
                     f"{h - h_cost:.1f} s = {(h - h_cost) / zb:.2f}x ZB as measured (system "
                     f"time {zb_sys:.2f} s) (an estimate, not a run)")
    return lines


def report(args: argparse.Namespace, info: dict[str, Any], small_info: dict[str, Any] | None,
           results: dict[str, list[Run]], sizes: dict[str, int], hashes: dict[str, str],
           profiles: dict[str, list[str]], load: list[str], machine: dict[str, float],
           workdir: Path) -> None:
    med = {k: median(v) for k, v in results.items()}
    rows: list[tuple[str, float, str, str, str]] = []
    verdicts = []

    def ratio(x: float, base: float) -> str:
        return f"{x / base:.2f}x"

    def check(x: float, base: float, limit: float) -> str:
        ok = x / base <= limit
        verdicts.append(ok)
        return "PASS" if ok else "FAIL"

    f_run, t_run = med["F"], med["T"]
    f, t = f_run.seconds, t_run.seconds
    fs, ts = f_run.summary.get("seconds", {}), t_run.summary.get("seconds", {})
    cold = med["cold"].seconds
    a = med["A"].seconds if "A" in med else None
    if a is not None:
        rows.append(("A  virt-tar-out -a IMG / (1 vCPU, no xattrs)", a, "", "", ""))
    rows.append(("F  libguestfs floor: launch+inspect+tar|cat, 2 vCPU", f,
                 (ratio(f, a) + " of A") if a else "", "", ""))
    rows.append(("T  F, the tree sent to the host (tar_out)", t,
                 (ratio(t, a) + " of A") if a else "", "", ""))
    if a is not None:
        rows.append(("cold build, tar.zst, empty cache", cold, ratio(cold, a) + " of A",
                     f"<= {TARGETS['cold']}x A", check(cold, a, TARGETS["cold"])))
    rows.append(("   (same, against the floor F)", cold, ratio(cold, f) + " of F",
                 f"<= {TARGETS['cold_floor']}x F", check(cold, f, TARGETS["cold_floor"])))
    zb = med["ZB"].seconds
    rows.append(("ZB zstd -3 -T2 of the stream tar", zb, "", "", ""))
    h = med["H"].seconds
    rows.append(("H  host side only: cold build fed the stream tar", h, ratio(h, zb) + " of ZB",
                 f"<= {TARGETS['host']}x ZB", check(h, zb, TARGETS["host"])))
    n_fresh, n_reused = med["N"].seconds, med["N'"].seconds
    rows.append(("N  the stream tar dd'd into a new file", n_fresh, "", "", ""))
    rows.append(("N' the same at once, into the pages N freed", n_reused,
                 ratio(n_reused, n_fresh) + " of N", "", ""))
    floor = med["zstd"].seconds
    rows.append(("Z  zstd -3 -T2 of the finished tar", floor, "", "", ""))
    for key, label in (("warm", "warm rebuild, nothing changed"),
                       ("warm2", "warm rebuild, 1 overlay file changed")):
        w = med[key].seconds
        rows.append((label, w, ratio(w, floor) + " of Z", f"<= {TARGETS['warm']}x Z",
                     check(w, floor, TARGETS["warm"])))

    n = args.repeat
    width = max(len(r[0]) for r in rows)
    out = [f"rootfs-build benchmark: {info['files']} files + {info['symlinks']} symlinks, "
           f"{info['file_bytes'] / 1e9:.2f} GB of file data"
           f"{', SELinux-labelled' if info.get('selinux_labels') else ''}; stream tar "
           f"{sizes['stream tar'] / 1e9:.2f} GB; rootfs tar {sizes['rootfs.tar'] / 1e9:.2f} GB "
           f"-> tar.zst {sizes['rootfs.tar.zst'] / 1e9:.2f} GB; accel={args.accel}; "
           f"medians of {n} cold and {n * args.warm_repeat} short runs",
           f"image {info['image']}", *load, "",
           f"{'step':<{width}}  {'seconds':>8}  {'ratio':<18}  {'target':<12}  result",
           "-" * (width + 52)]
    for label, secs, rat, target, verdict in rows:
        out.append(f"{label:<{width}}  {secs:8.1f}  {rat:<18}  {target:<12}  {verdict}")
    out.append("")
    out.append("Where the cold build's time goes, against its floors:")
    out.append(f"  F: launch {fs.get('launch', 0):.1f} s, inspection {fs.get('inspect', 0):.1f}"
               f" s, in-guest tar | cat {fs.get('read', 0):.1f} s, shutdown "
               f"{fs.get('shutdown', 0):.1f} s")
    out.append(f"  T: launch {ts.get('launch', 0):.1f} s, inspection {ts.get('inspect', 0):.1f}"
               f" s, tar_out to the host {ts.get('read', 0):.1f} s: the transfer costs "
               f"{ts.get('read', 0) - fs.get('read', 0):+.1f} s over the in-guest read")
    if a is not None:
        # The cold build moves the tree out of the appliance as T does, so T
        # is as low as it can go; what the A target leaves above T is all
        # the host side may add.
        out.append(f"  the A target: {TARGETS['cold']}x A = {TARGETS['cold'] * a:.1f} s; T (the "
                   f"floor with the transfer, which the cold build does as well) is {t:.1f} s = "
                   f"{t / a:.2f}x A, leaving {TARGETS['cold'] * a - t:+.1f} s for the rest")
    out += phase_rows(med["cold"], "cold build")
    out += phase_rows(med["H"], "host side only (H)")
    hp = timeline_events(med["H"]).get("profile")
    if hp:
        # The rootfs tar is sorted, so its compression starts only once the
        # whole stream is in; the stream ends no sooner than its one parsing
        # thread (Python, serial; it writes layer.tar too) is through.
        thread = hp["parse_cpu"] + hp["write_cpu"]
        hf = thread + floor
        out.append(f"    H's own floor: the parsing thread's CPU {thread:.1f} s (parse "
                   f"{hp['parse_cpu']:.1f}, write {hp['write_cpu']:.1f}) + Z {floor:.1f} s (the "
                   f"sorted rootfs tar is compressed once the whole stream is in) = {hf:.1f} s "
                   f"= {hf / zb:.2f}x ZB; {TARGETS['host']}x ZB leaves "
                   f"{TARGETS['host'] * zb - hf:.1f} s for the rest (start, the read-ahead and "
                   "hash threads' share of the cores, index, assembly, publishing)")
    out += new_memory_lines(n_fresh, n_reused, h, zb, med["ZB"].system, sizes)
    for key, label in (("warm", "warm"), ("warm2", "warm'")):
        out.append(warm_phases(med[key], label, floor))
    out.append("")
    out.append(f"{'peak RSS, rootfs-build Python process':<{width}}  {'MB':>8}  "
               f"{'entries':<18}  {'target':<12}  result")
    out.append("-" * (width + 52))

    def rss(r: Run) -> float:
        return float(r.rusage.get("self_maxrss_kb", 0)) / 1024

    def entries(r: Run) -> int:
        return int(r.summary.get("entries", 0))

    big = max(rss(r) for r in results["cold"])
    ok = big <= TARGETS["rss_mb"]
    verdicts.append(ok)
    out.append(f"{'cold build, ' + format(args.size_gb, 'g') + ' GB base':<{width}}  {big:8.0f}  "
               f"{entries(med['cold']):<18}  {'<= ' + str(TARGETS['rss_mb']) + ' MB':<12}  "
               f"{'PASS' if ok else 'FAIL'}")
    if "small" in results:
        little = max(rss(r) for r in results["small"])
        flat = little >= big * (1 - TARGETS["rss_flat"])
        verdicts.append(flat)
        out.append(f"{'cold build, ' + format(args.small_gb, 'g') + ' GB base':<{width}}  "
                   f"{little:8.0f}  {entries(med['small']):<18}  "
                   f"{'>= ' + format(1 - TARGETS['rss_flat'], '.0%') + ' of 1 GB':<12}  "
                   f"{'PASS' if flat else 'FAIL'}")
        d_entries = entries(med["cold"]) - entries(med["small"])
        if d_entries > 0:
            out.append(f"  bytes of peak RSS per extra entry: "
                       f"{(big - little) * 1024 * 1024 / d_entries:.0f} "
                       f"(({big:.0f} - {little:.0f}) MB over {d_entries} entries); "
                       f"the layer index on disk: {sizes.get('index bytes per entry', 0)} "
                       "bytes per entry")
            out += rss_split(max(results["cold"], key=rss), max(results["small"], key=rss),
                             d_entries)
    if sizes.get("zstd peak RSS KiB, small base"):
        z_big = sizes["zstd peak RSS KiB, base"] / 1024
        z_little = sizes["zstd peak RSS KiB, small base"] / 1024
        out.append(f"  zstd -3 -T2 alone on the two finished tars (the compressor the build "
                   f"runs in-process): {z_big:.0f} / {z_little:.0f} MB, {z_little / z_big:.2f}")
    for key, label in (("H", "host side only"), ("warm", "warm rebuild, nothing changed"),
                       ("warm2", "warm rebuild, 1 overlay file changed")):
        out.append(f"{label:<{width}}  {max(rss(r) for r in results[key]):8.0f}")
    qemu = max(r.rusage.get("children_maxrss_kb", 0) for r in results["cold"]) / 1024
    memsize = f_run.summary.get("memsize_mb", "?")
    out.append(f"appliance (qemu, a child process; not in the figures above): peak RSS "
               f"{qemu:.0f} MB, guest memory {memsize} MB (libguestfs' default, unchanged), "
               f"{f_run.summary.get('smp', '?')} vCPUs")
    out.append("")
    out.append("Artifacts (sha256):")
    for what, digest in hashes.items():
        out.append(f"  {digest}  {what}")
    out.append("")
    out.append("CPU seconds (user+sys) during each step; 'others' is what the rest of the")
    out.append("machine used meanwhile, in average busy cores (2 cores here): above ~0.1 the")
    out.append("step competed for CPU and its time is inflated.")
    if machine:
        slower = machine["together"] / machine["alone"]
        out.append(f"  C: one CPU-bound Python loop alone {machine['alone']:.2f} s, each of two "
                   f"at once {machine['together']:.2f} s (medians of 3): side by side each "
                   f"takes {slower:.2f}x its time alone, so two busy threads do the work of "
                   f"{2 / slower:.2f} cores here")
    noisy = []
    for key, label in STEPS:
        if key not in med:
            continue
        r = med[key]
        if r.rusage:
            own = (f"python {r.rusage.get('self_cpu', 0):6.1f}  qemu+children "
                   f"{r.rusage.get('children_cpu', 0):6.1f}")
        else:
            own = f"process tree {r.cpu:6.1f} (system {r.system:.2f})"
        busy = r.others / r.seconds
        if busy > 0.1:
            noisy.append(label)
        out.append(f"  {label:5} wall {r.seconds:6.1f}  {own:<38}  others {busy:4.2f} cores")
    for key, label in (("cold", "cold"), ("H", "H"), ("warm", "warm")):
        ru = med[key].rusage if key in med else {}
        if "self_user" in ru:
            # where a slow run's extra CPU went: the kernel (faults, the page
            # cache) or Python; and how often its threads were switched out
            out.append(f"  {label:5} python user {ru['self_user']:.1f} s, sys {ru['self_sys']:.1f} "
                       f"s, {ru['self_minflt']} minor faults, context switches "
                       f"{ru['self_nvcsw']} voluntary / {ru['self_nivcsw']} involuntary")
    if noisy:
        out.append(f"WARNING: other processes were busy during {', '.join(noisy)}: "
                   "rerun on a quiet machine (or with --repeat) before trusting the ratios")
    if n > 1 or args.warm_repeat > 1:
        out.append("all runs (s): " + "; ".join(
            f"{k} " + " ".join(f"{r.seconds:.1f}" for r in results[k])
            for k, _ in STEPS if k in results))
    out.append("")
    out.append(f"overall: {'PASS' if all(verdicts) else 'FAIL'} "
               f"({sum(verdicts)}/{len(verdicts)} targets met)")
    for lines in profiles.values():
        out.append("")
        out.extend(lines)
    text = "\n".join(out)
    print(text)
    (workdir / "last-result.txt").write_text(text + "\n")
    doc = {k: [dataclasses.asdict(r) for r in v] for k, v in results.items()}
    (workdir / "last-result.json").write_text(
        json.dumps({"image": info, "small": small_info, "sizes": sizes, "hashes": hashes,
                    "runs": doc}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
