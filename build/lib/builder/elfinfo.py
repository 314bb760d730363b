"""What an ELF file is built for: machine, and a kernel module's vermagic."""

from __future__ import annotations

import os
import struct
from pathlib import Path

# e_machine -> the architecture names libguestfs and uname use
MACHINES = {
    3: "i386",
    8: "mips",
    20: "ppc",
    21: "ppc64",
    22: "s390x",
    40: "arm",
    62: "x86_64",
    183: "aarch64",
    243: "riscv64",
    258: "loongarch64",
}
ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64", "x64": "x86_64", "i686": "i386"}


def normalize_arch(arch: str) -> str:
    return ARCH_ALIASES.get(arch, arch)


def machine_of_header(head: bytes) -> str | None:
    """Architecture from the first 20 bytes of a file, or None if not ELF."""
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    endian = "<" if head[5] == 1 else ">"
    (machine,) = struct.unpack(endian + "H", head[18:20])
    return MACHINES.get(machine, f"elf-machine-{machine}")


def machine_of(path: Path) -> str | None:
    with open(path, "rb") as f:
        return machine_of_header(f.read(20))


def modinfo(path: Path) -> dict[str, str]:
    """The key=value strings of a kernel module's .modinfo section."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            section = elf.get_section_by_name(".modinfo")
            if section is None:
                return {}
            if section["sh_offset"] + section["sh_size"] > os.fstat(f.fileno()).st_size:
                raise ValueError("its .modinfo section lies beyond the end of the file")
            data = section.data()
    except (ELFError, ValueError, OverflowError, OSError, struct.error) as e:
        # a damaged or non-ELF file: pyelftools fails in many ways
        raise ValueError(f"not an ELF kernel module: {e}") from None
    info: dict[str, str] = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            info.setdefault(key.decode("utf-8", "replace"), value.decode("utf-8", "replace"))
    return info


def vermagic_release(vermagic: str) -> str:
    """The kernel release in a vermagic string ('6.1.0-18-arm64 SMP mod_unload ...')."""
    return vermagic.split()[0] if vermagic.split() else ""


def module_kernel(path: Path) -> str | None:
    """The kernel release a module was built for (from its vermagic), or
    None when the file is not a kernel module or has no vermagic."""
    try:
        return vermagic_release(modinfo(path).get("vermagic", "")) or None
    except ValueError:
        return None
