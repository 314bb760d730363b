"""File layers: overlays and element content, planned then written.

A plan lists every member with the digest of its content; the plan's
digest is the layer's cache key, so a layer is rebuilt exactly when what it
would hold changes.  Host files are read, never executed; symlinks are kept
as symlinks and never followed; owners are root unless stated; modes come
from the plan, not from the checkout (git keeps only the x bit).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import io
import json
import os
import re
import shlex
import stat
import string
from pathlib import Path
from typing import Any

from . import FORMAT_VERSION, tarfmt
from .element_spec import holds
from .elements import Element, ElementSet
from .errors import UserError
from .hashing import sha256_file
from .layer import LayerWriter
from .recipe import OverlaySpec
from .tarfmt import BLK, CHR, DIR, FIFO, LNK, REG, SYM, Member


@dataclasses.dataclass
class Item:
    """One planned member; content comes from `path` or `data`."""

    member: Member
    path: Path | None = None
    data: bytes | None = None
    digest: str = ""
    weak: bool = False

    def describe(self) -> list[Any]:
        m = self.member
        return [m.name.decode("latin-1"), m.type.decode(), m.mode, m.uid, m.gid,
                m.linkname.decode("latin-1"), m.devmajor, m.devminor, self.digest,
                int(self.weak)]


@dataclasses.dataclass
class FilePlan:
    kind: str
    label: str
    items: list[Item] = dataclasses.field(default_factory=list)
    deletions: list[bytes] = dataclasses.field(default_factory=list)
    inputs: dict[str, str] = dataclasses.field(default_factory=dict)  # host path -> sha256

    def key(self) -> str:
        doc = {"format": FORMAT_VERSION, "kind": self.kind,
               "items": [i.describe() for i in sorted(self.items, key=lambda i: i.member.name)],
               "deletions": sorted(d.decode("latin-1") for d in self.deletions)}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def add(self, item: Item) -> None:
        self.items.append(item)

    def write(self, directory: Path) -> dict[str, Any]:
        """Write the layer into `directory` (a cache staging dir)."""
        writer = LayerWriter(directory, mtime_policy="epoch", source=self.label)
        try:
            for name in self.deletions:
                writer.delete(name)
            for item in sorted(self.items, key=lambda i: tarfmt.sort_key(i.member.name)):
                m = dataclasses.replace(item.member, xattrs=dict(item.member.xattrs))
                if m.type == REG and item.path is not None:
                    with open(item.path, "rb") as f:
                        got = hashlib.sha256()

                        def read(n: int, f: Any = f, got: Any = got) -> bytes:
                            chunk = f.read(n)
                            got.update(chunk)
                            return bytes(chunk)

                        writer.add(m, read, weak=item.weak)
                    if got.hexdigest() != item.digest:
                        raise UserError(f"{item.path}: changed while the build read it",
                                        hint="run the build again")
                elif m.type == REG:
                    writer.add(m, io.BytesIO(item.data or b"").read, weak=item.weak)
                else:
                    writer.add(m, weak=item.weak)
            return writer.finish()
        except BaseException:
            writer.abort()
            raise


def dest_name(dest: str, *, where: str) -> bytes:
    """A rootfs path from a recipe or element, refusing '..'."""
    try:
        return tarfmt.normalize_name(os.fsencode(dest), what=f"{where}: destination")
    except UserError as e:
        raise UserError(e.message, hint="paths inside the rootfs may not contain '..'") from None


def _join(base: bytes, rel: bytes) -> bytes:
    return base + b"/" + rel if base and rel else base or rel


# ---------------------------------------------------------------------------
# overlays


def plan_overlay(overlay: OverlaySpec, index: int, where: str, shown: str | None = None
                 ) -> FilePlan:
    """`shown` is the path as the recipe wrote it, for the layer's label (which
    the manifest records); default: the resolved path."""
    src = overlay.path
    label = f"overlays[{index}] ({shown or src})"
    if not src.exists():
        raise UserError(f"{src}: overlay directory not found", where=where,
                        hint="overlay paths are relative to the recipe's directory")
    if not src.is_dir() or src.is_symlink():
        raise UserError(f"{src}: an overlay must be a directory", where=where,
                        hint="name a directory, not a file or a symlink")
    plan = FilePlan("overlay", label)
    dest = dest_name(overlay.dest, where=where)
    seen_inodes: dict[tuple[int, int], bytes] = {}
    uid, gid = overlay.uid, overlay.gid

    def mode_for(rel: str, default: int) -> tuple[int, bool]:
        for pattern, mode in overlay.modes.items():
            if fnmatch.fnmatchcase(rel, pattern):
                return mode, True
        return default, False

    def visit(directory: Path, rel: str) -> None:
        try:
            names = sorted(os.listdir(directory), key=os.fsencode)
        except OSError as e:
            raise UserError(f"{directory}: cannot read overlay directory: {e.strerror}") from None
        for n in names:
            path = directory / n
            r = f"{rel}/{n}" if rel else n
            name = _join(dest, os.fsencode(r))
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                mode, explicit = mode_for(r, 0o755)
                plan.add(Item(Member(name, DIR, mode, uid=uid, gid=gid), weak=not explicit))
                visit(path, r)
            elif stat.S_ISLNK(st.st_mode):
                target = os.fsencode(os.readlink(path))
                plan.add(Item(Member(name, SYM, 0o777, linkname=target, uid=uid, gid=gid)))
            elif stat.S_ISREG(st.st_mode):
                if st.st_nlink > 1 and (st.st_dev, st.st_ino) in seen_inodes:
                    plan.add(Item(Member(name, LNK, 0o644, linkname=seen_inodes[
                        (st.st_dev, st.st_ino)], uid=uid, gid=gid)))
                    continue
                seen_inodes[(st.st_dev, st.st_ino)] = name
                default = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
                mode, _ = mode_for(r, default)
                digest = sha256_file(path)
                plan.inputs[str(path)] = digest
                plan.add(Item(Member(name, REG, mode, size=st.st_size, uid=uid, gid=gid),
                              path=path, digest=digest))
            elif stat.S_ISFIFO(st.st_mode):
                mode, _ = mode_for(r, 0o644)
                plan.add(Item(Member(name, FIFO, mode, uid=uid, gid=gid)))
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                mode, _ = mode_for(r, stat.S_IMODE(st.st_mode))
                kind = CHR if stat.S_ISCHR(st.st_mode) else BLK
                plan.add(Item(Member(name, kind, mode, devmajor=os.major(st.st_rdev),
                                     devminor=os.minor(st.st_rdev), uid=uid, gid=gid)))
            else:
                raise UserError(f"{path}: sockets and other special files cannot go into "
                                "a rootfs", hint="remove it from the overlay")

    visit(src, "")
    return plan


# ---------------------------------------------------------------------------
# element content


class _Template(string.Template):
    """@{name} placeholders: shell's $ and "$@" stay untouched; @@ is a literal @."""

    delimiter = "@"
    flags = re.RegexFlag(0)  # names are lower case; @{Other} is left as text
    pattern = r"""@(?:
        (?P<escaped>@) |
        \{(?P<braced>[a-z][a-z0-9_]*)\} |
        (?P<named>(?!x)x) |
        (?P<invalid>(?!x)x)
    )"""  # type: ignore[assignment]


def template_values(params: dict[str, Any]) -> dict[str, str]:
    """@{name} is the validated value, @{name_q} the same shell-quoted.  A list
    keeps its items apart: @{name} has one item per line, @{name_q} one quoted
    word per item (so `arr=(@{name_q})` is a bash array of the items)."""
    out: dict[str, str] = {}
    for k, v in params.items():
        if isinstance(v, list):
            items = [param_text(x) for x in v]
            out[k] = "\n".join(items)
            out[f"{k}_q"] = " ".join(shlex.quote(x) for x in items)
        else:
            out[k] = param_text(v)
            out[f"{k}_q"] = shlex.quote(out[k])
    return out


def param_text(value: Any) -> str:
    """A scalar param as text: '' when unset, true/false for booleans."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def element_source(el: Element, src: str, es: ElementSet, where: str) -> Path:
    """An element item's source: '@param' names a file or dir param, else a
    path inside the element directory."""
    if src.startswith("@"):
        pname = src[1:]
        spec = es.specs.get(pname)
        if spec is None or spec.type not in ("file", "dir"):
            raise UserError(f"{src}: no file or dir param named {pname}", where=where)
        value = es.params.get(pname)
        if value is None:
            raise UserError(f"params.{pname} is not set but {el.name} needs it",
                            where=where, hint=f"set it in the recipe: params: {{{pname}: ...}}")
        return Path(value)
    path = (el.path / src).resolve()
    if not path.is_relative_to(el.path.resolve()):
        raise UserError(f"{src}: element sources must stay inside the element directory",
                        where=where, hint="copy the file into the element, or pass it as a "
                                          "file param with '@name'")
    return path


def plan_element(el: Element, es: ElementSet) -> FilePlan:
    """The file layer of an element's declared content (what holds)."""
    plan = FilePlan("element", f"element {el.name}")
    spec = el.spec
    params = es.params

    for i, d in enumerate(spec.dirs):
        if holds(d.when, params):
            name = dest_name(d.path, where=el.where("dirs", i))
            explicit = d.mode is not None or d.uid is not None or d.gid is not None
            plan.add(Item(Member(name, DIR, 0o755 if d.mode is None else d.mode,
                                 uid=d.uid or 0, gid=d.gid or 0), weak=not explicit))
    for i, link in enumerate(spec.symlinks):
        if holds(link.when, params):
            name = dest_name(link.path, where=el.where("symlinks", i))
            plan.add(Item(Member(name, SYM, 0o777, linkname=os.fsencode(link.target),
                                 uid=link.uid, gid=link.gid)))
    for i, f in enumerate(spec.files):
        if not holds(f.when, params):
            continue
        where = el.where("files", i)
        src = element_source(el, f.src, es, where)
        if not src.is_file():
            raise UserError(f"{src}: file not found (files[{i}] of element {el.name})",
                            where=where, hint="add the file to the element or fix src")
        digest = sha256_file(src)
        plan.inputs[str(src)] = digest
        plan.add(Item(Member(dest_name(f.dest, where=where), REG,
                             0o644 if f.mode is None else f.mode, size=src.stat().st_size,
                             uid=f.uid, gid=f.gid), path=src, digest=digest))
    for i, t in enumerate(spec.templates):
        if not holds(t.when, params):
            continue
        where = el.where("templates", i)
        src = element_source(el, t.src, es, where)
        try:
            text = src.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{src}: cannot read template: {e}", where=where,
                            hint="add the template to the element or fix src") from None
        try:
            data = _Template(text).substitute(template_values(params)).encode()
        except KeyError as e:
            raise UserError(f"{src}: template uses @{{{e.args[0]}}}, which is not a param",
                            where=where) from None
        except ValueError as e:
            raise UserError(f"{src}: bad template placeholder: {e}", where=where) from None
        digest = hashlib.sha256(data).hexdigest()
        plan.add(Item(Member(dest_name(t.dest, where=where), REG,
                             0o644 if t.mode is None else t.mode, size=len(data),
                             uid=t.uid, gid=t.gid), data=data, digest=digest))
    for i, tree in enumerate(spec.trees):
        if not holds(tree.when, params):
            continue
        where = el.where("trees", i)
        src = element_source(el, tree.src, es, where)
        sub = plan_overlay(OverlaySpec(path=src, dest=tree.dest, uid=tree.uid, gid=tree.gid),
                           i, where)
        plan.items += sub.items
        plan.inputs.update(sub.inputs)
    for i, path in enumerate(spec.deletions):
        plan.deletions.append(dest_name(path, where=el.where("deletions", i)))
    static = el.path / "static"
    if static.is_dir() and not static.is_symlink():
        # diskimage-builder's static/: copied into the rootfs like an overlay
        sub = plan_overlay(OverlaySpec(path=static), 0, str(static))
        plan.items += sub.items
        plan.inputs.update(sub.inputs)
    return plan
