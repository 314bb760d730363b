"""diskimage-builder's package-installs.yaml and pkg-map, read on the build
host with DIB's semantics (elements/package-installs/bin/package-installs-
squash and elements/pkg-map/bin/pkg-map of diskimage-builder 3.43):

- package-installs.yaml (or .json): package name -> nothing, one mapping or
  a list of them with `phase` (pre-install.d, install.d (default),
  post-install.d), `uninstall`, `build-only` (installed for the build,
  removed afterwards), `installtype` (source/package: only when the
  element's install type is that), `arch` / `not-arch` (comma-separated,
  DIB's names: amd64, arm64), `dib_python_version`, `when` ("VAR=value" or
  "VAR!=value", or a list that must all hold).  As in DIB, `uninstall` and
  `build-only` count when present whatever their value.
- pkg-map: JSON mapping generic names to the distribution's, the most
  specific section winning (release, distro, family, default); a name
  mapped to "" is dropped, a name with no mapping passes unchanged.

Nothing is executed: `when` reads the variables rootfs-build gives the
scripts (DIB's defaults and the recipe's dib_env).  A variable only an
environment.d script would set cannot be known on the host and is an error
that says to set it under dib_env.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from .errors import UserError
from .spec import load_yaml, locate

PHASES = ("pre-install.d", "install.d", "post-install.d")
KEYS = ("phase", "uninstall", "build-only", "installtype", "arch", "not-arch",
        "dib_python_version", "when")
FAMILIES = {"almalinux": "redhat", "fedora": "redhat", "rhel": "redhat", "centos": "redhat",
            "openeuler": "redhat", "rocky": "redhat", "debian": "debian", "ubuntu": "debian",
            "opensuse": "suse", "gentoo": "gentoo"}


@dataclasses.dataclass
class PhasePackages:
    install: list[str] = dataclasses.field(default_factory=list)
    uninstall: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ElementPackages:
    """What one element asks for, per phase, before mapping."""

    element: str
    source: Path
    phases: dict[str, PhasePackages]


def _where(marks: dict, key: tuple, path: Path) -> str:
    return locate(marks, key, path)


def _when_holds(statements: Any, env: dict[str, str], where: str) -> bool:
    if statements is None:
        return True
    items = statements if isinstance(statements, list) else [statements]
    for s in items:
        m = re.fullmatch(r"(?P<var>\w+)\s*(?P<op>!=|=)\s*(?P<val>.*)", str(s))
        if not m:
            raise UserError(f"malformed when: {s!r}", where=where,
                            hint="write VAR=value or VAR!=value")
        var, op, val = m["var"], m["op"], m["val"]
        if var not in env:
            raise UserError(f"when: {var} is not set", where=where,
                            hint=f"set {var} under dib_env: in the recipe; environment.d "
                                 "files are not read on the build host")
        if (env[var] == val) != (op == "="):
            return False
    return True


def _arch_holds(name: str, arch: Any, not_arch: Any, dib_arch: str, where: str) -> bool:
    if arch is not None and not_arch is not None:
        raise UserError(f"{name}: both arch and not-arch given", where=where,
                        hint="give one of them")
    if arch is not None:
        return dib_arch in [a.strip() for a in str(arch).split(",")]
    if not_arch is not None:
        return dib_arch not in [a.strip() for a in str(not_arch).split(",")]
    return True


def read_element(element: str, directory: Path, env: dict[str, str]) -> ElementPackages | None:
    """The element's package-installs file, evaluated for `env` (the
    scripts' DIB variables), or None when it has none."""
    phases = {p: PhasePackages() for p in PHASES}
    found: Path | None = None
    for name in ("package-installs.json", "package-installs.yaml"):
        path = directory / name
        if not path.is_file():
            continue
        found = path
        data, marks = load_yaml(path, "package-installs file")  # JSON is YAML too
        if data is None:
            continue
        if not isinstance(data, dict):
            raise UserError(f"{path}: a package-installs file maps package names to options",
                            hint="see diskimage-builder's package-installs element")
        installtype = env.get(f"DIB_INSTALLTYPE_{element.replace('-', '_')}",
                              env.get("DIB_DEFAULT_INSTALLTYPE", "source"))
        for pkg, params in data.items():
            where = _where(marks, (pkg,), path)
            entries = params if isinstance(params, list) else [params or {}]
            for i, param in enumerate(entries):
                param = param or {}
                if not isinstance(param, dict):
                    raise UserError(f"{pkg}: options must be a mapping", where=where)
                unknown = sorted(set(param) - set(KEYS))
                if unknown:
                    raise UserError(f"{pkg}: unknown option {unknown[0]!r}",
                                    where=_where(marks, (pkg, unknown[0]), path)
                                    if not isinstance(params, list)
                                    else _where(marks, (pkg, i, unknown[0]), path),
                                    hint=f"known options: {', '.join(KEYS)}")
                _collect(phases, pkg, param, installtype, env, where)
    if found is None:
        return None
    return ElementPackages(element, found, phases)


def _collect(phases: dict[str, PhasePackages], pkg: str, param: dict[str, Any],
             installtype: str, env: dict[str, str], where: str) -> None:
    """One entry, as package-installs-squash's collect_data takes it."""
    phase = param.get("phase", "install.d")
    if phase not in PHASES:
        raise UserError(f"{pkg}: phase {phase!r} is not one of {', '.join(PHASES)}",
                        where=where)
    lists = phases[phase]
    actions = ["install"]
    if "uninstall" in param or "build-only" in param:
        in_install = pkg in lists.install
        not_in_uninstall = pkg not in lists.uninstall
        if in_install and not_in_uninstall:
            if "build-only" not in param:
                return  # installed elsewhere without removal: nothing to undo
        else:
            if "uninstall" in param:
                actions = ["uninstall"]
            if "build-only" in param:
                actions = ["install", "uninstall"]
    else:
        lists.uninstall[:] = [p for p in lists.uninstall if p != pkg]
    wanted_type = param.get("installtype")
    if wanted_type is not None and wanted_type != installtype:
        return
    if not _arch_holds(pkg, param.get("arch"), param.get("not-arch"), env.get("ARCH", ""),
                       where):
        return
    version = param.get("dib_python_version")
    if version is not None and str(version) != env.get("DIB_PYTHON_VERSION", "3"):
        return
    if not _when_holds(param.get("when"), env, where):
        return
    for action in actions:
        target = lists.install if action == "install" else lists.uninstall
        if pkg not in target:
            target.append(pkg)


def map_names(element: str, directory: Path, names: list[str], env: dict[str, str]
              ) -> list[str]:
    """`names` through the element's pkg-map for the distribution in `env`
    (DISTRO_NAME, DIB_RELEASE), as pkg-map --missing-ok maps them."""
    path = directory / "pkg-map"
    if not path.is_file():
        return list(names)
    try:
        table = json.loads(path.read_text())
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a pkg-map (JSON): {e}",
                        hint="see diskimage-builder's pkg-map element") from None
    if not isinstance(table, dict):
        raise UserError(f"{path}: a pkg-map is a JSON object")
    distro = env.get("DISTRO_NAME", "")
    release = env.get("DIB_RELEASE", "")
    name_map = dict(table.get("default", {}))
    name_map.update(table.get("family", {}).get(FAMILIES.get(distro, ""), {}) or {})
    name_map.update(table.get("distro", {}).get(distro, {}) or {})
    name_map.update(table.get("release", {}).get(distro, {}).get(
        "8" if release == "8-stream" else release, {}) or {})
    out: list[str] = []
    for name in names:
        mapped = name_map.get(name, name)
        for pkg in str(mapped).split():
            if pkg not in out:
                out.append(pkg)
    return out
