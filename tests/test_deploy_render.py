"""DeployConfig validation, the rendered files, shellcheck, and the scripts'
run-time parser of offload.conf."""

from __future__ import annotations

import platform
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from deploy_helpers import make_fake_rootfs, render, run_ns

from builder.deploy import DeployConfig, mount_table, render_deploy
from builder.deploy.bundle import render_installer
from builder.deploy.render import ConfigError, sh_quote
from builder.errors import UserError
from builder.sampleimage import fake_module

BAD_IPS = [
    "1.2.3.4; touch /tmp/x",
    "1.2.3.4\ntouch /tmp/x",
    "1.2.3.4`touch /tmp/x`",
    "$(touch /tmp/x)",
    "1.2.3.4 && touch /tmp/x",
    "'1.2.3.4'",
    "",
]


@pytest.mark.parametrize("value", BAD_IPS)
def test_config_rejects_shell_metacharacters(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        DeployConfig(name="demo", host_ip=value, rexec_port=7777)
    assert info.value.key == "host_ip"
    with pytest.raises(UserError) as uinfo:
        DeployConfig.from_params({"name": "demo", "host_ip": value, "rexec_port": 7777},
                                 "recipe.deploy")
    assert str(uinfo.value).startswith("recipe.deploy.host_ip: ")
    assert "\n" not in str(uinfo.value)


@pytest.mark.parametrize("key, value", [
    ("qtfs_server_ip", "10.0.0.1 ; id"),
    ("rootfs", "/another rootfs"),
    ("rootfs", "/"),
    ("rootfs", "/x/../etc"),
    ("rexec_port", 0),
    ("rexec_port", "77;7"),
    ("qmp_port", 70000),
    ("qtfs_log_level", "info"),
    ("dpu_kernel", "5.10 $(id)"),
    ("engine_args", [4096, "16"]),
    ("engine_args", [100000, 16]),
    ("engine_args", "4096 16"),
    ("rexec_listen", "0.0.0.0:7777;id"),
    ("rexec_listen", "host:7777"),
    ("whitelist_extra", ["rm -rf /"]),
    ("whitelist_extra", "qemu-img"),
    ("host_engine_path", "/usr/bin/engine;id"),
    ("qtfs_ko", "/nonexistent/qtfs.ko"),
    ("name", "a/b"),
])
def test_config_rejects_bad_values(key: str, value: object) -> None:
    params = {"name": "demo", "host_ip": "192.168.1.1", "rexec_port": 7777, key: value}
    with pytest.raises(UserError) as info:
        DeployConfig.from_params(params, "deploy")
    assert str(info.value).startswith(f"deploy.{key}: ")


def test_config_defaults_and_unknown_keys(tmp_path: Path) -> None:
    cfg = DeployConfig(name="demo", host_ip="fe80::0001", rexec_port="6666",  # type: ignore[arg-type]
                       engine_args=[2048, 8], whitelist_extra=["qemu-img", "/usr/bin/qemu-img"])
    assert cfg.qtfs_server_ip == "fe80::1" and cfg.host_ip == "fe80::1"
    assert cfg.rexec_port == 6666 and cfg.rexec_listen == "0.0.0.0:6666"
    assert cfg.engine_args == (2048, 8) and cfg.rootfs == "/another_rootfs"
    with pytest.raises(UserError, match=r"^deploy\.colour: unknown key"):
        DeployConfig.from_params({"name": "d", "host_ip": "1.2.3.4", "rexec_port": 1,
                                  "colour": "red"}, "deploy")
    with pytest.raises(UserError, match=r"^deploy\.rexec_port: missing"):
        DeployConfig.from_params({"name": "d", "host_ip": "1.2.3.4"}, "deploy")
    ko = tmp_path / "qtfs.ko"
    ko.write_bytes(fake_module("qtfs", "5.10.0-60.18.0.50.oe2203.aarch64", 183))
    ok = DeployConfig(name="d", host_ip="1.2.3.4", rexec_port=1, qtfs_ko=ko,
                      dpu_kernel="5.10.0-60.18.0.50.oe2203.aarch64")
    assert ok.qtfs_ko == ko
    with pytest.raises(ConfigError, match="built for kernel 5.10.0-60"):
        DeployConfig(name="d", host_ip="1.2.3.4", rexec_port=1, qtfs_ko=ko, dpu_kernel="6.6.0")


def test_sh_quote() -> None:
    assert sh_quote("/a,b") == "/a,b"
    assert sh_quote("a b'c") == "'a b'\"'\"'c'"
    with pytest.raises(ValueError):
        sh_quote("a\nb")


def _render_all(tmp_path: Path) -> tuple[Path, list[Path]]:
    ko = tmp_path / "qtfs.ko"
    ko.write_bytes(fake_module("qtfs", "6.6.0"))
    engine = tmp_path / "engine"
    engine.write_bytes(b"\x7fELF")
    cfg = DeployConfig(name="demo", host_ip="192.168.1.1", rexec_port=7777, qtfs_ko=ko,
                       qtfs_server_ko=ko, engine_bin=engine, whitelist_extra=["qemu-img"])
    table = mount_table([{"type": "tmpfs", "target": "/mnt/a,b", "options": "size=1M"}], "m")
    out = tmp_path / "out" / "demo"
    written = render_deploy(out, cfg, table)
    return out, written


def test_rendered_files(tmp_path: Path) -> None:
    out, written = _render_all(tmp_path)
    names = sorted(p.relative_to(out).as_posix() for p in written)
    assert names == sorted([
        "dpu/prepare.sh", "dpu/teardown.sh", "dpu/status.sh", "dpu/start-libvirtd.sh",
        "dpu/offload.conf", "dpu/qtfs.ko", "dpu/README", "host/setup.sh", "host/teardown.sh",
        "host/rexec.service", "host/qtfs-engine.service", "host/whitelist",
        "host/qtfs_server.ko", "host/engine", "host/README"])
    mode = {n: stat.S_IMODE((out / n).stat().st_mode) for n in names}
    assert mode["host/whitelist"] == 0o400
    assert mode["dpu/prepare.sh"] == 0o755 and mode["host/engine"] == 0o755
    assert mode["dpu/offload.conf"] == 0o644
    whitelist = (out / "host/whitelist").read_text().splitlines()
    for cmd in ("qemu-kvm", "/usr/bin/qemu-kvm", "kill", "taskset", "qemu-img"):
        assert cmd in whitelist
    unit = (out / "host/rexec.service").read_text()
    assert "ExecReload=/bin/kill -s HUP $MAINPID\n" in unit
    assert "Environment=CMD_NET_ADDR=tcp://0.0.0.0:7777\n" in unit
    assert "ExecStart=/usr/local/bin/qtfs-engine 4096 16\n" in (
        out / "host/qtfs-engine.service").read_text()
    conf = (out / "dpu/offload.conf").read_text()
    assert "HOST_IP=192.168.1.1\n" in conf and "REXEC_PORT=7777\n" in conf
    assert "ROOTFS=/another_rootfs\n" in conf and "QMP_PORT=32323\n" in conf
    prepare = (out / "dpu/prepare.sh").read_text()
    assert "'/mnt/a,b'" in prepare and "@VALUES@" not in prepare and "@COMMON@" not in prepare
    # rendering again replaces the directories (no stale files) and is deterministic
    before = {n: (out / n).read_bytes() for n in names}
    (out / "dpu/stale").write_text("x")
    _render_all(tmp_path)
    assert not (out / "dpu/stale").exists()
    assert {n: (out / n).read_bytes() for n in names} == before


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="needs shellcheck")
def test_every_script_passes_shellcheck(tmp_path: Path) -> None:
    out, written = _render_all(tmp_path)
    (out / "install.sh").write_text(render_installer("demo"))
    scripts = [p for p in written if p.suffix == ".sh"] + [out / "install.sh"]
    assert len(scripts) == 7
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
    engine.write_bytes(b"\x7fELF")
    cfg = DeployConfig(name="demo", host_ip="192.168.1.1", rexec_port=7777, qtfs_server_ko=ko,
                       engine_bin=engine, qtfs_log_level="WARN")
    out = tmp_path / "out/demo"
    render_deploy(out, cfg, mount_table([], "m"))
    r = subprocess.run([str(out / "host/setup.sh"), "--dry-run"], capture_output=True, text=True)
    if Path("/sys/module/qtfs_server").exists():
        pytest.skip("qtfs_server is loaded on this machine")
    assert r.returncode == 0, r.stdout + r.stderr
    host = out / "host"
    for line in [
        "would run: mkdir -p -- /home/VMs" if not Path("/home/VMs").is_dir() else "",
        f"would run: install -D -o root -g root -m 0755 -- {host}/engine "
        "/usr/local/bin/qtfs-engine",
        f"would run: install -D -o root -g root -m 0400 -- {host}/whitelist /etc/rexec/whitelist",
        f"would run: insmod {host}/qtfs_server.ko qtfs_server_ip=0.0.0.0 qtfs_log_level=WARN",
        "would run: systemctl restart rexec.service qtfs-engine.service",
    ]:
        assert line in r.stdout, (line, r.stdout)
    assert "/proc" not in r.stdout.split("install -D")[0]  # qtfs /proc etc. exist already
    r = subprocess.run([str(out / "host/teardown.sh"), "--dry-run", "--purge"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "would run: rm -f -- /etc/systemd/system/qtfs-engine.service" in r.stdout
    ko.write_bytes(fake_module("qtfs_server", "0.0.1"))
    render_deploy(out, DeployConfig(name="demo", host_ip="192.168.1.1", rexec_port=7777,
                                    qtfs_server_ko=ko), mount_table([], "m"))
    r = subprocess.run([str(out / "host/setup.sh"), "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 2 and "built for kernel 0.0.1" in r.stderr
