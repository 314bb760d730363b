#!/usr/bin/env bash
# Prepare a Debian 12 machine (as root) for rootfs-build: Debian packages,
# then .venv/ made from the system python (python3-guestfs is a Debian
# package, not on PyPI) with the project installed in editable mode.
set -euo pipefail
cd "$(dirname "$0")"

packages=(
  libguestfs-tools python3-guestfs linux-image-amd64 qemu-utils  # appliance
  python3-venv zstd squashfs-tools                               # venv, outputs
  gcc libc6-dev binutils kmod file                               # demo inputs, checks
  shellcheck util-linux                                          # script checks, unshare
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
echo "setup done: .venv/bin/rootfs-build"
