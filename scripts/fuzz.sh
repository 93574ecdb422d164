#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (FUZZ_SECONDS each, default 20) from the
# committed seeds. A crash fails the run and leaves its input under fuzz/artifacts/; turn it into
# a regression test before fixing it.
#
# cargo-fuzz's instrumentation flags are nightly-only; RUSTC_BOOTSTRAP lets the machine's stable
# toolchain accept them (no other toolchain can be installed here). No sanitizer: the crate
# forbids unsafe code, so the fuzzers look for panics, hangs and runaway memory.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${FUZZ_SECONDS:-20}
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
TARGET_DIR=${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR/fuzz}
ARGS=(-s none -O --fuzz-dir fuzz ${TARGET_DIR:+--target-dir "$TARGET_DIR"})
cargo fuzz build "${ARGS[@]}"
for target in $(cargo fuzz list --fuzz-dir fuzz); do
    corpus=$(mktemp -d)
    cp -r "fuzz/seeds/$target/." "$corpus/" 2>/dev/null || true
    echo "fuzzing $target for ${SECONDS_EACH}s"
    cargo fuzz run "${ARGS[@]}" "$target" "$corpus" -- \
        -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 2>&1 \
        | grep -E '^(Done|stat::number_of_executed_units|==|SUMMARY|thread .* panicked)' || true
    # cargo fuzz exits non-zero on a crash; re-check so a crash is never hidden by the filter.
    if ls "fuzz/artifacts/$target"/crash-* >/dev/null 2>&1; then
        echo "fuzz target $target crashed: see fuzz/artifacts/$target/"
        exit 1
    fi
    rm -rf "$corpus"
done
