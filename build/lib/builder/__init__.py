"""rootfs-build: reproducible libvirt-offload rootfs builds for DPUs."""

__version__ = "0.1.0"

# Bumped whenever the bytes a layer or an output would hold change for the
# same inputs; part of every cache key.
FORMAT_VERSION = 1
