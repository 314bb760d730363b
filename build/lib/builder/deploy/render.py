"""Generate the deployment files: ``dpu/`` scripts and ``host/`` setup.

This module is the one place where values reach scripts: each is validated
(``DeployConfig``, ``mounts.check_entry``) and then quoted with ``sh_quote``
into the ``# @VALUES@`` block of a template from ``builder/templates``.  The
templates contain no other placeholders.  Operator-editable settings of the
DPU scripts live in ``dpu/offload.conf``, which the scripts parse as strict
KEY=VALUE lines at run time (never ``source``).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from .. import elfinfo, values
from ..errors import UserError
from .mounts import MountEntry, check_entry

# Commands libvirt (with the offload patches) runs on the host through rexec.
# rexec matches the command exactly as given, so both spellings are listed.
WHITELIST_BASE = ("qemu-kvm", "/usr/bin/qemu-kvm", "/usr/libexec/qemu-kvm",
                  "kill", "/usr/bin/kill", "/bin/kill",
                  "taskset", "/usr/bin/taskset")
COMMAND_RE = re.compile(r"^[A-Za-z0-9._+-]{1,128}$")
LISTEN_RE = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<v4>[0-9.]+)):(?P<port>[0-9]+)$")
UNIT_DIR = "/etc/systemd/system"
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class ConfigError(ValueError):
    """A DeployConfig value is invalid; ``key`` names the field."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def sh_quote(value: str | int) -> str:
    """Quote one validated value for bash (refuses control characters outright)."""
    text = str(value)
    if _CONTROL_RE.search(text):
        raise ValueError(f"{text!r} contains control characters")
    return shlex.quote(text)


def _check_listen(value: object) -> str:
    m = LISTEN_RE.match(value) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"{value!r} is not an address:port to listen on (like 0.0.0.0:7777)")
    ip = values.check_ip(m.group("v6") or m.group("v4"))
    port = values.check_port(m.group("port"))
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _check_command(value: object) -> str:
    if isinstance(value, str) and value.startswith("/"):
        return values.check_abs_path(value)
    if not isinstance(value, str) or not COMMAND_RE.match(value):
        raise ValueError(f"{value!r} is not a command name or absolute path")
    return value


def _check_file(value: object) -> Path:
    if not isinstance(value, str | os.PathLike):
        raise ValueError(f"{value!r} is not a file path")
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not an existing file")
    return path


@dataclass(frozen=True)
class DeployConfig:
    """Validated deployment settings (ConfigError, a ValueError, names the key).

    DPU side: name (image name), rootfs (path on the DPU), host_ip (where
    qemu-kvm, rexec_server and QMP live), qtfs_server_ip (default host_ip),
    rexec_port, qmp_port, qtfs_log_level, qtfs_ko (build-host file shipped as
    dpu/qtfs.ko), dpu_kernel (expected ``uname -r``; checked against qtfs.ko's
    vermagic here and against the DPU at run time).
    Host side: qtfs_server_ko / engine_bin / rexec_server_bin (build-host
    files shipped in host/), engine_args, rexec_listen (default
    0.0.0.0:<rexec_port>), whitelist_extra (more commands for
    /etc/rexec/whitelist), qtfs_listen_ip (qtfs_server.ko's qtfs_server_ip),
    host_engine_path / host_rexec_server_path (where they run on the host).
    """

    name: str
    host_ip: str
    rexec_port: int
    rootfs: str = "/another_rootfs"
    qtfs_server_ip: str | None = None
    qmp_port: int = 32323
    qtfs_log_level: str = "INFO"
    qtfs_ko: Path | None = None
    dpu_kernel: str | None = None
    qtfs_server_ko: Path | None = None
    engine_bin: Path | None = None
    engine_args: Sequence[int] = (4096, 16)
    rexec_listen: str | None = None
    rexec_server_bin: Path | None = None
    whitelist_extra: Sequence[str] = field(default_factory=tuple)
    qtfs_listen_ip: str = "0.0.0.0"
    host_engine_path: str = "/usr/local/bin/qtfs-engine"
    host_rexec_server_path: str = "/usr/bin/rexec_server"

    def __post_init__(self) -> None:
        def setv(key: str, value: object) -> None:
            object.__setattr__(self, key, value)

        def check(key: str, fn: Any, optional: bool = False) -> None:
            value = getattr(self, key)
            if optional and value is None:
                return
            try:
                setv(key, fn(value))
            except ValueError as e:
                raise ConfigError(key, str(e)) from None

        check("name", values.check_name)
        check("rootfs", self._check_rootfs)
        check("host_ip", values.check_ip)
        if self.qtfs_server_ip is None:
            setv("qtfs_server_ip", self.host_ip)
        check("qtfs_server_ip", values.check_ip)
        check("rexec_port", values.check_port)
        check("qmp_port", values.check_port)
        check("qtfs_log_level", values.check_log_level)
        check("dpu_kernel", values.check_kernel_release, optional=True)
        for key in ("qtfs_ko", "qtfs_server_ko", "engine_bin", "rexec_server_bin"):
            check(key, _check_file, optional=True)
        check("engine_args", self._check_engine_args)
        if self.rexec_listen is None:
            setv("rexec_listen", f"0.0.0.0:{self.rexec_port}")
        check("rexec_listen", _check_listen)
        check("whitelist_extra", self._check_whitelist)
        check("qtfs_listen_ip", values.check_ip)
        check("host_engine_path", values.check_abs_path)
        check("host_rexec_server_path", values.check_abs_path)
        if self.qtfs_ko is not None:
            magic = elfinfo.module_kernel(self.qtfs_ko)
            if magic is None:
                raise ConfigError("qtfs_ko", f"{str(self.qtfs_ko)!r} has no vermagic: "
                                  "not a kernel module")
            if self.dpu_kernel is not None and magic != self.dpu_kernel:
                raise ConfigError("qtfs_ko", f"{str(self.qtfs_ko)!r} was built for kernel "
                                  f"{magic}, but dpu_kernel is {self.dpu_kernel}")

    @staticmethod
    def _check_rootfs(value: object) -> str:
        path = values.check_abs_path(value)
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if not parts:
            raise ValueError("the rootfs cannot be /")
        return "/" + "/".join(parts)

    @staticmethod
    def _check_engine_args(value: object) -> tuple[int, ...]:
        if isinstance(value, str | bytes) or not isinstance(value, Iterable):
            raise ValueError(f"{value!r} is not a list of integers (like [4096, 16])")
        args = tuple(value)
        if not args or any(isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < 2**31
                           for a in args):
            raise ValueError(f"{list(args)!r} is not a list of non-negative integers")
        if len(args) == 2 and not (1 <= args[0] <= 65536 and 1 <= args[1] <= 16):
            raise ValueError(f"{list(args)!r}: engine <buffer bytes 1-65536> <threads 1-16>")
        return args

    @staticmethod
    def _check_whitelist(value: object) -> tuple[str, ...]:
        if isinstance(value, str | bytes) or not isinstance(value, Iterable):
            raise ValueError(f"{value!r} is not a list of commands")
        return tuple(_check_command(v) for v in value)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], where: str) -> DeployConfig:
        """Build from a recipe mapping; errors are UserErrors naming ``where.key``."""
        if not isinstance(params, Mapping):
            raise UserError("deployment settings must be a mapping", where=where)
        known = {f.name for f in fields(cls)}
        for key in params:
            if key not in known:
                raise UserError(f"unknown key {key!r} (known: {', '.join(sorted(known))})",
                                where=f"{where}.{key}")
        for key in ("name", "host_ip", "rexec_port"):
            if key not in params:
                raise UserError(f"missing key {key!r}", where=f"{where}.{key}")
        try:
            return cls(**params)
        except ConfigError as e:
            raise UserError(e.message, where=f"{where}.{e.key}") from None


# ---------------------------------------------------------------------------
# rendering helpers


def _template(name: str) -> str:
    return resources.files("builder").joinpath("templates", name).read_text(encoding="utf-8")


def _sh_word(value: str | int) -> str:
    """sh_quote, but always quoted (an array element like 'a,b' reads as one word)."""
    text = sh_quote(value)
    return text if text.startswith("'") else f"'{text}'"


def _values_block(items: Sequence[tuple[str, str | int | Sequence[str | int]]]) -> str:
    lines = ["# --- values rendered by rootfs-build (validated, quoted) ---"]
    for key, value in items:
        # not every script uses every value
        lines.append("# shellcheck disable=SC2034")
        if isinstance(value, str | int):
            lines.append(f"{key}={sh_quote(value)}")
        else:
            lines.append(f"{key}=(" + " ".join(_sh_word(v) for v in value) + ")")
    return "\n".join(lines)


def render_template(name: str, items: Sequence[tuple[str, Any]], common: bool = False) -> str:
    """A script: template ``name`` with its ``# @VALUES@``, ``# @BASE@`` (and
    ``# @COMMON@``) lines filled."""
    text = _template(name)
    if text.count("\n# @VALUES@\n") != 1:
        raise AssertionError(f"template {name} needs exactly one '# @VALUES@' line")
    text = text.replace("\n# @VALUES@\n", "\n" + _values_block(items) + "\n", 1)
    if common:
        if text.count("\n# @COMMON@\n") != 1:
            raise AssertionError(f"template {name} needs exactly one '# @COMMON@' line")
        text = text.replace("\n# @COMMON@\n", "\n" + _template("deploy-common.sh"), 1)
    if text.count("\n# @BASE@\n") != 1:
        raise AssertionError(f"template {name} needs exactly one '# @BASE@' line")
    return text.replace("\n# @BASE@\n", "\n" + _template("deploy-base.sh"), 1)


def table_id(table: Sequence[MountEntry]) -> str:
    text = "\n".join(f"{e.type}|{e.source}|{e.target}|{e.options}" for e in table)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cgroup_roles(table: Sequence[MountEntry]) -> tuple[list[str], list[int]]:
    """Per entry: role ('', cgroup-root, cgroup-v1, cgroup-v1-last) and cgroup root index.

    A cgroup v1 controller's root is the latest tmpfs before it mounted on its
    parent directory; prepare.sh mounts cgroup2 there instead when the kernel
    has no cgroup v1 (and skips the controllers).
    """
    roles = [""] * len(table)
    roots = [-1] * len(table)
    last: dict[int, int] = {}
    for j, e in enumerate(table):
        if e.type != "cgroup":
            continue
        roles[j] = "cgroup-v1"
        parent = posixpath.dirname(e.target)
        for i in range(j - 1, -1, -1):
            if table[i].type == "tmpfs" and table[i].target == parent:
                roots[j] = i
                roles[i] = "cgroup-root"
                last[i] = j
                break
    for j in last.values():
        roles[j] = "cgroup-v1-last"
    return roles, roots


def _dpu_values(cfg: DeployConfig, table: Sequence[MountEntry]) -> list[tuple[str, Any]]:
    roles, roots = cgroup_roles(table)
    return [
        ("IMAGE_NAME", cfg.name),
        ("TABLE_ID", table_id(table)),
        ("MT_TYPE", [e.type for e in table]),
        ("MT_SOURCE", [e.source for e in table]),
        ("MT_TARGET", [e.target for e in table]),
        ("MT_OPTIONS", [e.options for e in table]),
        ("MT_ROLE", roles),
        ("MT_CGROOT", roots),
    ]


def _offload_conf(cfg: DeployConfig) -> str:
    return f"""\
# offload.conf for image {cfg.name}: settings of prepare.sh, teardown.sh,
# status.sh and start-libvirtd.sh.  KEY=VALUE lines only (no shell syntax, it
# is never sourced); every value is checked when a script runs.

# the rootfs directory on this DPU
ROOTFS={cfg.rootfs}
# a raw ext4 or squashfs image of the rootfs that prepare.sh loop-mounts on
# ROOTFS first (install.sh --format raw|squashfs sets it); empty: none, ROOTFS
# holds the rootfs itself
ROOTFS_IMAGE=
# 1: mount a raw image read-only (a squashfs image always is)
ROOTFS_IMAGE_RO=0
# the host: rexec_server, QMP and the VMs' consoles (written to hostaddr)
HOST_IP={cfg.host_ip}
# qtfs server (qtfs.ko's qtfs_server_ip); empty: HOST_IP
QTFS_SERVER_IP={cfg.qtfs_server_ip}
# rexec_server port on the host
REXEC_PORT={cfg.rexec_port}
# QMP port on the host (libvirt offload patch 0001)
QMP_PORT={cfg.qmp_port}
# NONE, ERROR, WARN, INFO or DEBUG
QTFS_LOG_LEVEL={cfg.qtfs_log_level}
# qtfs.ko to load; empty: qtfs.ko next to these scripts
QTFS_KO=
# kernel release (uname -r) the rootfs was built for; empty: not checked
DPU_KERNEL={cfg.dpu_kernel or ""}
"""


def _rexec_unit(cfg: DeployConfig) -> str:
    return f"""\
# rexec_server for image {cfg.name}: install to {UNIT_DIR}/rexec.service (host/setup.sh does)
[Unit]
Description=rexec server for libvirt offload ({cfg.name})
After=network.target

[Service]
Type=simple
Environment=CMD_NET_ADDR=tcp://{cfg.rexec_listen}
ExecStart={cfg.host_rexec_server_path}
ExecReload=/bin/kill -s HUP $MAINPID
KillMode=process

[Install]
WantedBy=multi-user.target
"""


def _engine_unit(cfg: DeployConfig) -> str:
    args = " ".join(str(a) for a in cfg.engine_args)
    return f"""\
# qtfs engine for image {cfg.name}: install to {UNIT_DIR}/qtfs-engine.service (host/setup.sh does)
[Unit]
Description=qtfs engine for libvirt offload ({cfg.name})
After=network.target

[Service]
Type=simple
ExecStartPre=/usr/bin/test -d /sys/module/qtfs_server
ExecStart={cfg.host_engine_path} {args}
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
"""


def _whitelist(cfg: DeployConfig) -> str:
    out: list[str] = []
    for cmd in (*WHITELIST_BASE, *cfg.whitelist_extra):
        if cmd not in out:
            out.append(cmd)
    return "".join(f"{c}\n" for c in out)


def _dpu_readme(cfg: DeployConfig, shipped_ko: bool) -> str:
    ko = "qtfs.ko        the qtfs client module prepare.sh loads\n" if shipped_ko else ""
    return f"""\
DPU side of image {cfg.name} (copy this directory to the DPU; install.sh of the
bundle puts it next to the rootfs as <target>.deploy/).

offload.conf       settings: rootfs path (and image), host address, ports, qtfs log level
prepare.sh         load qtfs.ko, write the rexec files, loop-mount the rootfs image
                   (ROOTFS_IMAGE, if set), mount everything into the rootfs
start-libvirtd.sh  start virtlogd and libvirtd chrooted into the prepared rootfs
status.sh          show which mounts are up
teardown.sh        stop the daemons, unmount everything, unload qtfs
{ko}
Order: prepare.sh, start-libvirtd.sh; later teardown.sh.  All take --help.
Try it anywhere first: unshare -m --propagation private ./prepare.sh --rehearse /tmp/host
"""


def _host_readme(cfg: DeployConfig, shipped: Sequence[str]) -> str:
    lines = "".join(f"{n:<20}{what}\n" for n, what in (
        ("setup.sh", "run as root on the host: installs and starts everything below"),
        ("teardown.sh", "stops the services and unloads qtfs_server (--purge removes them)"),
        ("rexec.service", f"-> {UNIT_DIR}/rexec.service (rexec_server on {cfg.rexec_listen})"),
        ("qtfs-engine.service", f"-> {UNIT_DIR}/qtfs-engine.service "
                                f"({cfg.host_engine_path} {' '.join(map(str, cfg.engine_args))})"),
        ("whitelist", "-> /etc/rexec/whitelist (root, 0400): commands the DPU may run here"),
        *((n, w) for n, w in (
            ("qtfs_server.ko", "loaded by setup.sh (qtfs_server_ip="
                               f"{cfg.qtfs_listen_ip} qtfs_log_level={cfg.qtfs_log_level})"),
            ("engine", f"-> {cfg.host_engine_path}"),
            ("rexec_server", f"-> {cfg.host_rexec_server_path}"),
        ) if n in shipped),
    ))
    return f"""\
Host side of image {cfg.name}: the machine where qemu-kvm runs (host_ip {cfg.host_ip}).
Copy this directory to the host and run ./setup.sh as root before prepare.sh on the DPU.

{lines}"""


def _write(path: Path, data: str | bytes, mode: int, written: list[Path]) -> None:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    written.append(path)


def _copy(src: Path, path: Path, mode: int, written: list[Path]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f, src.open("rb") as s:
            shutil.copyfileobj(s, f)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    written.append(path)


def _fresh_dir(path: Path) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UserError(f"{path} exists and is not a directory")
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def render_deploy(out_dir: Path, cfg: DeployConfig, table: Sequence[MountEntry]) -> list[Path]:
    """Write ``out_dir/dpu/`` and ``out_dir/host/`` (replacing them); returns the files."""
    checked: list[MountEntry] = []
    for n, entry in enumerate(table):
        try:
            checked.append(check_entry(entry))
        except ValueError as e:
            raise UserError(str(e), where=f"mount table[{n}] ({entry.target})") from None
    out_dir = Path(out_dir)
    dpu, host = out_dir / "dpu", out_dir / "host"
    _fresh_dir(dpu)
    _fresh_dir(host)
    written: list[Path] = []

    dpu_values = _dpu_values(cfg, checked)
    for script in ("prepare", "teardown", "status", "start-libvirtd"):
        _write(dpu / f"{script}.sh",
               render_template(f"deploy-{script}.sh", dpu_values, common=True), 0o755, written)
    _write(dpu / "offload.conf", _offload_conf(cfg), 0o644, written)
    if cfg.qtfs_ko is not None:
        _copy(cfg.qtfs_ko, dpu / "qtfs.ko", 0o644, written)
    _write(dpu / "README", _dpu_readme(cfg, cfg.qtfs_ko is not None), 0o644, written)

    # directories the DPU mounts through qtfs, which must exist on the host
    qtfs_dirs: list[str] = []
    pseudo = ("/proc", "/sys", "/dev")
    for entry in checked:
        qsrc = entry.source
        if (entry.type == "qtfs" and qsrc not in qtfs_dirs
                and not any(qsrc == p or qsrc.startswith(p + "/") for p in pseudo)):
            qtfs_dirs.append(qsrc)
    host_values: list[tuple[str, Any]] = [
        ("IMAGE_NAME", cfg.name),
        ("QTFS_DIRS", qtfs_dirs),
        ("QTFS_LISTEN_IP", cfg.qtfs_listen_ip),
        ("QTFS_LOG_LEVEL", cfg.qtfs_log_level),
        ("ENGINE_PATH", cfg.host_engine_path),
        ("ENGINE_ARGS", list(cfg.engine_args)),
        ("REXEC_SERVER_PATH", cfg.host_rexec_server_path),
        ("REXEC_LISTEN", str(cfg.rexec_listen)),
        ("UNIT_DIR", UNIT_DIR),
    ]
    _write(host / "setup.sh", render_template("deploy-host-setup.sh", host_values), 0o755,
           written)
    _write(host / "teardown.sh", render_template("deploy-host-teardown.sh", host_values), 0o755,
           written)
    _write(host / "rexec.service", _rexec_unit(cfg), 0o644, written)
    _write(host / "qtfs-engine.service", _engine_unit(cfg), 0o644, written)
    _write(host / "whitelist", _whitelist(cfg), 0o400, written)
    shipped: list[str] = []
    for src, name, mode in ((cfg.qtfs_server_ko, "qtfs_server.ko", 0o644),
                            (cfg.engine_bin, "engine", 0o755),
                            (cfg.rexec_server_bin, "rexec_server", 0o755)):
        if src is not None:
            _copy(src, host / name, mode, written)
            shipped.append(name)
    _write(host / "README", _host_readme(cfg, shipped), 0o644, written)
    return written
