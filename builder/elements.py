"""Elements: diskimage-builder's directory format plus our element.yaml.

diskimage-builder's own resolver expands `element-deps` and
`element-provides`; we add a stable order (dependencies first), cycle and
missing-element reports that say who asked for what, and the declarative
`element.yaml` (builder.element_spec): typed params with defaults and
everything the element contributes.  Params are checked once, here, by
their declared type; everything downstream reads the typed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from pathlib import Path
from typing import Any

from . import shipped
from .element_spec import PARAM_TYPES, ElementSpec, ParamDecl, holds
from .errors import UserError
from .recipe import Recipe
from .spec import Context, load_yaml
from .spec import load as load_table

IMPLICIT_ELEMENT = "rootfs-base"  # provides diskimage-builder's "operating-system"
RUN_PHASES = ("pre-install.d", "install.d", "post-install.d")
# diskimage-builder runs these on the build host (or around the disk image):
# refused, never run.
HOST_PHASES = ("root.d", "extra-data.d", "block-device.d", "cleanup.d", "finalise.d",
               "pre-finalise.d", "post-root.d")

# What an element directory may hold, and what rootfs-build does with it.
# Anything else is refused unless it is data for the element's own scripts
# (the element has in-rootfs phases: its whole directory is copied to the
# hooks tree they run from) or a file element.yaml names.
ELEMENT_CONTENT = {
    "element-deps": "dependencies, resolved with diskimage-builder's resolver",
    "element-provides": "virtual elements this one provides",
    "element.yaml": "rootfs-build's declarations (builder/element_spec.py)",
    "pre-install.d": "scripts run inside the rootfs, phase by phase across elements",
    "install.d": "scripts run inside the rootfs, phase by phase across elements",
    "post-install.d": "scripts run inside the rootfs, phase by phase across elements",
    "environment.d": "sourced (inside the appliance) before each phase",
    "bin": "on PATH while the phases run",
    "static": "copied into the rootfs like an overlay",
    "package-installs.yaml": "packages for the package step (diskimage-builder's semantics)",
    "package-installs.json": "packages for the package step (diskimage-builder's semantics)",
    "pkg-map": "maps the names of package-installs.yaml to the distribution's",
}
# Known not to matter for the rootfs: documentation and diskimage-builder's
# own tests and Python package files.
ELEMENT_ALLOWED = ("README", "README.rst", "README.md", "releasenotes", "tests",
                   "test-elements", "__init__.py", "__pycache__")
# diskimage-builder features rootfs-build does not provide, and why.
ELEMENT_UNSUPPORTED = {
    "source-repository-": "it fetches sources on the build host at build time; give them "
                          "as file params or an install tree instead",
    "svc-map": "service name mapping is not supported; enable units from a script "
               "(systemctl enable) or an overlay",
    "binary-deps.d": "ramdisk images are not built by rootfs-build",
    "init.d": "ramdisk images are not built by rootfs-build",
    "ramdisk-install.d": "ramdisk images are not built by rootfs-build",
    "block-device-": "rootfs-build writes a filesystem, not a partitioned disk",
}


def dib_elements_dir() -> Path | None:
    """diskimage-builder's own elements, searched last as disk-image-create does."""
    try:
        from diskimage_builder import paths
    except ImportError:
        return None
    return Path(paths.get_path("elements"))


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """A param as the elements of a build declare it."""

    name: str
    decl: ParamDecl
    declared_by: str

    @property
    def type(self) -> str:
        return self.decl.type

    @property
    def is_input(self) -> bool:
        return PARAM_TYPES[self.decl.type].input


@dataclasses.dataclass(frozen=True)
class Element:
    name: str
    path: Path
    spec: ElementSpec
    ctx: Context

    @property
    def yaml_path(self) -> Path:
        return self.path / "element.yaml"

    def where(self, *key: str | int) -> str:
        return self.ctx.where(key)

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
    """The elements of a build, dependencies first, with their params."""

    elements: list[Element]
    params: dict[str, Any]              # resolved, typed values (None = unset)
    specs: dict[str, ParamSpec]
    missing_inputs: list[str]           # "key: path" of inputs that do not exist
    search_path: list[Path]
    param_where: dict[str, str]         # where each param's value was given

    def names(self) -> list[str]:
        return [e.name for e in self.elements]

    def by_name(self, name: str) -> Element:
        return next(e for e in self.elements if e.name == name)


def search_path(recipe: Recipe) -> list[Path]:
    """The recipe's elements/ (when it has one), ELEMENTS_PATH, the shipped
    elements, then diskimage-builder's (an earlier directory's element of a
    name wins).  An ELEMENTS_PATH entry that is not a readable directory is
    an error; empty entries are skipped."""
    paths = [recipe.directory / "elements"] if (recipe.directory / "elements").is_dir() else []
    for entry in os.environ.get("ELEMENTS_PATH", "").split(":"):
        if entry:
            paths.append(_readable_dir(Path(entry), f"ELEMENTS_PATH entry {entry}",
                                       "fix ELEMENTS_PATH (directories of elements, "
                                       "separated by ':')"))
    paths.append(_readable_dir(shipped.path("elements"), "the shipped elements",
                               "reinstall rootfs-build"))
    dib = dib_elements_dir()
    if dib is not None and dib.is_dir():
        paths.append(dib)
    out: list[Path] = []
    for p in paths:
        if p.resolve() not in [q.resolve() for q in out]:
            out.append(p)
    return out


def _readable_dir(path: Path, what: str, hint: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{what}: {path} is not a directory", hint=hint)
    if not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"{what}: {path} is not readable", hint=hint)
    return path


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
    requested = [IMPLICIT_ELEMENT, *recipe.spec.elements]
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
        raise _provided_twice(recipe, requested, paths, str(e)) from None
    except dib.MissingOSException:
        raise UserError(f"element '{IMPLICIT_ELEMENT}' must provide 'operating-system'",
                        hint=f"check {shipped.path('elements') / IMPLICIT_ELEMENT}") from None
    by_name = {name: Path(path) for name, path in found}
    deps = {name: _deps_file(path / "element-deps") for name, path in by_name.items()}
    provided = {p: name for name, path in by_name.items()
                for p in _deps_file(path / "element-provides")}
    order = _topo_order(requested, by_name, deps, provided)
    chains = _chains(requested, deps, provided)
    out = []
    for name in order:
        el = load_element(name, by_name[name])
        check_element_content(el, chains.get(name, [name]))
        out.append(el)
    return out


def _chains(requested: list[str], deps: dict[str, set[str]],
            provided: dict[str, str]) -> dict[str, list[str]]:
    """For each element, the shortest chain of element-deps from an element
    the recipe asked for (breadth first, names sorted)."""
    chains = {name: [name] for name in requested}
    queue = list(requested)
    while queue:
        name = queue.pop(0)
        for dep in sorted(deps.get(name, ())):
            dep = provided.get(dep, dep)
            if dep not in chains:
                chains[dep] = [*chains[name], dep]
                queue.append(dep)
    return chains


def pulled_in(chain: list[str]) -> str:
    """' (pulled in by a -> b)' for an element that came as a dependency."""
    return f" (pulled in by {' -> '.join(chain[:-1])})" if len(chain) > 1 else ""


def _provided_twice(recipe: Recipe, requested: list[str], paths: list[Path],
                    detail: str) -> UserError:
    """The one line for two elements providing one name, with the chain of
    element-deps that brought the second one in."""
    from diskimage_builder import element_dependencies as dib

    all_elements = dib._find_all_elements(":".join(str(p) for p in paths))
    deps = {n: set(e.depends) for n, e in all_elements.items()}
    provides = {n: set(e.provides) for n, e in all_elements.items()}
    chains = _chains(requested, deps, {})
    virtual = detail.split(":", 1)[0].strip() if detail else ""
    clashes = [virtual] if virtual else [n for n in requested if any(
        n in provides[m] for m in chains if m in provides)]
    parts = []
    for name in clashes:
        providers = sorted(m for m in chains if name in provides.get(m, ()))
        shown = " and by ".join(f"{m}{pulled_in(chains[m])}" for m in providers)
        if name in requested and name not in providers:
            parts.append(f"{name} is listed in the recipe and also provided by {shown}")
        else:
            parts.append(f"{name} is provided by {shown}")
    hint = "drop one of the elements that provide it"
    if "operating-system" in clashes:
        hint = ("the base image is the operating system (rootfs-base provides it): drop the "
                "element that brings another one in")
    return UserError(f"{recipe.where('elements')}: an element is provided twice: "
                     + "; ".join(parts), hint=hint)


def check_element_content(el: Element, chain: list[str]) -> None:
    """Nothing in an element is silently ignored: every entry is something
    rootfs-build acts on (ELEMENT_CONTENT), known-harmless (ELEMENT_ALLOWED),
    data for the element's own scripts, or a file element.yaml names; host
    phases and unsupported diskimage-builder features are refused."""
    has_scripts = any((el.path / p).is_dir() for p in RUN_PHASES)
    named = _named_by_yaml(el)
    for entry in sorted(el.path.iterdir()):
        name = entry.name
        if name in ELEMENT_CONTENT or name in ELEMENT_ALLOWED or name.endswith(".pyc"):
            continue
        if name in HOST_PHASES:
            raise UserError(f"{entry}: phase {name} of element {el.name}{pulled_in(chain)} "
                            "would run on the build host",
                            hint="rootfs-build runs element scripts only inside the rootfs "
                                 "(pre-install.d, install.d, post-install.d); drop the "
                                 "element or move the script there")
        for prefix, why in ELEMENT_UNSUPPORTED.items():
            if name == prefix or (prefix.endswith("-") and name.startswith(prefix)):
                raise UserError(f"{entry}: element {el.name}{pulled_in(chain)} uses "
                                f"{prefix.rstrip('-') + '*' if prefix.endswith('-') else name}"
                                ", which rootfs-build does not support",
                                hint=why)
        if name in named or has_scripts:
            continue  # data its scripts read, or a file element.yaml places
        raise UserError(f"{entry}: element {el.name}{pulled_in(chain)} has {name}, which "
                        "rootfs-build would not use (nothing in the element reads it)",
                        hint="remove it, or say with element.yaml what it is for; "
                             "see 'Elements' in README.md")


def _named_by_yaml(el: Element) -> set[str]:
    """Top-level entries of the element directory that element.yaml names."""
    s = el.spec
    srcs = [f.src for f in s.files] + [t.src for t in s.templates] + [t.src for t in s.trees]
    return {Path(src).parts[0] for src in srcs if not src.startswith("@") and Path(src).parts}


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
    if not yaml_path.exists():
        return Element(name, path, ElementSpec(), Context(yaml_path, {}, "element.yaml"))
    data, marks = load_yaml(yaml_path, "element.yaml")
    ctx = Context(yaml_path, marks, "element.yaml")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{yaml_path}: element.yaml must be a mapping",
                        hint="see 'element.yaml' in README.md")
    return Element(name, path, load_table(ElementSpec, data, ctx), ctx)


# ---------------------------------------------------------------------------
# params


def check_param(spec: ParamSpec, value: Any, recipe: Recipe,
                key: tuple[str | int, ...], item_type: str | None = None) -> Any:
    """`value` as the typed value of param `spec` (or of one of its items);
    ValueError with a message otherwise.  Input paths are resolved against
    the recipe's directory (the current one for --set values)."""
    t = item_type or spec.type
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
        if value not in spec.decl.values:
            raise ValueError(f"{value!r} is not one of {', '.join(map(str, spec.decl.values))}")
        return value
    if t in ("file", "dir"):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{value!r} is not a path")
        return recipe.resolve_path(value, *key)
    if t in ("files", "list"):
        if not isinstance(value, list):
            raise ValueError(f"{value!r} is not a list")
        item = "file" if t == "files" else (spec.decl.items or "str")
        return [check_param(spec, v, recipe, (*key, i), item) for i, v in enumerate(value)]
    check = PARAM_TYPES[t].check
    assert check is not None, t
    return check(value)


def resolve_params(recipe: Recipe, elements: list[Element]) -> ElementSet:
    """Type-check recipe params against what the elements declare."""
    specs: dict[str, ParamSpec] = {}
    for el in elements:
        for pname, decl in el.spec.params.items():
            spec = ParamSpec(pname, decl, el.name)
            known = specs.get(pname)
            if known is not None and (known.type, known.decl.values) != (decl.type,
                                                                         decl.values):
                raise UserError(f"param {pname} is declared as {known.type} by "
                                f"{known.declared_by} and as {decl.type} by {el.name}",
                                where=el.where("params", pname))
            if decl.type == "enum" and not decl.values:
                raise UserError(f"param {pname}: an enum needs 'values'",
                                where=el.where("params", pname))
            specs.setdefault(pname, spec)
    given = recipe.spec.params
    for pname in given:
        if pname not in specs:
            close = difflib.get_close_matches(pname, list(specs), n=1)
            raise UserError(f"unknown param params.{pname}", where=recipe.where("params", pname),
                            hint=(f"did you mean '{close[0]}'?" if close else
                                  "no element in this recipe declares it"))
    resolved: dict[str, Any] = {}
    wheres: dict[str, str] = {}
    missing_inputs: list[str] = []
    by_name = {el.name: el for el in elements}
    for pname, spec in sorted(specs.items()):
        if pname in given:
            raw, where = given[pname], recipe.where("params", pname)
        else:
            raw = spec.decl.default
            where = by_name[spec.declared_by].where("params", pname, "default")
        try:
            value = check_param(spec, raw, recipe, ("params", pname))
        except ValueError as e:
            raise UserError(f"params.{pname}: {e}", where=where) from None
        resolved[pname], wheres[pname] = value, where
        for p in ([value] if spec.type in ("file", "dir") else
                  (value or []) if spec.type == "files" else []):
            if p is None:
                continue
            try:
                found = p.is_dir() if spec.type == "dir" else p.is_file()
            except OSError:  # a name too long for the filesystem, say
                found = False
            if not found:
                missing_inputs.append(f"params.{pname}: {p}")
    return ElementSet(elements, resolved, specs, missing_inputs, [], wheres)


def is_unset(value: Any) -> bool:
    return value is None or value == [] or value == ""


def required_missing(es: ElementSet) -> list[str]:
    """Params that must be set but are not, as readable phrases."""
    missing = [f"params.{n}" for n, s in sorted(es.specs.items())
               if s.decl.required and is_unset(es.params.get(n))]
    for el in es.elements:
        for rule in el.spec.requires:
            if not holds(rule.when, es.params):
                continue
            why = ""
            if len(rule.when) == 1:
                w = rule.when[0]
                why = f" (because {w.param} is {es.params.get(w.param)})"
            for name in rule.all_of:
                if is_unset(es.params.get(name)):
                    missing.append(f"params.{name}{why}")
            if rule.any_of and all(is_unset(es.params.get(n)) for n in rule.any_of):
                missing.append(" or ".join(f"params.{n}" for n in rule.any_of) + why)
    return missing


def _check_param_references(el: Element, specs: dict[str, ParamSpec]) -> None:
    """Every param an element's items name is declared by some element."""
    s = el.spec
    groups: dict[str, tuple[Any, ...]] = {
        "files": s.files, "dirs": s.dirs, "symlinks": s.symlinks, "templates": s.templates,
        "trees": s.trees, "sources": s.sources, "rpms": s.rpms, "requires": s.requires}
    for key, items in groups.items():
        for i, item in enumerate(items):
            for j, cond in enumerate(item.when):
                if cond.param not in specs:
                    raise UserError(f"{key}[{i}].when: unknown param {cond.param}",
                                    where=el.where(key, i, "when", j))
            for name in getattr(item, "all_of", ()) + getattr(item, "any_of", ()):
                if name not in specs:
                    raise UserError(f"{key}[{i}]: unknown param {name}",
                                    where=el.where(key, i))
    for j, cond in enumerate(s.run.when):
        if cond.param not in specs:
            raise UserError(f"run.when: unknown param {cond.param}",
                            where=el.where("run", "when", j))
    for pname, decl in s.params.items():
        ref = decl.vermagic
        if ref is not None and (ref not in specs or specs[ref].type != "kernel"):
            raise UserError(f"params.{pname}.vermagic: {ref} is not a kernel param",
                            where=el.where("params", pname, "vermagic"),
                            hint="name a param of type kernel")
        if (decl.elf_arch or ref) and not PARAM_TYPES[decl.type].input:
            raise UserError(f"params.{pname}: elf_arch and vermagic apply to file params",
                            where=el.where("params", pname))


def load(recipe: Recipe) -> ElementSet:
    elements = resolve_elements(recipe)
    es = resolve_params(recipe, elements)
    es.search_path = search_path(recipe)
    for el in elements:
        _check_param_references(el, es.specs)
    return es
