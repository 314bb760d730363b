#!/usr/bin/env bash
# Prepare a Debian 12 machine (as root) for rootfs-build: Debian packages,
# then .venv/ made from the system python (python3-guestfs is a Debian
# package, not on PyPI) with the project installed in editable mode.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")"

packages=(
  libguestfs-tools python3-guestfs linux-image-amd64 qemu-utils  # the appliance
  python3-venv zstd patch                                        # venv, outputs, sources
  squashfs-tools-ng libarchive13                                 # squashfs, mke2fs -d tar
  gcc libc6-dev binutils kmod file                               # demo inputs, checks
  shellcheck util-linux rpm                                      # tests: scripts, rpms
  python3-rpm python3-dnf createrepo-c libarchive-tools gnupg    # packages: host-side checks
  qemu-user-static                                               # foreign-arch run steps
  mmdebstrap dnf                                                 # tests: Debian bases with rpm/dnf
)
export DEBIAN_FRONTEND=noninteractive
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
updated=no
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q
  updated=yes
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Raw/qcow2 images need mke2fs -d reading a tar (e2fsprogs >= 1.47.1), which
# Debian 12 has in bookworm-backports.
e2fs=$(dpkg-query -W -f='${Version}' e2fsprogs 2>/dev/null || echo 0)
if ! dpkg --compare-versions "$e2fs" ge 1.47.1; then
  if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "deb http://deb.debian.org/debian bookworm-backports main" \
      > /etc/apt/sources.list.d/bookworm-backports.list
    updated=no
  fi
  [ "$updated" = yes ] || apt-get update -q
  apt-get install -y -q --no-install-recommends -t bookworm-backports e2fsprogs
fi

if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
echo "setup done: .venv/bin/rootfs-build"
