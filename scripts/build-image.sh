#!/usr/bin/env bash
# Build the local Debian image the Molecule scenarios boot (systemd as PID 1).
# No registry is reachable from CI, so the image is made with debootstrap and imported.
# Usage: scripts/build-image.sh SUITE IMAGE   (e.g. bookworm localhost/esp32-fleet-debian:bookworm)
# Skips the build when the image already exists, so a second `make test` reuses it.
set -euo pipefail
suite=${1:?suite (bookworm|trixie)}
image=${2:?image name}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if podman image exists "$image"; then
  echo "image $image exists: reusing it"
  exit 0
fi
rootfs=$(mktemp -d /var/tmp/esp32-fleet-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "building $image from Debian $suite (debootstrap, ~1 min)"
debootstrap --variant=minbase \
  --include=python3,python3-apt,systemd,systemd-sysv,ca-certificates,iproute2,procps \
  "$suite" "$rootfs" "$mirror" >/dev/null
# Keep the image lean and let apt inside containers start services (no policy-rc.d here).
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
tar -C "$rootfs" -c . | podman import --change 'CMD ["/sbin/init"]' - "$image" >/dev/null
echo "built $image"
