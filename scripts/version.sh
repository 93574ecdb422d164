#!/usr/bin/env bash
# Prints tokenward's version, [package] version in Cargo.toml: the image tag scripts/image.sh
# gives, and the one the manifests and chart must name.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
version=$(awk -F'"' '/^\[/ { section = $0 } section == "[package]" && /^version *=/ { print $2; exit }' Cargo.toml)
[ -n "$version" ] || { echo "$0: no [package] version in Cargo.toml" >&2; exit 1; }
echo "$version"
