"""The build: recipe -> plan of cached layers -> assembled outputs.

    base      the image's tree, read with libguestfs             [appliance]
    element   each element's files, dirs, symlinks, templates    [host, pure Python]
    run       each element's install scripts, inside the rootfs  [appliance]
    overlay   each overlay directory                             [host, pure Python]

Each layer is a cache entry keyed by the digest of what it is made from
(and, for run steps, of everything below it).  A warm build whose change
is in a file layer never starts the appliance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import (
    FORMAT_VERSION,
    __version__,
    assemble,
    elements,
    filelayers,
    guestfs_io,
    outputs,
    ui,
)
from .cache import Cache, sha256_file
from .errors import UserError
from .layer import Layer
from .recipe import TAR_FORMATS, Recipe


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
        previous, cls.current = cls.current, name
        try:
            yield
        finally:
            cls.current = previous


def digest(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


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

    # -- checks before any work ------------------------------------------
    def prepare(self) -> elements.ElementSet:
        with Phase.enter("validation"):
            es = elements.load(self.recipe)
            missing = elements.required_missing(es, self.recipe)
            if missing:
                raise UserError(f"{self.recipe.path}: required params not set: "
                                f"{', '.join(missing)}", hint="set them under params:")
            if es.missing_inputs:
                raise UserError(f"{self.recipe.path}: input not found: {es.missing_inputs[0]}"
                                + (f" (and {len(es.missing_inputs) - 1} more)"
                                   if len(es.missing_inputs) > 1 else ""),
                                hint="fix the path, or pass --set params.NAME=PATH")
            self.es = es
            return es

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
            raise UserError(f"base image {image} not found", where=r.where("base", "image"))
        if not image.is_file():
            raise UserError(f"base image {image} is not a file", where=r.where("base", "image"))
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
        app = guestfs_io.Appliance(f"base image {image.name}", smp=self.opts.smp,
                                   timeout=self.opts.timeout)
        app.add_drive(image, fmt=fmt, readonly=True)
        with app:
            info = app.inspect_base(str(image), mount=self.recipe.base_filesystems == "all")
            self._check_arch(info.arch)
            ui.step(f"extracting {image.name}: {info.os_release.get('PRETTY_NAME', 'unknown OS')}"
                    f" ({info.arch}), root {info.root}")
            with ui.bar("extracting base", info.used_bytes or None) as bar:
                def consume(stream: Any) -> dict[str, Any]:
                    from .layer import build_layer_from_tar
                    return build_layer_from_tar(stream, tmp, mtime_policy="clamp",
                                                source=f"{image.name}", on_bytes=bar.update)
                summary = app.tar_out("/", consume)
        return {"base": info.to_json(), "summary": summary}

    def _check_arch(self, arch: str) -> None:
        want = self.recipe.base_arch
        if want and arch != "unknown" and want != arch:
            raise UserError(f"base image is {arch}, the recipe says {want}",
                            where=self.recipe.where("base", "arch"))

    def file_layer(self, plan: filelayers.FilePlan) -> LayerRecord:
        for path, sha in plan.inputs.items():
            self.inputs.setdefault(f"{plan.label}: {path}", {"path": path, "sha256": sha})
        return self._layer(plan.kind, plan.label, plan.key(), plan.write)

    # -- the whole build -----------------------------------------------------------
    def layers(self) -> list[LayerRecord]:
        es = self.es or self.prepare()
        self.base_layer()
        with Phase.enter("element layers"):
            for el in es.elements:
                plan = filelayers.plan_element(el, es)
                if plan.items or plan.deletions:
                    self.file_layer(plan)
        with Phase.enter("overlays"):
            for i, ov in enumerate(self.recipe.overlays):
                self.file_layer(filelayers.plan_overlay(ov, i, self.recipe.where("overlays", i)))
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

    def run(self) -> BuildResult:
        start = time.monotonic()
        launches_before = guestfs_io.launches
        es = self.prepare()
        out = outputs.OutputDir(self.opts.output_root, self.recipe.name)
        try:
            records = self.layers()
            epoch, epoch_source = self.epoch()
            with Phase.enter("assembly"):
                tar_formats = [f for f in self.recipe.formats if f in TAR_FORMATS]
                with outputs.open_sinks(out.staging, tar_formats) as tee:
                    tree = assemble.Tree()
                    for rec in records:
                        tree.apply(rec.layer)
                    with ui.bar("writing rootfs", None) as bar:
                        class _Counting:
                            @staticmethod
                            def write(data: bytes) -> None:
                                tee.write(data)
                                bar.update(len(data))
                        stats = assemble.write_tree(tree, epoch, _Counting)
            artifacts = []
            for fmt in tar_formats:
                s = next(s for s in tee.sinks if s.fmt == fmt)
                artifacts.append({"path": f"rootfs.{fmt}", "format": fmt,
                                  "sha256": s.file.sha.hexdigest(), "size": s.file.size,
                                  "reproducibility": "bit-identical"})
            manifest = self.manifest(es, epoch, epoch_source, stats, artifacts)
            outputs.write_text_atomic(out.staging / "manifest.json",
                                      json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            outputs.write_text_atomic(out.staging / "SHA256SUMS",
                                      outputs.sha256sums(out.staging))
            with Phase.enter("publishing outputs"):
                final = out.publish()
        finally:
            out.close()
            for rec in self.records:
                rec.layer.close()
        result_artifacts = [{"path": str(final / str(a["path"])), "sha256": a["sha256"],
                             "size": a["size"], "format": a["format"]} for a in artifacts]
        return BuildResult(self.recipe.name, final, result_artifacts, manifest,
                           guestfs_io.launches - launches_before, self.records,
                           time.monotonic() - start)

    def manifest(self, es: elements.ElementSet, epoch: int, epoch_source: str,
                 stats: assemble.AssemblyStats, artifacts: list[dict[str, Any]]) -> dict[str, Any]:
        r = self.recipe
        params = {}
        for k, v in sorted(es.params.items()):
            if isinstance(v, Path):
                v = r.params.get(k, str(v))
            elif isinstance(v, list):
                v = [str(x) if isinstance(x, Path) else x for x in v]
                if es.specs[k].type == "files":
                    v = r.params.get(k, v)
            params[k] = v
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
            "inputs": [{"role": k, **v} for k, v in sorted(self.inputs.items())
                       if k != "base.image"],
            "layers": [{"kind": rec.kind, "label": rec.label, "key": rec.key,
                        "entries": rec.layer.summary["entries"]} for rec in self.records],
            "epoch": epoch,
            "epoch_source": epoch_source,
            "rootfs": {"entries": stats.entries, "tar_bytes": stats.tar_bytes},
            "artifacts": artifacts,
        }


def build(recipe: Recipe, opts: BuildOptions) -> BuildResult:
    return Builder(recipe, opts).run()
