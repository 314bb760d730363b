"""The demo: inputs the repository makes itself, so `rootfs-build demo` runs
offline on a fresh machine.

DEMO ONLY.  Nothing made here is a working DPU component:

- an openEuler-shaped qcow2 (see sampleimage) with the build host's bash;
- stand-in rexec / rexec_server / engine programs (C, built with gcc) that
  record what they were asked to run instead of doing it;
- stand-in qtfs.ko / qtfs_server.ko: ELF objects whose .modinfo carries the
  vermagic of the kernels named in recipes/demo.yaml, nothing else
  (sampleimage.fake_module);
- a tiny "prebuilt libvirt" install tree of shell-script daemons.

`prepare(workdir)` lays the demo out in a directory of its own, the way the
repository has it: `recipes/demo.yaml`, the overlay it names
(`overlays/demo/`), and the inputs in `recipes/demo-inputs/`, made once and
kept (the CLI uses a directory under the cache, never the install tree or
the checkout).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from . import runner, sampleimage, shipped, ui

RECIPE = "recipes/demo.yaml"
OVERLAY = "overlays/demo"
INPUTS = "recipes/demo-inputs"
BASE_IMAGE = "openEuler-22.03-LTS-demo-x86_64.qcow2"
DPU_KERNEL = "5.10.0-60.18.0.50.oe2203.x86_64"
HOST_KERNEL = "5.10.0-60.18.0.50.oe2203.x86_64"

# A rexec that records instead of connecting: argv and CMD_NET_ADDR go to
# $REXEC_RECORD (default /tmp/rexec-record), NUL-separated.
REXEC_C = r"""
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    const char *path = getenv("REXEC_RECORD");
    const char *addr = getenv("CMD_NET_ADDR");
    FILE *f = fopen(path ? path : "/tmp/rexec-record", "w");
    if (!f) { perror("rexec (demo stand-in)"); return 2; }
    fprintf(f, "CMD_NET_ADDR=%s", addr ? addr : "");
    fputc(0, f);
    for (int i = 1; i < argc; i++) { fputs(argv[i], f); fputc(0, f); }
    fclose(f);
    return 0;
}
"""

STUB_C = r"""
#include <stdio.h>
int main(int argc, char **argv) {
    printf("%s: demo stand-in, %d argument(s); not the real program\n", argv[0], argc - 1);
    return 0;
}
"""

DAEMON_SH = """#!/bin/bash
# DEMO stand-in for {name}: with -d it leaves a sleeping process and a pid file.
if [ "${{1:-}}" = "-d" ]; then
    mkdir -p /var/run
    sleep 100000 &
    echo $! > /var/run/{name}.pid
    exit 0
fi
echo "{name}: demo stand-in"
"""


def _gcc(args: list[str], what: str) -> None:
    gcc = runner.find_tool("gcc", needed_for=f"the demo's {what}")
    runner.run([gcc, *args], env=None, what=f"building the demo's {what}")


def _program(src: str, out: Path, work: Path) -> None:
    c = work / f"{out.name}.c"
    c.write_text(src)
    _gcc(["-O2", "-s", "-static", "-o", str(out), str(c)], out.name)


def _libvirt_tree(root: Path) -> None:
    for rel, text in (("usr/sbin/libvirtd", DAEMON_SH.format(name="libvirtd")),
                      ("usr/sbin/virtlogd", DAEMON_SH.format(name="virtlogd")),
                      ("usr/bin/virsh", "#!/bin/bash\necho 'virsh: demo stand-in'\n")):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        p.chmod(0o755)
    doc = root / "usr/share/doc/libvirt-demo/README"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("DEMO: a stand-in for a prebuilt libvirt 6.9.0 install tree.\n")


def prepare(workdir: Path) -> Path:
    """The demo laid out in `workdir` (recipe, overlay, inputs); returns the
    recipe's path.  The recipe and overlay are refreshed from the shipped
    copies on every call, the inputs made only when missing."""
    for rel in (RECIPE, OVERLAY):
        kind, _, name = rel.partition("/")
        src, dest = shipped.path(kind) / name, workdir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        staged = dest.with_name(f".{dest.name}.new")
        if src.is_dir():
            shutil.rmtree(staged, ignore_errors=True)
            shutil.copytree(src, staged)
            shutil.rmtree(dest, ignore_errors=True)
        else:
            shutil.copyfile(src, staged)
        os.replace(staged, dest)
    prepare_inputs(workdir / INPUTS)
    return workdir / RECIPE


def prepare_inputs(inputs: Path) -> None:
    """Make the demo inputs in `inputs` where missing."""
    inputs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".make-", dir=inputs) as tmp:
        work = Path(tmp)
        made = False
        for name, make in (
            ("rexec", lambda p: _program(REXEC_C, p, work)),
            ("rexec_server", lambda p: _program(STUB_C, p, work)),
            ("engine", lambda p: _program(STUB_C, p, work)),
            ("qtfs.ko", lambda p: p.write_bytes(sampleimage.fake_module("qtfs", DPU_KERNEL))),
            ("qtfs_server.ko",
             lambda p: p.write_bytes(sampleimage.fake_module("qtfs_server", HOST_KERNEL))),
            ("libvirt-tree", _libvirt_tree),
            (BASE_IMAGE, lambda p: sampleimage.make(p)),
        ):
            final = inputs / name
            if final.exists():
                continue
            if not made:
                ui.step(f"making demo inputs in {inputs}")
                made = True
            staged = work / f"staged-{name}"
            make(staged)
            os.replace(staged, final)  # inputs appear whole or not at all
