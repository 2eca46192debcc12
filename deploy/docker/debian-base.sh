#!/usr/bin/env bash
# A base image for the CPU image where no image registry is reachable (only Debian's package
# mirror): Debian bookworm built with debootstrap, with python3 and its venv module, imported
# into the local container storage that buildah and podman share. Needs root.
#   deploy/docker/debian-base.sh [TAG]      (default localhost/ticketserve-base:bookworm)
set -euo pipefail
tag=${1:-localhost/ticketserve-base:bookworm}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*
tar -C "$root" --numeric-owner -c . | podman import --change 'CMD ["python3"]' - "$tag"
