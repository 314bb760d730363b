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
  nftables iproute2 openssh-client                               # host firewall, signing
  docker-registry skopeo apache2-utils openssl python3-jwt       # tests: OCI registry, TLS, auth
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
# Debian 12 has in bookworm-backports.  The backports entry is derived from
# the machine's own Debian source (its mirror, its keyring): no host name is
# written here.
apt_etc=${ROOTFS_BUILD_APT_ETC:-/etc/apt}   # another directory: for the tests only
debian_source() {
  # "URI<TAB>Signed-By" of the first source that serves bookworm's main archive
  {
    for f in "$apt_etc"/sources.list "$apt_etc"/sources.list.d/*.list; do
      [ -f "$f" ] || continue
      awk '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
             if ($(i+1) == "bookworm") { print $i "\t"; exit } }' "$f"
    done
    for f in "$apt_etc"/sources.list.d/*.sources; do
      [ -f "$f" ] || continue
      awk 'BEGIN { RS = ""; FS = "\n" }
           { uri = ""; suites = ""; key = ""; deb = 0
             for (n = 1; n <= NF; n++) {
               if ($n ~ /^Types:.*(^|[ \t])deb([ \t]|$)/) deb = 1
               if ($n ~ /^URIs:/) { uri = $n; sub(/^URIs:[ \t]*/, "", uri); sub(/[ \t].*/, "", uri) }
               if ($n ~ /^Suites:/) suites = " " $n " "
               if ($n ~ /^Signed-By:/) { key = $n; sub(/^Signed-By:[ \t]*/, "", key) } }
             if (deb && uri != "" && suites ~ /[ \t]bookworm[ \t]/) { print uri "\t" key; exit } }' "$f"
    done
  } | head -n 1
}
e2fs=$(dpkg-query -W -f='${Version}' e2fsprogs 2>/dev/null || echo 0)
if ! dpkg --compare-versions "$e2fs" ge 1.47.1; then
  if ! grep -rqs "bookworm-backports" "$apt_etc"/sources.list "$apt_etc"/sources.list.d/; then
    source_line=$(debian_source)
    if [ -z "$source_line" ]; then
      echo "setup.sh: no Debian bookworm source in $apt_etc/sources.list or sources.list.d;" \
           "configure one (or add bookworm-backports yourself) and run setup.sh again" >&2
      exit 1
    fi
    uri=${source_line%%$'\t'*}
    key=${source_line#*$'\t'}
    {
      echo "Types: deb"
      echo "URIs: $uri"
      echo "Suites: bookworm-backports"
      echo "Components: main"
      if [ -n "$key" ]; then echo "Signed-By: $key"; fi
    } > "$apt_etc"/sources.list.d/rootfs-build-backports.sources
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
