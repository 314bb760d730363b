"""Typed declaration tables: YAML mappings read into frozen dataclasses.

Every kind of YAML mapping the tool reads (the recipe and its sections,
element.yaml and its items) is declared once, as a frozen dataclass whose
fields carry their type, default and one line of documentation
(``field(default, doc=...)``).  That declaration alone drives:

- loading: ``load(cls, data, ctx)`` checks types, required keys and unknown
  keys (with a "did you mean"), runs the value checks of ``Annotated``
  types, and builds the instance; every error is a ``UserError`` naming
  ``file:line`` (or the ``--set`` option) and the key path;
- ``--set KEY.PATH=VALUE``: overrides are applied to the raw data first and
  then checked by the same table, their keys marked ``--set KEY.PATH``;
- defaults: a field's default is the one default;
- documentation: ``reference(cls)`` renders the table as the README's
  reference (a test keeps the README equal to it).

Supported field types: str, int, float, bool, Any, ``Literal[...]`` (an
enum), ``X | None``, ``tuple[X, ...]`` (a YAML list), ``dict[str, X]``, a
nested table, and ``Annotated[X, Check(fn, "what")]`` where ``fn`` is one
of builder.values' checks (value -> value, ValueError with a message).
``Annotated[Table, Shorthand("key")]`` also accepts a bare scalar as
``{key: scalar}``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import UserError

MAX_YAML_BYTES = 1 << 20

Marks = dict[tuple[str | int, ...], str]


@dataclasses.dataclass(frozen=True)
class Check:
    """A value check for an Annotated field: `fn(value, ctx, key)` or
    `fn(value)` returns the stored value or raises ValueError."""

    fn: Callable[..., Any]
    what: str                 # how the reference names the type, e.g. "ip address"
    with_context: bool = False


@dataclasses.dataclass(frozen=True)
class Shorthand:
    """A bare scalar stands for {key: scalar}."""

    key: str


@dataclasses.dataclass(frozen=True)
class OneOrMany:
    """A list field that also takes a single item (a mapping) for a list of one."""


def field(default: Any = dataclasses.MISSING, *, doc: str, example: str | None = None,
          factory: Callable[[], Any] | None = None, key: str | None = None) -> Any:
    """A table field: its default (none = required), its documentation, and
    its YAML key when that is not a Python name (`is`, `in`)."""
    meta = {"doc": doc, "example": example, "key": key}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class Context:
    """Where the data came from, for errors and for relative paths.

    `overridden` holds the key paths set with --set: a relative path given
    there is relative to the current directory, not to `path`'s."""

    path: Path
    marks: Marks
    what: str = "recipe"
    overridden: frozenset[tuple[str | int, ...]] = frozenset()

    def where(self, key: tuple[str | int, ...]) -> str:
        return locate(self.marks, key, self.path)

    def error(self, key: tuple[str | int, ...], message: str, hint: str | None = None
              ) -> UserError:
        return UserError(f"{dotted(key)}: {message}", where=self.where(key), hint=hint)

    def relative_base(self, key: tuple[str | int, ...]) -> Path:
        if any(key[:len(t)] == t for t in self.overridden):
            return Path.cwd()
        return self.path.parent


def dotted(key: tuple[str | int, ...]) -> str:
    out = ""
    for part in key:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(top level)"


def locate(marks: Marks, key: tuple[str | int, ...], path: Path) -> str:
    """'file:line' of `key`, or of its nearest parent that has one."""
    probe = tuple(key)
    while probe not in marks and probe:
        probe = probe[:-1]
    return marks.get(probe, str(path))


# ---------------------------------------------------------------------------
# YAML with line numbers (plain data only: no aliases, merge keys, duplicate or
# non-string keys)


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
    if len(raw) > MAX_YAML_BYTES:
        raise UserError(f"{path}: {what} is larger than {MAX_YAML_BYTES >> 20} MiB")
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
# loading

_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "empty"
    return repr(value)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def load(cls: type, data: Any, ctx: Context, key: tuple[str | int, ...] = ()) -> Any:
    """`data` (plain YAML data) as an instance of table `cls`."""
    if not isinstance(data, dict):
        raise ctx.error(key, f"expected a mapping, not {_describe(data)}",
                        hint=f"write {dotted(key)} as a mapping of keys (see README.md)")
    hints = _hints(cls)
    fields = {yaml_key(f): f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = (f"did you mean '{close[0]}'?" if close
                    else f"known keys: {', '.join(fields)}")
            raise UserError(f"unknown key {dotted((*key, name))}",
                            where=ctx.where((*key, name)), hint=hint)
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name in data:
            values[f.name] = convert(hints[f.name], data[name], ctx, (*key, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UserError(f"{dotted((*key, name))} is required", where=ctx.where(key),
                            hint=f"add it to the {ctx.what}; see README.md")
    return cls(**values)


def yaml_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name


def convert(tp: Any, value: Any, ctx: Context, key: tuple[str | int, ...]) -> Any:
    """`value` checked and converted to type `tp`."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *extras = typing.get_args(tp)
        for extra in extras:
            if isinstance(extra, Shorthand) and not isinstance(value, dict | list):
                value = {extra.key: value}
            if isinstance(extra, OneOrMany) and isinstance(value, dict):
                value = [value]
        out = convert(base, value, ctx, key)
        for extra in extras:
            if isinstance(extra, Check) and out is not None:
                try:
                    out = extra.fn(out, ctx, key) if extra.with_context else extra.fn(out)
                except ValueError as e:
                    raise ctx.error(key, str(e)) from None
        return out
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return convert(rest[0], value, ctx, key)
        raise TypeError(f"unsupported union {tp}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != any(
                isinstance(a, bool) for a in allowed):
            raise ctx.error(key, f"{_describe(value)} is not one of "
                                 f"{', '.join(map(str, allowed))}",
                            hint="use one of the values listed")
        return value
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, list):
            raise ctx.error(key, f"expected a list, not {_describe(value)}",
                            hint=f"write {dotted(key)} as a list, e.g. [a, b]")
        return tuple(convert(item_tp, v, ctx, (*key, i)) for i, v in enumerate(value))
    if origin is dict:
        key_tp, item_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ctx.error(key, f"expected a mapping, not {_describe(value)}",
                            hint=f"write {dotted(key)} as a mapping")
        return {convert(key_tp, k, ctx, (*key, k)): convert(item_tp, v, ctx, (*key, k))
                for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return load(tp, value, ctx, key)
    if tp is Any:
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ctx.error(key, f"{_describe(value)} is not a path",
                            hint=f"write {dotted(key)} as a path")
        return Path(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ctx.error(key, f"{_describe(value)} is not a number",
                            hint=f"write {dotted(key)} as a number")
        return float(value)
    if tp in (str, int, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ctx.error(key, f"{_describe(value)} is not {_TYPE_WORDS[tp]}",
                            hint=f"write {dotted(key)} as {_TYPE_WORDS[tp]}")
        return value
    raise TypeError(f"unsupported table type {tp!r}")


# ---------------------------------------------------------------------------
# documentation


def type_name(tp: Any) -> str:
    """How the reference names a field's type."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *extras = typing.get_args(tp)
        checks = [e.what for e in extras if isinstance(e, Check)]
        shorthand = [e.key for e in extras if isinstance(e, Shorthand)]
        text = checks[0] if checks else type_name(base)
        if shorthand:
            text += f" (or just its {shorthand[0]})"
        return text
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(type_name(a) for a in rest)
    if origin is Literal:
        return " \\| ".join(str(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping to {type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if tp is Any:
        return "any"
    return {str: "text", int: "integer", float: "number", bool: "true/false",
            Path: "path"}.get(tp, str(tp))


def _default_text(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    value = (f.default if f.default is not dataclasses.MISSING
             else f.default_factory())  # type: ignore[operator]
    if value is None:
        return ""
    if dataclasses.is_dataclass(value):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, dict):
        return "{}"
    return str(value)


def _strip(tp: Any) -> Any:
    """`tp` without Annotated and Optional wrappers."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            rest = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(rest) != 1:
                return tp
            tp = rest[0]
        else:
            return tp


def reference(cls: type, prefix: str = "") -> str:
    """A markdown table of every key of `cls` and of the tables inside it."""
    rows: list[str] = []
    expanded: dict[type, str] = {}   # a table shown once; later uses point to it

    def walk(table: type, path: str) -> None:
        hints = _hints(table)
        for f in dataclasses.fields(table):
            tp = hints[f.name]
            bare = _strip(tp)
            origin = typing.get_origin(bare)
            key = f"{path}{yaml_key(f)}"
            inner, shown_tp = None, tp
            if origin is tuple:
                shown_tp, key = typing.get_args(bare)[0], f"{key}[]"
                inner = _strip(shown_tp)
            elif origin is dict:
                shown_tp, key = typing.get_args(bare)[1], f"{key}.NAME"
                inner = _strip(shown_tp)
            elif dataclasses.is_dataclass(bare):
                inner = bare
            doc = " ".join(f.metadata.get("doc", "").split())
            example = f.metadata.get("example")
            if example:
                doc = doc.rstrip(".") + f"; e.g. `{example}`"
            shown = type_name(shown_tp)
            nested = isinstance(inner, type) and dataclasses.is_dataclass(inner)
            if nested and inner in expanded:
                shown += f" (keys as in `{expanded[inner]}`)"
            rows.append(f"| `{key}` | {shown} | {_default_text(f)} | {doc} |")
            if nested and inner not in expanded and inner is not table:
                expanded[inner] = key  # type: ignore[index]
                walk(inner, f"{key}.")  # type: ignore[arg-type]

    walk(cls, prefix)
    head = "| key | type | default | meaning |\n|---|---|---|---|\n"
    return head + "\n".join(rows) + "\n"
