"""A throwaway registry on this machine, for the tests and the benchmarks.

Debian's `docker-registry` (CNCF distribution) serving 127.0.0.1 on a free
port, its storage in a directory; optionally TLS with a certificate from a
CA made here with openssl (a throwaway CA, valid two days), and htpasswd
(bcrypt) users.  It listens on 127.0.0.1 only and talks to nothing else.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .errors import UserError

PROGRAM = "docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(args: list[str], **kw: object) -> None:
    subprocess.run(args, check=True, capture_output=True, **kw)  # type: ignore[call-overload]


class LocalRegistry:
    """`with LocalRegistry(dir, tls=True, users={"alice": "pw"}) as reg:`
    ... `reg.host` is "127.0.0.1:PORT"."""

    def __init__(self, root: Path, *, tls: bool = True, users: dict[str, str] | None = None,
                 port: int | None = None):
        if shutil.which(PROGRAM) is None:
            raise UserError(f"{PROGRAM} is not installed", hint="./setup.sh installs it")
        self.root = Path(root)
        self.tls = tls
        self.users = dict(users or {})
        self.port = port or free_port()
        self.storage = self.root / "storage"
        self.proc: subprocess.Popen[bytes] | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        if tls:
            self._make_ca()
        if self.users:
            self._make_htpasswd()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.root / "ca.crt"

    @property
    def cert_dir(self) -> Path:
        """A directory in skopeo's --cert-dir layout (ca.crt)."""
        d = self.root / "certs"
        d.mkdir(exist_ok=True)
        shutil.copy(self.ca_file, d / "ca.crt")
        return d

    # -- setup -----------------------------------------------------------------
    def _make_ca(self) -> None:
        r = self.root
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        _run(["openssl", "req", "-x509", *ec, "-keyout", str(r / "ca.key"), "-out",
              str(r / "ca.crt"), "-days", "2", "-subj", "/CN=rootfs-build test CA"])
        _run(["openssl", "req", *ec, "-keyout", str(r / "server.key"), "-out",
              str(r / "server.csr"), "-subj", "/CN=127.0.0.1"])
        (r / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                      "basicConstraints=CA:FALSE\n"
                                      "extendedKeyUsage=serverAuth\n")
        _run(["openssl", "x509", "-req", "-in", str(r / "server.csr"), "-CA", str(r / "ca.crt"),
              "-CAkey", str(r / "ca.key"), "-CAcreateserial", "-out", str(r / "server.crt"),
              "-days", "2", "-extfile", str(r / "server.ext")])

    def _make_htpasswd(self) -> None:
        path = self.root / "htpasswd"
        path.unlink(missing_ok=True)
        for user, password in self.users.items():
            # the password goes through stdin, never argv
            _run(["htpasswd", "-iB", *([] if path.exists() else ["-c"]), str(path), user],
                 input=password.encode())

    def auth_file(self, user: str, password: str | None = None, *, name: str = "") -> Path:
        """A containers auth.json / docker config.json for `user` (with
        `password`, default: the user's) on this registry."""
        secret = self.users[user] if password is None else password
        path = self.root / f"auth-{name or user}.json"
        token = base64.b64encode(f"{user}:{secret}".encode()).decode()
        path.write_text(json.dumps({"auths": {self.host: {"auth": token}}}))
        os.chmod(path, 0o600)
        return path

    def _config(self) -> Path:
        lines = ["version: 0.1",
                 "log:", "  level: warn", "  accesslog:", "    disabled: true",
                 "storage:", "  filesystem:", f"    rootdirectory: {self.storage}",
                 "  delete:", "    enabled: true",
                 "  maintenance:", "    uploadpurging:", "      enabled: false",
                 "http:", f"  addr: 127.0.0.1:{self.port}"]
        if self.tls:
            lines += ["  tls:", f"    certificate: {self.root / 'server.crt'}",
                      f"    key: {self.root / 'server.key'}"]
        if self.users:
            lines += ["auth:", "  htpasswd:", "    realm: rootfs-build-test",
                      f"    path: {self.root / 'htpasswd'}"]
        path = self.root / "config.yml"
        path.write_text("\n".join(lines) + "\n")
        return path

    # -- running -----------------------------------------------------------------
    def start(self, timeout: float = 20) -> None:
        config = self._config()
        log = open(self.root / "registry.log", "ab")   # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen([PROGRAM, "serve", str(config)], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{PROGRAM} exited: "
                                   f"{(self.root / 'registry.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{PROGRAM} did not listen on {self.host} within {timeout} s")

    def stop(self) -> None:
        """Stop it (SIGKILL: as abrupt as a crash or a pulled cable)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> LocalRegistry:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- looking inside (tests) -------------------------------------------------------
    def blob_file(self, digest: str) -> Path:
        hexd = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def tags(self, repository: str) -> list[str]:
        d = self.storage / "docker/registry/v2/repositories" / repository / "_manifests/tags"
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []
