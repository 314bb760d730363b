"""The build: a plan of keyed steps, their execution, and the outputs.

    plan()     everything that can fail without the appliance: elements,
               params, input checks, generators, file plans, patched sources
    layers()   each step in order: its key from what it is made of (and, for
               steps that run inside the rootfs, from every layer below), its
               layer from the cache or built (builder.steps)
    outputs    the merged tree as the rootfs artifacts, the generators' files,
               manifest.json, SHA256SUMS, the generators' packages; published
               in one rename

The build knows no element: what an element contributes is a declaration
(element.yaml, builder.element_spec) that one generic mechanism acts on.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import (
    FORMAT_VERSION,
    __version__,
    assemble,
    checks,
    elements,
    fileio,
    filelayers,
    generators,
    oci,
    outputs,
    shipped,
    sources,
    steps,
    ui,
)
from .cache import Cache
from .element_spec import holds
from .errors import UserError
from .hashing import sha256_file
from .recipe import IMAGE_FORMATS, TAR_FORMATS, Recipe
from .session import Session
from .steps import LayerRecord


@dataclasses.dataclass
class BuildOptions:
    output_root: Path
    cache: Cache
    session: Session = dataclasses.field(default_factory=Session)
    timeout: float | None = None
    smp: int = 2


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


@dataclasses.dataclass
class Plan:
    """What plan() decided: the elements, the steps in order, the generators."""

    es: elements.ElementSet
    steps: list[steps.Step]
    generators: dict[str, generators.Generator]


class Builder:
    def __init__(self, recipe: Recipe, opts: BuildOptions):
        self.recipe = recipe
        self.opts = opts
        self.session = opts.session
        self.cache = opts.cache
        self.ctx = steps.StepContext(recipe, opts.cache, opts.session, opts.timeout,
                                     opts.smp)

    # -- the plan ----------------------------------------------------------
    def plan(self) -> Plan:
        """Everything that can fail without the appliance fails here."""
        r = self.recipe
        with self.session.enter("validation"):
            es = elements.load(r)
            missing = elements.required_missing(es)
            if missing:
                raise UserError(f"required params not set: {', '.join(missing)}",
                                where=str(r.path), hint="set them under params:")
            missing_inputs = es.missing_inputs + steps.missing_package_inputs(r)
            if missing_inputs:
                more = len(missing_inputs) - 1
                raise UserError(f"input not found: {missing_inputs[0]}"
                                + (f" (and {more} more)" if more else ""),
                                where=str(r.path),
                                hint="fix the path, or pass --set params.NAME=PATH")
            checks.check_kernel_modules(es)
            if r.spec.base.arch:
                checks.check_elf_arch(es, r.spec.base.arch)
            gens = plan_generators(r, es)
            oci.check_recipe(r, bundle=r.spec.output.bundle and bool(gens))
            self.ctx.es = es
            plan_steps: list[steps.Step] = [steps.BaseStep()]
            for el in es.elements:
                # found, hashed and their destinations checked before any appliance
                file_plan = filelayers.plan_element(el, es)
                if file_plan.items or file_plan.deletions:
                    plan_steps.append(steps.FileStep(file_plan))
            steps.check_base_image(r)
            outputs.check_output_root(self.opts.output_root)
        with self.session.enter("checking sources and patches"):
            for el in es.elements:
                for i, src in enumerate(el.spec.sources):
                    if holds(src.when, es.params):
                        plan_steps.append(steps.FileStep(self._source_plan(el, i, es)))
        with self.session.enter("validation"):
            package_step = steps.PackageStep() if steps.PackageStep.wanted(self.ctx) else None
            if package_step is not None:
                plan_steps.append(package_step)
            phases = steps.PhasesStep.plan(es, self.ctx, package_step)
            if phases is not None:
                plan_steps.append(phases)
            for i, ov in enumerate(r.spec.overlays):
                plan_steps.append(steps.FileStep(
                    filelayers.plan_overlay(ov, i, r.where("overlays", i),
                                            shown=r.written("overlays", i))))
        return Plan(es, plan_steps, gens)

    def _source_plan(self, el: elements.Element, i: int, es: elements.ElementSet
                     ) -> filelayers.FilePlan:
        item = el.spec.sources[i]
        archive = es.params.get(item.archive)
        patches = es.params.get(item.patches) or [] if item.patches else []
        where = el.where("sources", i)
        if archive is None:
            raise UserError(f"params.{item.archive} is not set but element {el.name} needs it",
                            where=where)
        work = Path(tempfile.mkdtemp(prefix="source-", dir=self.ctx.workdir()))
        return sources.plan_source(
            Path(archive), [Path(p) for p in patches], item.dest, work,
            label=f"element {el.name}: {Path(archive).name} + {len(patches)} patches",
            where=where)

    # -- the whole build -------------------------------------------------------
    def run(self) -> BuildResult:
        start = time.monotonic()
        launches_before = self.session.launches
        self.cache.clean_orphans()  # leftovers of killed builds
        out: outputs.OutputDir | None = None
        try:
            plan = self.plan()
            for step in plan.steps:
                self.ctx.run(step)
            # Only now does anything reach -o DIR: a build that fails earlier
            # leaves it as it was.
            with self.session.enter("assembly"):
                out = outputs.OutputDir(self.opts.output_root, self.recipe.name)
            final, artifacts, manifest = self._write_outputs(plan, out)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            if out is not None:
                raise UserError(f"{self.opts.output_root}: no space left on device for the "
                                "outputs", hint="free some space there, or choose another "
                                "-o DIR") from None
            raise UserError(f"{self.cache.root}: no space left on device for the layer cache",
                            hint="free some space, run 'rootfs-build cache prune', or pass "
                                 "--cache-dir DIR") from None
        finally:
            if out is not None:
                out.close()
            self.ctx.close()
        return BuildResult(self.recipe.name, final, artifacts, manifest,
                           self.session.launches - launches_before, self.ctx.records,
                           time.monotonic() - start)

    def _write_outputs(self, plan: Plan, out: outputs.OutputDir
                       ) -> tuple[Path, list[dict[str, Any]], dict[str, Any]]:
        epoch, epoch_source = self.ctx.epoch()
        with self.session.enter("assembly"):
            tree = self.ctx.tree()
            hidden_package_files: list[str] = []
            for name, gen in plan.generators.items():
                hidden_package_files += self._check_hidden(tree, name, gen.hidden_paths())
            if hidden_package_files:
                ui.warn(f"{len(hidden_package_files)} files that packages installed lie under "
                        "paths the deployment mounts over at run time (normal for /etc and "
                        "/var/lib: the DPU's own are used); manifest.json lists them")
            artifacts, stats = self._write_rootfs(tree, epoch, out.staging)
        sections: dict[str, Any] = {}
        for name, gen in plan.generators.items():
            with self.session.enter(f"generating {name}"):
                sections[name] = gen.write(out.staging)
                for w in gen.warnings():
                    ui.warn(w)
        manifest = self.manifest(plan, epoch, epoch_source, stats, artifacts, sections,
                                 hidden_package_files)
        fileio.write_atomic(out.staging / "manifest.json",
                                  json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        fileio.write_atomic(out.staging / "SHA256SUMS", outputs.sha256sums(
            out.staging, known={a["path"]: a["sha256"] for a in artifacts}))
        extra: list[generators.Artifact] = []
        for name, gen in plan.generators.items():
            with self.session.enter(f"packaging {name}"):
                extra += gen.package(out.staging, epoch, out.sibling)
        with self.session.enter("publishing outputs"):
            final = out.publish()
        result = [{"path": str(final / str(a["path"])), "sha256": a["sha256"],
                   "size": a["size"], "format": a["format"]} for a in artifacts]
        for art in extra:
            published = out.published(art.path)
            result.append({"path": str(published), "sha256": sha256_file(published),
                           "size": published.stat().st_size, "format": art.format})
        return final, result, manifest

    def _check_hidden(self, tree: assemble.Tree, generator: str, hidden: list[str]
                      ) -> list[str]:
        """Files an element or overlay puts where the generated deployment
        hides them at run time are errors unless the recipe allows them;
        packages put files there as a matter of course: those are returned,
        for the manifest and one warning."""
        kinds = {id(r.layer): r for r in self.ctx.records}
        allowed = [a.rstrip("/") for a in self.recipe.spec.allow_shadowed]
        from_packages: list[str] = []
        for shadow in hidden:
            prefix = shadow.strip("/").encode()
            names = sorted(n for n in tree.nodes
                           if (n == prefix or n.startswith(prefix + b"/"))
                           and (layer := tree.layer_of(n)) is not None
                           and kinds[id(layer)].kind in ("element", "overlay", "source",
                                                         "packages")
                           and tree.nodes[n].type != assemble.DIR)
            for name in names:
                path = "/" + name.decode("utf-8", "replace")
                if any(path == a or path.startswith(a + "/") for a in allowed):
                    continue
                rec = kinds[id(tree.layer_of(name))]
                if rec.kind == "packages":
                    from_packages.append(path)
                    continue
                raise UserError(
                    f"{rec.label} puts {path} under {shadow}, which the {generator} "
                    "mounts over at run time, so the file would be hidden",
                    where=str(self.recipe.path),
                    hint="move it, or list it under allow_shadowed: if that is intended")
        return from_packages

    def _write_rootfs(self, tree: assemble.Tree, epoch: int, staging: Path
                      ) -> tuple[list[dict[str, Any]], assemble.AssemblyStats]:
        formats = self.recipe.spec.output.formats
        tar_formats: list[str] = [f for f in formats if f in TAR_FORMATS]
        image_formats: list[str] = [f for f in formats if f in IMAGE_FORMATS]
        scratch_tar = bool(image_formats) and "tar" not in tar_formats
        sink_formats = tar_formats + (["tar"] if scratch_tar else [])
        oci_info = oci.ImageInfo.from_build(self.recipe, self.ctx.base_info.get("arch", ""),
                                            self.ctx.inputs["base.image"]["sha256"], epoch)
        with outputs.open_sinks(staging, sink_formats) as tee, \
                ui.bar("writing rootfs", None) as bar:
            oci_layer = oci.layer_sink(staging, oci_info, list(formats), tee.sinks)

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
        if oci_layer is not None:
            image = oci.write_layout(staging / oci.LAYOUT_DIR, oci_layer, oci_info)
            artifacts.append(image.artifact())
        if image_formats:
            from .images import ImageSpec, write_images
            out = self.recipe.spec.output
            spec = ImageSpec(name=self.recipe.name, epoch=epoch, size=out.size,
                             headroom=out.headroom, qcow2_compressed=out.qcow2_compressed)
            with self.session.enter("writing images"):
                for img in write_images(staging / "rootfs.tar", image_formats, staging, spec):
                    artifacts.append({"path": img.path.name, "format": img.format,
                                      "sha256": sha256_file(img.path),
                                      "size": img.path.stat().st_size,
                                      "reproducibility": img.reproducibility,
                                      "details": img.details})
        if scratch_tar:
            (staging / "rootfs.tar").unlink()
        for a in artifacts:  # not the umask's business: the bundle records modes
            if a["format"] != oci.FORMAT:   # a directory; write_layout sets its modes
                os.chmod(staging / a["path"], 0o644)
        return artifacts, stats

    def manifest(self, plan: Plan, epoch: int, epoch_source: str,
                 stats: assemble.AssemblyStats, artifacts: list[dict[str, Any]],
                 sections: dict[str, Any], hidden_package_files: list[str]
                 ) -> dict[str, Any]:
        r, es, ctx = self.recipe, plan.es, self.ctx
        params = {}
        for k, v in sorted(es.params.items()):
            if es.specs[k].is_input and k in r.spec.params:
                v = r.spec.params[k]   # as written in the recipe: stable across checkouts
            elif isinstance(v, Path):
                v = v.name
            elif isinstance(v, list):
                v = [x.name if isinstance(x, Path) else x for x in v]
            params[k] = v
        inputs = [{"role": role.split(": ")[0], "file": Path(item["path"]).name,
                   "sha256": item["sha256"]}
                  for role, item in sorted(ctx.inputs.items()) if role != "base.image"]
        return {
            "name": r.name,
            "tool": {"name": "rootfs-build", "version": __version__,
                     "format_version": FORMAT_VERSION, "elements": shipped.elements_digest(),
                     **outputs.compression_versions()},
            "recipe": {"file": r.path.name, "sha256": sha256_file(r.path)},
            "base": {"image": r.written("base", "image"),
                     "sha256": ctx.inputs["base.image"]["sha256"],
                     "os_release": ctx.base_info.get("os_release", {}),
                     "arch": ctx.base_info.get("arch"),
                     "root": ctx.base_info.get("root"),
                     "mountpoints": ctx.base_info.get("mountpoints", {})},
            "elements": [{"name": e.name, "element_yaml_sha256":
                          sha256_file(e.yaml_path) if e.yaml_path.exists() else None}
                         for e in es.elements],
            "params": params,
            "inputs": inputs,
            "layers": [{"kind": rec.kind, "label": rec.label, "key": rec.key,
                        "entries": rec.layer.summary["entries"]} for rec in ctx.records],
            "epoch": epoch,
            "epoch_source": epoch_source,
            "rootfs": {"entries": stats.entries, "tar_bytes": stats.tar_bytes},
            "artifacts": artifacts,
            "generated": sections,
            "packages": package_list(ctx.records, hidden_package_files),
            "not_reproducible": [n for rec in ctx.records
                                 for n in rec.info.get("not_reproducible", [])
                                 + rec.info.get("packages", {}).get("not_reproducible", [])],
            "notes": ctx.notes,
        }


def package_list(records: list[LayerRecord], hidden: list[str]) -> dict[str, Any]:
    """The packages the rootfs got from package steps (name, epoch, version,
    release, arch, the RPM file's sha256), as a release pipeline archives
    them, with what was removed and the files a deployment mount hides."""
    installed: dict[str, dict[str, Any]] = {}
    removed: list[str] = []
    for rec in records:
        done = rec.info.get("packages") or {}
        for p in done.get("installed", []):
            installed[p["name"]] = p
        for nevra in done.get("removed", []):
            removed.append(nevra)
            installed.pop(nevra.rsplit("-", 2)[0], None)
    return {"installed": [installed[n] for n in sorted(installed)], "removed": removed,
            "hidden_at_run_time": hidden}


def plan_generators(recipe: Recipe, es: elements.ElementSet) -> dict[str, generators.Generator]:
    """The generators the elements ask for, each created (and so checked)
    once; mount entries no generator consumes are an error, not ignored."""
    asked: dict[str, list[str]] = {}
    for el in es.elements:
        for i, name in enumerate(el.spec.generate):
            generators.check_name(name, el.where("generate", i))
            asked.setdefault(name, []).append(el.name)
    mounts = tuple(generators.MountContribution(el.name, el.where("mounts", i), item)
                   for el in es.elements for i, item in enumerate(el.spec.mounts))
    if mounts and not asked:
        m = mounts[0]
        raise UserError(f"element {m.element} adds a deployment mount, but no element of this "
                        "recipe generates a deployment", where=m.where,
                        hint="add an element that generates a deployment (its element.yaml "
                             "has generate:) or drop the mounts")
    return {name: generators.create(name, generators.GeneratorContext(
        recipe.name, dict(es.params), dict(es.param_where), mounts,
        recipe.spec.output.bundle, tuple(by))) for name, by in asked.items()}


class _Writer:
    def __init__(self, fn: Callable[[bytes], None]):
        self.write = fn


def build(recipe: Recipe, opts: BuildOptions) -> BuildResult:
    return Builder(recipe, opts).run()
