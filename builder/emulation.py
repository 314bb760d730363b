"""Running a foreign-architecture rootfs's programs: qemu-user-static
registered with binfmt_misc inside the libguestfs appliance only.

The appliance runs the build host's kernel on the build host's CPU type, so a
rootfs of another architecture needs a user-mode emulator.  Debian's
qemu-user-static ships static emulators (/usr/bin/qemu-ARCH-static) and, for
each, a binfmt-support description (/usr/share/binfmts/qemu-ARCH) with the
ELF magic and mask to register.  The registration is made in the appliance's
kernel with the F flag (the kernel opens the emulator once, so nothing is
copied into the rootfs), never on the build host.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from pathlib import Path

from .elfinfo import normalize_arch
from .errors import UserError

# Where the emulators are looked for; ROOTFS_BUILD_QEMU_DIR overrides it (an
# emulator installed elsewhere, or none: the tests' "no emulator" case).
EMULATOR_DIR_ENV = "ROOTFS_BUILD_QEMU_DIR"
BINFMTS_DIR = Path("/usr/share/binfmts")
# rootfs arch (elfinfo/uname names) -> qemu's name for it
QEMU_NAMES = {"x86_64": "x86_64", "aarch64": "aarch64", "i386": "i386", "arm": "arm",
              "ppc64le": "ppc64le", "ppc64": "ppc64", "s390x": "s390x",
              "riscv64": "riscv64", "loongarch64": "loongarch64", "mips": "mips"}


@dataclasses.dataclass(frozen=True)
class Emulator:
    """A user-mode emulator and the binfmt_misc registration that uses it."""

    arch: str
    path: Path          # on the build host; uploaded into the appliance
    magic: str          # as binfmt_misc takes it (\\xNN escapes)
    mask: str
    offset: int

    def registration(self, name: str, interpreter: str) -> str:
        """The line to write to /proc/sys/fs/binfmt_misc/register (F: the
        kernel opens the interpreter now, so it need not exist in the chroot)."""
        return f":{name}:M:{self.offset}:{self.magic}:{self.mask}:{interpreter}:F"


def host_arch() -> str:
    return normalize_arch(platform.machine())


def needs_emulation(arch: str) -> bool:
    return normalize_arch(arch) != host_arch()


def _binfmt_fields(path: Path) -> dict[str, str]:
    fields = {}
    for line in path.read_text().splitlines():
        key, _, value = line.strip().partition(" ")
        fields[key] = value.strip()
    return fields


def find(arch: str) -> Emulator | None:
    """The emulator for `arch` on this build host, None when there is none."""
    qemu = QEMU_NAMES.get(normalize_arch(arch))
    if qemu is None:
        return None
    binary = Path(os.environ.get(EMULATOR_DIR_ENV) or "/usr/bin") / f"qemu-{qemu}-static"
    desc = BINFMTS_DIR / f"qemu-{qemu}"
    if not binary.is_file() or not desc.is_file():
        return None
    try:
        fields = _binfmt_fields(desc)
    except (OSError, UnicodeDecodeError):
        return None
    if "magic" not in fields:
        return None
    return Emulator(normalize_arch(arch), binary, fields["magic"], fields.get("mask", ""),
                    int(fields.get("offset", "0") or 0))


def can_run(arch: str) -> bool:
    """Whether steps can run inside a rootfs of `arch` on this build host
    (natively, or under an emulator registered in the appliance)."""
    return not needs_emulation(arch) or find(arch) is not None


def require(arch: str, *, step: str, where: str | None = None) -> Emulator | None:
    """The emulator a step in an `arch` rootfs needs (None: native), or the
    one-line refusal naming the architecture."""
    if not needs_emulation(arch):
        return None
    emulator = find(arch)
    if emulator is None:
        qemu = QEMU_NAMES.get(normalize_arch(arch))
        hint = (f"install qemu-user-static (it provides /usr/bin/qemu-{qemu}-static; "
                "./setup.sh does)" if qemu else
                "no user-mode emulator is known for it; use prebuilt inputs instead of "
                "steps that run inside the rootfs")
        raise UserError(f"{step}: steps run inside the rootfs, which is {arch}, but the "
                        f"appliance is {host_arch()} and there is no emulator for {arch}",
                        where=where, hint=hint)
    return emulator
