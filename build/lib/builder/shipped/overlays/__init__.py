"""Shipped overlays: package data of rootfs-build (see builder/shipped)."""
