"""Shipped recipes: package data of rootfs-build (see builder/shipped)."""
