"""The elements, recipes and overlays rootfs-build ships.

In the repository they are the top-level `elements/`, `recipes/` and
`overlays/` directories; pyproject.toml maps them to the packages
`builder.shipped.elements`, `.recipes` and `.overlays`, so a checkout (an
editable install) and an installed wheel find the same files the same way,
through importlib.resources.  Each of those directories holds an
`__init__.py` for that reason only.
"""

from __future__ import annotations

import hashlib
from importlib.resources import files
from pathlib import Path

KINDS = ("elements", "recipes", "overlays")


def path(kind: str) -> Path:
    """The directory of the shipped `kind` (one of KINDS)."""
    assert kind in KINDS, kind
    return Path(str(files(f"builder.shipped.{kind}")))


def elements_digest() -> str:
    """A short digest of the shipped element set (every file's name and
    content), so --version and manifest.json say which one a build used."""
    root = path("elements")
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and p.name != "__init__.py":
            h.update(p.relative_to(root).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]
