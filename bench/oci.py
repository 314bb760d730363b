"""Benchmark the registry paths: a second machine's build via --cache-from; push/pull.

Issue 14: a cold build on a second machine through the layer cache shared
in a registry, and push/pull against skopeo.

    .venv/bin/python bench/oci.py [--size-gb 1.0] [--files 50000] [--workdir DIR]
        [--keep] [--accel tcg|auto] [--quiet-wait SECONDS]

On bench/build.py's base image (made once and cached by it, the same image
its report describes), against throwaway local registries (CNCF
distribution on 127.0.0.1, TLS from a throwaway CA, htpasswd users), in one
run:

    A       "machine A": cold build, empty cache, --cache-to REG/cache/bench
    B       "machine B": cold build, another empty cache and output directory,
            --cache-from REG/cache/bench      target: B <= 0.25x A, no appliance
    push    rootfs-build push OUT_A/bench REG2/img/bench:1      (a fresh registry)
    S-push  skopeo copy oci:OUT_A/bench/rootfs.oci docker://REG3/img/bench:1
    pull    rootfs-build pull REG2/img/bench:1 -o DIR
    S-pull  skopeo copy docker://REG3/img/bench:1 oci:DIR
    and the cache transfers inside A and B (from their --json) against skopeo
    copying the same cache blobs (the base layer's entry) out of and into a
    registry.

Every time is wall time of one process.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from builder import oci  # noqa: E402
from builder.localregistry import LocalRegistry  # noqa: E402

# bench/build.py: the base image, running and timing commands
_spec = importlib.util.spec_from_file_location("bench_build", Path(__file__).with_name("build.py"))
assert _spec is not None and _spec.loader is not None
bb = importlib.util.module_from_spec(_spec)
sys.modules["bench_build"] = bb
_spec.loader.exec_module(bb)

TARGET_B = 0.25
USER, PASSWORD = "bench", "bench-registry-password"


def skopeo(*args: str) -> list[str]:
    return ["skopeo", *args]


def blob_bytes(layout: Path) -> int:
    image = oci.read_layout(layout)
    return sum(d.size for d in (image.manifest, image.config, *image.layers))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bb.add_base_options(ap)
    args = ap.parse_args()
    bb.QUIET_WAIT = args.quiet_wait
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    env = {"LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"} if args.accel == "tcg" else {}
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    image, info = bb.base_image(workdir, args.size_gb, args.files, selinux=args.selinux,
                                env=env)
    rundir = Path(tempfile.mkdtemp(prefix="oci-run-", dir=workdir))
    logf = rundir / "log.txt"
    bb.log(f"run directory {rundir} (commands and their stderr in log.txt)")
    registries: list[LocalRegistry] = []
    rows: dict[str, Any] = {}
    try:
        def registry(name: str) -> LocalRegistry:
            reg = LocalRegistry(rundir / name, tls=True, users={USER: PASSWORD})
            reg.start()
            registries.append(reg)
            return reg

        cache_reg, img_reg, sk_reg, sk_cache_reg = (registry(n) for n in (
            "reg-cache", "reg-push", "reg-skopeo", "reg-skopeo-cache"))

        def reg_args(reg: LocalRegistry) -> list[str]:
            return ["--ca-file", str(reg.ca_file), "--creds-file", str(reg.auth_file(USER))]

        def sk_args(reg: LocalRegistry, side: str) -> list[str]:
            return ["--authfile", str(reg.auth_file(USER)), f"--{side}-cert-dir",
                    str(reg.cert_dir)]

        overlay = rundir / "overlay"
        (overlay / "etc" / "bench").mkdir(parents=True)
        (overlay / "etc" / "bench" / "file.conf").write_text("setting = 1\n")
        recipe = rundir / "bench.yaml"
        recipe.write_text(
            "name: bench\n"
            f"base:\n  image: {json.dumps(str(image))}\n"
            f"overlays:\n  - {json.dumps(str(overlay))}\n"
            "output:\n  formats: [tar.zst, oci]\n  bundle: false\n")
        cache_repo = f"{cache_reg.host}/cache/bench"

        bb.log("A: cold build, empty cache, --cache-to")
        cmd = bb.cli_cmd(recipe, rundir / "out-a", rundir / "cache-a", "--cache-to", cache_repo,
                         *reg_args(cache_reg))
        a = bb.run(cmd, env=env, log_to=logf, stdout=rundir / "a.json",
                   rusage_file=rundir / "a.rusage", shown=bb.cli_shown(cmd))
        bb.log("B: cold build, another empty cache, --cache-from")
        cmd = bb.cli_cmd(recipe, rundir / "out-b", rundir / "cache-b", "--cache-from",
                         cache_repo, *reg_args(cache_reg))
        b = bb.run(cmd, env=env, log_to=logf, stdout=rundir / "b.json",
                   rusage_file=rundir / "b.rusage", shown=bb.cli_shown(cmd))
        out_a = rundir / "out-a" / "bench"
        same = all(oci.read_layout(rundir / o / "bench" / oci.LAYOUT_DIR).manifest.digest
                   == oci.read_layout(out_a / oci.LAYOUT_DIR).manifest.digest
                   for o in ("out-b",)) and \
            (rundir / "out-b/bench/rootfs.tar.zst").read_bytes() == \
            (out_a / "rootfs.tar.zst").read_bytes()
        rows.update(A=a, B=b, same=same)

        ref = f"{img_reg.host}/img/bench:1"
        bb.log("push: rootfs-build push")
        cmd = [str(bb.PYTHON), "-c", bb.CLI_HOOK, "push", str(out_a), ref, "--json",
               *reg_args(img_reg)]
        rows["push"] = bb.run(cmd, env={}, log_to=logf, stdout=rundir / "push.json",
                              rusage_file=rundir / "push.rusage", shown=bb.cli_shown(cmd))
        bb.log("S-push: skopeo copy oci: -> docker://")
        rows["S-push"] = bb.run(skopeo("copy", "--quiet", *sk_args(sk_reg, "dest"),
                                       f"oci:{out_a / oci.LAYOUT_DIR}",
                                       f"docker://{sk_reg.host}/img/bench:1"),
                                env={}, log_to=logf)
        bb.log("pull: rootfs-build pull")
        cmd = [str(bb.PYTHON), "-c", bb.CLI_HOOK, "pull", ref, "-o", str(rundir / "pulled"),
               "--json", *reg_args(img_reg)]
        rows["pull"] = bb.run(cmd, env={}, log_to=logf, stdout=rundir / "pull.json",
                              rusage_file=rundir / "pull.rusage", shown=bb.cli_shown(cmd))
        pulled_same = all(
            (rundir / "pulled" / "bench" / p.relative_to(out_a)).read_bytes() == p.read_bytes()
            for p in out_a.rglob("*") if p.is_file())
        rows["pulled_same"] = pulled_same
        bb.log("S-pull: skopeo copy docker:// -> oci:")
        rows["S-pull"] = bb.run(skopeo("copy", "--quiet", *sk_args(sk_reg, "src"),
                                       f"docker://{sk_reg.host}/img/bench:1",
                                       f"oci:{rundir / 'skopeo-pulled'}:1"),
                                env={}, log_to=logf)
        rows["image_bytes"] = blob_bytes(out_a / oci.LAYOUT_DIR)

        # the cache entry of the base layer: skopeo moving the same blobs
        base_key = next(x["key"] for x in a.summary["layers"] if x["kind"] == "base")
        src = f"docker://{cache_repo}:{base_key}"
        bb.log("S-cache-pull: skopeo copy of the base entry docker:// -> oci:")
        try:
            rows["S-cache-pull"] = bb.run(skopeo("copy", "--quiet", *sk_args(cache_reg, "src"),
                                                 src, f"oci:{rundir / 'skopeo-cache'}:base"),
                                          env={}, log_to=logf)
            bb.log("S-cache-push: skopeo copy of the base entry oci: -> docker://")
            rows["S-cache-push"] = bb.run(skopeo(
                "copy", "--quiet", *sk_args(sk_cache_reg, "dest"),
                f"oci:{rundir / 'skopeo-cache'}:base",
                f"docker://{sk_cache_reg.host}/cache/bench:{base_key}"), env={}, log_to=logf)
            manifest = json.loads(subprocess.run(
                skopeo("inspect", "--raw", f"oci:{rundir / 'skopeo-cache'}:base"),
                check=True, capture_output=True).stdout)
            rows["base_entry_bytes"] = sum(x["size"] for x in manifest["layers"])
        except SystemExit as e:   # skopeo refusing an artifact is a result too
            rows["S-cache-error"] = str(e)
    except KeyboardInterrupt:
        bb.log("interrupted")
        return 130
    finally:
        for reg in registries:
            reg.stop()
        if args.keep:
            bb.log(f"kept {rundir}")
        else:
            shutil.rmtree(rundir, ignore_errors=True)
    report(args, info, rows, workdir)
    return 0


def report(args: argparse.Namespace, info: dict[str, Any], rows: dict[str, Any],
           workdir: Path) -> None:
    a, b = rows["A"], rows["B"]
    to = a.summary.get("remote_cache", {}).get("to", {})
    frm = b.summary.get("remote_cache", {}).get("from", {})
    launches_b = b.summary.get("appliance_launches")
    verdicts = []
    lines: list[tuple[str, str, str, str, str, str]] = []

    def mbs(nbytes: float, secs: float) -> str:
        return f"{nbytes / 1e6 / secs:.0f}" if secs > 0 else "-"

    def add(label: str, secs: float | None, mb: float | None = None, rate: str = "",
            ratio: str = "", verdict: str = "") -> None:
        lines.append((label, f"{secs:.1f}" if secs is not None else "",
                      f"{mb / 1e6:.0f}" if mb else "", rate, ratio, verdict))

    ratio_b = b.seconds / a.seconds
    ok_b = ratio_b <= TARGET_B
    ok_launch = launches_b == 0
    verdicts += [ok_b, ok_launch, bool(rows.get("same")), bool(rows.get("pulled_same"))]
    add("A  cold build, empty cache, --cache-to", a.seconds)
    add("     of which: pushing the cache entries", to.get("seconds"), to.get("bytes"),
        mbs(to.get("bytes", 0), to.get("seconds", 0)))
    add("     A without the cache push", a.seconds - to.get("seconds", 0))
    add("B  cold build, empty cache, --cache-from", b.seconds, ratio=f"{ratio_b:.2f}x A",
        verdict=f"<= {TARGET_B}x A: {'PASS' if ok_b else 'FAIL'}")
    add("     of which: fetching the cache entries", frm.get("seconds"), frm.get("bytes"),
        mbs(frm.get("bytes", 0), frm.get("seconds", 0)))
    lines.append(("     appliance launches on B", str(launches_b), "", "", "",
                  f"0: {'PASS' if ok_launch else 'FAIL'}"))
    lines.append(("     B's outputs identical to A's", "yes" if rows["same"] else "NO", "", "",
                  "", "PASS" if rows["same"] else "FAIL"))
    push, sp = rows["push"], rows["S-push"]
    pushed = push.summary.get("bytes", 0)
    add("push   rootfs-build push (image + files)", push.seconds, pushed,
        mbs(pushed, push.seconds), f"{push.seconds / sp.seconds:.2f}x S-push")
    add("S-push skopeo copy oci: -> docker://", sp.seconds, rows["image_bytes"],
        mbs(rows["image_bytes"], sp.seconds))
    pull, spl = rows["pull"], rows["S-pull"]
    pulled = pull.summary.get("bytes", 0)
    add("pull   rootfs-build pull (image + files)", pull.seconds, pulled,
        mbs(pulled, pull.seconds), f"{pull.seconds / spl.seconds:.2f}x S-pull")
    add("S-pull skopeo copy docker:// -> oci:", spl.seconds, rows["image_bytes"],
        mbs(rows["image_bytes"], spl.seconds))
    lines.append(("     pulled directory identical to A's", "yes" if rows["pulled_same"]
                  else "NO", "", "", "", "PASS" if rows["pulled_same"] else "FAIL"))
    if "S-cache-pull" in rows:
        n = rows["base_entry_bytes"]
        add("S-cache skopeo copy base entry docker:// -> oci:", rows["S-cache-pull"].seconds,
            n, mbs(n, rows["S-cache-pull"].seconds))
        add("S-cache skopeo copy base entry oci: -> docker://", rows["S-cache-push"].seconds,
            n, mbs(n, rows["S-cache-push"].seconds))
    else:
        lines.append(("S-cache skopeo copy of a cache entry", "n/a", "", "", "",
                      rows.get("S-cache-error", "")[:40]))
    w = max(len(x[0]) for x in lines)
    out = [f"rootfs-build OCI benchmark: base {info['files']} files + {info['symlinks']} "
           f"symlinks, {info['file_bytes'] / 1e9:.2f} GB of file data; accel={args.accel}; "
           "registries: distribution on 127.0.0.1 with TLS + htpasswd",
           f"image {info['image']}", "",
           f"{'step':<{w}}  {'seconds':>7}  {'MB':>6}  {'MB/s':>5}  {'ratio':<15}  target/result",
           "-" * (w + 60)]
    for label, secs, mb, rate, ratio, verdict in lines:
        out.append(f"{label:<{w}}  {secs:>7}  {mb:>6}  {rate:>5}  {ratio:<15}  {verdict}")
    out.append("")
    out.append("MB: bytes over the wire (cache entries zstd-compressed; push/pull: blobs and "
               "manifests, rootfs.tar.zst = the layer, sent once).  The cache rows include "
               "compressing / unpacking and hashing on the fly; skopeo moves the blobs as "
               "they are.")
    steps = [k for k in ("A", "B", "push", "S-push", "pull", "S-pull", "S-cache-pull",
                         "S-cache-push") if k in rows]
    out.append("CPU the rest of the machine used during each step, in busy cores (2 here; "
               "above ~0.1 the step competed for CPU): " + ", ".join(
                   f"{k} {rows[k].others / max(rows[k].seconds, 1e-9):.2f}" for k in steps))
    noisy = [k for k in steps if rows[k].others / max(rows[k].seconds, 1e-9) > 0.1]
    if noisy:
        out.append(f"WARNING: other processes were busy during {', '.join(noisy)}: "
                   "rerun on a quiet machine before trusting the ratios")
    out.append(f"overall: {'PASS' if all(verdicts) else 'FAIL'} "
               f"({sum(verdicts)}/{len(verdicts)} checks)")
    text = "\n".join(out)
    print(text)
    (workdir / "last-oci-result.txt").write_text(text + "\n")
    with contextlib.suppress(OSError):
        os.chmod(workdir / "last-oci-result.txt", 0o644)


if __name__ == "__main__":
    sys.exit(main())
