#!/usr/bin/env bash
# Builds tokenward's container image without pulling anything: `FROM scratch` (deploy/Containerfile)
# plus the release binary and exactly what it needs at run time (scripts/image-rootfs.sh).
#
#   scripts/image.sh                              # cargo build --release, then the image
#   TOKENWARD_BINARY=path/to/tokenward scripts/image.sh   # use a binary built elsewhere
#
# Tags localhost/tokenward:VERSION (Cargo.toml's version) and localhost/tokenward:dev in podman's
# local storage, and prints the image's size. Labels: org.opencontainers.image.version, .revision
# (the git commit, "-dirty" when tracked files differ from it), .source ($TOKENWARD_IMAGE_SOURCE,
# else the git remote `origin`, else "unknown") and .licenses.
#
# Needs podman (scripts/install-deps.sh installs it), ldd and readelf. Building runs no container,
# so it works where no container can run; export with `podman save` or push with `podman push`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

IMAGE=localhost/tokenward
VERSION=$(scripts/version.sh)

REVISION=unknown
if git rev-parse --git-dir >/dev/null 2>&1; then
    REVISION=$(git rev-parse HEAD)
    git diff --quiet HEAD -- 2>/dev/null || REVISION="$REVISION-dirty"
fi
SOURCE=${TOKENWARD_IMAGE_SOURCE:-$(git remote get-url origin 2>/dev/null || echo unknown)}
# A remote URL can carry credentials (CI systems clone with https://user:token@host/...): the
# label travels with the image, so only scheme, host and path go into it.
SOURCE=$(sed -E 's#^([a-z][a-z0-9+.-]*://)[^/@]*@#\1#' <<<"$SOURCE")

if [ -n "${TOKENWARD_BINARY:-}" ]; then
    BINARY=$TOKENWARD_BINARY
else
    cargo build --release --locked --bin tokenward
    TARGET_DIR=$(cargo metadata --format-version 1 --no-deps --offline |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
    BINARY=$TARGET_DIR/release/tokenward
fi

CONTEXT=$(mktemp -d)
trap 'rm -rf "$CONTEXT"' EXIT
scripts/image-rootfs.sh "$BINARY" "$CONTEXT"

previous=$(podman image inspect --format '{{.Id}}' "$IMAGE:dev" 2>/dev/null || true)
# --pull=never: FROM scratch needs no base image, and nothing else may be fetched.
# --squash: one layer, since the three COPYs only make sense together.
podman build --pull=never --squash --quiet \
    -f deploy/Containerfile \
    --build-arg VERSION="$VERSION" \
    --build-arg REVISION="$REVISION" \
    --build-arg SOURCE="$SOURCE" \
    -t "$IMAGE:$VERSION" -t "$IMAGE:dev" \
    "$CONTEXT" >/dev/null
# The image these tags named before is left without a name: remove it, so that rebuilding (every
# CI run) does not pile up images. `rmi` without --force keeps it if anything still uses it.
current=$(podman image inspect --format '{{.Id}}' "$IMAGE:dev")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
    podman rmi "$previous" >/dev/null 2>&1 || true
fi

size=$(podman image inspect --format '{{.Size}}' "$IMAGE:$VERSION")
echo "built $IMAGE:$VERSION and $IMAGE:dev (revision $REVISION): $size bytes ($((size / 1024 / 1024)) MiB)"
