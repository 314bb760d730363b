"""Elements: diskimage-builder's directory format plus our element.yaml.

diskimage-builder's own resolver expands `element-deps` and
`element-provides`; we add a stable order (dependencies first), cycle and
missing-element reports that say who asked for what, and the declarative
`element.yaml`: typed params with defaults, files, dirs, symlinks,
templates, deletions and deployment mount entries.  Scripts in
`pre-install.d/`, `install.d/` and `post-install.d/` run inside the rootfs
in the appliance; phases that would run on the build host are refused.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from pathlib import Path
from typing import Any

import jsonschema

from . import values
from .errors import UserError
from .recipe import Recipe, dotted, load_yaml, locate, schema_hint

PROJECT_ELEMENTS = Path(__file__).resolve().parent.parent / "elements"
IMPLICIT_ELEMENT = "rootfs-base"  # provides diskimage-builder's "operating-system"
RUN_PHASES = ("pre-install.d", "install.d", "post-install.d")
HOST_PHASES = ("root.d", "extra-data.d", "block-device.d", "cleanup.d", "finalise.d",
               "pre-finalise.d", "environment.d")

PARAM_TYPES = ("str", "int", "bool", "enum", "ip", "port", "path", "kernel", "log_level",
               "name", "file", "files", "dir", "list", "listen", "command")
INPUT_TYPES = ("file", "files", "dir")

_MODE = {"type": ["string", "integer"]}
_ABS = {"type": "string", "pattern": "^/"}
_CONDITION = {
    "type": "object",
    "additionalProperties": False,
    "required": ["param"],
    "properties": {"param": {"type": "string"}, "is": {}, "in": {"type": "array"},
                   "set": {"type": "boolean"}},
}
_WHEN = {"oneOf": [_CONDITION, {"type": "array", "items": _CONDITION}]}
_OWNER = {"uid": {"type": "integer", "minimum": 0}, "gid": {"type": "integer", "minimum": 0}}

ELEMENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "description": {"type": "string"},
        "params": {
            "type": "object",
            "propertyNames": {"pattern": r"^[a-z][a-z0-9_]*$"},
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["type"],
                "properties": {
                    "type": {"enum": list(PARAM_TYPES)},
                    "default": {},
                    "required": {"type": "boolean"},
                    "values": {"type": "array"},
                    "items": {"enum": list(PARAM_TYPES)},
                    "description": {"type": "string"},
                },
            },
        },
        "files": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["src", "dest"],
            "properties": {"src": {"type": "string"}, "dest": _ABS, "mode": _MODE,
                           "elf_arch": {"type": "boolean"}, "when": _WHEN, **_OWNER}}},
        "dirs": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["path"],
            "properties": {"path": _ABS, "mode": _MODE, "when": _WHEN, **_OWNER}}},
        "symlinks": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["path", "target"],
            "properties": {"path": _ABS, "target": {"type": "string", "minLength": 1},
                           "when": _WHEN, **_OWNER}}},
        "templates": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["src", "dest"],
            "properties": {"src": {"type": "string"}, "dest": _ABS, "mode": _MODE,
                           "when": _WHEN, **_OWNER}}},
        "trees": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["src", "dest"],
            "properties": {"src": {"type": "string"}, "dest": _ABS, "when": _WHEN,
                           **_OWNER}}},
        "deletions": {"type": "array", "items": _ABS},
        "sources": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["archive", "dest"],
            "properties": {"archive": {"type": "string", "pattern": "^@"},
                           "patches": {"type": "string", "pattern": "^@"},
                           "dest": _ABS, "when": _WHEN}}},
        "rpms": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["src"],
            "properties": {"src": {"type": "string", "pattern": "^@"}, "when": _WHEN}}},
        "mounts": {"type": "array", "items": {"type": "object"}},
        "requires": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "properties": {"when": _WHEN,
                           "all_of": {"type": "array", "items": {"type": "string"}},
                           "any_of": {"type": "array", "items": {"type": "string"}}}}},
        "run": {"type": "object", "additionalProperties": False,
                "properties": {"when": _WHEN, "network": {"type": "boolean"},
                               "timeout": {"type": "number", "minimum": 1}}},
    },
}


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    name: str
    type: str
    default: Any
    required: bool
    values: tuple[Any, ...]
    items: str | None
    declared_by: str


@dataclasses.dataclass
class Element:
    name: str
    path: Path
    spec: dict[str, Any]
    marks: dict[tuple[str | int, ...], str]

    @property
    def yaml_path(self) -> Path:
        return self.path / "element.yaml"

    def where(self, *key: str | int) -> str:
        return locate(self.marks, key, self.yaml_path)

    def run_scripts(self) -> list[tuple[str, Path]]:
        """(phase, script) for scripts that run inside the rootfs."""
        out = []
        for phase in RUN_PHASES:
            d = self.path / phase
            if d.is_dir():
                out += [(phase, p) for p in sorted(d.iterdir()) if p.is_file()]
        return out


@dataclasses.dataclass
class ElementSet:
    elements: list[Element]
    params: dict[str, Any]              # resolved, typed values (None = unset)
    specs: dict[str, ParamSpec]
    missing_inputs: list[str]           # "key: path" of inputs that do not exist
    search_path: list[Path]

    def names(self) -> list[str]:
        return [e.name for e in self.elements]


def search_path(recipe: Recipe) -> list[Path]:
    paths = [recipe.directory / "elements"]
    paths += [Path(p) for p in os.environ.get("ELEMENTS_PATH", "").split(":") if p]
    paths.append(PROJECT_ELEMENTS)
    out: list[Path] = []
    for p in paths:
        if p.is_dir() and p.resolve() not in [q.resolve() for q in out]:
            out.append(p)
    return out


def _deps_file(path: Path) -> set[str]:
    try:
        return {line.strip() for line in path.read_text().splitlines() if line.strip()}
    except FileNotFoundError:
        return set()


def _who_needs(missing: str, paths: list[Path]) -> list[str]:
    needers = []
    for base in paths:
        for d in sorted(base.iterdir()):
            if d.is_dir() and missing in _deps_file(d / "element-deps"):
                needers.append(d.name)
    return needers


def resolve_elements(recipe: Recipe) -> list[Element]:
    """The recipe's elements with their dependencies, dependencies first."""
    from diskimage_builder import element_dependencies as dib

    paths = search_path(recipe)
    requested = [IMPLICIT_ELEMENT, *recipe.elements]
    logging.getLogger("diskimage_builder").setLevel(logging.CRITICAL)  # we report
    try:
        found = dib.get_elements(requested, paths=":".join(str(p) for p in paths))
    except dib.MissingElementException as e:
        missing = str(e).split("'")[1] if "'" in str(e) else str(e)
        needers = _who_needs(missing, paths)
        who = (f"element-deps of {', '.join(needers)}" if needers
               else recipe.where("elements"))
        raise UserError(f"element '{missing}' not found (required by {who})",
                        hint="searched " + ", ".join(map(str, paths))) from None
    except dib.AlreadyProvidedException as e:
        # dib's message is empty when a listed element is also provided by another one
        detail = str(e) or "; ".join(
            f"{name}: also provided by {', '.join(providers)}" for name in requested
            if (providers := [d.name for base in paths for d in sorted(base.iterdir())
                        if d.is_dir() and name in _deps_file(d / "element-provides")]))
        raise UserError(f"{recipe.where('elements')}: an element is provided twice: {detail}",
                        hint="drop one of the elements that provide it") from None
    except dib.MissingOSException:
        raise UserError(f"element '{IMPLICIT_ELEMENT}' must provide 'operating-system'",
                        hint=f"check {PROJECT_ELEMENTS / IMPLICIT_ELEMENT}") from None
    by_name = {name: Path(path) for name, path in found}
    deps = {name: _deps_file(path / "element-deps") for name, path in by_name.items()}
    provided = {p: name for name, path in by_name.items()
                for p in _deps_file(path / "element-provides")}
    order = _topo_order(requested, by_name, deps, provided)
    return [load_element(name, by_name[name]) for name in order]


def _topo_order(requested: list[str], by_name: dict[str, Path], deps: dict[str, set[str]],
                provided: dict[str, str]) -> list[str]:
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: list[str]) -> None:
        name = name if name in by_name else provided.get(name, name)
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            cycle = chain[chain.index(name):] + [name]
            raise UserError("element dependency cycle: " + " -> ".join(cycle),
                            where=str(by_name[name] / "element-deps") if name in by_name
                            else None, hint="remove one of these element-deps entries")
        state[name] = "active"
        for dep in sorted(deps.get(name, ())):
            visit(dep, [*chain, name])
        state[name] = "done"
        order.append(name)

    for name in requested:
        visit(name, [])
    for name in sorted(by_name):
        visit(name, [])
    return order


def load_element(name: str, path: Path) -> Element:
    yaml_path = path / "element.yaml"
    for phase in HOST_PHASES:
        if (path / phase).exists():
            raise UserError(f"{path / phase}: phase {phase} would run on the build host",
                            hint="rootfs-build runs element scripts only inside the rootfs "
                                 "(pre-install.d, install.d, post-install.d)")
    if not yaml_path.exists():
        return Element(name, path, {}, {})
    spec, marks = load_yaml(yaml_path, "element.yaml")
    if spec is None or spec == {}:
        spec = {}
    if not isinstance(spec, dict):
        raise UserError(f"{yaml_path}: element.yaml must be a mapping")
    errors = list(jsonschema.Draft202012Validator(ELEMENT_SCHEMA).iter_errors(spec))
    if errors:
        err = jsonschema.exceptions.best_match(errors) or errors[0]
        key = tuple(err.absolute_path)
        where = locate(marks, key, yaml_path)
        if err.validator == "additionalProperties":
            extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            unknown = (*key, extra[0] if extra else "?")
            raise UserError(f"unknown key {dotted(unknown)}",
                            where=locate(marks, unknown, yaml_path),
                            hint="see 'element.yaml' in README.md")
        raise UserError(f"{dotted(key)}: {err.message[:200]}", where=where,
                        hint=schema_hint(err))
    return Element(name, path, spec, marks)


# ---------------------------------------------------------------------------
# params


def _check_value(spec: ParamSpec, value: Any, recipe: Recipe,
                 key: tuple[str | int, ...]) -> Any:
    t = spec.type
    if value is None:
        return None
    if t == "str":
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ValueError(f"{value!r} is not a string")
        return str(value)
    if t == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{value!r} is not an integer")
        return value
    if t == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{value!r} is not true or false")
        return value
    if t == "enum":
        if value not in spec.values:
            raise ValueError(f"{value!r} is not one of {', '.join(map(str, spec.values))}")
        return value
    if t in values.CHECKS:
        return values.CHECKS[t](value)
    if t in ("file", "dir"):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{value!r} is not a path")
        return recipe.resolve_path(value, *key)
    if t in ("files", "list"):
        if not isinstance(value, list):
            raise ValueError(f"{value!r} is not a list")
        item_spec = dataclasses.replace(spec, type="file" if t == "files" else
                                        (spec.items or "str"))
        return [_check_value(item_spec, v, recipe, (*key, i)) for i, v in enumerate(value)]
    raise ValueError(f"unknown type {t}")


def resolve_params(recipe: Recipe, elements: list[Element]) -> ElementSet:
    """Type-check recipe params against what the elements declare."""
    specs: dict[str, ParamSpec] = {}
    for el in elements:
        for pname, decl in el.spec.get("params", {}).items():
            spec = ParamSpec(pname, decl["type"], decl.get("default"),
                             bool(decl.get("required", False)),
                             tuple(decl.get("values", ())), decl.get("items"), el.name)
            if pname in specs and (specs[pname].type, specs[pname].values) != (spec.type,
                                                                              spec.values):
                raise UserError(f"param {pname} is declared as {specs[pname].type} by "
                                f"{specs[pname].declared_by} and as {spec.type} by {el.name}",
                                where=el.where("params", pname))
            if spec.type == "enum" and not spec.values:
                raise UserError(f"param {pname}: an enum needs 'values'",
                                where=el.where("params", pname))
            specs.setdefault(pname, spec)
    for pname in recipe.params:
        if pname not in specs:
            close = difflib.get_close_matches(pname, list(specs), n=1)
            raise UserError(f"unknown param params.{pname}", where=recipe.where("params", pname),
                            hint=(f"did you mean '{close[0]}'?" if close else
                                  "no element in this recipe declares it"))
    resolved: dict[str, Any] = {}
    missing_inputs: list[str] = []
    for pname, spec in sorted(specs.items()):
        given = pname in recipe.params
        raw = recipe.params[pname] if given else spec.default
        where = recipe.where("params", pname) if given else next(
            el for el in elements if el.name == spec.declared_by).where("params", pname, "default")
        try:
            value = _check_value(spec, raw, recipe, ("params", pname))
        except ValueError as e:
            raise UserError(f"params.{pname}: {e}", where=where) from None
        resolved[pname] = value
        for p in ([value] if spec.type in ("file", "dir") else
                  (value or []) if spec.type == "files" else []):
            if p is None:
                continue
            ok = p.is_dir() if spec.type == "dir" else p.is_file()
            if not ok:
                missing_inputs.append(f"params.{pname}: {p}")
    return ElementSet(elements, resolved, specs, missing_inputs, [])


def _unset(value: Any) -> bool:
    return value is None or value == [] or value == ""


def required_missing(es: ElementSet, recipe: Recipe) -> list[str]:
    """Params that must be set but are not, as readable phrases."""
    missing = [f"params.{n}" for n, s in sorted(es.specs.items())
               if s.required and _unset(es.params.get(n))]
    for el in es.elements:
        for rule in el.spec.get("requires", []):
            if not condition_holds(rule.get("when"), es.params):
                continue
            why = ""
            if rule.get("when") and not isinstance(rule["when"], list):
                w = rule["when"]
                why = f" (because {w['param']} is {es.params.get(w['param'])})"
            for name in rule.get("all_of", []):
                if _unset(es.params.get(name)):
                    missing.append(f"params.{name}{why}")
            names = rule.get("any_of", [])
            if names and all(_unset(es.params.get(n)) for n in names):
                missing.append(" or ".join(f"params.{n}" for n in names) + why)
    return missing


def condition_holds(when: dict[str, Any] | list[dict[str, Any]] | None,
                    params: dict[str, Any]) -> bool:
    """An item's `when:`: {param, is | in | set}, or a list that must all hold."""
    if not when:
        return True
    if isinstance(when, list):
        return all(condition_holds(w, params) for w in when)
    value = params.get(when["param"])
    if "is" in when:
        return bool(value == when["is"])
    if "in" in when:
        return value in when["in"]
    if "set" in when:
        return (value not in (None, [], "")) == when["set"]
    return bool(value)


def load(recipe: Recipe) -> ElementSet:
    elements = resolve_elements(recipe)
    es = resolve_params(recipe, elements)
    es.search_path = search_path(recipe)
    for el in elements:
        for key in ("files", "templates", "trees", "dirs", "symlinks", "sources", "rpms",
                    "requires"):
            for i, item in enumerate(el.spec.get(key, [])):
                w = item.get("when")
                for cond in (w if isinstance(w, list) else [w] if w else []):
                    if cond["param"] not in es.specs:
                        raise UserError(f"{key}[{i}].when: unknown param {cond['param']}",
                                        where=el.where(key, i, "when"))
                for name in item.get("all_of", []) + item.get("any_of", []):
                    if name not in es.specs:
                        raise UserError(f"{key}[{i}]: unknown param {name}",
                                        where=el.where(key, i))
    return es
