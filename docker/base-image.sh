#!/usr/bin/env bash
# The local base image for `make test-docker`: registry images cannot be pulled on the test
# machine, so Debian bookworm is made with debootstrap from the host's Debian mirror, with
# Python (python3, python3-venv) and the host's CA bundle (pip behind the host's network), and
# imported as $BASE_IMAGE. Already there: nothing to do (the image is a cache, ~300 MB).
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-aifarm-local/debian-python:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

fatal() { echo "FATAL: $*" >&2; exit 1; }

if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  echo "base image $BASE_IMAGE: present"
  exit 0
fi
command -v debootstrap >/dev/null || fatal "debootstrap is missing (apt-get install debootstrap)"
rootfs=$(mktemp -d /var/tmp/aifarm-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "building base image $BASE_IMAGE with debootstrap (bookworm, $MIRROR)"
timeout 900 debootstrap --variant=minbase \
  --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$rootfs" "$MIRROR" \
  >"$rootfs.log" 2>&1 || fatal "debootstrap failed: $(tail -n 1 "$rootfs.log")"
rm -f "$rootfs.log"
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
printf 'Types: deb\nURIs: %s\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
  "$MIRROR" >"$rootfs/etc/apt/sources.list.d/debian.sources"
rm -f "$rootfs/etc/apt/sources.list"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
  --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null || fatal "docker import of $BASE_IMAGE failed"
echo "base image $BASE_IMAGE: built"
