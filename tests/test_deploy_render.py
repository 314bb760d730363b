"""Deployment values (the param types, DeployConfig's rules across params),
the rendered files (no wildcard listen address, the firewall ruleset, TLS),
shellcheck, and the scripts' run-time parser of offload.conf."""

from __future__ import annotations

import json
import platform
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from deploy_helpers import make_fake_rootfs, remove_tree, render, run_ns

from builder import elements, filelayers, values
from builder.deploy import DeployConfig, mount_table, render_deploy, render_installer
from builder.deploy.render import sh_quote
from builder.errors import UserError
from builder.recipe import load_recipe
from builder.sampleimage import fake_elf, fake_module

REPO = Path(__file__).resolve().parent.parent

BAD_IPS = [
    "1.2.3.4; touch /tmp/x",
    "1.2.3.4\ntouch /tmp/x",
    "1.2.3.4`touch /tmp/x`",
    "$(touch /tmp/x)",
    "1.2.3.4 && touch /tmp/x",
    "'1.2.3.4'",
    "",
]

DEPLOY_RECIPE = """\
name: demo
base: {image: base.qcow2}
elements: [offload-deploy, qtfs]
params:
  host_ip: 192.168.1.1
  dpu_ip: 192.168.1.2
"""


def load_params(tmp: Path, *overrides: str) -> dict:
    """The element params of a recipe using offload-deploy, through the param
    layer (recipe load + element param types), as the build resolves them."""
    recipe = tmp / "recipe.yaml"
    recipe.write_text(DEPLOY_RECIPE)
    return elements.load(load_recipe(recipe, list(overrides))).params


def config(tmp: Path, *overrides: str) -> DeployConfig:
    return DeployConfig.from_params("demo", load_params(tmp, *overrides))


@pytest.mark.parametrize("key", ["host_ip", "dpu_ip", "qtfs_server_ip"])
@pytest.mark.parametrize("value", BAD_IPS)
def test_param_types_refuse_shell_metacharacters(tmp_path: Path, key: str, value: str) -> None:
    with pytest.raises(UserError) as info:
        load_params(tmp_path, f"params.{key}={json.dumps(value)}")
    assert f"params.{key}: " in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("key, value", [
    ("rootfs_path", "/another rootfs"),
    ("rootfs_path", "/x/../etc"),
    ("rexec_port", "0"),
    ("rexec_port", "'77;7'"),
    ("qmp_port", "70000"),
    ("qtfs_log_level", "info"),
    ("dpu_kernel", "'5.10 $(id)'"),
    ("engine_args", "[4096, '16']"),
    ("engine_args", "'4096 16'"),
    ("rexec_listen", "'0.0.0.0:7777;id'"),
    ("rexec_listen", "host:7777"),
    ("rexec_listen", "'fe80::1:7777'"),
    ("rexec_whitelist", "['rm -rf /']"),
    ("rexec_whitelist", "qemu-img"),
    ("host_listen", "everywhere"),
    ("rexec_tls", "'yes'"),
])
def test_param_types_refuse_bad_values(tmp_path: Path, key: str, value: str) -> None:
    with pytest.raises(UserError) as info:
        load_params(tmp_path, f"params.{key}={value}")
    assert f"params.{key}: " in str(info.value)


def test_the_param_types_deploy_adds() -> None:
    assert values.check_listen("[FE80::0001]:0777") == "[fe80::1]:777"
    assert values.check_listen("10.0.0.1:7777") == "10.0.0.1:7777"
    assert values.check_command("qemu-img") == "qemu-img"
    assert values.check_command("/usr/bin/qemu-img") == "/usr/bin/qemu-img"
    for bad in ("[10.0.0.1]:1", "10.0.0.1", "10.0.0.1:0"):
        with pytest.raises(ValueError):
            values.check_listen(bad)
    with pytest.raises(ValueError):
        values.check_command("a;b")


@pytest.mark.parametrize("overrides, key, message", [
    (["params.dpu_ip=null"], "dpu_ip", "missing"),
    (["params.dpu_ip=fe80::2"], "dpu_ip", "not of one IP version"),
    (["params.dpu_ip=192.168.1.1"], "dpu_ip", "the host's own address"),
    (["params.rexec_listen=0.0.0.0:7777"], "rexec_listen", "host_listen: any"),
    (["params.rexec_listen=192.168.1.1:6666"], "rexec_listen", "not on rexec_port"),
    (["params.rexec_port=50001"], "rexec_port", "collides"),
    (["params.qmp_port=12345"], "qmp_port", "collides"),
    (["params.qmp_port=7777"], "qmp_port", "rexec_port too"),
    (["params.engine_args=[100000, 16]"], "engine_args", "1-65536"),
    (["params.engine_args=[]"], "engine_args", "engine"),
    (["params.rexec_tls=true", "params.rexec_tls_cert={cert}"], "rexec_tls_key", "together"),
    (["params.rexec_tls_cert={cert}", "params.rexec_tls_key={cert}"], "rexec_tls", "false"),
    (["params.bundle_signing_key={cert}"], "bundle_signing_key", "cannot sign"),
])
def test_rules_across_params(tmp_path: Path, overrides: list[str], key: str,
                             message: str) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    params = load_params(tmp_path, *(o.format(cert=cert) for o in overrides))
    with pytest.raises(UserError) as info:
        DeployConfig.from_params("demo", params)
    assert info.value.where == f"params.{key}" and message in info.value.message, str(info.value)


def test_config_defaults_and_derived_values(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert cfg.qtfs_server_ip == "192.168.1.1" and cfg.qtfs_listen_ip == "192.168.1.1"
    assert cfg.rexec_listen == "192.168.1.1:7777" and cfg.rootfs_path == "/another_rootfs"
    assert cfg.engine_args == (4096, 16) and cfg.warnings() == []
    assert cfg.manifest() == {
        "host_ip": "192.168.1.1", "dpu_ip": "192.168.1.2", "host_listen": "link",
        "listen": {"qtfs_server": "192.168.1.1:12345", "rexec_server": "tcp://192.168.1.1:7777"},
        "firewall": {"table": "inet rootfs_offload", "admits": "192.168.1.2",
                     "tcp_ports": ["7777", "12345", "32323", "50000-58191"]},
        "rexec_tls": {"enabled": False}, "signing": {"signed_by": "unsigned"}, "warnings": []}
    # params that do not belong to the deployment are none of its business
    assert DeployConfig.from_params("demo", {**load_params(tmp_path), "libvirt_mode": "x"}) == cfg
    v6 = config(tmp_path, "params.host_ip=fe80::0001", "params.dpu_ip=fe80::2",
                "params.host_listen=any")
    assert v6.host_ip == "fe80::1" and v6.rexec_listen == "[::]:7777"
    assert v6.qtfs_listen_ip == "::"
    ko = tmp_path / "qtfs.ko"
    ko.write_bytes(fake_module("qtfs", "5.10.0-60.18.0.50.oe2203.aarch64", 183))
    ok = config(tmp_path, f"params.qtfs_ko={ko}")
    assert ok.qtfs_ko == ko
    for overrides, message in [([f"params.qtfs_ko={ko}", "params.dpu_kernel=6.6.0"],
                                 "built for kernel 5.10.0-60"),
                                ([f"params.qtfs_ko={tmp_path / 'recipe.yaml'}"], "no vermagic")]:
        with pytest.raises(UserError, match=message):
            config(tmp_path, *overrides)


def test_host_listen_any_is_warned_and_recorded(tmp_path: Path) -> None:
    cfg = config(tmp_path, "params.host_listen=any")
    assert cfg.rexec_listen == "0.0.0.0:7777" and cfg.qtfs_listen_ip == "0.0.0.0"
    [warning] = cfg.warnings()
    assert warning.startswith("host_listen: any: qtfs_server") and "every address" in warning
    m = cfg.manifest()
    assert m["host_listen"] == "any" and m["warnings"] == [warning]
    assert m["listen"] == {"qtfs_server": "0.0.0.0:12345", "rexec_server": "tcp://0.0.0.0:7777"}
    assert m["firewall"]["admits"] == "192.168.1.2"  # the firewall still holds
    # without dpu_ip there is nothing to admit: no firewall, and the warning says so
    bare = config(tmp_path, "params.host_listen=any", "params.dpu_ip=null")
    assert bare.manifest()["firewall"] is None and "no firewall" in bare.warnings()[0]
    out = tmp_path / "out"
    render_deploy(out, bare, mount_table([], "m"))
    assert not (out / "host/firewall.nft").exists()
    unit = (out / "host/rexec.service").read_text()
    assert "Environment=CMD_NET_ADDR=tcp://0.0.0.0:7777\n" in unit


def test_sh_quote() -> None:
    assert sh_quote("/a,b") == "/a,b"
    assert sh_quote("a b'c") == "'a b'\"'\"'c'"
    with pytest.raises(ValueError):
        sh_quote("a\nb")


def _render_all(tmp_path: Path, **params) -> tuple[Path, list[Path]]:
    ko = tmp_path / "qtfs.ko"
    ko.write_bytes(fake_module("qtfs", "6.6.0"))
    engine = tmp_path / "engine"
    engine.write_bytes(fake_elf(62))
    cfg = DeployConfig(name="demo", host_ip="192.168.1.1", dpu_ip="192.168.1.2",
                       rexec_port=7777, qtfs_ko=ko, qtfs_server_ko=ko, engine_bin=engine,
                       rexec_whitelist=["qemu-img"], **params)
    table = mount_table([{"type": "tmpfs", "target": "/mnt/a,b", "options": "size=1M"}], "m")
    out = tmp_path / "out" / "demo"
    written = render_deploy(out, cfg, table)
    return out, written


HOST_FILES = ["host/setup.sh", "host/teardown.sh", "host/status.sh", "host/rexec.service",
              "host/qtfs-engine.service", "host/whitelist", "host/server.json",
              "host/firewall.nft", "host/rootfs-offload-firewall.service",
              "host/qtfs_server.ko", "host/engine", "host/README"]


def test_rendered_files(tmp_path: Path) -> None:
    out, written = _render_all(tmp_path)
    names = sorted(p.relative_to(out).as_posix() for p in written)
    assert names == sorted([
        "dpu/prepare.sh", "dpu/teardown.sh", "dpu/status.sh", "dpu/start-libvirtd.sh",
        "dpu/offload.conf", "dpu/qtfs.ko", "dpu/README", *HOST_FILES, "install.sh"])
    mode = {n: stat.S_IMODE((out / n).stat().st_mode) for n in names}
    assert mode["host/whitelist"] == 0o400 and mode["host/server.json"] == 0o400
    assert mode["dpu/prepare.sh"] == 0o755 and mode["host/engine"] == 0o755
    assert mode["dpu/offload.conf"] == 0o644 and mode["install.sh"] == 0o755
    whitelist = (out / "host/whitelist").read_text().splitlines()
    for cmd in ("qemu-kvm", "/usr/bin/qemu-kvm", "kill", "taskset", "qemu-img"):
        assert cmd in whitelist
    # issue 13 point 6: rexec_server restarts on failure and has no reload (it
    # does not handle SIGHUP); the engine's unit loads qtfs_server.ko itself
    unit = (out / "host/rexec.service").read_text()
    assert "Environment=CMD_NET_ADDR=tcp://192.168.1.1:7777\n" in unit
    assert "Restart=on-failure\n" in unit and "ExecReload" not in unit
    engine_unit = (out / "host/qtfs-engine.service").read_text()
    assert ("ExecStartPre=/bin/sh -c 'test -d /sys/module/qtfs_server || exec insmod "
            "/usr/local/lib/rootfs-offload/qtfs_server.ko qtfs_server_ip=192.168.1.1 "
            "qtfs_log_level=INFO'\n") in engine_unit
    assert "ExecStart=/usr/local/bin/qtfs-engine 4096 16\n" in engine_unit
    # issue 13 point 7: rexec_server's own config
    assert json.loads((out / "host/server.json").read_text()) == {
        "Protocol": "tcp", "Ipaddr": "192.168.1.1", "Port": "7777"}
    conf = (out / "dpu/offload.conf").read_text()
    assert "HOST_IP=192.168.1.1\n" in conf and "REXEC_PORT=7777\n" in conf
    assert "ROOTFS=/another_rootfs\n" in conf and "QMP_PORT=32323\n" in conf
    assert "REXEC_TLS=0\n" in conf
    prepare = (out / "dpu/prepare.sh").read_text()
    assert "'/mnt/a,b'" in prepare and "@VALUES@" not in prepare and "@COMMON@" not in prepare
    assert (out / "install.sh").read_text() == render_installer("demo")
    # rendering again replaces the directories (no stale files) and is deterministic
    before = {n: (out / n).read_bytes() for n in names}
    (out / "dpu/stale").write_text("x")
    _render_all(tmp_path)
    assert not (out / "dpu/stale").exists()
    assert {n: (out / n).read_bytes() for n in names} == before


WILDCARDS = re.compile(r"0\.0\.0\.0|\[::\]|=::(\s|$)|\bany\b")


def test_no_wildcard_listen_address_for_the_link(tmp_path: Path) -> None:
    """Issue 16: for host_ip=10.9.8.7 dpu_ip=10.9.8.8 the host scripts and units
    listen on 10.9.8.7 only, and the firewall admits 10.9.8.8 only."""
    cfg = DeployConfig.from_params("demo", {"host_ip": "10.9.8.7", "dpu_ip": "10.9.8.8"})
    out = tmp_path / "out"
    written = render_deploy(out, cfg, mount_table([], "m"))
    checked = 0
    for path in written:
        if path.parent.name != "host" or path.name in ("qtfs_server.ko", "engine", "README"):
            continue
        lines = path.read_text().splitlines()
        if path.suffix == ".sh":  # the values; the code only compares against wildcards
            lines = lines[lines.index("# --- values rendered by rootfs-build (validated, quoted) "
                                      "---"):]
            lines = lines[:lines.index("")]
        for line in lines:
            if not line.startswith("#"):
                assert not WILDCARDS.search(line), (path.name, line)
                checked += 1
    assert checked > 50
    unit = (out / "host/rexec.service").read_text()
    assert "Environment=CMD_NET_ADDR=tcp://10.9.8.7:7777\n" in unit
    assert "qtfs_server_ip=10.9.8.7 " in (out / "host/qtfs-engine.service").read_text()
    assert json.loads((out / "host/server.json").read_text())["Ipaddr"] == "10.9.8.7"
    setup = (out / "host/setup.sh").read_text()
    assert "QTFS_LISTEN_IP='10.9.8.7'\n" in setup and "REXEC_LISTEN='10.9.8.7:7777'\n" in setup
    rules = (out / "host/firewall.nft").read_text()
    assert "ip saddr 10.9.8.8 tcp dport { 7777, 12345, 32323, 50000-58191 } accept\n" in rules
    assert "\t\ttcp dport { 7777, 12345, 32323, 50000-58191 } drop\n" in rules
    assert "table inet rootfs_offload\ndelete table inet rootfs_offload\n" in rules
    readme = (out / "host/README").read_text()
    assert "10.9.8.7:12345" in readme and "admits" in readme and "no authentication" in readme


@pytest.mark.root
@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (nftables)")
@pytest.mark.parametrize("host, dpu", [("10.9.8.7", "10.9.8.8"), ("fd00::7", "fd00::8")])
def test_the_ruleset_passes_nft_check(tmp_path: Path, host: str, dpu: str) -> None:
    cfg = DeployConfig.from_params("demo", {"host_ip": host, "dpu_ip": dpu})
    render_deploy(tmp_path / "out", cfg, mount_table([], "m"))
    # in a network namespace of its own: -c loads nothing, but needs the kernel
    rules = tmp_path / "out/host/firewall.nft"
    r = subprocess.run(["unshare", "-n", "nft", "-c", "-f", str(rules)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert ("ip6" if ":" in dpu else "ip") + f" saddr {dpu} " in (
        tmp_path / "out/host/firewall.nft").read_text()


def test_rexec_tls_wires_both_sides(tmp_path: Path) -> None:
    out, _ = _render_all(tmp_path, rexec_tls=True)
    unit = (out / "host/rexec.service").read_text()
    assert ("Environment=TLS_CERT=/etc/rexec/tls/server.crt TLS_KEY=/etc/rexec/tls/server.key\n"
            in unit)
    assert "REXEC_TLS=1\n" in (out / "dpu/offload.conf").read_text()
    readme = (out / "host/README").read_text()
    assert "eavesdropping" in readme and "does not verify" in readme
    assert "makes a self-signed certificate" in readme
    assert not (out / "host/rexec-tls.crt").exists()
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("cert\n")
    key.write_text("key\n")
    out, _ = _render_all(tmp_path, rexec_tls=True, rexec_tls_cert=cert, rexec_tls_key=key)
    assert (out / "host/rexec-tls.crt").read_text() == "cert\n"
    assert stat.S_IMODE((out / "host/rexec-tls.key").stat().st_mode) == 0o400
    cfg = DeployConfig(name="demo", host_ip="192.168.1.1", dpu_ip="192.168.1.2", rexec_tls=True,
                       rexec_tls_cert=cert, rexec_tls_key=key)
    assert cfg.manifest()["rexec_tls"] == {"enabled": True, "certificate": "given"}


@pytest.mark.root
def test_the_qemu_kvm_shim_turns_tls_on(tmp_path: Path) -> None:
    """The shim (element qemu-kvm-shim) exports USE_TLS=1 when the usetls file
    prepare.sh writes says 1, or else when the image was built with rexec_tls;
    never USE_TLS=0 (the Go client turns TLS on for any non-empty value)."""
    root = make_fake_rootfs(tmp_path / "root")
    template = (REPO / "elements/qemu-kvm-shim/qemu-kvm.in").read_text()
    rexec = root / "usr/bin/rexec"
    rexec.write_text('#!/usr/bin/bash\necho "USE_TLS=${USE_TLS-unset} $CMD_NET_ADDR" > /tmp/seen\n')
    rexec.chmod(0o755)

    def run(build_tls: bool, usetls: str | None, env: dict[str, str] | None = None) -> str:
        shim = root / "usr/bin/qemu-kvm"
        shim.write_text(filelayers._Template(template).substitute(filelayers.template_values(
            {"host_ip": "10.9.8.7", "rexec_port": 7777, "rexec_tls": build_tls})))
        shim.chmod(0o755)
        (root / "etc/rexec").mkdir(exist_ok=True)
        (root / "etc/rexec/usetls").unlink(missing_ok=True)
        if usetls is not None:
            (root / "etc/rexec/usetls").write_text(usetls + "\n")
        subprocess.run(["/usr/sbin/chroot", str(root), "/usr/bin/bash", "/usr/bin/qemu-kvm",
                        "-m", "1"],
                       env={"PATH": "/usr/bin", **(env or {})}, check=True)
        return (root / "tmp/seen").read_text()

    try:
        assert run(False, None) == "USE_TLS=unset tcp://10.9.8.7:7777\n"
        assert run(True, None) == "USE_TLS=1 tcp://10.9.8.7:7777\n"
        assert run(False, "1") == "USE_TLS=1 tcp://10.9.8.7:7777\n"
        assert run(True, "0") == "USE_TLS=unset tcp://10.9.8.7:7777\n"
        assert run(True, "1", {"USE_TLS": ""}) == "USE_TLS= tcp://10.9.8.7:7777\n"
    finally:
        remove_tree(root)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="needs shellcheck")
def test_every_script_passes_shellcheck(tmp_path: Path) -> None:
    out, written = _render_all(tmp_path)
    scripts = [p for p in written if p.suffix == ".sh"]
    assert len(scripts) == 8
    r = subprocess.run(["shellcheck", "--shell=bash", *map(str, scripts)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


BAD_CONF_LINES = [
    "HOST_IP=1.2.3.4; touch {marker}",
    "HOST_IP=1.2.3.4\ntouch {marker}",
    "HOST_IP=`touch {marker}`",
    "HOST_IP=$(touch {marker})",
    'HOST_IP="1.2.3.4"; touch {marker}',
    "HOST_IP=1.2.3.4\r\rtouch {marker}",
    "QTFS_SERVER_IP=1.2.3.4 {marker}",
    "REXEC_PORT=7777 ; touch {marker}",
    "QMP_PORT=0",
    "ROOTFS=/another_rootfs; touch {marker}",
    "ROOTFS=/x/../etc",
    "QTFS_KO=$(touch {marker})",
    "QTFS_LOG_LEVEL=INFO`touch {marker}`",
    "DPU_KERNEL=6.6 x",
    "ROOTFS_IMAGE=/x.raw; touch {marker}",
    "ROOTFS_IMAGE=/",
    "ROOTFS_IMAGE_RO=yes",
    "REXEC_TLS=yes",
    "touch {marker}",
    "EVIL=1",
]


@pytest.mark.parametrize("line", [*BAD_CONF_LINES, "duplicate"])
def test_scripts_reject_bad_offload_conf(tmp_path: Path, line: str) -> None:
    out, _ = _render_all(tmp_path)
    marker = tmp_path / "marker"
    conf = (out / "dpu/offload.conf").read_text()
    if line == "duplicate":
        line = "HOST_IP=1.2.3.4"
    else:  # replace the key's own line: the value check must catch it
        key = line.split("=", 1)[0]
        conf = "".join(c for c in conf.splitlines(keepends=True) if not c.startswith(key + "="))
    bad = tmp_path / "bad.conf"
    bad.write_text(conf + line.format(marker=marker) + "\n")
    for script in ("prepare.sh", "teardown.sh", "status.sh", "start-libvirtd.sh"):
        r = subprocess.run([str(out / "dpu" / script), "--config", str(bad), "--dry-run"
                            if script != "status.sh" else "--quiet"],
                           capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 2, (script, r.stdout, r.stderr)
        assert r.stdout == ""
        assert len(r.stderr.splitlines()) == 1 and f"{bad}:" in r.stderr, r.stderr
        assert not marker.exists()


def test_prepare_checks_the_rootfs_image(tmp_path: Path) -> None:
    out, _ = _render_all(tmp_path)
    root = tmp_path / "root"
    conf = (out / "dpu/offload.conf").read_text()
    assert "ROOTFS_IMAGE=\n" in conf and "ROOTFS_IMAGE_RO=0\n" in conf

    def prepare(image: Path) -> subprocess.CompletedProcess[str]:
        c = tmp_path / "image.conf"
        c.write_text(conf.replace("ROOTFS_IMAGE=\n", f"ROOTFS_IMAGE={image}\n"))
        return subprocess.run([str(out / "dpu/prepare.sh"), "--root", str(root), "--config",
                               str(c), "--dry-run", "--rehearse", str(tmp_path / "host")],
                              capture_output=True, text=True,
                              env={"ROOTFS_BUILD_STATE_DIR": str(tmp_path / "state"),
                                   "PATH": "/usr/bin:/bin"})

    qcow2 = tmp_path / "rootfs.qcow2"
    qcow2.write_bytes(b"QFI\xfb" + b"\0" * 2044)
    r = prepare(qcow2)
    assert r.returncode == 1 and "needs qemu-nbd" in r.stderr, r.stderr
    assert f"qemu-img convert -O raw {qcow2} {tmp_path}/rootfs.raw" in r.stderr
    other = tmp_path / "rootfs.raw"
    other.write_bytes(b"\0" * 4096)
    r = prepare(other)
    assert r.returncode == 1 and "neither a raw ext4 nor a squashfs image" in r.stderr
    r = prepare(tmp_path / "missing.raw")
    assert r.returncode == 1 and "is not a file" in r.stderr
    root.mkdir()
    r = prepare(root / "inside.raw")
    assert r.returncode == 2 and "must lie outside the rootfs" in r.stderr
    # a squashfs: the mount it would make (read-only), then the table
    sqfs = tmp_path / "rootfs.squashfs"
    sqfs.write_bytes(b"hsqs" + b"\0" * 4092)
    r = prepare(sqfs)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if "would run: mount" in line]
    assert lines[0] == f"prepare.sh: would run: mount -t squashfs -o loop\\,ro -- {sqfs} {root}"
    assert not (tmp_path / "state").exists()


def test_scripts_accept_the_rendered_conf(tmp_path: Path) -> None:
    out, _ = _render_all(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    r = subprocess.run([str(out / "dpu/status.sh"), "--root", str(root)], capture_output=True,
                       text=True, env={"ROOTFS_BUILD_STATE_DIR": str(tmp_path / "state"),
                                       "PATH": "/usr/bin:/bin"})
    assert r.returncode == 3, r.stdout + r.stderr  # nothing mounted
    assert "mounts: 0 up" in r.stdout


@pytest.mark.root
def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    root = make_fake_rootfs(tmp_path / "root")
    r = render(tmp_path, root)
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    res = run_ns(f"""
D={r.dpu}
$D/prepare.sh --dry-run --rehearse $W/host > $W/p.out 2>&1; echo $? > $W/p.rc
$D/teardown.sh --dry-run > $W/t.out 2>&1; echo $? > $W/t.rc
snap mi
""", tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "p.rc").read_text() == "0\n", (tmp_path / "p.out").read_text()
    assert (tmp_path / "t.rc").read_text() == "0\n", (tmp_path / "t.out").read_text()
    assert str(root) + "/" not in (tmp_path / "mi").read_text()
    out = (tmp_path / "p.out").read_text()
    assert "would run: mount -t proc -- proc " + str(root) + "/local_proc" in out
    assert "would run: mount --bind --make-slave -- " + str(tmp_path / "host/proc") in out
    after = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    new = set(after) - set(before)
    assert new <= {"driver.sh", "p.out", "p.rc", "t.out", "t.rc", "mi"}, new


def _fake_ko(path: Path, release: str) -> Path:
    path.write_bytes(fake_module("qtfs", release))
    return path


@pytest.mark.root
def test_real_mode_dry_run_checks_the_module(tmp_path: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    release = platform.release()
    root = make_fake_rootfs(tmp_path / "root")
    good = render(tmp_path / "good", root, qtfs_ko=_fake_ko(tmp_path / "good.ko", release))
    bad = render(tmp_path / "bad", root, qtfs_ko=_fake_ko(tmp_path / "bad.ko", "1.2.3-other"))
    other_kernel = tmp_path / "other-kernel.conf"
    other_kernel.write_text((good.dpu / "offload.conf").read_text().replace(
        "DPU_KERNEL=\n", "DPU_KERNEL=1.2.3-other\n"))
    res = run_ns(f"""
{good.dpu}/prepare.sh --dry-run > $W/g.out 2>&1; echo $? > $W/g.rc
{bad.dpu}/prepare.sh --dry-run > $W/b.out 2>&1; echo $? > $W/b.rc
{good.dpu}/prepare.sh --dry-run --config {other_kernel} > $W/k.out 2>&1; echo $? > $W/k.rc
snap mi
""", tmp_path)
    assert res.returncode == 0, res.stderr
    out = {n: (tmp_path / f"{n}.out").read_text() for n in "gbk"}
    rcs = {n: int((tmp_path / f"{n}.rc").read_text()) for n in "gbk"}
    if Path("/sys/module/qtfs").exists():
        pytest.skip("qtfs is loaded on this machine")
    assert rcs["g"] == 0, out["g"]
    assert (f"would run: insmod {good.dpu}/qtfs.ko qtfs_server_ip=192.168.1.1 "
            "qtfs_log_level=INFO") in out["g"]
    assert f"would run: mount -t qtfs -o proc -- /proc {root}/proc" in out["g"]
    assert "would write 192.168.1.1 to /var/run/rexec/hostaddr" in out["g"] or \
        Path("/var/run/rexec/hostaddr").exists()
    assert rcs["b"] == 1 and f"was built for kernel 1.2.3-other, this DPU runs {release}" \
        in out["b"], out["b"]
    assert rcs["k"] == 1 and "built for kernel 1.2.3-other but the DPU runs" in out["k"]
    assert "rolled back" not in out["b"] + out["k"]
    assert str(root) + "/" not in (tmp_path / "mi").read_text()


def test_host_scripts_dry_run(tmp_path: Path) -> None:
    ko = _fake_ko(tmp_path / "qtfs_server.ko", platform.release())
    engine = tmp_path / "engine"
    engine.write_bytes(fake_elf(62))
    server = tmp_path / "rexec_server"
    server.write_bytes(fake_elf(62))
    cfg = DeployConfig(name="demo", host_ip="192.168.1.1", dpu_ip="192.168.1.2",
                       qtfs_server_ko=ko, engine_bin=engine, rexec_server_bin=server,
                       qtfs_log_level="WARN")
    out = tmp_path / "out/demo"
    render_deploy(out, cfg, mount_table([], "m"))
    if platform.machine() != "x86_64":
        pytest.skip("the stand-in binaries are x86_64 programs")
    if Path("/sys/module/qtfs_server").exists():
        pytest.skip("qtfs_server is loaded on this machine")
    r = subprocess.run([str(out / "host/setup.sh"), "--dry-run", "--no-firewall"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    host = out / "host"
    for line in [
        "would run: mkdir -p -- /home/VMs" if not Path("/home/VMs").is_dir() else "",
        f"would run: install -D -o root -g root -m 0755 -- {host}/engine "
        "/usr/local/bin/qtfs-engine",
        f"would run: install -D -o root -g root -m 0644 -- {host}/qtfs_server.ko "
        "/usr/local/lib/rootfs-offload/qtfs_server.ko",
        f"would run: install -D -o root -g root -m 0400 -- {host}/whitelist /etc/rexec/whitelist",
        f"would run: install -D -o root -g root -m 0400 -- {host}/server.json "
        "/etc/rexec/server.json",
        "would run: systemctl restart rexec.service qtfs-engine.service",
    ]:
        assert line in r.stdout, (line, r.stdout)
    assert "--no-firewall: the qtfs, rexec, QMP and console ports answer every network" \
        in r.stderr
    assert "/proc" not in r.stdout.split("install -D")[0]  # qtfs /proc etc. exist already
    r = subprocess.run([str(out / "host/teardown.sh"), "--dry-run", "--purge"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "would run: rm -f -- /etc/systemd/system/qtfs-engine.service" in r.stdout
    # the checks come first and name every problem
    ko.write_bytes(fake_module("qtfs_server", "0.0.1"))
    engine.write_bytes(fake_elf(183))
    render_deploy(out, cfg, mount_table([], "m"))
    r = subprocess.run([str(out / "host/setup.sh"), "--dry-run", "--no-firewall"],
                       capture_output=True, text=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "built for kernel 0.0.1" in r.stderr
    assert "engine is not a program for this x86_64 host (aarch64)" in r.stderr
    assert "2 problem(s); nothing was changed" in r.stderr and r.stdout == ""
