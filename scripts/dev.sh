#!/usr/bin/env bash
# Builds tokenward and starts the zero-configuration demo (`tokenward dev`): a demo OAuth 2.0
# provider, an echo upstream and tokenward in front of it, all on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cmake >/dev/null; then
    echo "installing cmake (pingora's zlib-ng needs it)"
    if [ "$(id -u)" -eq 0 ]; then apt-get update -qq && apt-get install -y -qq cmake >/dev/null
    else sudo apt-get update -qq && sudo apt-get install -y -qq cmake >/dev/null; fi
fi
exec cargo run --locked --quiet -- dev "$@"
