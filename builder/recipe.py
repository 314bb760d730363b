"""Recipes: YAML loaded with line numbers, checked against one schema.

Every error names the file and line (or the --set option) and the key.
YAML aliases, duplicate keys and non-string keys are refused: a recipe is
plain data.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from . import values
from .errors import UserError

MAX_RECIPE_BYTES = 1 << 20
TAR_FORMATS = ("tar", "tar.gz", "tar.zst")
IMAGE_FORMATS = ("squashfs", "raw", "qcow2")
FORMATS = TAR_FORMATS + IMAGE_FORMATS + ("oci",)

_PATH = {"type": "string", "minLength": 1}
_SCALAR = {"type": ["string", "integer", "number", "boolean", "null"]}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "base"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[A-Za-z0-9._-]+$", "not": {"enum": [".", ".."]},
                 "description": "output goes to <output>/<name>/"},
        "description": {"type": "string"},
        "base": {
            "type": "object",
            "additionalProperties": False,
            "required": ["image"],
            "properties": {
                "image": _PATH,
                "sha256": {"type": "string", "pattern": r"^[0-9a-fA-F]{64}$"},
                "arch": {"type": "string", "pattern": r"^[a-z0-9_]+$"},
                "filesystems": {"enum": ["all", "root"]},
            },
        },
        "epoch": {"type": "integer", "minimum": 0},
        "elements": {"type": "array", "items": {"type": "string",
                                                 "pattern": r"^[A-Za-z0-9._-]+$"}},
        "overlays": {
            "type": "array",
            "items": {
                "oneOf": [
                    _PATH,
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["path"],
                        "properties": {
                            "path": _PATH,
                            "dest": {"type": "string", "pattern": "^/"},
                            "uid": {"type": "integer", "minimum": 0},
                            "gid": {"type": "integer", "minimum": 0},
                            "modes": {"type": "object",
                                      "additionalProperties": {"type": ["string", "integer"]}},
                        },
                    },
                ]
            },
        },
        "params": {
            "type": "object",
            "propertyNames": {"pattern": r"^[a-z][a-z0-9_]*$"},
            "additionalProperties": {
                "anyOf": [_SCALAR, {"type": "array", "items": _SCALAR}]
            },
        },
        "allow_shadowed": {"type": "array", "items": {"type": "string", "pattern": "^/"}},
        "output": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "formats": {"type": "array", "minItems": 1, "uniqueItems": True,
                            "items": {"enum": list(FORMATS)}},
                "size": {"type": ["integer", "string"], "minimum": 1},
                "headroom": {"type": "number", "minimum": 0, "maximum": 10},
                "qcow2_compressed": {"type": "boolean"},
                "bundle": {"type": "boolean"},
                "oci_compression": {"enum": ["zstd", "gzip"]},
                "oci_version": {"type": "string", "minLength": 1},
                "oci_revision": {"type": "string", "minLength": 1},
            },
        },
    },
}


@dataclasses.dataclass(frozen=True)
class Overlay:
    source: Path
    dest: str = "/"
    uid: int = 0
    gid: int = 0
    modes: tuple[tuple[str, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    base_image: Path
    base_sha256: str | None
    base_arch: str | None
    base_filesystems: str
    epoch: int | None
    elements: tuple[str, ...]
    overlays: tuple[Overlay, ...]
    params: dict[str, Any]
    formats: tuple[str, ...]
    image_size: int | None
    image_headroom: float
    qcow2_compressed: bool
    bundle: bool
    allow_shadowed: tuple[str, ...]
    marks: dict[tuple[str | int, ...], str]
    data: dict[str, Any]
    overridden: frozenset[tuple[str | int, ...]] = frozenset()

    def relative_base(self, *key: str | int) -> Path:
        """Directory a relative path at `key` is relative to: the recipe's, or
        the current directory for a value given with --set."""
        if any(key[:len(t)] == t for t in self.overridden):
            return Path.cwd()
        return self.directory

    def resolve_path(self, value: str, *key: str | int) -> Path:
        return _resolve(self.relative_base(*key), value)

    @property
    def directory(self) -> Path:
        return self.path.parent

    def where(self, *key: str | int) -> str:
        """'file:line' of a key (or of its nearest parent that has a line)."""
        return locate(self.marks, key, self.path)


def dotted(key: tuple[str | int, ...]) -> str:
    out = ""
    for part in key:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(top level)"


def locate(marks: dict[tuple[str | int, ...], str], key: tuple[str | int, ...],
           path: Path) -> str:
    probe = tuple(key)
    while probe not in marks and probe:
        probe = probe[:-1]
    return marks.get(probe, str(path))


# ---------------------------------------------------------------------------
# YAML with line numbers


def _read_text(path: Path, what: str) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found", hint="check the path") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a {what} file",
                        hint="give the path of the YAML file itself") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what}: {e.strerror}",
                        hint="check the path and its permissions") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise UserError(f"{path}: {what} is larger than {MAX_RECIPE_BYTES >> 20} MiB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: {what} is not valid UTF-8 (byte {e.start})",
                        hint="save the file as UTF-8") from None


def load_yaml(path: Path, what: str = "recipe") -> tuple[Any, dict[tuple[str | int, ...], str]]:
    """Parse a YAML file into plain data plus a map key-path -> 'file:line'."""
    text = _read_text(path, what)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        problem = (e.problem or e.context or "invalid YAML").strip()
        raise UserError(f"{path}{line}: invalid YAML: {problem}",
                        hint="check the indentation, brackets and quotes up to that line"
                        ) from None
    except yaml.reader.ReaderError as e:
        lineno = text[:e.position].count("\n") + 1
        char = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        raise UserError(f"{path}:{lineno}: invalid YAML: character {char} is not allowed",
                        hint="remove control characters") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML: {e}") from None
    except RecursionError:
        raise UserError(f"{path}: invalid YAML: nested too deeply") from None
    marks: dict[tuple[str | int, ...], str] = {}
    if node is None:
        return {}, marks
    constructor = yaml.constructor.SafeConstructor()
    seen: set[int] = set()

    def construct(n: yaml.Node, key: tuple[str | int, ...]) -> Any:
        try:
            return constructor.construct_object(n)
        except (yaml.YAMLError, ValueError, TypeError, LookupError, ArithmeticError,
                AttributeError) as e:
            # a bad tagged scalar (!!int abc) or a tag PyYAML has no constructor for
            problem = getattr(e, "problem", None) or f"{n.tag} value {n.value!r} is invalid"
            raise UserError(f"{path}:{n.start_mark.line + 1}: {dotted(key)}: {problem}"
                            ) from None

    def convert(n: yaml.Node, key: tuple[str | int, ...], line: int | None = None) -> Any:
        where = f"{path}:{n.start_mark.line + 1}"
        marks[key] = where
        if len(key) > 64:
            raise UserError(f"{where}: {what} is nested too deeply")
        if id(n) in seen:
            # An alias is its anchor's node, marks included; `line` (of the
            # key that holds it) is where the alias is written.
            raise UserError(f"{path}:{line or n.start_mark.line + 1}: {dotted(key)}: "
                            f"YAML aliases are not allowed in a {what}",
                            hint="write the value out")
        seen.add(id(n))
        if isinstance(n, yaml.MappingNode):
            out: dict[str, Any] = {}
            for k_node, v_node in n.value:
                if k_node.tag == "tag:yaml.org,2002:merge":
                    raise UserError(f"{where}: YAML merge keys (<<) are not allowed")
                k = construct(k_node, key)
                if not isinstance(k, str):
                    raise UserError(f"{path}:{k_node.start_mark.line + 1}: key {k!r} "
                                    f"under {dotted(key)} must be a string")
                if k in out:
                    raise UserError(f"{path}:{k_node.start_mark.line + 1}: "
                                    f"{dotted((*key, k))} is given twice")
                out[k] = convert(v_node, (*key, k), k_node.start_mark.line + 1)
                marks[(*key, k)] = f"{path}:{k_node.start_mark.line + 1}"
            return out
        if isinstance(n, yaml.SequenceNode):
            return [convert(item, (*key, i), line) for i, item in enumerate(n.value)]
        return construct(n, key)

    return convert(node, ()), marks


# ---------------------------------------------------------------------------
# --set KEY.PATH=VALUE


def apply_overrides(data: dict[str, Any], overrides: list[str],
                    marks: dict[tuple[str | int, ...], str]) -> set[tuple[str | int, ...]]:
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


# ---------------------------------------------------------------------------
# validation


def _schema_error(err: jsonschema.ValidationError, marks: dict, path: Path) -> UserError:
    key = tuple(err.absolute_path)
    where = locate(marks, key, path)
    if err.validator == "additionalProperties":
        schema = err.schema if isinstance(err.schema, dict) else {}
        known = list(schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(known)) if isinstance(err.instance, dict) else []
        name = extra[0] if extra else "?"
        where = locate(marks, (*key, name), path)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
        return UserError(f"unknown key {dotted((*key, name))}", where=where, hint=hint)
    if err.validator == "required":
        return UserError(f"{dotted(key)}: {err.message}", where=where,
                         hint="see the recipe reference in README.md")
    if err.validator in ("pattern", "not") and key[-1:] == ("name",):
        return UserError(f"{dotted(key)}: {err.instance!r} may only hold A-Z a-z 0-9 . _ -",
                         where=where, hint="it names the output directory; use e.g. "
                                           "dpu-rootfs")
    if err.validator == "oneOf" and key[:1] == ("overlays",):
        return UserError(f"{dotted(key)}: an overlay is a directory path or a mapping with "
                         "path, dest, uid, gid, modes", where=where)
    message = err.message
    if len(message) > 200:
        message = message[:200] + "..."
    return UserError(f"{dotted(key)}: {message}", where=where, hint=schema_hint(err))


_TYPE_WORDS = {"object": "a mapping", "array": "a list", "string": "a string",
               "integer": "an integer", "number": "a number", "boolean": "true or false",
               "null": "empty"}


def schema_hint(err: jsonschema.ValidationError) -> str:
    """What to do about a schema violation, for the error's hint."""
    key = dotted(tuple(err.absolute_path))
    if err.validator == "type":
        wanted = err.validator_value
        types = [str(t) for t in (wanted if isinstance(wanted, list) else [wanted])]
        return f"write {key} as " + " or ".join(_TYPE_WORDS.get(t, t) for t in types)
    if err.validator == "enum":
        return "use one of the values listed"
    return f"fix {key}"


def _resolve(base: Path, value: str) -> Path:
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else (base / p)


def _parse_size(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip().upper()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if text[-1:] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except (ValueError, OverflowError):
        raise UserError(f"output.size: {value!r} is not a size (like 2G or 512M)",
                        where=where) from None


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a recipe; relative paths are relative to its directory
    (to the current directory for values given with --set)."""
    path = Path(path)
    data, marks = load_yaml(path)
    if not isinstance(data, dict):
        raise UserError(f"{locate(marks, (), path)}: a recipe is a mapping (name:, base:, ...)",
                        hint="see recipes/demo.yaml")
    touched = apply_overrides(data, overrides or [], marks)
    validator = jsonschema.Draft202012Validator(SCHEMA)
    errors = sorted(validator.iter_errors(data), key=lambda e: (len(e.absolute_path),
                                                                 list(map(str, e.absolute_path))))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        raise _schema_error(best if best is not None else errors[0], marks, path)

    def base_for(key: tuple[str | int, ...]) -> Path:
        return Path.cwd() if any(key[:len(t)] == t for t in touched) else path.parent

    base = data["base"]
    overlays = []
    for i, item in enumerate(data.get("overlays", [])):
        spec: dict[str, Any] = {"path": item} if isinstance(item, str) else item
        modes = []
        for pattern, mode in spec.get("modes", {}).items():
            try:
                modes.append((pattern, values.check_mode(mode)))
            except ValueError as e:
                raise UserError(f"overlays[{i}].modes.{pattern}: {e}",
                                where=locate(marks, ("overlays", i, "modes", pattern),
                                             path)) from None
        dest = spec.get("dest", "/")
        if ".." in dest.split("/"):
            raise UserError(f"overlays[{i}].dest: {dest!r} must not contain '..'",
                            where=locate(marks, ("overlays", i, "dest"), path),
                            hint="paths inside the rootfs may not contain '..'")
        overlays.append(Overlay(source=_resolve(base_for(("overlays", i)), spec["path"]),
                                dest=dest, uid=spec.get("uid", 0), gid=spec.get("gid", 0),
                                modes=tuple(modes)))
    output = data.get("output", {})
    formats = tuple(output.get("formats", ["tar"]))
    return Recipe(
        path=path,
        name=data["name"],
        base_image=_resolve(base_for(("base", "image")), base["image"]),
        base_sha256=base.get("sha256", "").lower() or None,
        base_arch=base.get("arch"),
        base_filesystems=base.get("filesystems", "all"),
        epoch=data.get("epoch"),
        elements=tuple(data.get("elements", [])),
        overlays=tuple(overlays),
        params=dict(data.get("params", {})),
        formats=formats,
        image_size=_parse_size(output.get("size"), locate(marks, ("output", "size"), path)),
        image_headroom=float(output.get("headroom", 0.2)),
        qcow2_compressed=bool(output.get("qcow2_compressed", False)),
        bundle=bool(output.get("bundle", True)),
        allow_shadowed=tuple(data.get("allow_shadowed", [])),
        marks=marks,
        data=data,
        overridden=frozenset(touched),
    )
