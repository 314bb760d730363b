"""The kinds of build step, each a cached layer:

    base     the base image's tree, read with libguestfs          [appliance]
    element  an element's declared files, dirs, symlinks, templates, trees
    source   a release tarball with its patches applied (on the host, checked)
    rpm      RPM payloads unpacked on the build host (scriptlets not run)
    phases   every element's pre-install.d, install.d and post-install.d
             scripts, phase by phase across all elements as diskimage-builder
             runs them, inside the rootfs                         [appliance]
    overlay  a directory of the recipe

A step's key is the sha256 of what the step is made of: content, never a
path on the build host, so the same recipe and inputs give the same keys in
any directory and on any machine.  Steps that run inside the rootfs also
cover every layer below them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from . import (
    FORMAT_VERSION,
    assemble,
    checks,
    dib_packages,
    elfinfo,
    emulation,
    guestfs_io,
    packages,
    ui,
)
from .cache import Cache
from .element_spec import holds
from .elements import RUN_PHASES, Element, ElementSet
from .errors import UserError
from .filelayers import FilePlan, Item, param_text, plan_overlay
from .layer import Layer, build_layer_from_tar
from .recipe import OverlaySpec, PackagesSpec, Recipe
from .session import Session
from .tarfmt import DIR, Member

# Where the phases' scripts and their element directories are, inside the
# rootfs during the run (a tmpfs: nothing of it ends in a layer).  It is
# diskimage-builder's in-chroot hooks path, which scripts may name.
HOOKS_DIR = "/tmp/in_target.d"
INPUTS_DIR = "/tmp/rootfs-build-inputs"
# dib-run-parts runs executable files whose names match this, ordered as
# `LANG=C sort -n` orders them.
RUN_PARTS_NAME = re.compile(r"^[0-9A-Za-z_-]+$")
# Element content that is not copied into the hooks tree (diskimage-builder's
# own exclusions).
HOOKS_SKIP = ("tests", "__pycache__")


def digest(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


@dataclasses.dataclass
class LayerRecord:
    kind: str
    label: str
    key: str
    built: bool
    layer: Layer
    info: dict[str, Any]


class Step(Protocol):
    kind: str
    label: str
    phase: str

    def key(self, ctx: StepContext) -> str | None:
        """The step's cache key, or None when, all inputs known, it has
        nothing to do (it then leaves no layer)."""

    def build(self, ctx: StepContext, tmp: Path) -> dict[str, Any]: ...

    def done(self, ctx: StepContext, rec: LayerRecord) -> None: ...


class StepContext:
    """What steps share while a build runs: the layers so far, the inputs
    recorded for the manifest, the base image's facts, a locked work dir."""

    def __init__(self, recipe: Recipe, cache: Cache, session: Session, timeout: float | None,
                 smp: int):
        self.recipe = recipe
        self.cache = cache
        self.session = session
        self.timeout = timeout
        self.smp = smp
        self.es: ElementSet | None = None
        self.records: list[LayerRecord] = []
        self.inputs: dict[str, dict[str, str]] = {}
        self.base_info: dict[str, Any] = {}
        self.notes: list[str] = []
        self._workdir: Path | None = None
        # the locked work dir, removed at the end
        self._scratch = contextlib.ExitStack()

    def workdir(self) -> Path:
        # Locked like a cache staging dir, so that `cache prune` or another
        # build's orphan sweep leaves it alone while this build runs.
        if self._workdir is None:
            self._workdir = self._scratch.enter_context(self.cache.staging("work-"))
        return self._workdir

    def close(self) -> None:
        for rec in self.records:
            rec.layer.close()
        self._scratch.close()

    def record_input(self, role: str, shown: str, path: Path) -> str:
        sha = self.cache.file_sha256(path, label=role)
        self.inputs[role] = {"path": shown, "sha256": sha}
        return sha

    def tree(self, records: list[LayerRecord] | None = None) -> assemble.Tree:
        """The merged tree of `records` (default: every layer so far)."""
        tree = assemble.Tree()
        for rec in self.records if records is None else records:
            tree.apply(rec.layer)
        return tree

    def epoch(self) -> tuple[int, str]:
        env = os.environ.get("SOURCE_DATE_EPOCH")
        if env:
            if not env.isdigit():
                raise UserError(f"SOURCE_DATE_EPOCH={env!r} is not a number of seconds")
            return int(env), "SOURCE_DATE_EPOCH"
        if self.recipe.spec.epoch is not None:
            return self.recipe.spec.epoch, "recipe"
        base = next(r for r in self.records if r.kind == "base")
        return int(base.info["summary"]["newest_mtime"]), "base image newest file"

    def appliance(self, label: str, **kw: Any) -> guestfs_io.Appliance:
        return guestfs_io.Appliance(label, session=self.session, smp=self.smp,
                                    timeout=kw.pop("timeout", None) or self.timeout, **kw)

    def run(self, step: Step) -> LayerRecord | None:
        with self.session.enter(step.phase):
            key = step.key(self)
            if key is None:
                return None
            d, built = self.cache.get_or_build(key, lambda tmp: step.build(self, tmp),
                                               kind=step.kind, label=step.label)
        rec = LayerRecord(step.kind, step.label, key, built, Layer(d, step.label),
                          self.cache.meta(key).get("info", {}))
        self.records.append(rec)
        ui.info(f"{step.kind} layer {step.label}: {'built' if built else 'from cache'} "
                f"({key[:12]})")
        step.done(self, rec)
        return rec


# ---------------------------------------------------------------------------
# base


def check_base_image(recipe: Recipe) -> None:
    """The base image exists and is a usable file (before anything is written)."""
    image = recipe.spec.base.image
    if not image.exists():
        raise UserError(f"base image {image} not found", where=recipe.where("base", "image"),
                        hint="fix base.image (relative to the recipe) or pass "
                             "--set base.image=PATH")
    if not image.is_file():
        raise UserError(f"base image {image} is not a file", where=recipe.where("base", "image"),
                        hint="base.image must name a qcow2 or raw disk image file")
    guestfs_io.image_format(image)


class BaseStep:
    kind = "base"
    phase = "base image extraction"

    def __init__(self) -> None:
        self.label = "base"
        self.fmt = "raw"

    def key(self, ctx: StepContext) -> str:
        r = ctx.recipe
        image = r.spec.base.image
        self.label = f"base {image.name}"
        self.fmt = guestfs_io.image_format(image)
        with ctx.session.enter("hashing the base image"):
            sha = ctx.record_input("base.image", r.written("base", "image"), image)
        if r.spec.base.sha256 and sha != r.spec.base.sha256:
            raise UserError(f"base image {image} has sha256 {sha}, the recipe expects "
                            f"{r.spec.base.sha256}", where=r.where("base", "sha256"),
                            hint="the image changed or the checksum is wrong")
        return digest({"kind": "base", "format": FORMAT_VERSION, "image": sha, "fmt": self.fmt,
                       "filesystems": r.spec.base.filesystems})

    def build(self, ctx: StepContext, tmp: Path) -> dict[str, Any]:
        image = ctx.recipe.spec.base.image
        guestfs_io.check_image(image, self.fmt)
        app = ctx.appliance(f"base image {image.name}")
        app.add_drive(image, fmt=self.fmt, readonly=True)
        times = {"start": time.monotonic()}
        stats: dict[str, float] = {}
        with app:
            times["launched"] = time.monotonic()
            info = app.inspect_base(str(image), mount=ctx.recipe.spec.base.filesystems == "all")
            check_arch(ctx, info.arch)  # before the long extraction
            times["inspected"] = time.monotonic()
            ui.step(f"extracting {image.name}: {info.os_release.get('PRETTY_NAME', 'unknown OS')}"
                    f" ({info.arch}), root {info.root}")
            with ui.bar("extracting base", info.used_bytes or None) as bar:
                def consume(stream: BinaryIO) -> dict[str, Any]:
                    return build_layer_from_tar(stream, tmp, mtime_policy="clamp",
                                                source=image.name, on_bytes=bar.update,
                                                stats=stats)
                summary = app.tar_out("/", consume)
        times["closed"] = time.monotonic()
        ui.info(extraction_profile(times, stats, summary))
        return {"base": info.to_json(), "summary": summary}

    def done(self, ctx: StepContext, rec: LayerRecord) -> None:
        ctx.base_info = rec.info["base"]
        check_arch(ctx, ctx.base_info["arch"])


def extraction_profile(times: dict[str, float], stats: dict[str, float],
                       summary: dict[str, Any]) -> str:
    """One -v line on where the base extraction's time went, as key=value
    pairs (bench/build.py reads it): seconds since the launch began of the
    launch, inspection, the stream's first and last 1 MiB block, the end of
    parsing and of the layer (index, fsync), the appliance's shutdown; CPU
    seconds of the host side's work (read, parse, write: the parsing
    thread's writes of layer.tar, hash); seconds the parser waited for the
    stream."""
    t0 = times["start"]
    fields = {
        "launch": times["launched"] - t0,
        "inspect": times["inspected"] - times["launched"],
        "stream_first": stats.get("first_data", t0) - t0,
        "stream_last": stats.get("last_data", t0) - t0,
        "parsed": stats.get("parsed", t0) - t0,
        "layer_done": stats.get("finished", t0) - t0,
        "appliance_closed": times["closed"] - t0,
        "read_cpu": stats.get("read_cpu", 0.0),
        "parse_cpu": stats.get("parse_cpu", 0.0),
        "write_cpu": stats.get("write_cpu", 0.0),
        "hash_cpu": stats.get("hash_cpu", 0.0),
        "index_cpu": stats.get("index_cpu", 0.0),
        "waited": stats.get("waited", 0.0),
    }
    text = " ".join(f"{k}={v:.2f}" for k, v in fields.items())
    return (f"extraction profile: {text} bytes={summary['tar_bytes']} "
            f"entries={summary['entries']}")


def check_arch(ctx: StepContext, arch: str) -> None:
    """The recipe's declared arch and every input declared `elf_arch` match
    the rootfs."""
    want = ctx.recipe.spec.base.arch
    if want and arch != "unknown" and elfinfo.normalize_arch(want) != arch:
        raise UserError(f"base image is {arch}, the recipe says {want}",
                        where=ctx.recipe.where("base", "arch"))
    if ctx.es is not None and arch != "unknown":
        checks.check_elf_arch(ctx.es, arch)


# ---------------------------------------------------------------------------
# file layers


class FileStep:
    """A layer planned on the host: element content, a source tree, an overlay."""

    def __init__(self, plan: FilePlan):
        self.plan = plan
        self.kind = plan.kind
        self.label = plan.label
        self.phase = plan.label

    def key(self, ctx: StepContext) -> str:
        for path, sha in self.plan.inputs.items():
            ctx.inputs.setdefault(f"{self.plan.label}: {path}", {"path": path, "sha256": sha})
        return self.plan.key()

    def build(self, ctx: StepContext, tmp: Path) -> dict[str, Any]:
        return self.plan.write(tmp)

    def done(self, ctx: StepContext, rec: LayerRecord) -> None:
        pass


def element_env(ctx: StepContext, el: Element) -> dict[str, str]:
    """What an element's package-installs.yaml `when:` may read: DIB's
    variables for the base image, the recipe's dib_env, and the element's
    params as PARAM_<NAME> (as its scripts see them)."""
    es = ctx.es
    assert es is not None
    env = {**dib_environment(ctx.base_info.get("os_release", {}), ctx.base_info["arch"]),
           **ctx.recipe.spec.dib_env}
    for pname in el.spec.params:
        value = es.params.get(pname)
        env[f"PARAM_{pname.upper()}"] = ("\n".join(param_text(v) for v in value)
                                         if isinstance(value, list) else param_text(value))
    return env


def missing_package_inputs(recipe: Recipe) -> list[str]:
    """"key: path" of the recipe's package repositories and keys that are
    not there (validate lists them; a build stops on the first)."""
    spec = recipe.spec.packages
    if spec is None:
        return []
    return [f"packages.{key}[{i}]: {p}" for key, paths in (("repos", spec.repos),
                                                          ("gpgkeys", spec.gpgkeys))
            for i, p in enumerate(paths) if not p.exists()]


class PackageStep:
    """Packages installed by the rootfs's own dnf (or rpm) in the appliance,
    offline: the recipe's packages:, what the elements' package-installs.yaml
    install (through their pkg-map), the RPM files of the elements' rpms:
    items, then the recipe's remove:.  What elements list to uninstall (and
    build-only packages) goes after their scripts, in the phases step."""

    kind = "packages"
    phase = "installing packages"

    def __init__(self) -> None:
        self.label = "packages"
        self.request: packages.PackageRequest | None = None
        self.repo_set: packages.RepoSet | None = None
        self.uninstall: list[str] = []
        self._records: list[LayerRecord] = []
        self._epoch = 0

    @staticmethod
    def wanted(ctx: StepContext) -> bool:
        """Whether the build has anything for a package step (known before
        the base is read: the recipe's key, package-installs files, RPM
        items that hold)."""
        es = ctx.es
        assert es is not None
        return (ctx.recipe.spec.packages is not None
                or any(el.path.joinpath(f).is_file() for el in es.elements
                       for f in ("package-installs.yaml", "package-installs.json"))
                or any(holds(item.when, es.params) and es.params.get(item.src)
                       for el in es.elements for item in el.spec.rpms))

    def _request(self, ctx: StepContext) -> packages.PackageRequest:
        es = ctx.es
        assert es is not None
        spec = ctx.recipe.spec.packages or PackagesSpec()
        install = list(spec.install)
        uninstall: list[str] = []
        rpm_files: list[Path] = []
        for el in es.elements:
            for item in el.spec.rpms:
                if holds(item.when, es.params):
                    rpm_files += [Path(p) for p in es.params.get(item.src) or []]
            env = element_env(ctx, el)
            wanted = dib_packages.read_element(el.name, el.path, env)
            if wanted is None:
                continue
            for lists in wanted.phases.values():
                install += [n for n in dib_packages.map_names(el.name, el.path, lists.install,
                                                              env) if n not in install]
                uninstall += [n for n in dib_packages.map_names(el.name, el.path,
                                                                lists.uninstall, env)
                              if n not in uninstall]
        self.uninstall = uninstall
        return packages.PackageRequest(
            repos=spec.repos, install=tuple(install), remove=spec.remove,
            rpm_files=tuple(rpm_files), gpgcheck=spec.gpgcheck, gpgkeys=spec.gpgkeys,
            weak_deps=spec.weak_deps)

    def key(self, ctx: StepContext) -> str | None:
        self._records = list(ctx.records)
        self._epoch, _ = ctx.epoch()
        self.request = self._request(ctx)
        where = ctx.recipe.where("packages")
        if not (self.request.install or self.request.remove or self.request.rpm_files):
            return None  # uninstalls alone are the phases step's
        self.repo_set = packages.check(self.request, arch=ctx.base_info["arch"],
                                       workdir=Path(tempfile.mkdtemp(prefix="packages-",
                                                                     dir=ctx.workdir())),
                                       where=where)
        for f in self.repo_set.rpm_files:
            # by file name: the manifest must not depend on where the inputs lie
            ctx.inputs.setdefault(f"packages: {f.path.name}", {"path": f.path.name,
                                                               "sha256": f.sha256})
        return digest({"kind": "packages", "format": FORMAT_VERSION,
                       "runner": guestfs_io.RUN_STEP_VERSION,
                       "below": [r.key for r in self._records], "epoch": self._epoch,
                       "request": packages.request_digest(self.request, self.repo_set)})

    def build(self, ctx: StepContext, tmp: Path) -> dict[str, Any]:
        assert self.request is not None and self.repo_set is not None
        records, epoch = self._records, self._epoch
        tree = ctx.tree(records)

        def produce(sink: BinaryIO) -> None:
            assemble.write_tree(tree, epoch, sink)

        def consume(stream: BinaryIO) -> dict[str, Any]:
            return build_layer_from_tar(stream, tmp, mtime_policy="clamp", source=self.label,
                                        overlay_upper=True)

        summary, done = packages.install(
            self.request, self.repo_set, tree=produce,
            tree_bytes=sum(r.layer.summary["tar_bytes"] for r in records), epoch=epoch,
            arch=ctx.base_info["arch"], consume_upper=consume, step=self.label,
            smp=ctx.smp, timeout=ctx.timeout)
        return {"summary": summary, "packages": done.to_json()}

    def done(self, ctx: StepContext, rec: LayerRecord) -> None:
        pass


# ---------------------------------------------------------------------------
# phases: diskimage-builder's execution model inside the rootfs


def run_parts_order(names: list[str]) -> list[str]:
    """`names` in the order `LANG=C sort -n` gives: by leading number
    (none = 0), then byte-wise."""
    def key(name: str) -> tuple[int, bytes]:
        m = re.match(r"-?\d+", name)
        return (int(m.group()) if m else 0, name.encode())
    return sorted(names, key=key)


@dataclasses.dataclass(frozen=True)
class PhaseRun:
    """One phase as dib-run-parts runs it: the environment.d files it sources
    and the scripts it runs, in order (names inside the hooks tree)."""

    phase: str
    env_files: tuple[str, ...]
    scripts: tuple[str, ...]


class PhasesStep:
    """Every element's in-rootfs phases in one appliance run, phase by phase
    across all elements, the way `disk-image-create` runs them."""

    kind = "run"

    def __init__(self, hooks: FilePlan, inputs: FilePlan, runs: list[PhaseRun],
                 env: dict[str, str], network: bool, timeout: float | None,
                 elements: list[str], package_step: PackageStep | None = None):
        self.package_step = package_step   # its uninstall list is ours to do
        self.uninstall: tuple[str, ...] = ()
        self.hooks = hooks
        self.inputs = inputs
        self.runs = runs
        self.env = env
        self.network = network
        self.timeout = timeout
        scripts = [f"{r.phase}/{s}" for r in runs for s in r.scripts]
        shown = (", ".join(scripts) if len(scripts) <= 3
                 else f"{len(scripts)} scripts in " + ", ".join(r.phase for r in runs
                                                                if r.scripts))
        self.label = (f"element{'s' if len(elements) > 1 else ''} {', '.join(elements)} ({shown})"
                      if scripts else "package uninstalls")
        self.phase = f"running {self.label}"
        self._records: list[LayerRecord] = []
        self._epoch = 0
        self._env: dict[str, str] = {}

    @classmethod
    def plan(cls, es: ElementSet, ctx: StepContext, package_step: PackageStep | None = None
             ) -> PhasesStep | None:
        """The phases of the elements whose `run.when` holds (and the
        uninstalls the package step leaves to them), or None when no element
        has a script to run and there is no package step."""
        taking = [el for el in es.elements if holds(el.spec.run.when, es.params)
                  and any((el.path / p).is_dir() for p in RUN_PHASES)]
        if not taking and package_step is None:
            return None
        hooks = FilePlan("hooks", "element hooks")
        owner: dict[bytes, str] = {}
        for el in es.elements:
            for entry in sorted(el.path.iterdir()):
                if entry.name in HOOKS_SKIP:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    sub = plan_overlay(OverlaySpec(path=entry, dest="/" + entry.name), 0,
                                       str(el.path))
                    for item in sub.items:
                        name = item.member.name
                        if name in owner:
                            if item.member.type == DIR:
                                continue  # a directory several elements have
                            raise UserError(
                                f"{entry / name.decode().split('/', 1)[1]}: element "
                                f"{el.name} and element {owner[name]} both have "
                                f"{name.decode()}", where=str(el.path),
                                hint="diskimage-builder refuses duplicated hooks too: "
                                     "rename one of them")
                        owner[name] = el.name
                        hooks.add(item)
                    hooks.inputs.update(sub.inputs)
                # Top-level files (README.rst, element-deps, ...) are left out:
                # DIB copies them over one another into the hooks root, where
                # nothing reads them, and that jumble would make the step
                # depend on the recipe's element order.
        names = {i.member.name.decode() for i in hooks.items}
        modes = {i.member.name.decode(): i.member.mode for i in hooks.items}
        runs = []
        for phase in RUN_PHASES:
            # only the scripts of elements whose run.when holds
            mine = {p.name for el in taking if (el.path / phase).is_dir()
                    for p in (el.path / phase).iterdir()}
            scripts = [n.split("/", 1)[1] for n in names
                       if n.startswith(phase + "/") and n.count("/") == 1
                       and n.split("/", 1)[1] in mine
                       and RUN_PARTS_NAME.match(n.split("/", 1)[1])
                       and modes[n] & 0o111]
            envs = [n.split("/", 1)[1] for n in names if n.startswith("environment.d/")
                    and n.count("/") == 1 and re.match(r"^[0-9A-Za-z_.-]+$",
                                                       n.split("/", 1)[1])]
            runs.append(PhaseRun(phase, tuple(run_parts_order(envs)),
                                 tuple(run_parts_order(scripts))))
        declared = sorted({p for el in taking for p in el.spec.params})
        inputs = FilePlan("inputs", "script inputs")
        env: dict[str, str] = {}
        for pname in declared:
            value = es.params.get(pname)
            if es.specs[pname].is_input and value is not None:
                paths = value if isinstance(value, list) else [value]
                shown = []
                for i, p in enumerate(paths):
                    dest = f"{INPUTS_DIR}/{pname}/{i}/{Path(p).name}"
                    sub = (plan_overlay(OverlaySpec(path=Path(p), dest=dest), 0, pname)
                           if Path(p).is_dir() else _file_plan(Path(p), dest))
                    inputs.items += sub.items
                    inputs.inputs.update(sub.inputs)
                    shown.append(dest)
                env[f"PARAM_{pname.upper()}"] = "\n".join(shown)
            else:
                env[f"PARAM_{pname.upper()}"] = (
                    "\n".join(param_text(v) for v in value) if isinstance(value, list)
                    else param_text(value))
        network = any(el.spec.run.network for el in taking)
        timeouts = [el.spec.run.timeout for el in taking if el.spec.run.timeout]
        step = cls(hooks, inputs, runs, env, network, max(timeouts) if timeouts else None,
                   [el.name for el in taking], package_step)
        arch = ctx.recipe.spec.base.arch
        if arch:
            step.check_arch(elfinfo.normalize_arch(arch), ctx.recipe.where("base", "arch"))
        return step

    def check_arch(self, arch: str, where: str) -> None:
        """A rootfs of another architecture runs its scripts under a
        user-mode emulator in the appliance; without one, refused now."""
        emulation.require(arch, step=self.label, where=where)

    def driver(self) -> bytes:
        """The bash script that runs the phases in the appliance: per phase,
        in a subshell, source environment.d then run each script (as
        dib-run-parts does)."""
        lines = ["#!/bin/bash", "set -eu", 'hooks="$TMP_HOOKS_PATH"',
                 'export PATH="$PATH:$hooks/bin"']
        if not any(run.scripts for run in self.runs):
            lines.append(": no scripts")
        for run in self.runs:
            if not run.scripts:
                continue
            lines.append("(")
            for env_file in run.env_files:
                lines.append(f'  source "$hooks/environment.d/"{shlex.quote(env_file)}')
            for script in run.scripts:
                path = f"{run.phase}/{script}"
                lines.append(f"  echo {shlex.quote('rootfs-build: running ' + path)}")
                lines.append(f'  "$hooks/"{shlex.quote(path)}')
            lines.append(")")
        return ("\n".join(lines) + "\n").encode()

    def key(self, ctx: StepContext) -> str | None:
        self._records = list(ctx.records)
        self._epoch, _ = ctx.epoch()
        if self.package_step is not None:
            self.uninstall = tuple(self.package_step.uninstall)
        if not any(run.scripts for run in self.runs) and not self.uninstall:
            return None
        self.check_arch(ctx.base_info["arch"], str(ctx.recipe.path))
        for plan in (self.hooks, self.inputs):
            FileStep(plan).key(ctx)
        self._env = {**dib_environment(ctx.base_info.get("os_release", {}),
                                       ctx.base_info["arch"]),
                     **ctx.recipe.spec.dib_env, **self.env,
                     "TMP_HOOKS_PATH": HOOKS_DIR, "SOURCE_DATE_EPOCH": str(self._epoch)}
        env = self._env
        return digest({"kind": "run", "format": FORMAT_VERSION,
                       "runner": guestfs_io.RUN_STEP_VERSION,
                       "below": [r.key for r in self._records], "epoch": self._epoch,
                       "hooks": self.hooks.key(), "inputs": self.inputs.key(),
                       "runs": [dataclasses.astuple(r) for r in self.runs], "env": env,
                       "network": self.network, "uninstall": self.uninstall})

    def build(self, ctx: StepContext, tmp: Path) -> dict[str, Any]:
        records, epoch = self._records, self._epoch
        tree = ctx.tree(records)
        tree_bytes = sum(r.layer.summary["tar_bytes"] for r in records)
        work = Path(tempfile.mkdtemp(prefix="hooks-", dir=ctx.workdir()))
        files = _merge_plans(self.hooks, self.inputs, HOOKS_DIR)
        files.write(work)
        app = ctx.appliance(self.label, timeout=self.timeout, network=self.network)
        app.add_run_scratch(tree_bytes)

        def consume(stream: BinaryIO) -> dict[str, Any]:
            return build_layer_from_tar(stream, tmp, mtime_policy="clamp", source=self.label,
                                        overlay_upper=True)

        def produce(sink: BinaryIO) -> None:
            assemble.write_tree(tree, epoch, sink)

        def produce_files(sink: BinaryIO) -> None:
            with open(work / "layer.tar", "rb") as f:
                while chunk := f.read(1 << 20):
                    sink.write(chunk)

        removed: dict[str, Any] = {}
        with app:
            session = guestfs_io.TreeSession(app, step=self.label, epoch=epoch,
                                             arch=ctx.base_info["arch"])
            session.lay(produce)
            session.put_tmp(produce_files)
            session.run_scripts([("phases", self.driver())], self._env)
            if self.uninstall:
                # diskimage-builder's package-installs: uninstall and
                # build-only packages go once the scripts have run
                request = packages.PackageRequest(remove=self.uninstall, gpgcheck=False)
                repo_set = packages.check(request, arch=ctx.base_info["arch"], workdir=work)
                removed = packages.install_in_session(session, request, repo_set,
                                                      []).to_json()
            summary = session.finish(consume)
        return {"summary": summary, "runs": [dataclasses.asdict(r) for r in self.runs],
                "not_reproducible": session.not_reproducible, "packages": removed}

    def done(self, ctx: StepContext, rec: LayerRecord) -> None:
        pass


# diskimage-builder names architectures as Debian does (lib/common-defaults).
DIB_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "i386": "i386", "ppc64le": "ppc64el"}


def dib_environment(os_release: dict[str, str], arch: str) -> dict[str, str]:
    """The variables diskimage-builder defines for element scripts, as the
    base image says them (the recipe's dib_env overrides any of them)."""
    distro = os_release.get("ID", "").lower()
    if distro in ("debian", "ubuntu"):
        release = os_release.get("VERSION_CODENAME", "")
    else:
        release = os_release.get("VERSION_ID", "")
        if distro == "openeuler" and "LTS" in (os_release.get("VERSION", "")
                                               + os_release.get("PRETTY_NAME", "")):
            release += "-LTS"  # openeuler-minimal's naming: 22.03-LTS
    dib_arch = DIB_ARCH.get(arch, "armhf" if arch.startswith("armv") else arch)
    return {"DISTRO_NAME": distro, "DIB_RELEASE": release, "ARCH": dib_arch,
            "DIB_ARCH": dib_arch, "DIB_DEFAULT_INSTALLTYPE": "source", "DIB_DEBUG_TRACE": "0"}


def _file_plan(path: Path, dest: str) -> FilePlan:
    from .hashing import sha256_file
    plan = FilePlan("inputs", str(path))
    sha = sha256_file(path)
    plan.inputs[str(path)] = sha
    plan.add(Item(Member(dest.strip("/").encode(), b"0", 0o644, size=path.stat().st_size),
                  path=path, digest=sha))
    return plan


def _merge_plans(hooks: FilePlan, inputs: FilePlan, hooks_dir: str) -> FilePlan:
    """One plan for the files sent into /tmp: the hooks tree under
    `hooks_dir`, the inputs where they say (both relative to /tmp)."""
    base = hooks_dir.removeprefix("/tmp/").encode()
    out = FilePlan("files", "run files")
    for item in hooks.items:
        m = dataclasses.replace(item.member, name=base + b"/" + item.member.name
                                if item.member.name else base)
        out.add(dataclasses.replace(item, member=m))
    for item in inputs.items:
        m = dataclasses.replace(item.member,
                                name=item.member.name.removeprefix(b"tmp/"))
        out.add(dataclasses.replace(item, member=m))
    return out
