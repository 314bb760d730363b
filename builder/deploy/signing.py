"""Signing the bundle's SHA256SUMS with an SSH key (``ssh-keygen -Y sign``).

OpenSSH's file signatures are what a stock openEuler DPU can check without
anything installed (``ssh-keygen -Y verify`` with an allowed-signers file,
OpenSSH >= 8.1).  The signature covers SHA256SUMS, which covers every file
of the bundle, install.sh included; install.sh --trust FILE verifies it
before it reads anything else.  Ed25519 (and RSA) signatures are
deterministic, so a signed bundle stays reproducible; ECDSA ones are not.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ..errors import UserError

NAMESPACE = "rootfs-build-bundle"
SIGNATURE = "SHA256SUMS.sig"
UNSIGNED = {"signed_by": "unsigned"}


def _ssh_keygen() -> str:
    tool = shutil.which("ssh-keygen")
    if tool is None:
        raise UserError("ssh-keygen is needed to sign the bundle",
                        hint="install openssh-client, or drop params.bundle_signing_key")
    return tool


def public_key(key: Path, where: str = "params.bundle_signing_key") -> str:
    """The public half of an unencrypted OpenSSH private key (one line).

    ``-P ''`` makes a passphrase-protected key fail instead of prompting."""
    r = subprocess.run([_ssh_keygen(), "-y", "-P", "", "-f", str(key)], capture_output=True,
                       text=True, stdin=subprocess.DEVNULL,
                       env={**os.environ, "SSH_ASKPASS": "", "DISPLAY": ""})
    if r.returncode != 0 or not r.stdout.startswith(("ssh-", "ecdsa-", "sk-")):
        why = " ".join(r.stderr.split()) or "not an SSH private key"
        raise UserError(f"{key} cannot sign: {why}", where=where,
                        hint="use an unencrypted private key (ssh-keygen -t ed25519 -N '' -f KEY),"
                             " mode 0600")
    return r.stdout.split("\n", 1)[0].strip()


def fingerprint(pubkey: str) -> str:
    """ssh-keygen's SHA256 fingerprint of a public key line ('SHA256:...')."""
    blob = base64.b64decode(pubkey.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def signing_info(key: Path | None) -> dict[str, Any]:
    """The manifest's record of how the bundle is signed."""
    if key is None:
        return dict(UNSIGNED)
    pub = public_key(key)
    return {"signed_by": fingerprint(pub), "key_type": pub.split()[0], "namespace": NAMESPACE,
            "signature": SIGNATURE}


def sign(sums: Path, key: Path) -> Path:
    """Write ``SHA256SUMS.sig`` next to ``sums``; returns its path."""
    sig = sums.with_name(SIGNATURE)
    sig.unlink(missing_ok=True)  # ssh-keygen will not overwrite it
    r = subprocess.run([_ssh_keygen(), "-Y", "sign", "-n", NAMESPACE, "-f", str(key), str(sums)],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL,
                       env={**os.environ, "SSH_ASKPASS": "", "DISPLAY": ""})
    if r.returncode != 0 or not sig.is_file():
        sig.unlink(missing_ok=True)
        raise UserError(f"signing {sums.name} failed: {' '.join(r.stderr.split())}",
                        where="params.bundle_signing_key")
    os.chmod(sig, 0o644)
    return sig
