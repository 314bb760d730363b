"""Shipped elements: package data of rootfs-build (see builder/shipped)."""
