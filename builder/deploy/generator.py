"""The `offload-deployment` generator (builder.generators): the DPU's
prepare/teardown scripts, the host's setup and the offline bundle.

An element asks for it with `generate: [offload-deployment]`; its settings
are the build's params of the same names (DeployConfig's fields), already
checked by their param types (DeployConfig adds the rules across params);
its mount table is the procedure's (mounts.DEFAULT_MOUNTS) plus every
element's `mounts:` entries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..generators import Artifact, GeneratorContext
from .bundle import make_bundle
from .mounts import MountEntry, check_entry, mount_table, shadowed_paths
from .render import DeployConfig, render_deploy


class OffloadDeployment:
    """dpu/ scripts and offload.conf, host/ setup and units, the offline bundle.

    dpu/: prepare, teardown, start-libvirtd and status scripts, offload.conf,
    qtfs.ko; host/: setup and teardown, the rexec and engine units, the
    whitelist; OUTPUT/NAME.bundle.tar with install.sh.
    """

    def __init__(self, ctx: GeneratorContext):
        self.ctx = ctx
        entries = []
        for c in ctx.mounts:
            entry = MountEntry(c.item.type, c.item.source or c.item.type, c.item.target,
                               c.item.options, c.item.order)
            try:
                entries.append(check_entry(entry))
            except ValueError as e:
                key, _, message = str(e).partition(": ")
                raise UserError(f"mounts: {key}: {message}", where=c.where) from None
        self.table = mount_table([dataclasses.asdict(e) for e in entries],
                                 where="element mounts")
        try:
            self.config = DeployConfig.from_params(ctx.name, ctx.params)
        except UserError as e:
            param = (e.where or "").removeprefix("params.")
            raise UserError(f"params.{param}: {e.message}",
                            where=ctx.param_where.get(param, f"params.{param}"),
                            hint=e.hint or f"set params.{param} (the offload-deployment "
                                           f"generator of {', '.join(ctx.requested_by)} "
                                           "needs it)") from None

    def hidden_paths(self) -> list[str]:
        return shadowed_paths(self.table)

    def warnings(self) -> list[str]:
        return self.config.warnings()

    def write(self, staging: Path) -> dict[str, Any]:
        render_deploy(staging, self.config, self.table)
        return {**self.config.manifest(), "mounts": len(self.table),
                "rootfs_path": self.config.rootfs_path}

    def package(self, staging: Path, epoch: int, sibling: Callable[[str], Path]
                ) -> list[Artifact]:
        if not self.ctx.bundle:
            return []
        dest = sibling(f"{self.ctx.name}.bundle.tar")
        make_bundle(staging.parent, self.ctx.name, epoch, src=staging, dest=dest,
                    signing_key=self.config.bundle_signing_key)
        return [Artifact(Path(f"{self.ctx.name}.bundle.tar"), "bundle")]
