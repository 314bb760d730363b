"""Generate the deployment files: ``dpu/`` scripts, ``host/`` setup, ``install.sh``.

This module is the one place where values reach scripts: each arrives
validated (by its element param type, ``builder.values``; the mount table by
``mounts.check_entry``), ``DeployConfig`` adds what no single value can say
(derived defaults, rules across params), and ``sh_quote`` quotes it into the
``# @VALUES@`` block of a template from ``builder/templates``.  The templates
contain no other placeholders.  Operator-editable settings of the DPU
scripts live in ``dpu/offload.conf``, which the scripts parse as strict
KEY=VALUE lines at run time (never ``source``).

Host exposure: qtfs_server.ko and rexec_server listen on the host's address
on the host-DPU link (``host_ip``) unless ``host_listen: any``, and the host
side carries an nftables table that admits the qtfs, rexec, QMP and console
ports from ``dpu_ip`` only.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import posixpath
import shlex
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from .. import elfinfo, values
from ..errors import UserError
from . import signing
from .mounts import MountEntry, check_entry

# Commands libvirt (with the offload patches) runs on the host through rexec.
# rexec matches the command exactly as given, so both spellings are listed.
WHITELIST_BASE = ("qemu-kvm", "/usr/bin/qemu-kvm", "/usr/libexec/qemu-kvm",
                  "kill", "/usr/bin/kill", "/bin/kill",
                  "taskset", "/usr/bin/taskset")
UNIT_DIR = "/etc/systemd/system"
# qtfs_server.ko's port (its qtfs_server_port parameter, 2022 generation default)
QTFS_PORT = 12345
# The libvirt offload patch 0001 connects to per-domain ports on the host:
# 50000 + (md5(domain name) & 0xfff) for the monitor, 4096 more for the other
# character devices (QEMU_PORT_BASE, QEMU_PORT_MASK in qemu_monitor.h).
CONSOLE_PORTS = (50000, 50000 + 2 * 4096 - 1)
# The host's nftables table (its own: setup.sh loads it, teardown.sh deletes it)
FIREWALL_FAMILY, FIREWALL_TABLE = "inet", "rootfs_offload"
FIREWALL_UNIT = "rootfs-offload-firewall.service"
HOST_CONF_DIR = "/etc/rootfs-offload"
HOST_LISTEN = ("link", "any")
_CONTROL_RE_CHARS = {chr(c) for c in range(32)} | {"\x7f"}


class ConfigError(ValueError):
    """A rule across deployment settings is broken; ``key`` names the param."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def sh_quote(value: str | int) -> str:
    """Quote one validated value for bash (refuses control characters outright)."""
    text = str(value)
    if any(c in _CONTROL_RE_CHARS for c in text):
        raise ValueError(f"{text!r} contains control characters")
    return shlex.quote(text)


def _bracket(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def _family(ip: str) -> int:
    return ipaddress.ip_address(ip).version


@dataclass(frozen=True)
class DeployConfig:
    """Deployment settings; every field but ``name`` and the host_* paths is
    the element param of the same name (offload-deploy, qtfs, rexec), whose
    type has validated it already.  ``__post_init__`` fills the derived
    defaults and enforces the rules across params (ConfigError names the param):

    - ``qtfs_server_ip`` (where the DPU's qtfs.ko connects) defaults to host_ip;
    - ``host_listen: link`` (the default): qtfs_server.ko listens on
      qtfs_server_ip and rexec_server on host_ip:rexec_port, never on a
      wildcard, and ``dpu_ip`` is required; ``any``: both listen on every
      address (0.0.0.0 or ::) and ``warnings()`` says so;
    - dpu_ip (the DPU's address on the link, the only one the host firewall
      admits) is of host_ip's family and not host_ip;
    - rexec_listen (default from the above) listens on rexec_port;
    - the host ports (qtfs, rexec, QMP, consoles) do not collide;
    - engine_args: <buffer bytes 1-65536> <threads 1-16>;
    - rexec_tls_cert and rexec_tls_key come together and need rexec_tls
      (without them, host/setup.sh makes a self-signed pair on the host);
    - qtfs_ko is a kernel module, built for dpu_kernel when that is given;
    - bundle_signing_key is an unencrypted SSH private key (checked here,
      before any build work: ``signing_key_info``).
    """

    name: str
    host_ip: str
    rexec_port: int = 7777
    dpu_ip: str | None = None
    host_listen: str = "link"
    qtfs_server_ip: str | None = None
    qmp_port: int = 32323
    rootfs_path: str = "/another_rootfs"
    qtfs_log_level: str = "INFO"
    qtfs_ko: Path | None = None
    dpu_kernel: str | None = None
    qtfs_server_ko: Path | None = None
    engine_bin: Path | None = None
    engine_args: Sequence[int] = (4096, 16)
    rexec_listen: str | None = None
    rexec_server_bin: Path | None = None
    rexec_whitelist: Sequence[str] = field(default_factory=tuple)
    rexec_tls: bool = False
    rexec_tls_cert: Path | None = None
    rexec_tls_key: Path | None = None
    bundle_signing_key: Path | None = None
    # where things go on the host (not params)
    host_engine_path: str = "/usr/local/bin/qtfs-engine"
    host_rexec_server_path: str = "/usr/bin/rexec_server"
    host_module_path: str = "/usr/local/lib/rootfs-offload/qtfs_server.ko"
    # derived: the signing key's manifest record (computed once)
    signing: dict[str, Any] = field(default_factory=dict, init=False, compare=False)

    def __post_init__(self) -> None:
        def setv(key: str, value: object) -> None:
            object.__setattr__(self, key, value)

        setv("engine_args", tuple(self.engine_args))
        setv("rexec_whitelist", tuple(self.rexec_whitelist))
        if self.qtfs_server_ip is None:
            setv("qtfs_server_ip", self.host_ip)
        if self.host_listen not in HOST_LISTEN:
            raise ConfigError("host_listen", f"{self.host_listen!r} is not one of "
                              f"{', '.join(HOST_LISTEN)}")
        if self.dpu_ip is None and self.host_listen == "link":
            raise ConfigError("dpu_ip", "missing: the host firewall admits the DPU by this "
                              "address (or set host_listen: any to listen on every address)")
        if self.dpu_ip is not None:
            if _family(self.dpu_ip) != _family(self.host_ip):
                raise ConfigError("dpu_ip", f"{self.dpu_ip} and host_ip {self.host_ip} are "
                                  "not of one IP version; both are addresses on one link")
            if self.dpu_ip in (self.host_ip, self.qtfs_server_ip):
                raise ConfigError("dpu_ip", f"{self.dpu_ip} is the host's own address "
                                  "(host_ip / qtfs_server_ip); give the DPU's")
        if self.rexec_listen is None:
            ip = self.host_ip if self.host_listen == "link" else self.wildcard
            setv("rexec_listen", f"{_bracket(ip)}:{self.rexec_port}")
        else:
            ip, _, listen_port = str(self.rexec_listen).rpartition(":")
            if int(listen_port) != self.rexec_port:
                raise ConfigError("rexec_listen", f"{self.rexec_listen} is not on rexec_port "
                                  f"{self.rexec_port}, where the DPU connects")
            if ip.strip("[]") in ("0.0.0.0", "::") and self.host_listen == "link":
                raise ConfigError("rexec_listen", f"{self.rexec_listen} listens on every "
                                  "address of the host; set host_listen: any to mean that")
        ports = {"rexec_port": self.rexec_port, "qmp_port": self.qmp_port}
        for key, port in ports.items():
            if port == QTFS_PORT or CONSOLE_PORTS[0] <= port <= CONSOLE_PORTS[1]:
                raise ConfigError(key, f"{port} collides with the qtfs port {QTFS_PORT} or the "
                                  f"consoles' ports {CONSOLE_PORTS[0]}-{CONSOLE_PORTS[1]}")
        if self.rexec_port == self.qmp_port:
            raise ConfigError("qmp_port", f"{self.qmp_port} is rexec_port too")
        args = self.engine_args
        if not args or len(args) == 2 and not (1 <= args[0] <= 65536 and 1 <= args[1] <= 16):
            raise ConfigError("engine_args", f"{list(args)!r}: engine <buffer bytes 1-65536> "
                              "<threads 1-16>")
        if any(a < 0 or a >= 2**31 for a in args):
            raise ConfigError("engine_args", f"{list(args)!r} are not all non-negative")
        if (self.rexec_tls_cert is None) != (self.rexec_tls_key is None):
            key = "rexec_tls_key" if self.rexec_tls_key is None else "rexec_tls_cert"
            raise ConfigError(key, "missing: rexec_tls_cert and rexec_tls_key come together")
        if self.rexec_tls_cert is not None and not self.rexec_tls:
            raise ConfigError("rexec_tls", "false, but rexec_tls_cert is given; set "
                              "rexec_tls: true (or drop the certificate)")
        if self.qtfs_ko is not None:
            magic = elfinfo.module_kernel(self.qtfs_ko)
            if magic is None:
                raise ConfigError("qtfs_ko", f"{str(self.qtfs_ko)!r} has no vermagic: "
                                  "not a kernel module")
            if self.dpu_kernel is not None and magic != self.dpu_kernel:
                raise ConfigError("qtfs_ko", f"{str(self.qtfs_ko)!r} was built for kernel "
                                  f"{magic}, but dpu_kernel is {self.dpu_kernel}")
        setv("signing", signing.signing_info(self.bundle_signing_key))

    @classmethod
    def from_params(cls, name: str, params: Mapping[str, Any]) -> DeployConfig:
        """From the resolved element params (by param name; others are
        ignored).  A broken rule is a UserError with where ``params.<param>``."""
        known = {f.name for f in fields(cls) if f.init} - {"name"}
        given: dict[str, Any] = {k: v for k, v in params.items()
                                 if k in known and v is not None}
        if "host_ip" not in given:
            raise UserError("missing: the host's address on the host-DPU link",
                            where="params.host_ip")
        try:
            return cls(name=name, **given)
        except ConfigError as e:
            raise UserError(e.message, where=f"params.{e.key}") from None

    # -- derived ----------------------------------------------------------
    @property
    def wildcard(self) -> str:
        return "::" if _family(self.host_ip) == 6 else "0.0.0.0"

    @property
    def qtfs_listen_ip(self) -> str:
        """qtfs_server.ko's qtfs_server_ip on the host."""
        return str(self.qtfs_server_ip) if self.host_listen == "link" else self.wildcard

    @property
    def firewall(self) -> bool:
        return self.dpu_ip is not None

    def firewall_ports(self) -> list[str]:
        """The host's TCP ports the DPU uses, as nft set elements (sorted, disjoint)."""
        ports = sorted({QTFS_PORT, self.rexec_port, self.qmp_port})
        return [str(p) for p in ports] + [f"{CONSOLE_PORTS[0]}-{CONSOLE_PORTS[1]}"]

    def warnings(self) -> list[str]:
        out = []
        if self.host_listen == "any":
            out.append(f"host_listen: any: qtfs_server (port {QTFS_PORT}, no authentication) "
                       f"and rexec_server ({self.rexec_listen}) listen on every address of "
                       "the host, not only on the host-DPU link"
                       + ("; only the firewall keeps strangers out" if self.firewall else
                          "; and without dpu_ip there is no firewall either"))
        return out

    def manifest(self) -> dict[str, Any]:
        """The deployment section of manifest.json."""
        tls: dict[str, Any] = {"enabled": self.rexec_tls}
        if self.rexec_tls:
            tls["certificate"] = ("given" if self.rexec_tls_cert is not None
                                  else "made by host/setup.sh on the host")
        return {
            "host_ip": self.host_ip,
            "dpu_ip": self.dpu_ip,
            "host_listen": self.host_listen,
            "listen": {"qtfs_server": f"{_bracket(self.qtfs_listen_ip)}:{QTFS_PORT}",
                       "rexec_server": f"tcp://{self.rexec_listen}"},
            "firewall": ({"table": f"{FIREWALL_FAMILY} {FIREWALL_TABLE}",
                          "admits": self.dpu_ip, "tcp_ports": self.firewall_ports()}
                         if self.firewall else None),
            "rexec_tls": tls,
            "signing": dict(self.signing),
            "warnings": self.warnings(),
        }


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
        if isinstance(value, int):
            lines.append(f"{key}={value}")
        elif isinstance(value, str):
            lines.append(f"{key}={_sh_word(value)}")
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
        ("QTFS_PORT", QTFS_PORT),
        ("CONSOLE_PORTS", f"{CONSOLE_PORTS[0]}-{CONSOLE_PORTS[1]}"),
    ]


def _offload_conf(cfg: DeployConfig) -> str:
    return f"""\
# offload.conf for image {cfg.name}: settings of prepare.sh, teardown.sh,
# status.sh and start-libvirtd.sh.  KEY=VALUE lines only (no shell syntax, it
# is never sourced); every value is checked when a script runs.

# the rootfs directory on this DPU
ROOTFS={cfg.rootfs_path}
# a raw ext4 or squashfs image of the rootfs that prepare.sh loop-mounts on
# ROOTFS first (install.sh --format raw|squashfs sets it); empty: none, ROOTFS
# holds the rootfs itself
ROOTFS_IMAGE=
# 1: mount a raw image read-only (a squashfs image always is)
ROOTFS_IMAGE_RO=0
# the host's address on the host-DPU link: rexec_server, QMP and the VMs'
# consoles (written to hostaddr and client.json)
HOST_IP={cfg.host_ip}
# qtfs server (qtfs.ko's qtfs_server_ip); empty: HOST_IP
QTFS_SERVER_IP={cfg.qtfs_server_ip}
# rexec_server port on the host
REXEC_PORT={cfg.rexec_port}
# 1: rexec_server speaks TLS (rexec gets USE_TLS=1); must match the host side
REXEC_TLS={1 if cfg.rexec_tls else 0}
# QMP port on the host (libvirt offload patch 0001)
QMP_PORT={cfg.qmp_port}
# NONE, ERROR, WARN, INFO or DEBUG
QTFS_LOG_LEVEL={cfg.qtfs_log_level}
# qtfs.ko to load; empty: qtfs.ko next to these scripts
QTFS_KO=
# kernel release (uname -r) the rootfs was built for; empty: not checked
DPU_KERNEL={cfg.dpu_kernel or ""}
"""


REXEC_TLS_DIR = "/etc/rexec/tls"


def _rexec_unit(cfg: DeployConfig) -> str:
    env = [f"Environment=CMD_NET_ADDR=tcp://{cfg.rexec_listen}"]
    if cfg.rexec_tls:
        env.append(f"Environment=TLS_CERT={REXEC_TLS_DIR}/server.crt "
                   f"TLS_KEY={REXEC_TLS_DIR}/server.key")
    fw = (f"Wants={FIREWALL_UNIT}\nAfter=network.target {FIREWALL_UNIT}\n" if cfg.firewall
          else "After=network.target\n")
    env_lines = "\n".join(env)
    return f"""\
# rexec_server for image {cfg.name}: install to {UNIT_DIR}/rexec.service (host/setup.sh does).
# It reads /etc/rexec/whitelist only when it starts (setup.sh restarts it when
# the whitelist changes) and does not handle SIGHUP, so there is no reload.
[Unit]
Description=rexec server for libvirt offload ({cfg.name})
{fw}
[Service]
Type=simple
{env_lines}
ExecStart={cfg.host_rexec_server_path}
Restart=on-failure
RestartSec=2
KillMode=process

[Install]
WantedBy=multi-user.target
"""


def _engine_unit(cfg: DeployConfig) -> str:
    args = " ".join(str(a) for a in cfg.engine_args)
    fw = (f"Wants={FIREWALL_UNIT}\nAfter=network.target {FIREWALL_UNIT}\n" if cfg.firewall
          else "After=network.target\n")
    load = (f"test -d /sys/module/qtfs_server || exec insmod {cfg.host_module_path} "
            f"qtfs_server_ip={cfg.qtfs_listen_ip} qtfs_log_level={cfg.qtfs_log_level}")
    return f"""\
# qtfs engine for image {cfg.name}: install to {UNIT_DIR}/qtfs-engine.service (host/setup.sh does).
# It loads qtfs_server.ko itself, so that the engine comes back after a reboot.
[Unit]
Description=qtfs engine for libvirt offload ({cfg.name})
{fw}
[Service]
Type=simple
ExecStartPre=/bin/sh -c '{load}'
ExecStart={cfg.host_engine_path} {args}
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
"""


def _firewall_rules(cfg: DeployConfig) -> str:
    assert cfg.dpu_ip is not None
    fam = "ip6" if _family(cfg.dpu_ip) == 6 else "ip"
    ports = ", ".join(cfg.firewall_ports())
    consoles = f"{CONSOLE_PORTS[0]}-{CONSOLE_PORTS[1]}"
    return f"""\
#!/usr/sbin/nft -f
# Host firewall for image {cfg.name} (generated by rootfs-build): the qtfs ({QTFS_PORT}),
# rexec ({cfg.rexec_port}), QMP ({cfg.qmp_port}) and console ({consoles}) ports
# of this host answer the DPU ({cfg.dpu_ip}) only.
# A table of its own: loading this file replaces that table alone (the first
# two lines make loading it again a no-op); other tables are never touched.
# setup.sh loads it, {FIREWALL_UNIT} at boot; teardown.sh deletes it.
table {FIREWALL_FAMILY} {FIREWALL_TABLE}
delete table {FIREWALL_FAMILY} {FIREWALL_TABLE}
table {FIREWALL_FAMILY} {FIREWALL_TABLE} {{
\tchain input {{
\t\ttype filter hook input priority filter; policy accept;
\t\t# replies to this host's own connections (their local ports may fall in
\t\t# the console range)
\t\tct state established,related accept
\t\t{fam} saddr {cfg.dpu_ip} tcp dport {{ {ports} }} accept
\t\ttcp dport {{ {ports} }} drop
\t}}
}}
"""


def _firewall_unit(cfg: DeployConfig) -> str:
    return f"""\
# Loads the host firewall of image {cfg.name} at boot, before rexec_server and
# the qtfs engine: install to {UNIT_DIR}/{FIREWALL_UNIT} (host/setup.sh does).
[Unit]
Description=nftables {FIREWALL_FAMILY} {FIREWALL_TABLE}: offload ports for the DPU only ({cfg.name})
DefaultDependencies=no
Wants=network-pre.target
Before=network-pre.target rexec.service qtfs-engine.service
After=local-fs.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/nft -f {HOST_CONF_DIR}/firewall.nft

[Install]
WantedBy=multi-user.target
"""


def _server_json(cfg: DeployConfig) -> str:
    ip, _, port = str(cfg.rexec_listen).rpartition(":")
    # rexec_server reads it when CMD_NET_ADDR is not set; Port is a string there
    return json.dumps({"Protocol": "tcp", "Ipaddr": ip, "Port": port}) + "\n"


def _whitelist(cfg: DeployConfig) -> str:
    out: list[str] = []
    for cmd in (*WHITELIST_BASE, *cfg.rexec_whitelist):
        if cmd not in out:
            out.append(cmd)
    return "".join(f"{c}\n" for c in out)


def _dpu_readme(cfg: DeployConfig, shipped_ko: bool) -> str:
    ko = "qtfs.ko        the qtfs client module prepare.sh loads\n" if shipped_ko else ""
    return f"""\
DPU side of image {cfg.name} (copy this directory to the DPU; install.sh of the
bundle puts it next to the rootfs as <target>.deploy/).

offload.conf       settings: rootfs path (and image), host address, ports, TLS, qtfs log level
prepare.sh         load qtfs.ko, stop and mask the DPU's own libvirt, write the rexec
                   files, loop-mount the rootfs image (ROOTFS_IMAGE, if set), mount
                   everything into the rootfs
start-libvirtd.sh  start virtlogd and libvirtd chrooted into the prepared rootfs
status.sh          show which mounts are up, and where the host is expected
teardown.sh        stop the daemons, unmount everything, unmask, unload qtfs
{ko}
Order: prepare.sh, start-libvirtd.sh; later teardown.sh.  All take --help.
Try it anywhere first (it leaves the machine as it was):
  unshare -m --propagation private ./prepare.sh --rehearse /tmp/host
"""


def _host_readme(cfg: DeployConfig, shipped: Sequence[str]) -> str:
    rows: list[tuple[str, str]] = [
        ("setup.sh", "run as root on the host: checks everything, then installs and "
                     "starts what is below"),
        ("teardown.sh", "stops the services, deletes the firewall table, unloads "
                        "qtfs_server (--purge removes the files)"),
        ("status.sh", "what listens where, the services, the firewall table"),
        ("rexec.service", f"-> {UNIT_DIR}/rexec.service (rexec_server on "
                          f"tcp://{cfg.rexec_listen}{', TLS' if cfg.rexec_tls else ''})"),
        ("qtfs-engine.service", f"-> {UNIT_DIR}/qtfs-engine.service (loads qtfs_server.ko, "
                                f"runs {cfg.host_engine_path} "
                                f"{' '.join(map(str, cfg.engine_args))})"),
        ("whitelist", "-> /etc/rexec/whitelist (root, 0400): commands the DPU may run here"),
        ("server.json", "-> /etc/rexec/server.json (root, 0400): rexec_server's address"),
    ]
    if cfg.firewall:
        rows += [("firewall.nft", f"-> {HOST_CONF_DIR}/firewall.nft: table {FIREWALL_FAMILY} "
                                  f"{FIREWALL_TABLE}"),
                 (FIREWALL_UNIT, f"-> {UNIT_DIR}/{FIREWALL_UNIT}: loads it at boot")]
    for n, what in (("qtfs_server.ko", f"-> {cfg.host_module_path}"),
                    ("engine", f"-> {cfg.host_engine_path}"),
                    ("rexec_server", f"-> {cfg.host_rexec_server_path}"),
                    ("rexec-tls.crt", f"-> {REXEC_TLS_DIR}/server.crt"),
                    ("rexec-tls.key", f"-> {REXEC_TLS_DIR}/server.key (root, 0400)")):
        if n in shipped:
            rows.append((n, what))
    width = max(len(n) for n, _ in rows) + 2
    lines = "".join(f"{n:<{width}}{what}\n" for n, what in rows)
    listen = (f"qtfs_server.ko listens on {_bracket(cfg.qtfs_listen_ip)}:{QTFS_PORT}, "
              f"rexec_server on tcp://{cfg.rexec_listen}")
    if cfg.host_listen == "any":
        listen += (" -- every address of this host (host_listen: any), not only the "
                   "host-DPU link")
    else:
        listen += " -- this host's address on the host-DPU link only"
    if cfg.firewall:
        fw = (f"The firewall (nftables table {FIREWALL_FAMILY} {FIREWALL_TABLE}) admits the "
              f"qtfs, rexec, QMP and console ports\n({', '.join(cfg.firewall_ports())}) from "
              f"the DPU ({cfg.dpu_ip}) only.  setup.sh stops where nft is\nmissing unless "
              "--no-firewall is given.")
    else:
        fw = "No firewall: the recipe gives no dpu_ip."
    if cfg.rexec_tls:
        tls = ("rexec: TLS (TLS_CERT/TLS_KEY for the server, USE_TLS on the DPU) protects the "
               "commands from\neavesdropping.  The rexec client does not verify the server's "
               "certificate, so TLS does\nnot keep strangers out: the bind address and the "
               "firewall do.")
        if "rexec-tls.crt" not in shipped:
            tls += "\nsetup.sh makes a self-signed certificate on this host (needs openssl)."
    else:
        tls = ("rexec: no TLS (rexec_tls: false); the bind address and the firewall keep "
               "strangers out.")
    return f"""\
Host side of image {cfg.name}: the machine where qemu-kvm runs (host_ip {cfg.host_ip}).
Copy this directory to the host and run ./setup.sh as root before prepare.sh on the DPU.

{lines}
Exposure: qtfs has no authentication (whoever reaches it mounts this host's
/proc, /sys, /dev/pts, /var/lib/libvirt and the VM images) and rexec_server
runs its whitelisted commands, qemu-kvm with any arguments included, for
whoever connects.  So:
{listen}.
{fw}
{tls}
"""


def render_installer(name: str) -> str:
    """bundle's install.sh (rendered into the output next to SHA256SUMS, which covers it)."""
    return render_template("deploy-install.sh", [("IMAGE_NAME", values.check_name(name)),
                                                 ("SIGN_NAMESPACE", signing.NAMESPACE)])


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


def _host_values(cfg: DeployConfig, qtfs_dirs: list[str]) -> list[tuple[str, Any]]:
    return [
        ("IMAGE_NAME", cfg.name),
        ("HOST_IP", cfg.host_ip),
        ("DPU_IP", cfg.dpu_ip or ""),
        ("HOST_LISTEN", cfg.host_listen),
        ("QTFS_DIRS", qtfs_dirs),
        ("QTFS_LISTEN_IP", cfg.qtfs_listen_ip),
        ("QTFS_LOG_LEVEL", cfg.qtfs_log_level),
        ("QTFS_PORT", QTFS_PORT),
        ("MODULE_PATH", cfg.host_module_path),
        ("ENGINE_PATH", cfg.host_engine_path),
        ("ENGINE_ARGS", list(cfg.engine_args)),
        ("REXEC_SERVER_PATH", cfg.host_rexec_server_path),
        ("REXEC_LISTEN", str(cfg.rexec_listen)),
        ("REXEC_PORT", cfg.rexec_port),
        ("REXEC_TLS", 1 if cfg.rexec_tls else 0),
        ("TLS_DIR", REXEC_TLS_DIR),
        ("QMP_PORT", cfg.qmp_port),
        ("CONSOLE_PORTS", f"{CONSOLE_PORTS[0]}-{CONSOLE_PORTS[1]}"),
        ("UNIT_DIR", UNIT_DIR),
        ("CONF_DIR", HOST_CONF_DIR),
        ("FIREWALL", 1 if cfg.firewall else 0),
        ("FW_TABLE", f"{FIREWALL_FAMILY} {FIREWALL_TABLE}"),
        ("FW_UNIT", FIREWALL_UNIT),
    ]


def render_deploy(out_dir: Path, cfg: DeployConfig, table: Sequence[MountEntry]) -> list[Path]:
    """Write ``out_dir/dpu/`` and ``out_dir/host/`` (replacing them) and
    ``out_dir/install.sh`` (the bundle's installer); returns the files."""
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
    host_values = _host_values(cfg, qtfs_dirs)
    for script in ("setup", "teardown", "status"):
        _write(host / f"{script}.sh", render_template(f"deploy-host-{script}.sh", host_values),
               0o755, written)
    _write(host / "rexec.service", _rexec_unit(cfg), 0o644, written)
    _write(host / "qtfs-engine.service", _engine_unit(cfg), 0o644, written)
    _write(host / "whitelist", _whitelist(cfg), 0o400, written)
    _write(host / "server.json", _server_json(cfg), 0o400, written)
    if cfg.firewall:
        _write(host / "firewall.nft", _firewall_rules(cfg), 0o644, written)
        _write(host / FIREWALL_UNIT, _firewall_unit(cfg), 0o644, written)
    shipped: list[str] = []
    for src, name, mode in ((cfg.qtfs_server_ko, "qtfs_server.ko", 0o644),
                            (cfg.engine_bin, "engine", 0o755),
                            (cfg.rexec_server_bin, "rexec_server", 0o755),
                            (cfg.rexec_tls_cert, "rexec-tls.crt", 0o644),
                            (cfg.rexec_tls_key, "rexec-tls.key", 0o400)):
        if src is not None:
            _copy(src, host / name, mode, written)
            shipped.append(name)
    _write(host / "README", _host_readme(cfg, shipped), 0o644, written)
    _write(out_dir / "install.sh", render_installer(cfg.name), 0o755, written)
    return written
