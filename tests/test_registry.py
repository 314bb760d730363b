"""Push and pull against a real registry (CNCF distribution on 127.0.0.1,
TLS from a throwaway CA, htpasswd users), with output directories made
without the appliance (tests/oci_helpers.py), through the real CLI."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REGISTRY_PASSWORD, REGISTRY_USER, one_error_line, registry_args, run_cli
from oci_helpers import leftovers, make_output, tree_files

from builder import oci
from builder.errors import UserError
from builder.localregistry import LocalRegistry
from builder.registry import Options, Reference, find_credentials
from builder.registry_client import Client

REPO = Path(__file__).resolve().parent.parent


def no_ambient_creds(tmp_path: Path) -> dict[str, str]:
    """An environment where only --creds-file can give credentials."""
    return {"REGISTRY_AUTH_FILE": "", "DOCKER_CONFIG": str(tmp_path / "no-docker-config"),
            "HOME": str(tmp_path)}


def skopeo_digest(ref: str, *extra: str) -> str:
    raw = subprocess.run(["skopeo", "inspect", "--raw", *extra, ref], check=True,
                         capture_output=True).stdout
    return oci.sha256_digest(raw)


def test_push_then_pull_elsewhere_is_byte_identical(registry, tmp_path: Path) -> None:
    src = make_output(tmp_path / "machine-a" / "out", seed="push-pull")
    ref = f"{registry.host}/team/demo:v1"
    env = no_ambient_creds(tmp_path)
    pushed = run_cli("push", src, ref, *registry_args(registry), "--json", env=env)
    assert pushed.returncode == 0, pushed.stderr
    layout = oci.read_layout(src / oci.LAYOUT_DIR)
    assert pushed.json["digest"] == layout.manifest.digest
    assert registry.tags("team/demo") == ["v1", "v1.bundle"]
    # the registry holds the layout's exact manifest bytes
    assert skopeo_digest(f"docker://{ref}", "--cert-dir", str(registry.cert_dir),
                         "--authfile", str(registry.auth_file(REGISTRY_USER))) \
        == layout.manifest.digest
    # rootfs.tar.zst and the zstd layer are one blob: pushed once
    assert pushed.json["bytes"] < (src / "rootfs.tar.zst").stat().st_size * 1.1

    again = run_cli("push", src, ref, *registry_args(registry), "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert again.json["bytes"] < 20_000, "a second push sends manifests only"

    out_b = tmp_path / "machine-b" / "elsewhere"
    pulled = run_cli("pull", ref, "-o", out_b, *registry_args(registry), "--json", env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.json["digest"] == layout.manifest.digest
    # rootfs.tar.zst is the layer: fetched once, copied
    assert pulled.json["bytes"] < (src / "rootfs.tar.zst").stat().st_size * 1.1
    assert tree_files(out_b) == tree_files(src.parent)   # the directory and the bundle tar
    check = subprocess.run(["sha256sum", "-c", "--strict", "--quiet", "SHA256SUMS"],
                           cwd=out_b / "demo", capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert leftovers(out_b) == ["demo", "demo.bundle.tar"]


def test_mirrored_with_skopeo_then_pulled(registry, tmp_path: Path) -> None:
    """The offline-site path of the README: skopeo copy --all of both tags
    into another registry (here another repository), then rootfs-build pull."""
    src = make_output(tmp_path / "out", seed="mirror")
    env = no_ambient_creds(tmp_path)
    ref = f"{registry.host}/release/demo:2.0"
    assert run_cli("push", src, ref, *registry_args(registry), env=env).returncode == 0
    auth = str(registry.auth_file(REGISTRY_USER))
    certs = str(registry.cert_dir)
    for tag in ("2.0", "2.0.bundle"):
        subprocess.run(["skopeo", "copy", "--all", "--quiet", "--authfile", auth,
                        "--src-cert-dir", certs, "--dest-cert-dir", certs,
                        f"docker://{registry.host}/release/demo:{tag}",
                        f"docker://{registry.host}/site-mirror/demo:{tag}"], check=True)
    out = tmp_path / "site"
    res = run_cli("pull", f"{registry.host}/site-mirror/demo:2.0", "-o", out,
                  *registry_args(registry), env=env)
    assert res.returncode == 0, res.stderr
    assert tree_files(out) == tree_files(src.parent)


def test_skopeo_copies_the_layout_to_the_registry_and_back(registry, tmp_path: Path) -> None:
    src = make_output(tmp_path / "out", seed="skopeo", compression="gzip")
    layout = oci.read_layout(src / oci.LAYOUT_DIR)
    assert layout.layers[0].media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
    auth, certs = str(registry.auth_file(REGISTRY_USER)), str(registry.cert_dir)
    dest = f"docker://{registry.host}/skopeo/demo:gz"
    subprocess.run(["skopeo", "copy", "--quiet", "--authfile", auth, "--dest-cert-dir", certs,
                    f"oci:{src / oci.LAYOUT_DIR}", dest], check=True)
    assert skopeo_digest(dest, "--authfile", auth, "--cert-dir", certs) \
        == layout.manifest.digest
    back = tmp_path / "back"
    subprocess.run(["skopeo", "copy", "--quiet", "--authfile", auth, "--src-cert-dir", certs,
                    dest, f"oci:{back}:gz"], check=True)
    assert skopeo_digest(f"oci:{back}:gz") == layout.manifest.digest


def test_anonymous_push_is_refused_in_one_line(registry, tmp_path: Path) -> None:
    src = make_output(tmp_path / "out", seed="anon")
    res = run_cli("push", src, f"{registry.host}/anon/demo:v1", "--ca-file", registry.ca_file,
                  env=no_ambient_creds(tmp_path))
    assert res.returncode != 0
    line = one_error_line(res.stderr)
    assert "refused access without credentials (HTTP 401)" in line, line
    assert "--creds-file" in line
    assert registry.tags("anon/demo") == []


@pytest.mark.parametrize("verbose", [False, True])
def test_wrong_password_is_refused_without_printing_it(registry, tmp_path: Path,
                                                       verbose: bool) -> None:
    src = make_output(tmp_path / "out", seed="wrong-password")
    wrong = "Wr0ng-Secret-4-this-test"
    creds = registry.auth_file(REGISTRY_USER, wrong, name="wrong")
    res = run_cli("push", src, f"{registry.host}/wrong/demo:v1", "--ca-file", registry.ca_file,
                  "--creds-file", creds, *(["-v"] if verbose else []),
                  env=no_ambient_creds(tmp_path))
    assert res.returncode != 0
    if not verbose:
        line = one_error_line(res.stderr)
        assert f"refused the credentials of user '{REGISTRY_USER}' from {creds}" in line, line
    everything = res.stdout + res.stderr
    for secret in (wrong, REGISTRY_PASSWORD,
                   base64.b64encode(f"{REGISTRY_USER}:{wrong}".encode()).decode()):
        assert secret not in everything
    assert registry.tags("wrong/demo") == []


def test_tls_is_verified_unless_told_which_ca(registry, tmp_path: Path) -> None:
    src = make_output(tmp_path / "out", seed="tls")
    res = run_cli("push", src, f"{registry.host}/tls/demo:v1", "--creds-file",
                  registry.auth_file(REGISTRY_USER), env=no_ambient_creds(tmp_path))
    assert res.returncode != 0
    line = one_error_line(res.stderr)
    assert "TLS: certificate verify failed" in line and "--ca-file" in line, line
    assert registry.tags("tls/demo") == []


def test_plain_http_only_with_insecure_and_only_on_this_machine(tmp_path: Path) -> None:
    src = make_output(tmp_path / "out", seed="insecure")
    env = no_ambient_creds(tmp_path)
    res = run_cli("push", src, "192.0.2.1:5000/x/demo:v1", "--insecure", env=env)
    assert res.returncode != 0
    assert "only allowed for a registry on this machine" in one_error_line(res.stderr)
    with LocalRegistry(tmp_path / "plain", tls=False) as plain:
        ref = f"{plain.host}/x/demo:v1"
        res = run_cli("push", src, ref, env=env)   # https to a plain-HTTP registry
        assert res.returncode != 0
        one_error_line(res.stderr)
        assert plain.tags("x/demo") == []
        assert run_cli("push", src, ref, "--insecure", env=env).returncode == 0
        res = run_cli("pull", ref, "--insecure", "-o", tmp_path / "pulled", env=env)
        assert res.returncode == 0, res.stderr
        assert tree_files(tmp_path / "pulled") == tree_files(src.parent)


def test_a_blob_asked_for_while_another_client_uploads_it_again_is_found(
        tmp_path: Path) -> None:
    """The same race on the read side (the suite on two workers, once in
    about 18 minutes): CNCF distribution answered a HEAD of a blob with
    HTTP 500 while the other client's upload of that blob rewrote its link,
    and the build lost its remote cache.  One client uploads the same blob
    over and over while the other asks for it (HEAD, then GET): ~100 of
    3,200 HEADs in 10 s were refused so before the client asked again;
    every answer here must be the blob."""
    import threading

    with LocalRegistry(tmp_path / "reg", tls=False) as reg:
        ref = Reference.parse(f"{reg.host}/cache/race")
        data = b"the same config" * 64
        uploader, reader = Client(ref, Options(insecure=True)), Client(ref, Options(insecure=True))
        digest = uploader.push_blob_bytes(ref, data)
        stop = time.monotonic() + 6
        failures: list[str] = []
        asked = uploads = 0

        def upload_again() -> None:
            nonlocal uploads
            while time.monotonic() < stop:
                try:
                    uploader.upload_blob_bytes(ref, digest, data)
                except UserError as e:
                    failures.append(f"upload: {e}")
                uploads += 1

        thread = threading.Thread(target=upload_again)
        thread.start()
        try:
            container = reader.container(ref)
            while time.monotonic() < stop:
                asked += 1
                try:
                    if not reader.blob_exists({"digest": digest}, container):
                        failures.append("HEAD: absent")
                    if asked % 8 == 0 and reader.fetch_blob_bytes(ref, digest, len(data)) != data:
                        failures.append("GET: other bytes")
                except UserError as e:
                    failures.append(str(e))
        finally:
            thread.join(timeout=60)
        assert asked > 50 and uploads > 50, (asked, uploads)
        assert not failures, f"{len(failures)} of {asked}: {failures[:2]}"


def test_two_clients_pushing_the_same_manifests_at_once_both_store_them(
        tmp_path: Path) -> None:
    """Two builds pushing the same cache entries at once (test_oci_e2e, in
    the suite's first run on two workers): the registry refused a manifest
    with DIGEST_INVALID and MANIFEST_BLOB_UNKNOWN while the other client's
    push of the same blob rewrote its link.  Here 2-4 of the 400 PUTs were
    refused so before the client retried them; every one must be stored."""
    import threading

    rounds = 200
    with LocalRegistry(tmp_path / "reg", tls=False) as reg:
        ref = Reference.parse(f"{reg.host}/cache/race")
        barrier = threading.Barrier(2)
        failures: list[str] = []

        def push_all() -> None:
            client = Client(ref, Options(insecure=True))
            for i in range(rounds):
                data = i.to_bytes(4, "big") * 256
                config = oci.canonical_json({"round": i})
                barrier.wait(timeout=60)
                try:
                    digest, size = client.push_blob_stream(ref, iter([data]))
                    manifest = oci.canonical_json({
                        "schemaVersion": 2, "mediaType": oci.MEDIA_MANIFEST,
                        "config": oci.Descriptor("application/vnd.rb.test+json",
                                                 client.push_blob_bytes(ref, config),
                                                 len(config)).to_json(),
                        "layers": [oci.Descriptor("application/octet-stream", digest,
                                                  size).to_json()]})
                    client.put_manifest(ref, manifest, oci.MEDIA_MANIFEST, f"round-{i}")
                except UserError as e:
                    failures.append(f"round {i}: {e}")

        threads = [threading.Thread(target=push_all) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not failures, failures[:3]
        assert len(reg.tags("cache/race")) == rounds


def test_tampered_blob_on_pull_is_refused(registry, tmp_path: Path) -> None:
    src = make_output(tmp_path / "out", seed="tamper")
    env = no_ambient_creds(tmp_path)
    ref = f"{registry.host}/tamper/demo:v1"
    assert run_cli("push", src, ref, *registry_args(registry), env=env).returncode == 0
    layer = oci.read_layout(src / oci.LAYOUT_DIR).layers[0]
    blob = registry.blob_file(layer.digest)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF                      # same size, one byte changed
    blob.write_bytes(bytes(data))
    out = tmp_path / "pulled"
    res = run_cli("pull", ref, "-o", out, *registry_args(registry), env=env)
    assert res.returncode != 0
    line = one_error_line(res.stderr)
    assert f"blob {layer.digest} does not match its digest" in line, line
    assert leftovers(out) == [], "nothing half-written"


def test_pull_refuses_a_bundle_that_belongs_to_another_image(registry, tmp_path: Path) -> None:
    env = no_ambient_creds(tmp_path)
    one = make_output(tmp_path / "one", seed="one")
    two = make_output(tmp_path / "two", seed="two")
    base = f"{registry.host}/mixed/demo"
    for d, tag in ((one, "v1"), (two, "v2")):
        assert run_cli("push", d, f"{base}:{tag}", *registry_args(registry),
                       env=env).returncode == 0
    # what a re-push of `two` as v1 that stopped before its last step leaves
    opts = Options(ca_file=registry.ca_file, creds_file=registry.auth_file(REGISTRY_USER))
    ref = Reference.parse(f"{base}:v1")
    client = Client(ref, opts)
    data, _ = client.get_manifest_bytes(ref, "v2.bundle", oci.MEDIA_MANIFEST)
    client.put_manifest(ref, data, oci.MEDIA_MANIFEST, "v1.bundle")
    out = tmp_path / "pulled"
    res = run_cli("pull", f"{base}:v1", "-o", out, *registry_args(registry), env=env)
    assert res.returncode != 0
    assert "the bundle belongs to another image" in one_error_line(res.stderr)
    assert leftovers(out) == []


def _wait_stopped(pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.05)
    raise AssertionError("the push did not reach the stop point")


def test_registry_stopped_in_the_middle_of_a_push(tmp_path: Path) -> None:
    """The registry dies while the layer is being uploaded: no tag points at
    anything, a pull says so, and the next push completes."""
    src = make_output(tmp_path / "out", seed="interrupted", size=4 << 20)
    env = no_ambient_creds(tmp_path)
    reg = LocalRegistry(tmp_path / "reg", tls=True, users={REGISTRY_USER: REGISTRY_PASSWORD})
    reg.start()
    try:
        ref = f"{reg.host}/stopped/demo:v1"
        cmd = [sys.executable, "-m", "builder.cli", "push", str(src), ref, *registry_args(reg)]
        push = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, **env,
                                                "ROOTFS_BUILD_TEST_STOP_IN_BLOB": "1"})
        _wait_stopped(push.pid)                 # 1 MiB of the layer sent
        reg.stop()                              # SIGKILL, mid-upload
        reg.start()                             # same port, same storage
        os.kill(push.pid, signal.SIGCONT)
        _, stderr = push.communicate(timeout=120)
        assert push.returncode != 0
        assert "the connection broke off" in one_error_line(stderr)
        assert reg.tags("stopped/demo") == []
        res = run_cli("pull", ref, "-o", tmp_path / "p1", *registry_args(reg), env=env)
        assert res.returncode != 0
        assert "no such image" in one_error_line(res.stderr)
        assert leftovers(tmp_path / "p1") == []

        res = run_cli("push", src, ref, *registry_args(reg), env=env)
        assert res.returncode == 0, res.stderr
        assert reg.tags("stopped/demo") == ["v1", "v1.bundle"]
        res = run_cli("pull", ref, "-o", tmp_path / "p2", *registry_args(reg), env=env)
        assert res.returncode == 0, res.stderr
        assert tree_files(tmp_path / "p2") == tree_files(src.parent)
    finally:
        reg.stop()


def test_push_refuses_a_directory_that_changed_after_the_build(registry, tmp_path: Path
                                                                ) -> None:
    src = make_output(tmp_path / "out", seed="changed")
    (src / "dpu" / "prepare.sh").write_text("#!/bin/bash\necho edited\n")
    res = run_cli("push", src, f"{registry.host}/changed/demo:v1", *registry_args(registry),
                  env=no_ambient_creds(tmp_path))
    assert res.returncode != 0
    assert "dpu/prepare.sh does not match SHA256SUMS" in one_error_line(res.stderr)
    assert registry.tags("changed/demo") == []


@pytest.mark.parametrize("text, message", [
    ("demo:v1", "does not name a registry host"),
    ("127.0.0.1:5000/Team/demo:v1", "may hold only lowercase"),
    ("127.0.0.1:5000/team/demo:-v1", "tag '-v1'"),
    ("127.0.0.1:5000/team/demo@sha256:abc", "sha256:<64 hex digits>"),
])
def test_bad_references_are_one_clear_line(text: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        Reference.parse(text)
    assert message in str(err.value)
    res = run_cli("pull", text, "-o", tmp_path, env=no_ambient_creds(tmp_path))
    assert res.returncode == 2 and message in one_error_line(res.stderr)


def test_references_parse() -> None:
    r = Reference.parse("localhost:5000/a/b.c_d:1.0-rc")
    assert (r.host, r.repository, r.tag, r.digest) == ("localhost:5000", "a/b.c_d", "1.0-rc", None)
    assert r.loopback and str(r) == "localhost:5000/a/b.c_d:1.0-rc"
    d = "sha256:" + "0" * 64
    r = Reference.parse(f"[::1]:5000/x@{d}")
    assert r.loopback and r.digest == d and r.tag is None
    assert not Reference.parse("192.0.2.1:5000/x:y").loopback


def test_credentials_come_from_the_first_file_that_has_them(tmp_path: Path,
                                                            monkeypatch) -> None:
    def auth(path: Path, user: str, host: str = "127.0.0.1:5000") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        token = base64.b64encode(f"{user}:pw-{user}".encode()).decode()
        path.write_text(json.dumps({"auths": {f"https://{host}/v1/": {"auth": token}}}))
        return path

    docker = auth(tmp_path / "docker" / "config.json", "from-docker")
    registry_file = auth(tmp_path / "auth.json", "from-env")
    explicit = auth(tmp_path / "creds.json", "from-flag")
    monkeypatch.setenv("DOCKER_CONFIG", str(docker.parent))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    c = find_credentials("127.0.0.1:5000", None)
    assert c is not None and c.username == "from-docker" and c.password == "pw-from-docker"
    assert "pw-" not in repr(c)
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(registry_file))
    assert find_credentials("127.0.0.1:5000", None).username == "from-env"  # type: ignore
    assert find_credentials("127.0.0.1:5000", explicit).username == "from-flag"  # type: ignore
    assert find_credentials("127.0.0.1:5001", explicit) is None
    with pytest.raises(UserError, match="credentials file not found"):
        find_credentials("127.0.0.1:5000", tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not a credentials file"):
        find_credentials("127.0.0.1:5000", tmp_path / "bad.json")


def test_token_auth_registry(tmp_path: Path) -> None:
    """A registry that asks for Bearer tokens from a token service (as
    Harbor, Quay and Docker Hub do): push and pull get tokens with the
    user's credentials; wrong or no credentials are one refusal line."""
    src = make_output(tmp_path / "out", seed="token")
    env = no_ambient_creds(tmp_path)
    with LocalRegistry(tmp_path / "reg", tls=True, users={REGISTRY_USER: REGISTRY_PASSWORD},
                       token_auth=True) as reg:
        ref = f"{reg.host}/tokens/demo:v1"
        res = run_cli("push", src, ref, *registry_args(reg), env=env)
        assert res.returncode == 0, res.stderr
        res = run_cli("pull", ref, "-o", tmp_path / "pulled", *registry_args(reg), env=env)
        assert res.returncode == 0, res.stderr
        assert tree_files(tmp_path / "pulled") == tree_files(src.parent)
        assert reg._tokens is not None and reg._tokens.issued >= 2
        wrong = reg.auth_file(REGISTRY_USER, "Not-The-Password", name="wrong")
        for extra in (["--creds-file", str(wrong)], []):
            res = run_cli("pull", ref, "-o", tmp_path / "p2", "--ca-file", reg.ca_file, *extra,
                          env=env)
            assert res.returncode == 2
            line = one_error_line(res.stderr)
            assert "refused" in line and "Not-The-Password" not in res.stderr, line
        assert leftovers(tmp_path / "p2") == []


def test_a_build_that_talks_to_no_registry_does_not_import_the_client() -> None:
    # registry_client's docstring: oras-py and requests cost every build
    # ~0.1 s and ~9 MB when cli -> distribute -> registry imported them.
    code = ("import sys, builder.cli, builder.build, builder.distribute, builder.oci, "
            "builder.remote_cache; print(sorted({'oras', 'requests', 'builder.registry_client'}"
            " & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == "[]"
