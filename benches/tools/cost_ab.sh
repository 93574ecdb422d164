#!/usr/bin/env bash
# Per-request cost of two tokenward binaries, counted rather than timed: user-space instructions
# (valgrind's callgrind) and system calls (the raw_syscalls:sys_enter tracepoint) per request, on the
# same route, the same provider and the same nginx upstream. Counts barely move with what else the
# machine is doing, so an A/B of a change holds on a busy 2-core machine where CPU time (load.sh)
# swings ±10 % between runs.
#
#   benches/tools/cost_ab.sh OLD_BIN NEW_BIN              # both binaries, ROUNDS alternating rounds
#   ROUNDS=3 REQUESTS=4000 CONC=10 benches/tools/cost_ab.sh /tmp/before target/release/tokenward
#   FAST_PATH=false benches/tools/cost_ab.sh A B         # the same on the full (ProxyHttp) path
#
# Prints, per binary, the median of ROUNDS of: instructions per request (callgrind Ir over REQUESTS
# requests, counters zeroed after a warm-up) and system calls per request. Every server listens on
# 127.0.0.1, every load run is a fixed request count, and everything is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
source benches/tools/bench_route.sh

[ $# -eq 2 ] || { sed -n '2,14p' "$0" >&2; exit 2; }
BINS=("$1" "$2")
ROUNDS=${ROUNDS:-3}
REQUESTS=${REQUESTS:-3000}
WARMUP=${WARMUP:-500}
CONC=${CONC:-10}
FAST_PATH=${FAST_PATH:-true}
BASE=${BASE_PORT:-18180}
UPSTREAM=$((BASE + 1)) PROVIDER=$((BASE + 2)) ADMIN=$((BASE + 3)) ROUTE=$((BASE + 4))
PATH=$PATH:/usr/sbin
for tool in nginx hey valgrind callgrind_control perf; do
    command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done

WORK=$(mktemp -d)
PIDS=()
# Processes started inside a command substitution are that subshell's: they are listed in a
# file too, so the cleanup finds them whichever shell started them (a failed load check exits a
# subshell, which used to leave its tokenward answering the next run on the same ports).
started() { PIDS+=("$1"); echo "$1" >>"$WORK/pids"; }
cleanup() {
    [ -e "$WORK/pids" ] && while read -r pid; do PIDS+=("$pid"); done <"$WORK/pids"
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    [ -e "$WORK/nginx.conf" ] && nginx -c "$WORK/nginx.conf" -p "$WORK" -s stop 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cat >"$WORK/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err warn;
events { worker_connections 1024; }
http {
    access_log off;
    server { listen 127.0.0.1:$UPSTREAM; location = / { default_type text/plain; return 200 "ok\\n"; } }
}
CONF
nginx -c "$WORK/nginx.conf" -p "$WORK"
"${BINS[0]}" dev --component provider --listen "127.0.0.1:$PROVIDER" --token-lifetime 1h >"$WORK/provider.log" 2>&1 &
started $!

cat >"$WORK/tokenward.toml" <<CONF
[server]
threads = 1
http1_fast_path = $FAST_PATH
[log]
level = "warn"
[admin]
listen = "127.0.0.1:$ADMIN"
$(bench_route "$ROUTE" "$UPSTREAM" "$PROVIDER")
CONF

until_up() { # url, tries of 0.2 s
    for _ in $(seq 1 "$2"); do curl -sf -o /dev/null "$1" && return 0; sleep 0.2; done
    echo "not up: $1" >&2; cat "$WORK"/*.log >&2; exit 1
}
load() { # requests → fails unless every one got 200
    hey -n "$1" -c "$CONC" -t 20 "http://127.0.0.1:$ROUTE/" >"$WORK/hey.out"
    local ok; ok=$(awk '$1 == "[200]" { print $2 }' "$WORK/hey.out")
    [ "${ok:-0}" -eq "$1" ] || { echo "only ${ok:-0} of $1 requests got 200" >&2; cat "$WORK/hey.out" >&2; exit 1; }
}
stop() { kill -9 "$1"; wait "$1" 2>/dev/null || true; }

syscalls_per_request() { # binary
    "$1" run --config "$WORK/tokenward.toml" >"$WORK/tokenward.log" 2>&1 &
    local pid=$!; started "$pid"
    until_up "http://127.0.0.1:$ADMIN/readyz" 100
    load "$WARMUP"
    perf stat -e raw_syscalls:sys_enter -p "$pid" -x, -o "$WORK/perf.out" &
    local perf=$!
    sleep 0.5 # perf attaches to the threads asynchronously
    load "$REQUESTS"
    kill -INT "$perf"; wait "$perf" 2>/dev/null || true
    stop "$pid"
    awk -F, -v n="$REQUESTS" '/sys_enter/ { printf "%.2f", $1 / n }' "$WORK/perf.out"
}

instructions_per_request() { # binary
    valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.%p" "$1" run --config "$WORK/tokenward.toml" \
        >"$WORK/tokenward.log" 2>&1 &
    local pid=$!; started "$pid"
    until_up "http://127.0.0.1:$ADMIN/readyz" 300
    load "$WARMUP"
    callgrind_control -z "$pid" >/dev/null 2>&1
    load "$REQUESTS"
    callgrind_control -d "$pid" >/dev/null 2>&1
    stop "$pid"
    # The dump after -d is the one numbered .1; its totals line is the Ir since the zeroing.
    local dump; dump=$(ls "$WORK"/cg."$pid".* | sort | head -1)
    awk -v n="$REQUESTS" '/^(totals|summary):/ { ir = $2 } END { printf "%.0f", ir / n }' "$dump"
    [ -n "${KEEP_DUMPS:-}" ] && cp "$dump" "$KEEP_DUMPS/$(basename "$1").callgrind"
    rm -f "$WORK"/cg."$pid"*
}

until_up "http://127.0.0.1:$UPSTREAM/" 50
echo "$REQUESTS requests per count, $CONC connections, fast path $FAST_PATH, $ROUNDS alternating rounds"
declare -A IR SC
for round in $(seq 1 "$ROUNDS"); do
    # Alternate the order each round so neither binary always goes first.
    order=(0 1); [ $((round % 2)) -eq 0 ] && order=(1 0)
    for i in "${order[@]}"; do
        IR[$i]+="$(instructions_per_request "${BINS[$i]}") "
        SC[$i]+="$(syscalls_per_request "${BINS[$i]}") "
    done
    echo "  round $round: ${BINS[0]} ir ${IR[0]}sc ${SC[0]}| ${BINS[1]} ir ${IR[1]}sc ${SC[1]}"
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
printf '\n%-40s %14s %14s\n' binary "instr/req" "syscalls/req"
for i in 0 1; do
    printf '%-40s %14s %14s\n' "${BINS[$i]}" "$(median <<<"${IR[$i]}")" "$(median <<<"${SC[$i]}")"
done
