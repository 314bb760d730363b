"""Generators: outputs an element asks for beside the rootfs.

An element names a generator in its `generate:` list; the build knows no
generator by name and calls every one it is asked for at the same points:

    planning   Generator(ctx): check settings, plan; before any appliance
    assembly   hidden_paths(): rootfs paths the output hides at run time (a
               file an element or overlay puts there is an error unless the
               recipe allows it)
    outputs    write(staging): files beside the rootfs; returns the
               generator's section of manifest.json
    packaging  package(staging, sibling): after manifest.json and SHA256SUMS
               exist, e.g. an offline bundle; returns extra artifacts

`REGISTRY` is the one declaration of the generators that exist (name ->
"module:Class", imported when used).  Generator code is part of
rootfs-build: an element only names it, nothing of an element runs on the
build host.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .element_spec import MountItem
from .errors import UserError

REGISTRY = {
    "offload-deployment": "builder.deploy.generator:OffloadDeployment",
}


@dataclasses.dataclass(frozen=True)
class MountContribution:
    """A `mounts:` entry of an element, with where it was written."""

    element: str
    where: str
    item: MountItem


@dataclasses.dataclass(frozen=True)
class GeneratorContext:
    name: str                          # the recipe's name
    params: dict[str, Any]             # resolved element params, by param name
    param_where: dict[str, str]        # where each param's value was given
    mounts: tuple[MountContribution, ...]
    bundle: bool                       # output.bundle
    requested_by: tuple[str, ...]      # elements that asked for the generator


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A file a generator published next to the output directory."""

    path: Path
    format: str


class Generator(Protocol):
    def __init__(self, ctx: GeneratorContext) -> None: ...

    def hidden_paths(self) -> list[str]: ...

    def warnings(self) -> list[str]: ...

    def write(self, staging: Path) -> dict[str, Any]: ...

    def package(self, staging: Path, epoch: int, sibling: Callable[[str], Path]
                ) -> list[Artifact]: ...


def check_name(name: str, where: str) -> None:
    if name not in REGISTRY:
        raise UserError(f"unknown generator {name!r}", where=where,
                        hint=f"generators: {', '.join(sorted(REGISTRY))}")


def create(name: str, ctx: GeneratorContext) -> Generator:
    module, _, cls = REGISTRY[name].partition(":")
    factory = getattr(importlib.import_module(module), cls)
    gen: Generator = factory(ctx)
    return gen
