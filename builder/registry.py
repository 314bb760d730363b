"""Registry names and credentials: references (host/repository:tag@digest),
the auth files consulted for a host, the options every registry user
shares, the errors, and `connect`, which makes the HTTP client
(registry_client.Client).  The client is kept apart because oras-py and
requests take ~0.1 s and ~9 MB to import, which a build that talks to no
registry should not pay.

Credentials: oras merges ~/.docker/config.json and the files it is given
in no fixed order.  Here the first of --creds-file, REGISTRY_AUTH_FILE,
$DOCKER_CONFIG/config.json or ~/.docker/config.json is used, the way
skopeo and podman look.  Secrets never reach argv, messages or logs.

Every failure is a `RegistryError` (a UserError: one line, no traceback);
`RegistryUnavailable` marks the ones a remote cache treats as "go on
locally" (down, timeouts, server errors).
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    from .registry_client import Client

DEFAULT_TIMEOUT = 60.0
MAX_DOCUMENT = 4 << 20     # manifests and configs; blobs are streamed

# https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pulling-manifests
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
REPOSITORY_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
HOST_RE = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
                     r"(?::[0-9]{1,5})?$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class RegistryError(UserError):
    """A registry refused, failed or sent something wrong."""


class RegistryUnavailable(RegistryError):
    """Down, not answering in time, or a server error: worth going on
    without it where that is possible (the remote cache)."""


class AuthRefused(RegistryError):
    pass


class NotFound(RegistryError):
    pass


class DigestMismatch(RegistryError):
    pass


# ---------------------------------------------------------------------------
# references


@dataclasses.dataclass(frozen=True)
class Reference:
    """host[:port]/repository[:tag][@sha256:...]; the host is required:
    nothing is pushed to or pulled from a registry the user did not name."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str, *, what: str = "REF") -> Reference:
        example = "e.g. registry.example:5000/team/rootfs:v1"
        rest, at, digest = text.partition("@")
        if at and not DIGEST_RE.match(digest):
            raise UserError(f"{what} {text!r}: the digest must be sha256:<64 hex digits>")
        host, slash, path = rest.partition("/")
        if not slash or not path or not ("." in host or ":" in host or host == "localhost"):
            raise UserError(f"{what} {text!r} does not name a registry host",
                            hint=f"write HOST[:PORT]/REPOSITORY[:TAG], {example}")
        if not HOST_RE.match(host):
            raise UserError(f"{what} {text!r}: {host!r} is not a host[:port]")
        repository, colon, tag = path.rpartition(":")
        if not colon:
            repository, tag = path, ""
        if not REPOSITORY_RE.match(repository):
            raise UserError(f"{what} {text!r}: repository {repository!r} may hold only "
                            "lowercase letters, digits, '/', '.', '_' and '-'", hint=example)
        if colon and not TAG_RE.match(tag):
            raise UserError(f"{what} {text!r}: tag {tag!r} may hold only A-Z a-z 0-9 _ . - "
                            "(at most 128, not starting with . or -)")
        return cls(host, repository, tag or None, digest or None)

    def __str__(self) -> str:
        return (f"{self.host}/{self.repository}" + (f":{self.tag}" if self.tag else "")
                + (f"@{self.digest}" if self.digest else ""))

    @property
    def repo(self) -> str:
        return f"{self.host}/{self.repository}"

    def with_tag(self, tag: str) -> Reference:
        return dataclasses.replace(self, tag=tag, digest=None)

    @property
    def loopback(self) -> bool:
        name = self.host.rsplit(":", 1)[0] if not self.host.startswith("[") else \
            self.host[1:self.host.index("]")]
        if name == "localhost":
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False


# ---------------------------------------------------------------------------
# credentials


@dataclasses.dataclass(frozen=True)
class Credentials:
    username: str
    password: str = dataclasses.field(repr=False)
    source: str = ""           # the file they came from, for messages

    def basic(self) -> str:
        return "Basic " + base64.b64encode(
            f"{self.username}:{self.password}".encode()).decode()


def auth_files(creds_file: Path | None) -> list[tuple[Path, bool]]:
    """(file, given explicitly) in the order they are consulted."""
    if creds_file is not None:
        return [(creds_file, True)]
    out: list[tuple[Path, bool]] = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        out.append((Path(os.environ["REGISTRY_AUTH_FILE"]), True))
    docker_dir = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"),
                                                                 ".docker")
    out.append((Path(docker_dir) / "config.json", False))
    return out


def _host_of(key: str) -> str:
    key = re.sub(r"^[a-z]+://", "", key.strip())
    return key.split("/", 1)[0]


def find_credentials(host: str, creds_file: Path | None) -> Credentials | None:
    """The first entry for `host` in the auth files (docker config.json /
    containers auth.json format: auths.<host>.auth = base64(user:password))."""
    for path, explicit in auth_files(creds_file):
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            if explicit:
                raise UserError("credentials file not found", where=str(path)) from None
            continue
        except OSError as e:
            raise UserError(f"cannot read the credentials file: {e.strerror}",
                            where=str(path)) from None
        try:
            doc = json.loads(raw)
            auths = doc.get("auths") or {}
            if not isinstance(auths, dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError, AttributeError):
            raise UserError("not a credentials file (expected JSON with \"auths\")",
                            where=str(path), hint="see docker config.json / containers "
                                                  "auth.json") from None
        for key, entry in auths.items():
            if _host_of(key) != host or not isinstance(entry, dict):
                continue
            if isinstance(entry.get("auth"), str) and entry["auth"]:
                try:
                    user, sep, password = base64.b64decode(entry["auth"]).decode().partition(
                        ":")
                except (ValueError, UnicodeDecodeError):
                    sep = ""
                if not sep:
                    raise UserError(f"auths.{key}.auth is not base64 of user:password",
                                    where=str(path))
                return Credentials(user, password, str(path))
            if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
                return Credentials(entry["username"], entry["password"], str(path))
        helpers = doc.get("credHelpers") or {}
        if isinstance(helpers, dict) and any(_host_of(k) == host for k in helpers):
            raise UserError(f"the credentials for {host} are in a credential helper, which "
                            "rootfs-build does not run", where=str(path),
                            hint="write them to a file for --creds-file or REGISTRY_AUTH_FILE "
                                 "(e.g. podman login --authfile FILE)")
    return None


# ---------------------------------------------------------------------------
# options shared by push, pull and the remote cache


@dataclasses.dataclass(frozen=True)
class Options:
    """How to reach registries (shared by push, pull and the remote cache)."""

    ca_file: Path | None = None       # trust this CA (PEM) instead of the system's
    insecure: bool = False            # plain HTTP, loopback registries only
    creds_file: Path | None = None
    timeout: float = DEFAULT_TIMEOUT  # seconds to connect, and between bytes read


def connect(ref: Reference, opts: Options) -> Client:
    """A client for `ref`'s registry, with the credentials and TLS tried
    once (ping), so a refusal is reported before any work.  The only place
    that loads registry_client: oras-py and requests cost ~0.1 s and ~9 MB
    to import, which a build that talks to no registry does not pay."""
    from .registry_client import Client

    client = Client(ref, opts)
    client.ping()
    return client
