"""A throwaway registry on this machine, for the tests and the benchmarks.

Debian's `docker-registry` (CNCF distribution) serving 127.0.0.1 on a free
port, its storage in a directory; optionally TLS with a certificate from a
CA made here with openssl (a throwaway CA, valid two days), and users:
htpasswd (bcrypt, the registry asks for HTTP Basic), or `token_auth=True`:
a token service here (what Harbor, Quay or Docker Hub run) that checks the
user's password and issues a JWT the registry verifies (Bearer).  Both
listen on 127.0.0.1 only and talk to nothing else.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
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
                 port: int | None = None, token_auth: bool = False):
        if shutil.which(PROGRAM) is None:
            raise UserError(f"{PROGRAM} is not installed", hint="./setup.sh installs it")
        self.root = Path(root)
        self.tls = tls
        self.users = dict(users or {})
        self.port = port or free_port()
        self.storage = self.root / "storage"
        self.proc: subprocess.Popen[bytes] | None = None
        self.token_auth = token_auth
        self._tokens: _TokenService | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        if tls:
            self._make_ca()
        if token_auth:
            self._tokens = _TokenService(self.root, self.users)
        elif self.users:
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
        if self._tokens is not None:
            lines += ["auth:", "  token:", f"    realm: {self._tokens.realm}",
                      f"    service: {_TokenService.SERVICE}",
                      f"    issuer: {_TokenService.ISSUER}",
                      f"    rootcertbundle: {self._tokens.cert}"]
        elif self.users:
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

    def close(self) -> None:
        """Stop the registry and the token service."""
        self.stop()
        if self._tokens is not None:
            self._tokens.close()

    def __enter__(self) -> LocalRegistry:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- looking inside (tests) -------------------------------------------------------
    def blob_file(self, digest: str) -> Path:
        hexd = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def tags(self, repository: str) -> list[str]:
        d = self.storage / "docker/registry/v2/repositories" / repository / "_manifests/tags"
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


class _TokenService:
    """A Docker-style token service (plain HTTP on 127.0.0.1): GET /token
    with HTTP Basic credentials and ?scope=repository:NAME:ACTIONS answers
    {"token": JWT} granting the actions asked for; wrong or no credentials
    get 401.  The JWT is ES256, signed with a key whose self-signed
    certificate is the registry's rootcertbundle and travels in `x5c`."""

    SERVICE = "rootfs-build-test"
    ISSUER = "rootfs-build-test-tokens"

    def __init__(self, root: Path, users: dict[str, str]):
        import threading

        self.cert = root / "token.crt"
        key = root / "token.key"
        _run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
              "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out",
              str(self.cert), "-days", "2", "-subj", "/CN=rootfs-build test tokens"])
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
                             check=True, capture_output=True).stdout
        self._x5c = base64.b64encode(der).decode()
        self._key = key.read_text()
        self.users = users
        self.issued = 0
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                service._answer(self)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self._server.server_address[1]}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _answer(self, h: http.server.BaseHTTPRequestHandler) -> None:
        import secrets
        import urllib.parse

        import jwt  # python3-jwt (Debian), tests only

        header = h.headers.get("Authorization", "")
        user = None
        if header.startswith("Basic "):
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if self.users.get(name) == password:
                user = name
        if user is None:
            h.send_response(401)
            h.end_headers()
            return
        query = urllib.parse.parse_qs(urllib.parse.urlparse(h.path).query)
        access = []
        for scope in query.get("scope", []):
            for item in scope.split(" "):
                kind, _, rest = item.partition(":")
                name, _, actions = rest.rpartition(":")
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        token = jwt.encode({"iss": self.ISSUER, "sub": user, "aud": self.SERVICE,
                            "iat": now, "nbf": now - 10, "exp": now + 600,
                            "jti": secrets.token_hex(8), "access": access},
                           self._key, algorithm="ES256", headers={"x5c": [self._x5c]})
        self.issued += 1
        body = json.dumps({"token": token}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.end_headers()
        h.wfile.write(body)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
