"""Checks elements declare on their file params (element.yaml `params:`):

    elf_arch: true      each file is an ELF binary built for the rootfs's
                        architecture (checked once the architecture is known:
                        from base.arch before any work, else from the image)
    vermagic: KERNEL    the file is a kernel module built for the release that
                        the kernel param KERNEL gives (checked when it is set)

One mechanism for every element: the build itself knows no module or binary.
"""

from __future__ import annotations

from pathlib import Path

from . import elfinfo
from .elements import ElementSet
from .errors import UserError


def _files(value: object) -> list[Path]:
    """The path(s) of a file or files param (resolved, or None when unset)."""
    if value is None:
        return []
    return [Path(str(p)) for p in (value if isinstance(value, list) else [value])]


def check_elf_arch(es: ElementSet, arch: str) -> None:
    """Every file of an `elf_arch` param is an ELF binary for `arch`."""
    arch = elfinfo.normalize_arch(arch)
    for pname, spec in sorted(es.specs.items()):
        if not spec.decl.elf_arch:
            continue
        for path in _files(es.params.get(pname)):
            machine = elfinfo.machine_of(path)
            if machine is None:
                raise UserError(f"params.{pname}: {path} is not an ELF binary (expected one "
                                f"for {arch})", where=es.param_where[pname],
                                hint=f"params.{pname} must be a program built for the DPU")
            if machine != arch:
                raise UserError(f"params.{pname}: {path} is built for {machine}, but the "
                                f"rootfs is {arch}", where=es.param_where[pname],
                                hint=f"give params.{pname} the {arch} build")


def check_kernel_modules(es: ElementSet) -> None:
    """Every file of a `vermagic` param is a module for the kernel it names."""
    for pname, spec in sorted(es.specs.items()):
        kernel_param = spec.decl.vermagic
        if kernel_param is None:
            continue
        kernel = es.params.get(kernel_param)
        for path in _files(es.params.get(pname)):
            built_for = elfinfo.module_kernel(path)
            if built_for is None:
                raise UserError(f"params.{pname}: {path} is not a kernel module (no vermagic)",
                                where=es.param_where[pname],
                                hint=f"params.{pname} must be a .ko file")
            if kernel is not None and built_for != kernel:
                raise UserError(f"params.{pname}: {path} was built for kernel {built_for}, but "
                                f"{kernel_param} is {kernel}", where=es.param_where[pname],
                                hint=f"use the module built for {kernel}, or fix "
                                     f"params.{kernel_param}")
