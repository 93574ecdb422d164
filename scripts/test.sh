#!/usr/bin/env bash
# The whole test suite, as CI runs it: unit tests, black-box tests of the binary against fake
# providers and upstreams (and a real Prometheus), a bounded run of every fuzz target, offline
# validation of every deployment artifact, and the container image built (release binary) and run.
# Installs whatever a fresh machine lacks first.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo fmt --all -- --check
# Benches and every test target build in the dev profile, so a broken benchmark fails here too.
cargo build --all-targets --locked
cargo nextest run --locked --no-fail-fast -E 'not binary(conformance)'
# The differential HTTP/1 conformance suite (both paths, and nginx as upstream and as reference
# proxy) on its own, so its tallies, known failures and allowed differences are printed.
cargo nextest run --locked --no-fail-fast --test conformance --no-capture
# The proxy-path tests again with the lean HTTP/1 path off, so the ProxyHttp path stays proven
# for the plain routes the lean path serves by default, and with the default single proxy
# thread (tokio's single-threaded runtime; the harness config runs two, work-stealing).
# Without the WebSocket test: pingora-proxy 0.9 sometimes closes a tunnel right after its 101
# (README, "Two request paths"; tests/http1.rs keeps that race's own test, ignored with the
# reason); the lean path carries WebSocket upgrades by default and runs the test above.
TOKENWARD_SERVER__HTTP1_FAST_PATH=false cargo nextest run --locked --no-fail-fast \
    --test proxy --test keepalive --test faults \
    -E 'not test(websocket_upgrades_pass_with_the_token)'
TOKENWARD_SERVER__THREADS=1 cargo nextest run --locked --no-fail-fast \
    --test proxy --test keepalive --test faults
scripts/fuzz.sh
scripts/validate-deploy.sh
# Builds the release binary and the image, runs it read-only against fakes on loopback, and prints
# the image size and start-to-ready time (skipped with the reason where no container can run).
scripts/test-image.sh
