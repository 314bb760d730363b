"""The registry HTTP client (the distribution API) through oras-py.

`Client` is oras-py's `Registry` (reference URLs, blob HEAD/GET, upload
locations, tag listing, its requests session) with the parts that fall
short for rootfs-build overridden; each was seen against the real registry
the tests run (CNCF distribution 2.8) with oras 0.2.x:

- `do_request`: oras retries every failure five times with 3**n s of
  backoff, so a registry that is down is reported after ~130 s, and it sets
  no timeout, so one that stops answering hangs forever.  Here: one attempt
  with connect/read timeouts, and authentication negotiated from the
  registry's challenge -- Basic (htpasswd registries) or Bearer tokens.
  oras's default token backend turns a Basic challenge into a token request
  to the realm's name ("Invalid URL", after those retries).
- `upload_manifest`: oras serializes the manifest dict again (`json=`), so
  the registry stores other bytes under another digest than the layout's
  manifest.  Here the exact bytes are PUT with their media type.
- `put_upload`: oras reads the whole blob into memory.  Here it is streamed
  from the file with its length; `push_blob_stream` streams data whose
  digest is known only at the end (POST, streamed PATCH, PUT ?digest=).
- downloads: oras does not check digests.  `fetch_blob` hashes every byte
  as it is written and refuses a blob that does not match.
- credentials come from registry.find_credentials.

registry.connect is the one place that imports it (and pings): oras-py and
requests take ~0.1 s and ~9 MB to import, which a build that talks to no
registry does not pay.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import oras.auth.utils
import oras.container
import oras.provider
import oras.utils
import requests

from .errors import UserError
from .hashing import CHUNK
from .registry import (
    DIGEST_RE,
    MAX_DOCUMENT,
    AuthRefused,
    DigestMismatch,
    NotFound,
    Options,
    Reference,
    RegistryError,
    RegistryUnavailable,
    auth_files,
    find_credentials,
)

# CNCF distribution rewrites a repository's link to a blob in place, so while
# another client pushes the same blob, a manifest naming it can be refused
# with these codes although both uploads succeeded (two processes pushing the
# same 200 manifests at once had 2-4 of the 400 PUTs refused so, none on a
# second try), and a HEAD or GET of the blob can fail with HTTP 500 (~80 of
# 1,800 HEADs while the blob was uploaded again and again).  Such a refusal
# or failure is retried after each of these pauses (s).
_MANIFEST_RACE_CODES = frozenset({"MANIFEST_BLOB_UNKNOWN", "DIGEST_INVALID"})
RACE_RETRY_PAUSES = (0.2, 1.0, 3.0)
_BLOB_PATH = re.compile(r"/blobs/[a-z0-9]+:[0-9a-f]+$")


def _reads_a_blob(method: str, url: str) -> bool:
    """A HEAD or GET of a blob by digest (not an upload session)."""
    return method in ("HEAD", "GET") and bool(_BLOB_PATH.search(url.split("?", 1)[0]))


def _retried_through_races(send: Callable[[], requests.Response],
                           raced: Callable[[requests.Response], bool]) -> requests.Response:
    """send()'s answer, sent again after each of RACE_RETRY_PAUSES while
    `raced` says the answer is what a concurrent push of the same blob
    explains; the last answer whatever it is."""
    response = send()
    for pause in RACE_RETRY_PAUSES:
        if not raced(response):
            break
        response.close()
        time.sleep(pause)
        response = send()
    return response


def _error_codes(r: requests.Response) -> list[tuple[str, str]]:
    """(code, message) of each error in a registry's JSON error answer."""
    try:
        errors = r.json().get("errors") or []
        return [(str(e.get("code", "")), str(e.get("message", ""))) for e in errors
                if isinstance(e, dict)]
    except (ValueError, AttributeError):
        return []


def _reason(exc: BaseException) -> str:
    text = str(exc)
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if m:
        return m.group(1).strip()
    m = re.search(r"certificate verify failed: ([^(')]+)", text)
    if m:
        return f"certificate verify failed: {m.group(1).strip()}"
    m = re.search(r"\[SSL(?:: [A-Z_]+)?\] ([^(')]+)", text) or \
        re.search(r"\w+Error\(-?\d+, '([^'(]+)", text)
    if m:
        return m.group(1).strip()
    return type(exc).__name__


def _unavailable(host: str, exc: BaseException) -> RegistryUnavailable:
    """A connection that could not be made, or broke off."""
    text = str(exc)
    if "NewConnectionError" in text or "Failed to establish" in text or \
            "NameResolutionError" in text:
        return RegistryUnavailable(f"{host}: cannot reach the registry ({_reason(exc)})")
    return RegistryUnavailable(f"{host}: the connection broke off ({_reason(exc)})")


class _Body:
    """A request body streamed from a file in CHUNK blocks (no `read`, so
    http.client iterates it instead of reading 8 KiB at a time)."""

    def __init__(self, path: Path, size: int, progress: Callable[[int], None] | None):
        self.path = path
        self.size = size
        self.progress = progress

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        with open(self.path, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
                sent += len(chunk)
                if self.progress:
                    self.progress(len(chunk))
                _test_stop_in_blob(sent)
        if sent != self.size:
            raise UserError(f"{self.path} changed while it was uploaded")


def _test_stop_in_blob(sent: int) -> None:
    # Lets a test stop the registry in the middle of an upload, at a known point.
    if os.environ.get("ROOTFS_BUILD_TEST_STOP_IN_BLOB") and sent >= CHUNK:
        del os.environ["ROOTFS_BUILD_TEST_STOP_IN_BLOB"]
        os.kill(os.getpid(), signal.SIGSTOP)


class Client(oras.provider.Registry):
    """One registry host, one repository at a time (given per call)."""

    def __init__(self, ref: Reference, opts: Options):
        if opts.insecure and not ref.loopback:
            raise UserError(f"--insecure (plain HTTP) is only allowed for a registry on this "
                            f"machine; {ref.host} is not", hint="use TLS (--ca-file for a "
                                                                "private CA)")
        if opts.ca_file is not None and not opts.ca_file.is_file():
            raise UserError("CA file not found", where=str(opts.ca_file))
        verify: bool | str = True
        if opts.ca_file is not None:
            verify = str(opts.ca_file)
        elif not os.environ.get("REQUESTS_CA_BUNDLE"):
            system = ssl.get_default_verify_paths().cafile
            if system and os.path.isfile(system):
                verify = system   # the system's roots (a site CA installed there works)
        super().__init__(hostname=ref.host, insecure=opts.insecure, tls_verify=verify,
                         auth_backend="basic")
        self.ref = ref
        self.opts = opts
        self.creds = find_credentials(ref.host, opts.creds_file)
        self._authorization: str | None = None     # header value once negotiated
        self._tokens: dict[str, str] = {}           # bearer scope -> token
        self.bytes_up = 0
        self.bytes_down = 0

    # -- requests ------------------------------------------------------------
    def url(self, path: str) -> str:
        return f"{self.prefix}://{self.ref.host}{path}"

    def container(self, ref: Reference) -> oras.container.Container:
        return oras.container.Container(ref.repository + (f":{ref.tag}" if ref.tag else ""),
                                        registry=ref.host)

    def do_request(self, url: str, method: str = "GET", data: Any = None,
                   headers: dict | None = None, json: dict | None = None,
                   stream: bool = False) -> requests.Response:
        """One request with timeouts and negotiated authentication (see the
        module docstring for why oras's version is replaced); a read of a
        blob that fails with a server error is sent again after each of
        RACE_RETRY_PAUSES."""
        del json  # every body here is bytes or a stream
        headers = dict(headers or {})
        reads_a_blob = _reads_a_blob(method, url)
        response = _retried_through_races(
            lambda: self._authorized(method, url, data, headers, stream),
            lambda r: reads_a_blob and r.status_code >= 500)
        if response.status_code >= 500:
            response.close()
            raise RegistryUnavailable(f"{self.ref.host}: server error (HTTP "
                                      f"{response.status_code}) on {method} "
                                      f"{_shown_path(url)}")
        return response

    def _authorized(self, method: str, url: str, data: Any, headers: dict,
                    stream: bool) -> requests.Response:
        """The request, answering the registry's authentication challenges."""
        rewindable = data is None or isinstance(data, bytes)
        for attempt in range(3):
            if self._authorization:
                headers["Authorization"] = self._authorization
            response = self._send(method, url, data, headers, stream)
            if response.status_code != 401 or attempt == 2:
                break
            challenge = response.headers.get("WWW-Authenticate", "")
            response.close()
            if not self._answer(challenge):
                break
            if not rewindable:
                raise RegistryError(f"{self.ref.host} asked for authentication in the middle "
                                    "of an upload", hint="push again")
        if response.status_code == 401:
            raise self._refused(response.status_code)
        return response

    def _send(self, method: str, url: str, data: Any, headers: dict,
              stream: bool) -> requests.Response:
        try:
            return self.session.request(method, url, data=data, headers=headers, stream=stream,
                                        verify=self._tls_verify, allow_redirects=True,
                                        timeout=(self.opts.timeout, self.opts.timeout))
        except requests.exceptions.SSLError as e:
            if "certificate verify failed" not in str(e).lower() and \
                    "wrong version number" not in str(e).lower():
                # not about trust: the connection broke during the handshake or a transfer
                raise _unavailable(self.ref.host, e) from None
            raise RegistryError(f"{self.ref.host}: TLS: {_reason(e)}",
                                hint="pass --ca-file with the registry's CA certificate, or "
                                     "--insecure for a plain-HTTP registry on this machine"
                                ) from None
        except requests.exceptions.Timeout:
            raise RegistryUnavailable(f"{self.ref.host}: no answer within "
                                      f"{self.opts.timeout:g} s") from None
        except requests.exceptions.RequestException as e:
            raise _unavailable(self.ref.host, e) from None

    def _answer(self, challenge: str) -> bool:
        """Set self._authorization for a 401 challenge; False if nothing more
        can be tried."""
        scheme = challenge.split(" ", 1)[0].lower()
        if scheme == "basic":
            if self.creds is None or self._authorization == self.creds.basic():
                return False
            self._authorization = self.creds.basic()
            return True
        if scheme == "bearer":
            h = oras.auth.utils.parse_auth_header(challenge)
            scope = h.scope or ""
            if scope in self._tokens and self._authorization == f"Bearer {self._tokens[scope]}":
                return False
            if scope not in self._tokens:
                self._tokens[scope] = self._token(h.realm, h.service, scope)
            self._authorization = f"Bearer {self._tokens[scope]}"
            return True
        return False

    def _token(self, realm: str | None, service: str | None, scope: str) -> str:
        if not realm or not realm.startswith(("https://", "http://")):
            raise RegistryError(f"{self.ref.host}: its token challenge has no usable realm")
        params = {k: v for k, v in (("service", service), ("scope", scope)) if v}
        headers = {"Authorization": self.creds.basic()} if self.creds else {}
        try:
            r = self.session.get(realm, params=params, headers=headers, verify=self._tls_verify,
                                 timeout=(self.opts.timeout, self.opts.timeout))
        except requests.exceptions.Timeout:
            raise RegistryUnavailable(f"{self.ref.host}: its token service did not answer "
                                      f"within {self.opts.timeout:g} s") from None
        except requests.exceptions.RequestException as e:
            raise RegistryUnavailable(f"{self.ref.host}: cannot reach its token service "
                                      f"({_reason(e)})") from None
        if r.status_code in (401, 403):
            raise self._refused(r.status_code)
        try:
            doc = r.json()
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if r.status_code != 200 or not isinstance(token, str):
            raise RegistryError(f"{self.ref.host}: its token service answered HTTP "
                                f"{r.status_code} without a token")
        return token

    def _refused(self, status: int) -> AuthRefused:
        where = " or ".join(str(p) for p, _ in auth_files(self.opts.creds_file))
        if self.creds is None:
            return AuthRefused(f"{self.ref.host} refused access without credentials (HTTP "
                               f"{status})", hint=f"log in: put credentials for {self.ref.host} "
                                                  f"in {where}, or pass --creds-file FILE")
        return AuthRefused(f"{self.ref.host} refused the credentials of user "
                           f"{self.creds.username!r} from {self.creds.source} (HTTP {status})",
                           hint="check the user name and password in that file")

    def _check(self, r: requests.Response, what: str, ok: Iterable[int] = (200, 201, 202)
               ) -> requests.Response:
        if r.status_code in ok:
            return r
        if r.status_code == 404:
            raise NotFound(f"{what}: not found")
        if r.status_code == 403:
            raise self._refused(403)
        message = "; ".join(f"{code}: {text}" for code, text in _error_codes(r))
        message = " ".join(message.split())[:200]
        raise RegistryError(f"{what}: the registry answered HTTP {r.status_code}"
                            + (f" ({message})" if message else ""))

    # -- the API ---------------------------------------------------------------------
    def ping(self) -> None:
        """GET /v2/: the registry answers and accepts our credentials (or
        needs none)."""
        r = self.do_request(self.url("/v2/"))
        r.close()
        if r.status_code != 200:
            self._check(r, f"{self.ref.host}: /v2/")

    def push_blob_file(self, ref: Reference, path: Path, digest: str, size: int,
                       progress: Callable[[int], None] | None = None) -> bool:
        """Upload a blob from a file unless the repository has it; True if
        uploaded.  The registry checks the bytes against `digest`."""
        container = self.container(ref)
        if self.blob_exists({"digest": digest}, container):
            return False
        r = self.put_upload(str(path), container, {"digest": digest, "size": size},
                            progress=progress)
        self._check(r, f"{ref.repo}: upload of blob {digest}")
        self.bytes_up += size
        return True

    def put_upload(self, blob: str, container: oras.container.Container, layer: dict,
                   progress: Callable[[int], None] | None = None) -> requests.Response:
        """oras's put_upload, streaming the file instead of reading it whole."""
        location = self._start_upload(container)
        url = oras.utils.append_url_params(location, {"digest": layer["digest"]})
        return self.do_request(url, "PUT", data=_Body(Path(blob), layer["size"], progress),
                               headers={"Content-Type": "application/octet-stream",
                                        "Content-Length": str(layer["size"])})

    def _start_upload(self, container: oras.container.Container) -> str:
        r = self.do_request(f"{self.prefix}://{container.upload_blob_url()}", "POST",
                            headers={"Content-Length": "0"})
        self._check(r, f"{container.registry}/{container.api_prefix}: starting an upload")
        location = self._get_location(r, container)
        if not location:
            raise RegistryError(f"{container.registry}: an upload started without a Location")
        return location

    def push_blob_bytes(self, ref: Reference, data: bytes) -> str:
        """Upload `data` unless the repository has it; returns its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if not self.blob_exists({"digest": digest}, self.container(ref)):
            self.upload_blob_bytes(ref, digest, data)
        return digest

    def upload_blob_bytes(self, ref: Reference, digest: str, data: bytes) -> None:
        """Upload `data` as blob `digest`, whether or not the repository has
        it (the registry checks the bytes against the digest)."""
        url = oras.utils.append_url_params(self._start_upload(self.container(ref)),
                                           {"digest": digest})
        self._check(self.do_request(url, "PUT", data=data, headers={
            "Content-Type": "application/octet-stream"}),
            f"{ref.repo}: upload of blob {digest}")
        self.bytes_up += len(data)

    def push_blob_stream(self, ref: Reference, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Upload data whose digest is known only at its end: POST, one
        streamed PATCH, PUT ?digest=.  Returns (digest, size)."""
        container = self.container(ref)
        location = self._start_upload(container)
        sha = hashlib.sha256()
        size = 0

        def body() -> Iterator[bytes]:
            nonlocal size
            for chunk in chunks:
                sha.update(chunk)
                size += len(chunk)
                yield chunk

        r = self.do_request(location, "PATCH", data=body(),
                            headers={"Content-Type": "application/octet-stream"})
        self._check(r, f"{ref.repo}: streamed upload")
        location = self._get_location(r, container) or location
        digest = "sha256:" + sha.hexdigest()
        url = oras.utils.append_url_params(location, {"digest": digest})
        self._check(self.do_request(url, "PUT", data=b""), f"{ref.repo}: upload of {digest}")
        self.bytes_up += size
        return digest, size

    def upload_manifest(self, manifest: Any, container: oras.container.Container,
                        media_type: str = "", reference: str = "") -> requests.Response:
        """PUT the manifest's exact bytes (oras would serialize a dict again)."""
        assert isinstance(manifest, bytes)
        url = f"{self.prefix}://{container.manifest_url(reference or None)}"
        return self.do_request(url, "PUT", data=manifest, headers={"Content-Type": media_type})

    def put_manifest(self, ref: Reference, data: bytes, media_type: str, reference: str) -> str:
        """Store a manifest under a tag or its digest; returns its digest.  A
        refusal that a concurrent push of the same blobs explains
        (_MANIFEST_RACE_CODES) is retried."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        container = self.container(ref)
        r = _retried_through_races(
            lambda: self.upload_manifest(data, container, media_type, reference),
            lambda r: r.status_code == 400
            and bool({code for code, _ in _error_codes(r)} & _MANIFEST_RACE_CODES))
        r = self._check(r, f"{ref.repo}:{reference}: storing the manifest")
        stored = r.headers.get("Docker-Content-Digest")
        if stored and stored != digest:
            raise RegistryError(f"{ref.repo}: the registry stored the manifest as {stored}, "
                                f"not {digest}")
        self.bytes_up += len(data)
        return digest

    def manifest_digest(self, ref: Reference, reference: str, accept: str) -> str | None:
        """HEAD a manifest: its digest, or None when absent."""
        url = f"{self.prefix}://{self.container(ref).manifest_url(reference)}"
        r = self.do_request(url, "HEAD", headers={"Accept": accept})
        r.close()
        if r.status_code == 404:
            return None
        self._check(r, f"{ref.repo}:{reference}")
        return r.headers.get("Docker-Content-Digest") or ""

    def get_manifest_bytes(self, ref: Reference, reference: str, accept: str
                           ) -> tuple[bytes, str]:
        """(bytes, media type) of a manifest; checked against `reference`
        when that is a digest.  NotFound when absent."""
        url = f"{self.prefix}://{self.container(ref).manifest_url(reference)}"
        r = self._check(self.do_request(url, "GET", headers={"Accept": accept}, stream=True),
                        f"{ref.repo}:{reference}" if not reference.startswith("sha256:")
                        else f"{ref.repo}@{reference}")
        data = self._read_capped(r, f"{ref.repo}:{reference}: manifest")
        if DIGEST_RE.match(reference) and "sha256:" + hashlib.sha256(data).hexdigest() \
                != reference:
            raise DigestMismatch(f"{ref.repo}@{reference}: the manifest does not match its "
                                 "digest")
        media_type = r.headers.get("Content-Type", "").split(";")[0].strip()
        return data, media_type

    def _read_capped(self, r: requests.Response, what: str) -> bytes:
        out = bytearray()
        try:
            for chunk in r.iter_content(CHUNK):
                out += chunk
                if len(out) > MAX_DOCUMENT:
                    raise RegistryError(f"{what} is larger than {MAX_DOCUMENT >> 20} MiB")
        except requests.exceptions.RequestException as e:
            raise RegistryUnavailable(f"{self.ref.host}: transfer broke off ({_reason(e)})"
                                      ) from None
        finally:
            r.close()
        self.bytes_down += len(out)
        return bytes(out)

    def fetch_blob(self, ref: Reference, digest: str, size: int,
                   write: Callable[[bytes], Any],
                   progress: Callable[[int], None] | None = None) -> None:
        """Stream a blob into `write`, hashing it; DigestMismatch when the
        bytes are not `digest` / `size` (the caller discards what it wrote)."""
        r = self._check(self.get_blob(self.container(ref), digest, stream=True),
                        f"{ref.repo}: blob {digest}")
        sha = hashlib.sha256()
        got = 0
        try:
            for chunk in r.iter_content(CHUNK):
                got += len(chunk)
                if got > size:
                    break
                sha.update(chunk)
                write(chunk)
                if progress:
                    progress(len(chunk))
        except requests.exceptions.RequestException as e:
            raise RegistryUnavailable(f"{self.ref.host}: transfer of {digest} broke off "
                                      f"({_reason(e)})") from None
        finally:
            r.close()
        self.bytes_down += got
        if got != size or "sha256:" + sha.hexdigest() != digest:
            raise DigestMismatch(f"{ref.repo}: blob {digest} does not match its digest"
                                 + (f" ({got} bytes, expected {size})" if got != size else ""),
                                 hint="the registry's copy is damaged or was tampered with; "
                                      "push it again")

    def fetch_blob_bytes(self, ref: Reference, digest: str, size: int) -> bytes:
        if size > MAX_DOCUMENT:
            raise RegistryError(f"{ref.repo}: blob {digest} is too large for a document "
                                f"({size} bytes)")
        out = bytearray()
        self.fetch_blob(ref, digest, size, out.extend)
        return bytes(out)


def _shown_path(url: str) -> str:
    """A request path for messages: no query (upload state), no host."""
    path = re.sub(r"^[a-z]+://[^/]+", "", url).split("?", 1)[0]
    return re.sub(r"/blobs/uploads/[^/]+$", "/blobs/uploads/...", path)

