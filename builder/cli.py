"""Command line: build, validate, inspect, cache, demo."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from . import __version__, ui
from .errors import BuildInterrupted, UserError
from .session import Session

COMMANDS = ("build", "validate", "inspect", "cache", "demo")


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
    sub.add_parser("build", parents=[common, recipe_opts, build_opts, cache_opts],
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
    sub.add_parser("demo", parents=[common, build_opts, cache_opts],
                   help="lay out the demo (recipe, overlay, stand-in inputs) under the "
                        "cache directory, made once, and build it")
    return p


def _emit(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(obj, indent=None, sort_keys=True))
    else:
        print(text)


def cmd_build(args: argparse.Namespace, session: Session, recipe_path: Path | None = None,
              overrides: list[str] | None = None) -> int:
    from .build import BuildOptions, build
    from .cache import Cache
    from .recipe import load_recipe

    recipe = load_recipe(recipe_path or args.recipe,
                         overrides if overrides is not None else args.overrides)
    cache = Cache(args.cache_dir, enabled=not args.no_cache)
    try:
        result = build(recipe, BuildOptions(output_root=args.output, cache=cache,
                                            session=session, timeout=args.appliance_timeout))
    finally:
        cache.close()
    lines = [f"built {result.name} in {result.seconds:.1f} s -> {result.directory}"]
    for a in result.artifacts:
        lines.append(f"  {a['sha256']}  {a['path']}  ({a['size']} bytes)")
    _emit(args, result.summary(), "\n".join(lines))
    return 0


def cmd_validate(args: argparse.Namespace, session: Session) -> int:
    from . import elements
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    es = elements.load(recipe)
    missing_params = elements.required_missing(es)
    missing = list(es.missing_inputs)
    if not recipe.spec.base.image.is_file():
        missing.insert(0, f"base.image: {recipe.spec.base.image}")
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
        info = app.inspect_base(str(image))
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "build")
    args = parser().parse_args(argv)
    if not args.command:
        parser().print_help()
        return 2
    ui.set_verbose(getattr(args, "verbose", False))
    session = Session()

    def on_sigterm(signum: int, _frame: Any) -> None:
        raise BuildInterrupted(signum, session.phase)

    signal.signal(signal.SIGTERM, on_sigterm)
    handlers = {"build": cmd_build, "validate": cmd_validate, "inspect": cmd_inspect,
                "cache": cmd_cache, "demo": cmd_demo}
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
