"""Command line: build, validate, inspect, cache, demo."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any

from . import __version__, heap, interrupts, ui
from .errors import BuildInterrupted, UserError
from .session import Session

COMMANDS = ("build", "validate", "inspect", "cache", "demo", "push", "pull")


def _size(text: str) -> int:
    from .values import parse_size
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Version(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kw: Any) -> None:
        from . import shipped
        print(f"rootfs-build {__version__} (elements {shipped.elements_digest()})")
        parser.exit()


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true",
                        help="show details and tracebacks")
    common.add_argument("--json", action="store_true",
                        help="print one JSON object with the result on stdout")
    cache_opts = argparse.ArgumentParser(add_help=False)
    cache_opts.add_argument("--cache-dir", type=Path, metavar="DIR",
                            help="layer cache (default: $XDG_CACHE_HOME/rootfs-build)")
    build_opts = argparse.ArgumentParser(add_help=False)
    build_opts.add_argument("-o", "--output", type=Path, default=Path("output"), metavar="DIR",
                            help="output root; results go to DIR/<name>/ (default: ./output)")
    build_opts.add_argument("--no-cache", action="store_true",
                            help="build every layer afresh in a private temporary cache")
    build_opts.add_argument("--appliance-timeout", type=float, metavar="SECONDS",
                            help="stop an appliance call that makes no progress for this long "
                                 "(default: 1800; starting the appliance always gets at least "
                                 "600)")
    registry_opts = argparse.ArgumentParser(add_help=False)
    reg = registry_opts.add_argument_group(
        "registry access (credentials: --creds-file, else $REGISTRY_AUTH_FILE, else "
        "~/.docker/config.json; never on the command line)")
    reg.add_argument("--creds-file", type=Path, metavar="FILE",
                     help="registry credentials (docker config.json / containers auth.json)")
    reg.add_argument("--ca-file", type=Path, metavar="FILE",
                     help="trust this CA certificate (PEM) for the registry's TLS")
    reg.add_argument("--insecure", action="store_true",
                     help="plain HTTP (only for a registry on this machine)")
    reg.add_argument("--registry-timeout", type=float, default=60, metavar="SECONDS",
                     help="give up on a registry that does not connect or send for this long "
                          "(default: 60)")
    remote_opts = argparse.ArgumentParser(add_help=False, parents=[registry_opts])
    rem = remote_opts.add_argument_group("registries")
    rem.add_argument("--push", metavar="REF",
                     help="after the build, push it as REF (needs the oci format); see "
                          "'rootfs-build push'")
    rem.add_argument("--cache-from", metavar="REPO",
                     help="fetch missing layer cache entries from this registry repository")
    rem.add_argument("--cache-to", metavar="REPO",
                     help="after the build, push its layer cache entries to this registry "
                          "repository")
    recipe_opts = argparse.ArgumentParser(add_help=False)
    recipe_opts.add_argument("recipe", type=Path, help="recipe YAML file")
    recipe_opts.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                             dest="overrides",
                             help="override a recipe value, e.g. --set params.host_ip=10.0.0.2 "
                                  "(repeatable; relative paths are relative to the current "
                                  "directory)")

    p = argparse.ArgumentParser(
        prog="rootfs-build",
        description="Build a reproducible libvirt-offload rootfs for a DPU from an openEuler "
                    "qcow2.  'rootfs-build RECIPE' is short for 'rootfs-build build RECIPE'.")
    p.add_argument("--version", action=_Version, nargs=0,
                   help="show the version and the shipped element set's digest")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("build", parents=[common, recipe_opts, build_opts, cache_opts, remote_opts],
                   help="build a recipe into DIR/<name>/")
    sub.add_parser("validate", parents=[common, recipe_opts],
                   help="check a recipe and its elements; list missing inputs")
    ins = sub.add_parser("inspect", parents=[common],
                         help="show partitions, filesystems, root, os-release and arch "
                              "of an image")
    ins.add_argument("image", type=Path)
    ins.add_argument("--appliance-timeout", type=float, metavar="SECONDS")
    cache = sub.add_parser("cache", help="show or trim the layer cache")
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    cache_sub.add_parser("ls", parents=[common, cache_opts], help="list cache entries")
    prune = cache_sub.add_parser("prune", parents=[common, cache_opts],
                                 help="remove entries not in use, least recently used first")
    prune.add_argument("--max-size", type=_size, metavar="SIZE",
                       help="keep at most SIZE (like 20G); without it, remove all")
    cache_sub.add_parser(
        "verify", parents=[common, cache_opts],
        help="hash every file of every entry and remove the damaged ones (a build "
             "re-hashes a file only when its size, inode, mtime or ctime changed); "
             "exit 1 when something was damaged")
    sub.add_parser("demo", parents=[common, build_opts, cache_opts, remote_opts],
                   help="lay out the demo (recipe, overlay, stand-in inputs) under the "
                        "cache directory, made once, and build it")
    push = sub.add_parser("push", parents=[common, registry_opts],
                          help="push a build's output directory (with the oci format) to a "
                               "registry: the image as REF, the other files as REF's tag + "
                               "'.bundle'")
    push.add_argument("directory", type=Path, metavar="OUTPUT_DIR",
                      help="a build's output directory, e.g. output/NAME")
    push.add_argument("ref", metavar="REF", help="HOST[:PORT]/REPOSITORY[:TAG] (tag: latest)")
    pull = sub.add_parser("pull", parents=[common, registry_opts],
                          help="fetch a pushed build into DIR/<name>/, every blob verified, "
                               "published in one rename")
    pull.add_argument("ref", metavar="REF", help="HOST[:PORT]/REPOSITORY:TAG")
    pull.add_argument("-o", "--output", type=Path, default=Path("output"), metavar="DIR",
                      help="output root; the build goes to DIR/<name>/ (default: ./output)")
    return p


def _emit(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(obj, indent=None, sort_keys=True))
    else:
        print(text)


def _registry_options(args: argparse.Namespace) -> Any:
    from .registry import Options

    if args.registry_timeout <= 0:
        raise UserError("--registry-timeout must be more than 0 seconds")
    return Options(ca_file=args.ca_file, insecure=args.insecure, creds_file=args.creds_file,
                   timeout=args.registry_timeout)


def cmd_build(args: argparse.Namespace, session: Session, recipe_path: Path | None = None,
              overrides: list[str] | None = None) -> int:
    from . import oci
    from .build import BuildOptions, build
    from .cache import Cache
    from .recipe import load_recipe
    from .registry import Reference, RegistryError, connect
    from .remote_cache import Remotes

    recipe = load_recipe(recipe_path or args.recipe,
                         overrides if overrides is not None else args.overrides)
    opts = _registry_options(args)
    push_ref = Reference.parse(args.push, what="--push") if args.push else None
    if push_ref is not None:
        if oci.FORMAT not in recipe.spec.output.formats:
            raise UserError("--push needs the oci format", where=recipe.where("output", "formats"),
                            hint="add oci to output.formats (e.g. --set "
                                 "'output.formats=[tar.zst, oci]')")
        connect(push_ref, opts)   # refused credentials fail now, not after the build
    remotes = Remotes.from_flags(args.cache_from, args.cache_to, opts)
    cache = Cache(args.cache_dir, enabled=not args.no_cache)
    try:
        remotes.attach(cache)
        result = build(recipe, BuildOptions(output_root=args.output, cache=cache,
                                            session=session, timeout=args.appliance_timeout))
        summary = result.summary()
        for layer in summary["layers"]:
            if layer["key"] in cache.fetched:
                layer["cache"] = "remote"
        if args.cache_from or args.cache_to:
            summary["remote_cache"] = remotes.finish(cache)
    finally:
        cache.close()
    lines = [f"built {result.name} in {result.seconds:.1f} s -> {result.directory}"]
    for a in result.artifacts:
        lines.append(f"  {a['sha256']}  {a['path']}  ({a['size']} bytes)")
    if push_ref is not None:
        from . import distribute

        try:
            pushed = distribute.push_output(result.directory, push_ref, opts)
        except RegistryError as e:
            raise RegistryError(f"built {result.directory}, but pushing it failed: {e.message}",
                                hint=e.hint or f"push it with: rootfs-build push "
                                               f"{result.directory} {push_ref}") from None
        summary["push"] = pushed.to_json()
        lines.append(distribute.transfer_lines(pushed, "pushed"))
    _emit(args, summary, "\n".join(lines))
    return 0


def cmd_push(args: argparse.Namespace, session: Session) -> int:
    from . import distribute
    from .registry import Reference

    ref = Reference.parse(args.ref)
    result = distribute.push_output(args.directory, ref, _registry_options(args))
    _emit(args, result.to_json(), distribute.transfer_lines(result, "pushed"))
    return 0


def cmd_pull(args: argparse.Namespace, session: Session) -> int:
    from . import distribute
    from .registry import Reference

    ref = Reference.parse(args.ref)
    result = distribute.pull_output(ref, args.output, _registry_options(args))
    _emit(args, result.to_json(), distribute.transfer_lines(result, "pulled"))
    return 0


def cmd_validate(args: argparse.Namespace, session: Session) -> int:
    import tempfile

    from . import elements, elfinfo, emulation, packages, steps
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    es = elements.load(recipe)
    missing_params = elements.required_missing(es)
    missing = list(es.missing_inputs) + steps.missing_package_inputs(recipe)
    if not recipe.spec.base.image.is_file():
        missing.insert(0, f"base.image: {recipe.spec.base.image}")
    if recipe.spec.packages is not None and not steps.missing_package_inputs(recipe):
        # the repositories and names, checked without installing anything
        pk = recipe.spec.packages
        request = packages.PackageRequest(repos=pk.repos, install=pk.install, remove=pk.remove,
                                          gpgcheck=pk.gpgcheck, gpgkeys=pk.gpgkeys,
                                          weak_deps=pk.weak_deps)
        if request.install or request.remove:
            arch = elfinfo.normalize_arch(recipe.spec.base.arch or emulation.host_arch())
            with tempfile.TemporaryDirectory(prefix="rootfs-build-validate-") as tmp:
                packages.check(request, arch=arch, workdir=Path(tmp),
                               where=recipe.where("packages"))
    summary = {"recipe": str(recipe.path), "name": recipe.name, "valid": True,
               "elements": es.names(), "missing_inputs": missing,
               "missing_params": missing_params, "formats": list(recipe.spec.output.formats)}
    lines = [f"{recipe.path}: valid", f"  elements: {' '.join(es.names())}"]
    if missing_params:
        lines.append("  required params not set: " + ", ".join(missing_params))
    for m in missing:
        lines.append(f"  missing input: {m}")
    _emit(args, summary, "\n".join(lines))
    return 0


def cmd_inspect(args: argparse.Namespace, session: Session) -> int:
    from . import guestfs_io

    image = args.image
    if not image.is_file():
        raise UserError(f"{image}: not found or not a file")
    fmt = guestfs_io.image_format(image)
    app = guestfs_io.Appliance(f"inspect {image.name}", session=session,
                               timeout=args.appliance_timeout)
    app.add_drive(image, fmt=fmt, readonly=True)
    with app:
        partitions = app.call("list_partitions")
        info = app.inspect_base(str(image), every_filesystem=True)
    obj = {"image": str(image), "format": fmt, "partitions": partitions, **info.to_json()}
    lines = [f"{image} ({fmt})",
             "  partitions: " + (" ".join(partitions) or "none"),
             "  filesystems: " + " ".join(f"{d}={t}" for d, t in sorted(info.filesystems.items())),
             f"  root: {info.root}",
             "  mountpoints: " + " ".join(f"{m}={d}" for m, d in sorted(info.mountpoints.items())),
             f"  os: {info.os_release.get('PRETTY_NAME', '(no os-release)')}",
             f"  arch: {info.arch}"]
    _emit(args, obj, "\n".join(lines))
    return 0


def cmd_cache(args: argparse.Namespace, session: Session) -> int:
    from .cache import Cache

    cache = Cache(args.cache_dir)
    try:
        if args.cache_command == "ls":
            entries = cache.entries()
            rows = [{"key": e.key, "kind": e.meta.get("kind"), "label": e.meta.get("label"),
                     "size": e.size, "last_used": int(e.last_used)} for e in entries]
            total = sum(e.size for e in entries)
            text = "\n".join(f"{e.key[:16]}  {e.meta.get('kind', '?'):8} {e.size:>12}  "
                             f"{e.meta.get('label', '')}" for e in entries)
            _emit(args, {"cache_dir": str(cache.root), "entries": rows, "total": total},
                  (text + "\n" if text else "") + f"{len(rows)} entries, {total} bytes in "
                  f"{cache.root}")
        elif args.cache_command == "verify":
            rows = cache.verify()
            bad = [r for r in rows if r["status"] != "ok"]
            text = "\n".join(f"{r['key'][:16]}  {r['kind']:8} {r['status']:16} {r['label']}"
                             + (f": {r['why']}" if r["why"] else "") for r in rows)
            removed = sum(1 for r in bad if "in use" not in r["status"])
            _emit(args, {"cache_dir": str(cache.root), "entries": rows, "damaged": len(bad),
                         "removed": removed},
                  (text + "\n" if text else "") + f"{len(rows)} entries verified, "
                  f"{len(bad)} damaged, {removed} removed")
            return 1 if bad else 0
        else:
            removed, freed = cache.prune(args.max_size)
            _emit(args, {"removed": removed, "freed": freed},
                  f"removed {removed} entries, freed {freed} bytes")
    finally:
        cache.close()
    return 0


def cmd_demo(args: argparse.Namespace, session: Session) -> int:
    from . import cache, demo

    workdir = (args.cache_dir or cache.default_dir()) / "demo"
    recipe = demo.prepare(workdir)
    return cmd_build(args, session, recipe_path=recipe, overrides=[])


def main(argv: list[str] | None = None) -> int:
    heap.settle()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "build")
    args = parser().parse_args(argv)
    if not args.command:
        parser().print_help()
        return 2
    ui.set_verbose(getattr(args, "verbose", False))
    session = Session()

    interrupts.install(lambda: session.phase)
    handlers = {"build": cmd_build, "validate": cmd_validate, "inspect": cmd_inspect,
                "cache": cmd_cache, "demo": cmd_demo, "push": cmd_push, "pull": cmd_pull}
    try:
        return handlers[args.command](args, session)
    except UserError as e:
        if ui.verbose():
            traceback.print_exc()
        return _fail(args, session, f"error: {e}", e.exit_code)
    except KeyboardInterrupt:
        return _fail(args, session, f"interrupted during {session.phase}; nothing was "
                     "published", 130)
    except BuildInterrupted as e:
        return _fail(args, session, f"stopped by signal {e.signum} during {e.phase}; nothing "
                     "was published", 128 + e.signum)
    except OSError as e:
        if ui.verbose():
            traceback.print_exc()
        where = f"{e.filename}: " if e.filename else ""
        return _fail(args, session, f"error: {where}{e.strerror or e}", 1)


def _fail(args: argparse.Namespace, session: Session, message: str, code: int) -> int:
    """One line on stderr; with --json also {"error", "phase", "appliance_launches"}."""
    print(f"rootfs-build: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": message, "phase": session.phase, "exit_code": code,
                          "appliance_launches": session.launches}, sort_keys=True))
    return code


if __name__ == "__main__":
    sys.exit(main())
