"""element.yaml: the typed table of what an element declares.

An element is a directory in diskimage-builder's format; `element.yaml` is
our declarative part of it.  The tables below are the one declaration of
its keys (loading, validation with file:line errors, defaults, and the
README's element reference come from them, see builder.spec), and
`PARAM_TYPES` is the one table of param types.

Everything an element contributes is said here as data and acted on by one
generic mechanism each: files and trees (builder.filelayers), checks of
input files against the rootfs or a kernel (`elf_arch`, `vermagic` on a
param: builder.checks), mount entries for a deployment (`mounts`), and
generated outputs (`generate`, builder.generators).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Annotated, Any

from . import values
from .recipe import Id, Mode, ParamName, RootfsPath
from .spec import Check, OneOrMany, field


@dataclasses.dataclass(frozen=True)
class ParamType:
    """One param type: how a value is checked and what it holds.

    `check` turns a recipe value into the stored value (ValueError with a
    message otherwise); None for the types elements.check_param handles by
    shape (str, int, bool, enum, list, and the build-host inputs)."""

    name: str
    what: str
    check: Callable[[object], object] | None = None
    input: bool = False       # a path on the build host, relative to the recipe


PARAM_TYPES: dict[str, ParamType] = {t.name: t for t in (
    ParamType("str", "text (a number is taken as its text)"),
    ParamType("int", "an integer"),
    ParamType("bool", "true or false"),
    ParamType("enum", "one of `values`"),
    ParamType("list", "a list of `items` (default str)"),
    ParamType("ip", "an IPv4 or IPv6 address", values.check_ip),
    ParamType("port", "a port number 1-65535", values.check_port),
    ParamType("path", "an absolute path of plain characters", values.check_abs_path),
    ParamType("kernel", "a kernel release as `uname -r` prints it",
              values.check_kernel_release),
    ParamType("name", "a name of A-Z a-z 0-9 . _ -", values.check_name),
    ParamType("listen", "an address:port to listen on", values.check_listen),
    ParamType("command", "a command name or absolute path (a rexec whitelist entry)",
              values.check_command),
    ParamType("file", "a file on the build host", input=True),
    ParamType("files", "a list of files on the build host", input=True),
    ParamType("dir", "a directory on the build host", input=True),
)}


def _param_type(value: str) -> str:
    if value not in PARAM_TYPES:
        raise ValueError(f"{value!r} is not a param type ({', '.join(PARAM_TYPES)})")
    return value


def _item_type(value: str) -> str:
    allowed = [t for t in PARAM_TYPES if t not in ("list", "enum", "files")]
    if value not in allowed:
        raise ValueError(f"{value!r} is not a list item type ({', '.join(allowed)})")
    return value


def _param_ref(value: str) -> str:
    """'@name' -> 'name'."""
    if not value.startswith("@"):
        raise ValueError(f"{value!r} must name a param as '@name'")
    return values.check_param_name(value[1:])


def _non_empty(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError(f"{value} is not a positive number of seconds")
    return value


class _NotGiven:
    def __repr__(self) -> str:
        return "NOT_GIVEN"

    def __str__(self) -> str:
        return ""


NOT_GIVEN: Any = _NotGiven()
ParamRef = Annotated[str, Check(_param_ref, "@param")]


@dataclasses.dataclass(frozen=True)
class Condition:
    """`when:` of an item: the param compared with `is`, `in` or `set`."""

    param: ParamName = field(doc="the param the condition reads")
    is_: Any = field(NOT_GIVEN, key="is", doc="holds when the param equals this value")
    in_: tuple[Any, ...] | None = field(None, key="in", doc="holds when the param is one "
                                                             "of these values")
    set: bool | None = field(None, doc="true: holds when the param is set (not empty); "
                                       "false: when it is not")

    def holds(self, params: dict[str, Any]) -> bool:
        value = params.get(self.param)
        if self.is_ is not NOT_GIVEN:
            return bool(value == self.is_)
        if self.in_ is not None:
            return value in self.in_
        if self.set is not None:
            return (value not in (None, [], "")) == self.set
        return bool(value)


When = Annotated[tuple[Condition, ...], OneOrMany()]
WHEN_DOC = "conditions that must all hold for the item to apply (one mapping or a list)"


def holds(when: tuple[Condition, ...], params: dict[str, Any]) -> bool:
    return all(c.holds(params) for c in when)


@dataclasses.dataclass(frozen=True)
class ParamDecl:
    type: Annotated[str, Check(_param_type, "param type")] = field(
        doc="one of " + ", ".join(PARAM_TYPES))
    default: Any = field(None, doc="the value when the recipe gives none")
    required: bool = field(False, doc="the recipe must set it")
    values: tuple[Any, ...] = field((), doc="the allowed values of an enum")
    items: Annotated[str, Check(_item_type, "param type")] | None = field(
        None, doc="the type of a list's items (default str)")
    description: str = field("", doc="free text")
    elf_arch: bool = field(False, doc="a file/files param: each must be an ELF binary built "
                                      "for the rootfs architecture")
    vermagic: ParamName | None = field(None, doc="a file param holding a kernel module: its "
                                                 "vermagic must name the kernel release this "
                                                 "(kernel) param gives, when it is set")


@dataclasses.dataclass(frozen=True)
class FileItem:
    src: Annotated[str, Check(_non_empty, "source")] = field(
        doc="a path inside the element directory, or '@param' naming a file param")
    dest: RootfsPath = field(doc="where in the rootfs")
    mode: Mode | None = field(None, doc="default 0644")
    uid: Id = field(0, doc="owner")
    gid: Id = field(0, doc="group")
    when: When = field((), doc=WHEN_DOC)


@dataclasses.dataclass(frozen=True)
class DirItem:
    path: RootfsPath = field(doc="the directory")
    mode: Mode | None = field(None, doc="without mode, uid and gid: made only where missing "
                                        "(0755 root), an existing directory is kept")
    uid: Id | None = field(None, doc="owner")
    gid: Id | None = field(None, doc="group")
    when: When = field((), doc=WHEN_DOC)


@dataclasses.dataclass(frozen=True)
class SymlinkItem:
    path: RootfsPath = field(doc="the link")
    target: Annotated[str, Check(_non_empty, "text")] = field(doc="what it points to")
    uid: Id = field(0, doc="owner")
    gid: Id = field(0, doc="group")
    when: When = field((), doc=WHEN_DOC)


@dataclasses.dataclass(frozen=True)
class TemplateItem:
    src: Annotated[str, Check(_non_empty, "source")] = field(
        doc="a text file in the element directory (or '@param') with @{param} "
            "placeholders: @{p} is the value, @{p_q} the value shell-quoted; a list "
            "param gives one item per line for @{p} and one quoted word per item "
            "for @{p_q}; @@ is a literal @")
    dest: RootfsPath = field(doc="where in the rootfs")
    mode: Mode | None = field(None, doc="default 0644")
    uid: Id = field(0, doc="owner")
    gid: Id = field(0, doc="group")
    when: When = field((), doc=WHEN_DOC)


@dataclasses.dataclass(frozen=True)
class TreeItem:
    src: Annotated[str, Check(_non_empty, "source")] = field(
        doc="a directory in the element, or '@param' naming a dir param; copied like "
            "an overlay")
    dest: RootfsPath = field(doc="where in the rootfs")
    uid: Id = field(0, doc="owner")
    gid: Id = field(0, doc="group")
    when: When = field((), doc=WHEN_DOC)


@dataclasses.dataclass(frozen=True)
class SourceItem:
    archive: ParamRef = field(doc="a file param: a release tarball, unpacked on the build "
                                  "host without executing anything")
    dest: RootfsPath = field(doc="where the patched tree goes in the rootfs")
    patches: ParamRef | None = field(None, doc="a files param: patches applied in order "
                                               "(checked before any appliance starts)")
    when: When = field((), doc=WHEN_DOC)


@dataclasses.dataclass(frozen=True)
class RpmItem:
    src: ParamRef = field(doc="a files param: RPM files the rootfs's own rpm/dnf installs "
                              "in the package step (scriptlets run, the rpm database updated)")
    when: When = field((), doc=WHEN_DOC)


@dataclasses.dataclass(frozen=True)
class Requirement:
    when: When = field((), doc=WHEN_DOC)
    all_of: tuple[ParamName, ...] = field((), doc="params that must all be set")
    any_of: tuple[ParamName, ...] = field((), doc="params of which one must be set")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    when: When = field((), doc="the element's scripts run only when these hold")
    network: bool = field(False, doc="the appliance gets a network while they run")
    timeout: Annotated[float, Check(_positive, "seconds")] | None = field(
        None, doc="seconds without progress before the step is stopped")


@dataclasses.dataclass(frozen=True)
class MountItem:
    type: Annotated[str, Check(_non_empty, "mount type")] = field(
        doc="proc, sysfs, bind, qtfs, devtmpfs, hugetlbfs, mqueue, tmpfs, cgroup, cgroup2, "
            "devpts")
    target: RootfsPath = field(doc="mount point inside the rootfs")
    source: str | None = field(None, doc="a path for bind and qtfs, else a device name "
                                         "(default: the type)")
    options: str = field("", doc="comma-separated mount options")
    order: int = field(1000, doc="position in the deployment's mount table (see "
                                 "builder/deploy/mounts.py for the bands)")


@dataclasses.dataclass(frozen=True)
class ElementSpec:
    description: str = field("", doc="free text")
    params: dict[ParamName, ParamDecl] = field(
        factory=dict, doc="typed params; recipe params are checked against them")
    files: tuple[FileItem, ...] = field((), doc="files to place")
    dirs: tuple[DirItem, ...] = field((), doc="directories to make")
    symlinks: tuple[SymlinkItem, ...] = field((), doc="symlinks to make")
    templates: tuple[TemplateItem, ...] = field((), doc="files generated from a template")
    trees: tuple[TreeItem, ...] = field((), doc="directories copied like an overlay")
    deletions: tuple[RootfsPath, ...] = field((), doc="paths removed from the layers below")
    sources: tuple[SourceItem, ...] = field((), doc="source trees patched on the host")
    rpms: tuple[RpmItem, ...] = field((), doc="RPM files to install")
    requires: tuple[Requirement, ...] = field((), doc="params needed together")
    run: RunSpec = field(RunSpec(), doc="how the element's pre-install.d, install.d and "
                                        "post-install.d scripts run")
    mounts: tuple[MountItem, ...] = field((), doc="entries for the deployment's mount table")
    generate: tuple[Annotated[str, Check(_non_empty, "generator")], ...] = field(
        (), doc="outputs generated beside the rootfs (see Generators)")
