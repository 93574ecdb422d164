#!/usr/bin/env bash
# Installs what a fresh Debian machine with the Rust toolchain lacks to build and test tokenward:
# cmake (pingora's zlib-ng), cargo-nextest, the real servers the tests use (Prometheus, Redis,
# nginx: the HTTP/1 conformance suite's reference peer; moto's server, the AWS SigV4 verifier of
# tests/aws.rs, pinned, in the test venv), and what builds and runs the container image offline
# (podman, buildah, runc; readelf, CA certificates, curl and python3 for the test).
# Each step runs only when its tool is missing, so running this again is cheap.
set -euo pipefail

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v prometheus >/dev/null || missing+=(prometheus)
command -v redis-server >/dev/null || missing+=(redis-server)
# nginx lives in /usr/sbin, which is not on every user's PATH.
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || missing+=(nginx)
# The image (scripts/image.sh, scripts/test-image.sh): podman builds and runs it; runc is the
# runtime the test asks for (crun fails on hosts with hybrid cgroups).
command -v podman >/dev/null || missing+=(podman)
command -v buildah >/dev/null || missing+=(buildah)
command -v runc >/dev/null || missing+=(runc)
command -v readelf >/dev/null || missing+=(binutils)
[ -r /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
command -v curl >/dev/null || missing+=(curl)
command -v python3 >/dev/null || missing+=(python3)
# Debian's python3 needs python3-venv for `python3 -m venv` (ensurepip), for the test venv below.
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}
VENV=$CACHE/tokenward-venv
if [ ! -x "$VENV/bin/python" ] && ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's prometheus and nginx packages start system services (ports 9090 and 80); the tests
# run their own, on ports of their own.
for service in prometheus nginx; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$service" 2>/dev/null; then
        as_root systemctl stop "$service" || true
    fi
done

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "installing cargo-nextest"
    cargo install --locked cargo-nextest
fi

# moto's server: tests/aws.rs runs it as an independent SigV4 verifier (IAM authentication on).
# In the venv scripts/validate-deploy.sh shares; its own stamp, so a changed pin reinstalls.
MOTO_REQS="moto[server]==5.2.6"
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating venv $VENV"
    python3 -m venv "$VENV"
fi
if [ "$(cat "$VENV/.tokenward-moto" 2>/dev/null || true)" != "$MOTO_REQS" ]; then
    echo "installing $MOTO_REQS into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "$MOTO_REQS"
    printf '%s' "$MOTO_REQS" >"$VENV/.tokenward-moto"
fi
