"""Deployment side of a build: DPU scripts, host setup and the offline bundle.

- ``mounts``: the mount table (procedure defaults + element contributions);
- ``render``: ``DeployConfig`` (``from_params``, ``manifest``, ``warnings``) and
  ``render_deploy`` writing ``dpu/``, ``host/`` and ``install.sh``;
- ``bundle``: ``make_bundle`` writing ``<name>.bundle.tar``, signed with
  ``signing`` (ssh-keygen -Y sign) when a key is given.

Every value that reaches a generated script is validated in Python first (by
its element param type, ``builder.values``) and quoted in one place
(``render.sh_quote``); the scripts validate their operator-editable
``offload.conf`` again at run time.
"""

from __future__ import annotations

from .bundle import make_bundle
from .mounts import DEFAULT_MOUNTS, SHADOWED_PATHS, MountEntry, mount_table, shadowed_paths
from .render import DeployConfig, render_deploy, render_installer

__all__ = [
    "DEFAULT_MOUNTS",
    "SHADOWED_PATHS",
    "DeployConfig",
    "MountEntry",
    "make_bundle",
    "mount_table",
    "render_deploy",
    "render_installer",
    "shadowed_paths",
]
