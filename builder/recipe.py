"""Recipes: one YAML file, read into the typed table `RecipeSpec`.

The tables below are the one declaration of the recipe's keys: loading,
validation (file:line errors), `--set`, the defaults and the README's
recipe reference all come from them (builder.spec).  A recipe is plain
data: YAML aliases, merge keys, duplicate and non-string keys are refused.
Relative paths are relative to the recipe's directory, or to the current
directory for values given with --set.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from . import values
from .errors import UserError
from .spec import Check, Context, Marks, Shorthand, dotted, field, load, load_yaml

TAR_FORMATS = ("tar", "tar.gz", "tar.zst")
IMAGE_FORMATS = ("squashfs", "raw", "qcow2")
FORMATS = TAR_FORMATS + IMAGE_FORMATS + ("oci",)
Format = Literal["tar", "tar.gz", "tar.zst", "squashfs", "raw", "qcow2", "oci"]


def _input_path(value: Path, ctx: Context, key: tuple[str | int, ...]) -> Path:
    return resolve(ctx.relative_base(key), str(value))


def _non_negative(value: int) -> int:
    if value < 0:
        raise ValueError(f"{value} is negative")
    return value


def _output_name(value: str) -> str:
    try:
        return values.check_name(value)
    except ValueError:
        raise ValueError(f"{value!r} may only hold A-Z a-z 0-9 . _ - (it names the output "
                         "directory; use e.g. dpu-rootfs)") from None


def _non_empty(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


def _headroom(value: float) -> float:
    if not 0 <= value <= 10:
        raise ValueError(f"{value} is out of range 0..10 (a fraction such as 0.2)")
    return value


def _formats(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        raise ValueError("name at least one format")
    if len(set(value)) != len(value):
        raise ValueError("a format is listed twice")
    return value


def _param_value(value: Any) -> Any:
    scalar = (str, int, float, bool, type(None))
    if isinstance(value, scalar) or (isinstance(value, list)
                                     and all(isinstance(v, scalar) for v in value)):
        return value
    raise ValueError(f"{type(value).__name__} value: a param is a scalar or a list of scalars")


def _dib_var(value: str) -> str:
    if not re.fullmatch(r"DIB_[A-Z0-9_]+|DISTRO_NAME|ARCH", value):
        raise ValueError(f"{value!r} is not a diskimage-builder variable (DIB_*, DISTRO_NAME, "
                         "ARCH)")
    return value


def _env_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, str | int | float):
        return str(value)
    raise ValueError(f"{type(value).__name__} value: give a string or a number")


InputPath = Annotated[Path, Check(_input_path, "path", with_context=True)]
RootfsPath = Annotated[str, Check(values.check_rootfs_path, "rootfs path")]
Mode = Annotated[Any, Check(values.check_mode, "mode ('0755')")]
Id = Annotated[int, Check(values.check_id, "id")]
ParamName = Annotated[str, Check(values.check_param_name, "param name")]
ElementName = Annotated[str, Check(values.check_name, "element name")]


@dataclasses.dataclass(frozen=True)
class BaseSpec:
    image: InputPath = field(doc="the base disk image: qcow2 or raw; a qcow2 with a backing "
                                 "file is refused")
    sha256: Annotated[str, Check(values.check_sha256, "sha256")] | None = field(
        None, doc="checked before use")
    arch: Annotated[str, Check(values.check_arch, "arch")] | None = field(
        None, doc="checked against the image (x86_64, aarch64, ...)")
    filesystems: Literal["all", "root"] = field(
        "all", doc="all: the root and its fstab mounts; root: the root filesystem only")


@dataclasses.dataclass(frozen=True)
class OverlaySpec:
    path: InputPath = field(doc="a directory copied over the rootfs")
    dest: RootfsPath = field("/", doc="where in the rootfs")
    uid: Id = field(0, doc="owner of every file")
    gid: Id = field(0, doc="group of every file")
    modes: dict[str, Mode] = field(
        factory=dict, doc="glob (relative to the overlay) -> mode; files are 0644, or 0755 "
                          "when executable in the checkout, directories 0755",
        example='{"sbin/*": "0750"}')


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    formats: Annotated[tuple[Format, ...], Check(_formats, "formats")] = field(
        ("tar",), doc="what to write: any of " + ", ".join(FORMATS))
    size: Annotated[Any, Check(values.parse_size, "size")] | None = field(
        None, doc="raw/qcow2 filesystem size (like 2G); default: fitted to the content")
    headroom: Annotated[float, Check(_headroom, "fraction")] = field(
        0.2, doc="fraction added to the fitted size")
    qcow2_compressed: bool = field(False, doc="compress the qcow2 clusters")
    bundle: bool = field(True, doc="also write OUTPUT/NAME.bundle.tar when an element "
                                   "generates a deployment")
    oci_compression: Literal["zstd", "gzip"] = field(
        "zstd", doc="the oci image's layer compression (gzip for older runtimes)")
    oci_version: Annotated[str, Check(_non_empty, "text")] | None = field(
        None, doc="org.opencontainers.image.version of the oci image")
    oci_revision: Annotated[str, Check(_non_empty, "text")] | None = field(
        None, doc="org.opencontainers.image.revision of the oci image (e.g. a commit)")


def _package_name(value: str) -> str:
    if not value or value.startswith("-") or any(c.isspace() for c in value):
        raise ValueError(f"{value!r} is not a package name or spec")
    return value


PackageName = Annotated[str, Check(_package_name, "package name")]


@dataclasses.dataclass(frozen=True)
class PackagesSpec:
    repos: tuple[InputPath, ...] = field(
        (), doc="local repositories: a directory with repodata/, a directory of *.rpm "
                "(indexed at build time), or an .iso (an openEuler everything ISO works)")
    install: tuple[PackageName, ...] = field(
        (), doc="what the rootfs's own dnf installs from them (names, provides, globs)")
    remove: tuple[PackageName, ...] = field((), doc="packages removed afterwards")
    gpgcheck: bool = field(True, doc="every package must be signed by one of gpgkeys or a "
                                     "key the rootfs trusts; false turns the check off")
    gpgkeys: tuple[InputPath, ...] = field((), doc="armored public keys to trust")
    weak_deps: bool = field(False, doc="also install weak dependencies (Recommends)")


@dataclasses.dataclass(frozen=True)
class RecipeSpec:
    name: Annotated[str, Check(_output_name, "name")] = field(
        doc="output goes to OUTPUT/NAME/; only A-Z a-z 0-9 . _ -")
    base: BaseSpec = field(doc="the base image")
    description: str = field("", doc="free text")
    epoch: Annotated[int, Check(_non_negative, "seconds")] | None = field(
        None, doc="mtimes are clamped to it (see Reproducibility)")
    elements: tuple[ElementName, ...] = field(
        (), doc="element names, resolved with their element-deps")
    overlays: tuple[Annotated[OverlaySpec, Shorthand("path")], ...] = field(
        (), doc="directories copied over the rootfs, in order")
    params: dict[ParamName, Annotated[Any, Check(_param_value, "value")]] = field(
        factory=dict, doc="element parameters (each declared by some element)")
    allow_shadowed: tuple[RootfsPath, ...] = field(
        (), doc="rootfs paths an element or overlay may fill although a deployment "
                "mount hides them at run time (see Shadowed paths)")
    output: OutputSpec = field(OutputSpec(), doc="what to write")
    packages: PackagesSpec | None = field(
        None, doc="packages installed by the rootfs's own dnf (or rpm) inside the appliance, "
                  "offline, with the elements' package-installs.yaml and RPM files")
    dib_env: dict[Annotated[str, Check(_dib_var, "variable")],
                  Annotated[Any, Check(_env_text, "text")]] = field(
        factory=dict, doc="diskimage-builder variables for the elements' scripts "
                          "(DIB_*, DISTRO_NAME, ARCH); they override the defaults taken from "
                          "the base image", example="{DIB_RELEASE: 22.03-LTS}")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A loaded recipe: its typed `spec`, the raw `data` (values as written,
    for the manifest) and where each key came from."""

    path: Path
    spec: RecipeSpec
    data: dict[str, Any]
    ctx: Context

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def directory(self) -> Path:
        return self.path.parent

    def where(self, *key: str | int) -> str:
        """'file:line' of a key (or of its nearest parent that has a line)."""
        return self.ctx.where(key)

    def resolve_path(self, value: str, *key: str | int) -> Path:
        """A path given at `key`: relative to the recipe, or to the current
        directory when it was given with --set."""
        return resolve(self.ctx.relative_base(key), value)

    def written(self, *key: str | int) -> str:
        """The path at `key` as the recipe wrote it (an item given in its
        short form stands for its `path`).  The manifest shows these, so that
        it does not depend on where the recipe and its inputs lie."""
        node: Any = self.data
        for k in key:
            node = node[k]
        return str(node["path"] if isinstance(node, dict) else node)


def resolve(base: Path, value: str) -> Path:
    p = Path(os.path.expanduser(value))  # leaves ~nosuchuser as it is
    return p if p.is_absolute() else base / p


# ---------------------------------------------------------------------------
# --set KEY.PATH=VALUE


def apply_overrides(data: dict[str, Any], overrides: list[str],
                    marks: Marks) -> set[tuple[str | int, ...]]:
    """Apply --set options in order; returns the key paths they set."""
    touched: set[tuple[str | int, ...]] = set()
    for item in overrides:
        key_text, sep, raw = item.partition("=")
        if not sep or not key_text:
            raise UserError(f"--set {item}: expected KEY.PATH=VALUE",
                            hint="e.g. --set params.host_ip=10.0.0.2")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
            value = raw
        parts: list[str | int] = [int(p) if p.isdigit() else p for p in key_text.split(".")]
        target: Any = data
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(target, dict) and isinstance(part, str):
                if part not in target or not isinstance(target[part], dict | list):
                    target[part] = [] if isinstance(nxt, int) else {}
                    marks[tuple(parts[:i + 1])] = f"--set {key_text}"
                target = target[part]
            elif isinstance(target, list) and isinstance(part, int) and part < len(target):
                target = target[part]
            else:
                raise UserError(f"--set {key_text}: {dotted(tuple(parts[:i + 1]))} "
                                "is not a mapping or list index here")
        last = parts[-1]
        if isinstance(target, dict) and isinstance(last, str):
            target[last] = value
        elif isinstance(target, list) and isinstance(last, int) and last <= len(target):
            if last == len(target):
                target.append(value)
            else:
                target[last] = value
        else:
            raise UserError(f"--set {key_text}: cannot set {dotted(tuple(parts))}")
        key = tuple(parts)
        touched.add(key)
        for k in [k for k in marks if k[:len(key)] == key]:
            marks[k] = f"--set {key_text}"
        marks[key] = f"--set {key_text}"
    return touched


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a recipe, with --set overrides applied."""
    path = Path(path)
    data, marks = load_yaml(path)
    if not isinstance(data, dict):
        raise UserError(f"{Context(path, marks).where(())}: a recipe is a mapping "
                        "(name:, base:, ...)", hint="see recipes/demo.yaml")
    touched = apply_overrides(data, overrides or [], marks)
    ctx = Context(path, marks, "recipe", frozenset(touched))
    spec = load(RecipeSpec, data, ctx)
    return Recipe(path, spec, data, ctx)
