"""The build: recipe -> plan of cached layers -> assembled outputs.

    base      the image's tree, read with libguestfs             [appliance]
    element   each element's files, dirs, symlinks, templates,
              RPM payloads and patched source trees               [host, pure Python]
    run       each element's install scripts, inside the rootfs  [appliance]
    overlay   each overlay directory                             [host, pure Python]

Each layer is a cache entry keyed by the digest of what it is made from
(and, for run steps, of everything below it).  A warm build whose change
is in a file layer never starts the appliance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import platform
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from . import (
    FORMAT_VERSION,
    __version__,
    assemble,
    elements,
    elfinfo,
    emulation,
    filelayers,
    guestfs_io,
    outputs,
    sources,
    ui,
)
from .cache import Cache
from .errors import UserError
from .hashing import sha256_file
from .layer import Layer, build_layer_from_tar
from .recipe import IMAGE_FORMATS, TAR_FORMATS, Recipe

RUN_UPPER_BYTES = 32 << 30   # scratch disk for a run step's changes (sparse)


@dataclasses.dataclass
class LayerRecord:
    kind: str
    label: str
    key: str
    built: bool
    layer: Layer
    info: dict[str, Any]


@dataclasses.dataclass
class BuildResult:
    name: str
    directory: Path
    artifacts: list[dict[str, Any]]
    manifest: dict[str, Any]
    launches: int
    layers: list[LayerRecord]
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "output": str(self.directory),
            "artifacts": self.artifacts,
            "entries": self.manifest["rootfs"]["entries"],
            "epoch": self.manifest["epoch"],
            "appliance_launches": self.launches,
            "layers": [{"kind": r.kind, "label": r.label, "key": r.key,
                        "cache": "built" if r.built else "hit"} for r in self.layers],
            "seconds": round(self.seconds, 2),
        }


class Phase:
    """Where the build is, for interruption messages."""

    current = "startup"

    @classmethod
    @contextlib.contextmanager
    def enter(cls, name: str) -> Iterator[None]:
        # Not restored when an exception leaves the phase: the error report
        # then says where the build stopped.
        previous, cls.current = cls.current, name
        yield
        cls.current = previous


def digest(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def host_arch() -> str:
    return elfinfo.normalize_arch(platform.machine())


@dataclasses.dataclass
class BuildOptions:
    output_root: Path
    cache: Cache
    timeout: float | None = None
    smp: int = guestfs_io.DEFAULT_SMP


class Builder:
    def __init__(self, recipe: Recipe, opts: BuildOptions):
        self.recipe = recipe
        self.opts = opts
        self.cache = opts.cache
        self.records: list[LayerRecord] = []
        self.inputs: dict[str, dict[str, str]] = {}
        self.es: elements.ElementSet | None = None
        self.base_info: dict[str, Any] = {}
        self.deploy: Any = None          # deploy.DeployConfig when the recipe deploys
        self.mount_table: list[Any] = []
        self.source_plans: dict[str, filelayers.FilePlan] = {}
        self.element_plans: dict[str, filelayers.FilePlan] = {}
        self.overlay_plans: list[filelayers.FilePlan] = []
        self.notes: list[str] = []       # manifest notes (skipped scriptlets...)
        self._workdir: Path | None = None
        self._scratch = contextlib.ExitStack()   # the locked work dir, removed at the end

    # -- checks before any work ------------------------------------------
    def prepare(self) -> elements.ElementSet:
        """Everything that can fail without the appliance fails here."""
        with Phase.enter("validation"):
            es = elements.load(self.recipe)
            missing = elements.required_missing(es, self.recipe)
            if missing:
                raise UserError(f"required params not set: {', '.join(missing)}",
                                where=str(self.recipe.path), hint="set them under params:")
            if es.missing_inputs:
                more = len(es.missing_inputs) - 1
                raise UserError(f"input not found: {es.missing_inputs[0]}"
                                + (f" (and {more} more)" if more else ""),
                                where=str(self.recipe.path),
                                hint="fix the path, or pass --set params.NAME=PATH")
            self.es = es
            self._prepare_deploy(es)
            # Element files and overlays are planned (found, hashed, their
            # destinations checked) before any appliance starts.
            for el in es.elements:
                self.element_plans[el.name] = filelayers.plan_element(el, es)
            self.overlay_plans = [
                filelayers.plan_overlay(ov, i, self.recipe.where("overlays", i))
                for i, ov in enumerate(self.recipe.overlays)]
        with Phase.enter("checking sources and patches"):
            self._prepare_sources(es)
        return es

    def _prepare_deploy(self, es: elements.ElementSet) -> None:
        if "host_ip" not in es.specs or es.params.get("host_ip") is None:
            return
        from .deploy import DeployConfig, mount_table
        fields = {f.name for f in dataclasses.fields(DeployConfig)}
        given: dict[str, Any] = {"name": self.recipe.name}
        for param, value in es.params.items():
            field = DEPLOY_PARAM_FIELDS.get(param, param)
            if field in fields and field != "name" and value is not None:
                given[field] = tuple(value) if isinstance(value, list) else value
        try:
            self.deploy = DeployConfig.from_params(given, where="params")
        except UserError as e:
            # name the recipe's param and line, not DeployConfig's field
            field = (e.where or "").removeprefix("params.")
            param = {f: p for p, f in DEPLOY_PARAM_FIELDS.items()}.get(field, field)
            raise UserError(f"params.{param}: {e.message}",
                            where=(self.recipe.where("params", param)
                                   if param in self.recipe.params else str(self.recipe.path)),
                            hint=e.hint or (None if e.message.endswith(")") else
                                            f"fix params.{param} in the recipe")) from None
        contributions = []
        for el in es.elements:
            for i, entry in enumerate(el.spec.get("mounts", [])):
                if not isinstance(entry, dict):
                    raise UserError(f"mounts[{i}] must be a mapping", where=el.where("mounts", i))
                contributions.append(entry)
        self.mount_table = mount_table(contributions, where="element mounts")
        host_ko, host_kernel = es.params.get("qtfs_server_ko"), es.params.get("host_kernel")
        if host_ko is not None and host_kernel is not None:
            magic = elfinfo.module_kernel(host_ko)
            if magic != host_kernel:
                built = (f"was built for kernel {magic}" if magic
                         else "is not a kernel module (no vermagic)")
                raise UserError(f"params.qtfs_server_ko: {host_ko} {built}, but host_kernel "
                                f"is {host_kernel}",
                                where=self.recipe.where("params", "qtfs_server_ko"),
                                hint="use the qtfs_server.ko built for the host's kernel")

    def _prepare_sources(self, es: elements.ElementSet) -> None:
        for el in es.elements:
            for i, item in enumerate(el.spec.get("sources", [])):
                if not elements.condition_holds(item.get("when"), es.params):
                    continue
                where = el.where("sources", i)
                archive = es.params.get(item["archive"][1:])
                patches = es.params.get(item.get("patches", "@")[1:]) or []
                if archive is None:
                    raise UserError(f"params.{item['archive'][1:]} is not set but element "
                                    f"{el.name} needs it", where=where)
                work = Path(tempfile.mkdtemp(prefix="source-", dir=self._work()))
                self.source_plans[f"{el.name}:{i}"] = sources.plan_source(
                    Path(archive), [Path(p) for p in patches], item["dest"], work,
                    label=f"element {el.name}: {Path(archive).name} + {len(patches)} patches",
                    where=where)

    def _work(self) -> Path:
        # Locked like a cache staging dir, so that `cache prune` or another
        # build's orphan sweep leaves it alone while this build runs.
        if self._workdir is None:
            self._workdir = self._scratch.enter_context(self.cache.staging("work-"))
        return self._workdir

    def _record_input(self, role: str, shown: str, path: Path) -> str:
        sha = self.cache.file_sha256(path, label=role)
        self.inputs[role] = {"path": shown, "sha256": sha}
        return sha

    # -- layers ------------------------------------------------------------------
    def _layer(self, kind: str, label: str, key: str,
               build: Callable[[Path], dict[str, Any]]) -> LayerRecord:
        d, built = self.cache.get_or_build(key, build, kind=kind, label=label)
        info = self.cache.meta(key).get("info", {})
        rec = LayerRecord(kind, label, key, built, Layer(d, label), info)
        self.records.append(rec)
        ui.info(f"{kind} layer {label}: {'built' if built else 'from cache'} ({key[:12]})")
        return rec

    def base_layer(self) -> LayerRecord:
        r = self.recipe
        image = r.base_image
        shown = r.data["base"]["image"]
        if not image.exists():
            raise UserError(f"base image {image} not found", where=r.where("base", "image"),
                            hint="fix base.image (relative to the recipe) or pass "
                                 "--set base.image=PATH")
        if not image.is_file():
            raise UserError(f"base image {image} is not a file", where=r.where("base", "image"),
                            hint="base.image must name a qcow2 or raw disk image file")
        fmt = guestfs_io.image_format(image)
        with Phase.enter("hashing the base image"):
            sha = self._record_input("base.image", shown, image)
        if r.base_sha256 and sha != r.base_sha256:
            raise UserError(f"base image {image} has sha256 {sha}, the recipe expects "
                            f"{r.base_sha256}", where=r.where("base", "sha256"),
                            hint="the image changed or the checksum is wrong")
        key = digest({"kind": "base", "format": FORMAT_VERSION, "image": sha, "fmt": fmt,
                      "filesystems": r.base_filesystems})

        def build(tmp: Path) -> dict[str, Any]:
            with Phase.enter("base image extraction"):
                return self._extract_base(image, fmt, tmp)

        rec = self._layer("base", f"base {image.name}", key, build)
        self.base_info = rec.info["base"]
        self._check_arch(rec.info["base"]["arch"])
        return rec

    def _extract_base(self, image: Path, fmt: str, tmp: Path) -> dict[str, Any]:
        guestfs_io.check_image(image, fmt)
        app = guestfs_io.Appliance(f"base image {image.name}", smp=self.opts.smp,
                                   timeout=self.opts.timeout)
        app.add_drive(image, fmt=fmt, readonly=True)
        with app:
            info = app.inspect_base(str(image), mount=self.recipe.base_filesystems == "all")
            self._check_arch(info.arch)  # before the long extraction
            ui.step(f"extracting {image.name}: {info.os_release.get('PRETTY_NAME', 'unknown OS')}"
                    f" ({info.arch}), root {info.root}")
            with ui.bar("extracting base", info.used_bytes or None) as bar:
                def consume(stream: BinaryIO) -> dict[str, Any]:
                    return build_layer_from_tar(stream, tmp, mtime_policy="clamp",
                                                source=image.name, on_bytes=bar.update)
                summary = app.tar_out("/", consume)
        return {"base": info.to_json(), "summary": summary}

    def _check_arch(self, arch: str) -> None:
        """The recipe's declared arch and every binary an element marks
        `elf_arch` must match the rootfs."""
        want = self.recipe.base_arch
        if want and arch != "unknown" and elfinfo.normalize_arch(want) != arch:
            raise UserError(f"base image is {arch}, the recipe says {want}",
                            where=self.recipe.where("base", "arch"))
        es = self.es
        if es is None or arch == "unknown":
            return
        for el in es.elements:
            for i, item in enumerate(el.spec.get("files", [])):
                if not item.get("elf_arch") or not elements.condition_holds(item.get("when"),
                                                                            es.params):
                    continue
                src = filelayers.element_source(el, item["src"], es, el.where("files", i))
                machine = elfinfo.machine_of(src)
                shown = (f"params.{item['src'][1:]}" if item["src"].startswith("@")
                         else f"element {el.name}")
                if machine is None:
                    raise UserError(f"{src} is not an ELF binary (expected one for {arch})",
                                    where=self._where_param(item["src"], el, i),
                                    hint=f"{shown} must be a program built for the DPU")
                if machine != arch:
                    raise UserError(f"{src} is built for {machine}, but the rootfs is {arch}",
                                    where=self._where_param(item["src"], el, i),
                                    hint=f"give {shown} the {arch} build")
        ko = es.params.get("qtfs_ko")
        if ko is not None:
            machine = elfinfo.machine_of(ko)
            if machine != arch:
                raise UserError(f"{ko} is built for {machine or 'no ELF machine'}, but the DPU "
                                f"rootfs is {arch}", where=self.recipe.where("params", "qtfs_ko"),
                                hint=f"give params.qtfs_ko the qtfs.ko built for {arch}")

    def _where_param(self, src: str, el: elements.Element, i: int) -> str:
        if src.startswith("@") and src[1:] in self.recipe.params:
            return self.recipe.where("params", src[1:])
        return el.where("files", i)

    def file_layer(self, plan: filelayers.FilePlan) -> LayerRecord:
        for path, sha in plan.inputs.items():
            self.inputs.setdefault(f"{plan.label}: {path}", {"path": path, "sha256": sha})
        return self._layer(plan.kind, plan.label, plan.key(), plan.write)

    def tree(self, records: list[LayerRecord] | None = None) -> assemble.Tree:
        """The merged tree of `records` (default: every layer so far)."""
        tree = assemble.Tree()
        for rec in self.records if records is None else records:
            tree.apply(rec.layer)
        return tree

    def rpm_layer(self, el: elements.Element, es: elements.ElementSet) -> None:
        paths: list[Path] = []
        for item in el.spec.get("rpms", []):
            if elements.condition_holds(item.get("when"), es.params):
                value = es.params.get(item["src"][1:]) or []
                paths += [Path(p) for p in value]
        if not paths:
            return
        from . import rpm
        tree = self.tree()
        passwd, group = rpm.read_user_maps(
            (tree.read_file(b"etc/passwd") or b"").decode("utf-8", "replace"),
            (tree.read_file(b"etc/group") or b"").decode("utf-8", "replace"))
        work = Path(tempfile.mkdtemp(prefix="rpms-", dir=self._work()))
        plan, report = rpm.plan_rpms(paths, arch=self.base_info["arch"], passwd=passwd,
                                     group=group, label=f"element {el.name}: rpms",
                                     workdir=work)
        if report.scriptlets_skipped:
            ui.warn(f"element {el.name}: scriptlets not run (they would need the target "
                    f"CPU): {', '.join(report.scriptlets_skipped)}")
            self.notes.append(f"{el.name}: RPM scriptlets not run: "
                              f"{', '.join(report.scriptlets_skipped)}")
        self.file_layer(plan)

    def run_layer(self, el: elements.Element, es: elements.ElementSet, epoch: int) -> None:
        scripts = el.run_scripts()
        run_spec = el.spec.get("run", {})
        if not scripts or not elements.condition_holds(run_spec.get("when"), es.params):
            return
        names = [f"{phase}/{p.name}" for phase, p in scripts]
        step = f"element {el.name} ({', '.join(names)})"
        arch = self.base_info["arch"]
        emulation.require(arch, step=step, where=str(el.path))  # refuses without an emulator
        data = [(f"{phase.removesuffix('.d')}-{p.name}", p.read_bytes()) for phase, p in scripts]
        declared = el.spec.get("params", {})
        env = {f"PARAM_{k.upper()}": _env_value(es.params.get(k)) for k in sorted(declared)}
        below = [r.key for r in self.records]
        network = bool(run_spec.get("network", False))
        key = digest({"kind": "run", "format": FORMAT_VERSION, "below": below, "epoch": epoch,
                      "runner": guestfs_io.RUN_STEP_VERSION,
                      "scripts": [(n, hashlib.sha256(d).hexdigest()) for n, d in data],
                      "env": env, "network": network})
        records = list(self.records)
        timeout = self.opts.timeout or run_spec.get("timeout")

        def build(tmp: Path) -> dict[str, Any]:
            tree = self.tree(records)
            tree_bytes = sum(r.layer.summary["tar_bytes"] for r in records)
            app = guestfs_io.Appliance(step, smp=self.opts.smp, timeout=timeout,
                                       network=network)
            app.add_scratch(max(int(tree_bytes * 1.5) + (512 << 20), 1 << 30))
            app.add_scratch(RUN_UPPER_BYTES)

            def consume(stream: BinaryIO) -> dict[str, Any]:
                return build_layer_from_tar(stream, tmp, mtime_policy="clamp", source=step,
                                            overlay_upper=True)

            def produce(sink: BinaryIO) -> None:
                assemble.write_tree(tree, epoch, sink)

            with Phase.enter(f"running {step}"), app:
                summary = app.run_in_tree(produce, data, env, consume, step=step,
                                           epoch=epoch, arch=arch)
            return {"summary": summary, "scripts": names}

        self._layer("run", step, key, build)

    # -- the whole build -----------------------------------------------------------
    def layers(self) -> list[LayerRecord]:
        """Every layer, from the cache or built; prepare() has run."""
        es = self.es
        assert es is not None
        self.base_layer()
        epoch, _ = self.epoch()
        for el in es.elements:
            with Phase.enter(f"element {el.name}"):
                plan = self.element_plans[el.name]
                for i, _item in enumerate(el.spec.get("sources", [])):
                    source_plan = self.source_plans.get(f"{el.name}:{i}")
                    if source_plan is not None:
                        self.file_layer(source_plan)
                if plan.items or plan.deletions:
                    self.file_layer(plan)
                self.rpm_layer(el, es)
            self.run_layer(el, es, epoch)
        with Phase.enter("overlays"):
            for plan in self.overlay_plans:
                self.file_layer(plan)
        return self.records

    def epoch(self) -> tuple[int, str]:
        env = os.environ.get("SOURCE_DATE_EPOCH")
        if env:
            if not env.isdigit():
                raise UserError(f"SOURCE_DATE_EPOCH={env!r} is not a number of seconds")
            return int(env), "SOURCE_DATE_EPOCH"
        if self.recipe.epoch is not None:
            return self.recipe.epoch, "recipe"
        base = next(r for r in self.records if r.kind == "base")
        return int(base.info["summary"]["newest_mtime"]), "base image newest file"

    def check_shadowed(self, tree: assemble.Tree) -> None:
        """Files an element or overlay puts where a bind mount hides them at
        run time are errors unless the recipe allows them."""
        if self.deploy is None:
            return
        from .deploy import shadowed_paths
        kinds = {id(r.layer): r for r in self.records}
        allowed = [a.rstrip("/") for a in self.recipe.allow_shadowed]
        for shadow in shadowed_paths(self.mount_table):
            prefix = shadow.strip("/").encode()
            hidden = sorted(n for n in tree.nodes
                            if (n == prefix or n.startswith(prefix + b"/"))
                            and (layer := tree.layer_of(n)) is not None
                            and kinds[id(layer)].kind in ("element", "overlay", "source")
                            and tree.nodes[n].type != assemble.DIR)
            for name in hidden:
                path = "/" + name.decode("utf-8", "replace")
                if any(path == a or path.startswith(a + "/") for a in allowed):
                    continue
                rec = kinds[id(tree.layer_of(name))]
                raise UserError(
                    f"{rec.label} puts {path} under {shadow}, which prepare.sh bind-mounts "
                    "from the DPU at run time, so the file would be hidden",
                    where=str(self.recipe.path),
                    hint="move it, or list it under allow_shadowed: if that is intended")

    def run(self) -> BuildResult:
        start = time.monotonic()
        launches_before = guestfs_io.launches
        self.cache.clean_orphans()  # leftovers of killed builds
        try:
            es = self.prepare()
            out = outputs.OutputDir(self.opts.output_root, self.recipe.name)
        except BaseException:
            self._scratch.close()
            raise
        writing_outputs = False
        try:
            self.layers()
            writing_outputs = True
            epoch, epoch_source = self.epoch()
            with Phase.enter("assembly"):
                tree = self.tree()
                self.check_shadowed(tree)
                artifacts, stats = self._write_rootfs(tree, epoch, out.staging)
            if self.deploy is not None:
                with Phase.enter("deployment scripts"):
                    from .deploy import render_deploy
                    render_deploy(out.staging, self.deploy, self.mount_table)
            manifest = self.manifest(es, epoch, epoch_source, stats, artifacts)
            outputs.write_text_atomic(out.staging / "manifest.json",
                                      json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            outputs.write_text_atomic(out.staging / "SHA256SUMS", outputs.sha256sums(
                out.staging, known={a["path"]: a["sha256"] for a in artifacts}))
            if self.recipe.bundle and self.deploy is not None:
                with Phase.enter("bundle"):
                    from .deploy import make_bundle
                    make_bundle(self.opts.output_root, self.recipe.name, epoch, src=out.staging,
                                dest=out.sibling(f"{self.recipe.name}.bundle.tar"))
            with Phase.enter("publishing outputs"):
                if os.environ.get("ROOTFS_BUILD_TEST_STOP_BEFORE_PUBLISH"):
                    # lets a test SIGKILL the build at this exact moment
                    os.kill(os.getpid(), signal.SIGSTOP)
                final = out.publish()
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            if writing_outputs:
                raise UserError(f"{self.opts.output_root}: no space left on device for the "
                                "outputs", hint="free some space there, or choose another "
                                "-o DIR") from None
            raise UserError(f"{self.cache.root}: no space left on device for the layer cache",
                            hint="free some space, run 'rootfs-build cache prune', or pass "
                                 "--cache-dir DIR") from None
        finally:
            out.close()
            for rec in self.records:
                rec.layer.close()
            self._scratch.close()
        result_artifacts = [{"path": str(final / str(a["path"])), "sha256": a["sha256"],
                             "size": a["size"], "format": a["format"]} for a in artifacts]
        if self.recipe.bundle and self.deploy is not None:
            bundle = self.opts.output_root / f"{self.recipe.name}.bundle.tar"
            result_artifacts.append({"path": str(bundle), "sha256": sha256_file(bundle),
                                     "size": bundle.stat().st_size, "format": "bundle"})
        return BuildResult(self.recipe.name, final, result_artifacts, manifest,
                           guestfs_io.launches - launches_before, self.records,
                           time.monotonic() - start)

    def _write_rootfs(self, tree: assemble.Tree, epoch: int, staging: Path
                      ) -> tuple[list[dict[str, Any]], assemble.AssemblyStats]:
        formats = self.recipe.formats
        tar_formats = [f for f in formats if f in TAR_FORMATS]
        image_formats = [f for f in formats if f in IMAGE_FORMATS]
        scratch_tar = bool(image_formats) and "tar" not in tar_formats
        sink_formats = tar_formats + (["tar"] if scratch_tar else [])
        with outputs.open_sinks(staging, sink_formats) as tee, \
                ui.bar("writing rootfs", None) as bar:
            def write(data: bytes) -> None:
                tee.write(data)
                bar.update(len(data))
            stats = assemble.write_tree(tree, epoch, _Writer(write))
        artifacts: list[dict[str, Any]] = []
        for fmt in tar_formats:
            s = next(s for s in tee.sinks if s.fmt == fmt)
            artifacts.append({"path": f"rootfs.{fmt}", "format": fmt,
                              "sha256": s.file.sha.hexdigest(), "size": s.file.size,
                              "reproducibility": "bit-identical"})
        if image_formats:
            from .images import ImageSpec, write_images
            spec = ImageSpec(name=self.recipe.name, epoch=epoch, size=self.recipe.image_size,
                             headroom=self.recipe.image_headroom,
                             qcow2_compressed=self.recipe.qcow2_compressed)
            with Phase.enter("writing images"):
                for img in write_images(staging / "rootfs.tar", image_formats, staging, spec):
                    artifacts.append({"path": img.path.name, "format": img.format,
                                      "sha256": sha256_file(img.path),
                                      "size": img.path.stat().st_size,
                                      "reproducibility": img.reproducibility,
                                      "details": img.details})
        if scratch_tar:
            (staging / "rootfs.tar").unlink()
        for a in artifacts:  # not the umask's business: the bundle records modes
            os.chmod(staging / a["path"], 0o644)
        return artifacts, stats

    def manifest(self, es: elements.ElementSet, epoch: int, epoch_source: str,
                 stats: assemble.AssemblyStats, artifacts: list[dict[str, Any]]) -> dict[str, Any]:
        r = self.recipe
        params = {}
        for k, v in sorted(es.params.items()):
            if es.specs[k].type in elements.INPUT_TYPES and k in r.params:
                v = r.params[k]   # as written in the recipe: stable across checkouts
            elif isinstance(v, Path):
                v = v.name
            elif isinstance(v, list):
                v = [x.name if isinstance(x, Path) else x for x in v]
            params[k] = v
        inputs = []
        for role, item in sorted(self.inputs.items()):
            if role == "base.image":
                continue
            inputs.append({"role": role.split(": ")[0], "file": Path(item["path"]).name,
                           "sha256": item["sha256"]})
        return {
            "name": r.name,
            "tool": {"name": "rootfs-build", "version": __version__,
                     "format_version": FORMAT_VERSION, **outputs.compression_versions()},
            "recipe": {"file": r.path.name, "sha256": sha256_file(r.path)},
            "base": {"image": r.data["base"]["image"],
                     "sha256": self.inputs["base.image"]["sha256"],
                     "os_release": self.base_info.get("os_release", {}),
                     "arch": self.base_info.get("arch"),
                     "root": self.base_info.get("root"),
                     "mountpoints": self.base_info.get("mountpoints", {})},
            "elements": [{"name": e.name, "element_yaml_sha256":
                          sha256_file(e.yaml_path) if e.yaml_path.exists() else None}
                         for e in es.elements],
            "params": params,
            "inputs": inputs,
            "layers": [{"kind": rec.kind, "label": rec.label, "key": rec.key,
                        "entries": rec.layer.summary["entries"]} for rec in self.records],
            "epoch": epoch,
            "epoch_source": epoch_source,
            "rootfs": {"entries": stats.entries, "tar_bytes": stats.tar_bytes},
            "artifacts": artifacts,
            "notes": self.notes,
        }


class _Writer:
    def __init__(self, fn: Callable[[bytes], None]):
        self.write = fn


def _env_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


# recipe param -> DeployConfig field, where the names differ
DEPLOY_PARAM_FIELDS = {"rootfs_path": "rootfs", "rexec_whitelist": "whitelist_extra"}


def build(recipe: Recipe, opts: BuildOptions) -> BuildResult:
    return Builder(recipe, opts).run()
