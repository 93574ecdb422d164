#!/usr/bin/env bash
# Whole-proxy cost against nginx, on loopback, on this machine. Three proxies sit in front of the
# same nginx upstream, each adding an `Authorization` header over a keep-alive upstream pool:
#   nginx      1 worker, a static header (the reference)
#   minimal    the least pingora ProxyHttp doing the same (benches/tools/minimal_proxy.rs): the framework's floor
#   tokenward  the release binary with a real cached token from the demo provider
#   lean       (opt-in) the same job on pingora-core's HTTP/1 pieces with no ProxyHttp
#              (benches/tools/lean_proxy.rs): what pingora-proxy's orchestration costs
# and each is measured, in alternating rounds, two ways:
#   cpu    CPU µs per request: utime+stime of all the proxy's threads/processes (/proc/PID/stat)
#          around a fixed number of requests at a fixed rate (hey -n N -c 50 -q RATE/50)
#   max    throughput and p99 latency with wrk (-t1 -c CONNS) for DURATION
# for each response size in SIZES (small = "ok\n", 10k, 1m; bodies are streamed by all three).
# With 2+ cores the upstream and the proxy are pinned to CPU 1 and the load generator to CPU 0,
# so the proxy under test never competes with the load for a core (CORES_*, below, choose instead).
#
#   benches/load.sh                                  # 5 rounds, sizes small 10k 1m
#   ROUNDS=3 SIZES=small CONNS=1000 benches/load.sh  # one size, 1,000 keep-alive connections
#   TARGETS="nginx tokenward" TW_THREADS=2 benches/load.sh
#   TARGETS="nginx tokenward alt" ALT_BIN=/tmp/tokenward-before SIZES=small benches/load.sh
#   TARGETS="nginx tokenward alt" ALT_FAST_PATH=false SIZES=small benches/load.sh
#       alt: a second tokenward (ALT_BIN, default the same binary) with the same config but
#       ALT_THREADS threads (default TW_THREADS) and server.http1_fast_path = ALT_FAST_PATH
#       (default true): an A/B of a change, in one run
#   TARGETS="nginx tokenward tokenward1k" SIZES=small benches/load.sh
#       tokenward1k: a second tokenward whose config also holds 999 credentials without routes,
#       each refreshing on schedule (60 s tokens from a second demo provider): what background
#       refreshes add to the cost of a request.
#
# Many cores (issue 20): give the cores of each party explicitly and sweep the proxies' thread count.
#   CORES_UPSTREAM=0-3 CORES_PROXY=4-11 CORES_LOAD=12-15 THREADS="1 4 8" SIZES=small TARGETS="nginx tokenward" benches/load.sh
#       CORES_*: taskset cpu lists (all three or none); they replace the default pinning. The
#       upstream nginx runs as many workers as CORES_UPSTREAM has cpus, so it is not the
#       bottleneck; every proxy under test runs on CORES_PROXY; hey and wrk on CORES_LOAD, wrk
#       with one thread per cpu of it.
#       THREADS: for each N in turn, all proxies are restarted with N threads (nginx: N workers;
#       tokenward and alt: server.threads = N, alt ALT_THREADS instead when set; minimal and lean:
#       N threads), then measured as above. wrk keeps CONNS_PER_THREAD (default 50) connections
#       per proxy thread open (CONNS, when set, for every N). Prints one row per (N, target),
#       its ratios to nginx with the same N, and each target's throughput at every N relative to
#       its throughput at the first N (put 1 first: "throughput at 4 threads ≥ 3.3× that at 1").
#   TARGETS="nginx tokenward alt" ALT_BIN=/tmp/tokenward-before THREADS="1 2 4" SIZES=small benches/load.sh
#       the same sweep as an A/B of two builds: alt gets the same N as tokenward at each step.
#
# Prints the median of ROUNDS per target, and tokenward's and minimal's ratios to nginx. Every
# load run is bounded (a request count or DURATION); every server listens on 127.0.0.1 and is
# stopped on exit. Installs nginx, wrk and hey (Debian) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/tools/bench_route.sh

ROUNDS=${ROUNDS:-5}
SIZES=${SIZES:-small 10k 1m}
TARGETS=${TARGETS:-nginx minimal tokenward}
DURATION=${DURATION:-8s}
CONNS_GIVEN=${CONNS:-}
CONNS=${CONNS:-50}
CONNS_PER_THREAD=${CONNS_PER_THREAD:-50}
RATE=${RATE:-5000}          # requests per second for the CPU measurement (small and 10k)
CPU_REQUESTS=${CPU_REQUESTS:-30000}
TW_THREADS=${TW_THREADS:-1}
# Many-core mode: a sweep over proxy thread counts (nginx: workers), see the header.
THREADS=${THREADS:-}
STEPS=${THREADS:-$TW_THREADS}
BASE=${BASE_PORT:-18080}
UPSTREAM=$((BASE + 1)) PROVIDER=$((BASE + 2)) ADMIN=$((BASE + 3))
PROVIDER_1K=$((BASE + 4)) ADMIN_1K=$((BASE + 5))
declare -A PORT=([nginx]=$((BASE + 10)) [minimal]=$((BASE + 11)) [tokenward]=$((BASE + 12)) [tokenward1k]=$((BASE + 13)) [alt]=$((BASE + 14)) [lean]=$((BASE + 15)))
ADMIN_ALT=$((BASE + 6))

for tool in nginx wrk hey; do
    if ! command -v "$tool" >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tool" >/dev/null
    fi
done
PATH=$PATH:/usr/sbin
OUT=${CARGO_TARGET_DIR:-target}/release
# TW_BIN / MINIMAL_BIN / LEAN_BIN: measure binaries built elsewhere (an A/B of a change) instead.
if [ -z "${TW_BIN:-}" ] || [ -z "${MINIMAL_BIN:-}" ] || [ -z "${LEAN_BIN:-}" ]; then
    cargo build --release --locked --quiet --bin tokenward --example minimal_proxy --example lean_proxy
fi
TW_BIN=${TW_BIN:-$OUT/tokenward}
MINIMAL_BIN=${MINIMAL_BIN:-$OUT/examples/minimal_proxy}
LEAN_BIN=${LEAN_BIN:-$OUT/examples/lean_proxy}
ulimit -n "$(ulimit -Hn)"

if [ -n "${CORES_UPSTREAM:-}${CORES_PROXY:-}${CORES_LOAD:-}" ]; then
    if [ -z "${CORES_UPSTREAM:-}" ] || [ -z "${CORES_PROXY:-}" ] || [ -z "${CORES_LOAD:-}" ]; then
        echo "CORES_UPSTREAM, CORES_PROXY and CORES_LOAD go together: set all three" >&2
        exit 1
    fi
    UPSTREAM_CPU=(taskset -c "$CORES_UPSTREAM") PROXY_CPU=(taskset -c "$CORES_PROXY") LOAD_CPU=(taskset -c "$CORES_LOAD")
elif [ "$(nproc)" -ge 2 ]; then
    UPSTREAM_CPU=(taskset -c 1) PROXY_CPU=(taskset -c 1) LOAD_CPU=(taskset -c 0)
else
    UPSTREAM_CPU=() PROXY_CPU=() LOAD_CPU=()
fi
# nproc counts the cpus a process may run on: under taskset, those of its list.
UPSTREAM_WORKERS=1 LOAD_THREADS=1
if [ -n "${CORES_UPSTREAM:-}" ]; then
    UPSTREAM_WORKERS=$("${UPSTREAM_CPU[@]}" nproc) LOAD_THREADS=$("${LOAD_CPU[@]}" nproc)
fi

WORK=$(mktemp -d)
PIDS=()       # for the whole run: the demo providers
STEP_PIDS=()  # the proxies under test, restarted for each thread count
cleanup() {
    # SIGKILL: pingora drains for minutes on SIGTERM, and a survivor would share the next run's
    # port (SO_REUSEPORT) and take part of its load unmeasured.
    for pid in "${PIDS[@]}" "${STEP_PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}" "${STEP_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for conf in "$WORK"/nginx-*.conf; do [ -e "$conf" ] && nginx -c "$conf" -p "$WORK" -s stop 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
ports_free() { # ports
    local port
    for port in "$@"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "127.0.0.1:$port is taken: stop what listens there (or set BASE_PORT)" >&2
            exit 1
        fi
    done
}
ports_free "$UPSTREAM" "$PROVIDER" "$ADMIN" "$PROVIDER_1K" "$ADMIN_1K" "$ADMIN_ALT" "${PORT[@]}"

# nginx's workers run unprivileged: they must be able to read the bodies they serve.
chmod 755 "$WORK"
head -c 10240 /dev/zero | tr '\0' 'x' >"$WORK/10k"
head -c 1048576 /dev/zero | tr '\0' 'x' >"$WORK/1m"

nginx_conf() { # name, port, workers, body of the location
    cat >"$WORK/nginx-$1.conf" <<CONF
worker_processes $3;
pid $WORK/nginx-$1.pid;
error_log $WORK/nginx-$1.err warn;
events { worker_connections 8192; }
http {
    access_log off;
    upstream backend { server 127.0.0.1:$UPSTREAM; keepalive 128; }
    server {
        listen 127.0.0.1:$2 backlog=4096;
        $4
    }
}
CONF
    if [ "$1" = upstream ]; then
        "${UPSTREAM_CPU[@]}" nginx -c "$WORK/nginx-$1.conf" -p "$WORK"
    else
        "${PROXY_CPU[@]}" nginx -c "$WORK/nginx-$1.conf" -p "$WORK"
    fi
}
stop_nginx() { # name: stops it and waits (at most 10 s) until its master has exited
    local master
    master=$(cat "$WORK/nginx-$1.pid" 2>/dev/null) || return 0
    nginx -c "$WORK/nginx-$1.conf" -p "$WORK" -s stop 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$master" 2>/dev/null || return 0; sleep 0.1; done
    echo "nginx $1 (pid $master) did not stop" >&2
    exit 1
}
until_up() { # url
    for _ in $(seq 1 100); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done
    echo "not up: $1" >&2; cat "$WORK"/*.log >&2; exit 1
}

nginx_conf upstream "$UPSTREAM" "$UPSTREAM_WORKERS" "root $WORK; location = / { default_type text/plain; return 200 \"ok\\n\"; }"
"$TW_BIN" dev --component provider --listen "127.0.0.1:$PROVIDER" --token-lifetime 1h >"$WORK/provider.log" 2>&1 &
PIDS+=($!)
if [[ " $TARGETS " == *" tokenward1k "* ]]; then
    "$TW_BIN" dev --component provider --listen "127.0.0.1:$PROVIDER_1K" --token-lifetime 60s >"$WORK/provider-1k.log" 2>&1 &
    PIDS+=($!)
fi
targeted() { [[ " $TARGETS " == *" $1 "* ]]; }

start_proxies() { # N: the thread count of every proxy under test (nginx: its workers)
    local n=$1 nginx_workers=1
    # Outside a sweep nginx keeps 1 worker whatever TW_THREADS is (the 1-core reference).
    if [ -n "$THREADS" ]; then nginx_workers=$n; fi
    if targeted nginx; then
        nginx_conf proxy "${PORT[nginx]}" "$nginx_workers" 'location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host 127.0.0.1:'"$UPSTREAM"'; proxy_set_header Authorization "Bearer static-token-for-the-benchmark"; }'
    fi
    if targeted minimal; then
        "${PROXY_CPU[@]}" "$MINIMAL_BIN" "127.0.0.1:${PORT[minimal]}" "127.0.0.1:$UPSTREAM" "$n" >"$WORK/minimal.log" 2>&1 &
        STEP_PIDS+=($!)
        MINIMAL_PID=$!
    fi
    if targeted lean; then
        "${PROXY_CPU[@]}" "$LEAN_BIN" "127.0.0.1:${PORT[lean]}" "127.0.0.1:$UPSTREAM" "$n" >"$WORK/lean.log" 2>&1 &
        STEP_PIDS+=($!)
        LEAN_PID=$!
    fi
    cat >"$WORK/tokenward.toml" <<CONF
[server]
threads = $n
[log]
level = "warn"
[admin]
listen = "127.0.0.1:$ADMIN"
[state]
dir = "$WORK/state"
$(bench_route "${PORT[tokenward]}" "$UPSTREAM" "$PROVIDER")
CONF
    if targeted tokenward; then
        "${PROXY_CPU[@]}" "$TW_BIN" run --config "$WORK/tokenward.toml" >"$WORK/tokenward.log" 2>&1 &
        STEP_PIDS+=($!)
        TOKENWARD_PID=$!
        until_up "http://127.0.0.1:$ADMIN/readyz"
    fi
    if targeted alt; then
        sed -e "s/$ADMIN/$ADMIN_ALT/" -e "s/${PORT[tokenward]}/${PORT[alt]}/" -e "s|state\"|state-alt\"|" \
            -e "s/^threads = .*/threads = ${ALT_THREADS:-$n}\nhttp1_fast_path = ${ALT_FAST_PATH:-true}/" \
            "$WORK/tokenward.toml" >"$WORK/tokenward-alt.toml"
        "${PROXY_CPU[@]}" "${ALT_BIN:-$TW_BIN}" run --config "$WORK/tokenward-alt.toml" >"$WORK/tokenward-alt.log" 2>&1 &
        STEP_PIDS+=($!)
        ALT_PID=$!
        until_up "http://127.0.0.1:$ADMIN_ALT/readyz"
    fi
    if targeted tokenward1k; then
        sed -e "s/$ADMIN/$ADMIN_1K/" -e "s/${PORT[tokenward]}/${PORT[tokenward1k]}/" -e "s|state\"|state-1k\"|" "$WORK/tokenward.toml" >"$WORK/tokenward-1k.toml"
        for i in $(seq 1 999); do
            printf '[credentials.bg%d]\ndialect = "oauth2"\ntoken_url = "http://127.0.0.1:%d/oauth2/token"\nclient_id = "demo"\nclient_secret = "demo-secret"\n' "$i" "$PROVIDER_1K"
        done >>"$WORK/tokenward-1k.toml"
        "${PROXY_CPU[@]}" "$TW_BIN" run --config "$WORK/tokenward-1k.toml" >"$WORK/tokenward-1k.log" 2>&1 &
        STEP_PIDS+=($!)
        TOKENWARD_1K_PID=$!
        for _ in $(seq 1 300); do curl -sf -o /dev/null "http://127.0.0.1:$ADMIN_1K/readyz" && break; sleep 0.1; done
        until_up "http://127.0.0.1:$ADMIN_1K/readyz"
    fi
    for t in $TARGETS; do until_up "http://127.0.0.1:${PORT[$t]}/"; done
}

stop_proxies() { # and check that none survives on its port
    stop_nginx proxy
    rm -f "$WORK/nginx-proxy.pid"
    for pid in "${STEP_PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    for pid in "${STEP_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    STEP_PIDS=()
    ports_free "$ADMIN" "$ADMIN_1K" "$ADMIN_ALT" "${PORT[@]}"
}

pids_of() { # target → the pids whose CPU time counts
    case $1 in
        nginx) local master; master=$(cat "$WORK/nginx-proxy.pid"); echo "$master $(pgrep -P "$master" | tr '\n' ' ')" ;;
        minimal) echo "$MINIMAL_PID" ;;
        lean) echo "$LEAN_PID" ;;
        tokenward) echo "$TOKENWARD_PID" ;;
        tokenward1k) echo "$TOKENWARD_1K_PID" ;;
        alt) echo "$ALT_PID" ;;
    esac
}
cpu_ticks() { # pids → utime+stime (clock ticks) summed; a process's stat counts all its threads
    local total=0 pid fields
    for pid in "$@"; do
        read -ra fields <"/proc/$pid/stat"
        # Fields 14 and 15 (1-based) once the command name, which may hold spaces, is skipped.
        local rest=${fields[*]}
        rest=${rest##*) }
        read -ra fields <<<"$rest"
        total=$((total + fields[11] + fields[12]))
    done
    echo "$total"
}
path_of() { case $1 in small) echo / ;; *) echo "/$1" ;; esac; }

measure_cpu() { # target size → µs of proxy CPU per request
    local url="http://127.0.0.1:${PORT[$1]}$(path_of "$2")" rate=$RATE n=$CPU_REQUESTS
    # A 1 MiB answer is ~100× the bytes: a lower rate and count keep the proxy below saturation.
    if [ "$2" = 1m ]; then rate=$((RATE / 10)); n=$((CPU_REQUESTS / 10)); fi
    local pids before after
    pids=$(pids_of "$1")
    # shellcheck disable=SC2086
    before=$(cpu_ticks $pids)
    "${LOAD_CPU[@]}" hey -n "$n" -c 50 -q $((rate / 50)) -t 10 "$url" >"$WORK/hey.out"
    # shellcheck disable=SC2086
    after=$(cpu_ticks $pids)
    local ok
    ok=$(awk '$1 == "[200]" { print $2 }' "$WORK/hey.out")
    [ "${ok:-0}" -eq "$n" ] || { echo "$1 $2: only ${ok:-0} of $n requests got 200" >&2; cat "$WORK/hey.out" >&2; exit 1; }
    awk -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" -v n="$n" 'BEGIN { printf "%.1f", t / hz / n * 1e6 }'
}

conns_for() { # N proxy threads → wrk's connections: CONNS outside a sweep or when given
    local n=$CONNS
    if [ -n "$THREADS" ] && [ -z "$CONNS_GIVEN" ]; then n=$((CONNS_PER_THREAD * $1)); fi
    # wrk needs a connection per thread at least.
    echo $((n < LOAD_THREADS ? LOAD_THREADS : n))
}

measure_max() { # target size N → "req/s p99_ms"
    local url="http://127.0.0.1:${PORT[$1]}$(path_of "$2")"
    "${LOAD_CPU[@]}" wrk -t"$LOAD_THREADS" -c"$(conns_for "$3")" -d"$DURATION" --timeout 10s --latency "$url" >"$WORK/wrk.out"
    if grep -q 'Non-2xx' "$WORK/wrk.out"; then echo "$1 $2: non-2xx answers" >&2; cat "$WORK/wrk.out" >&2; exit 1; fi
    awk '
        function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
        /Requests\/sec/ { rps = $2 }
        $1 == "99%" { p99 = ms($2) }
        END { printf "%.0f %.3f", rps, p99 }' "$WORK/wrk.out"
}

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

pinning="${UPSTREAM_CPU[*]:-unpinned} for the upstream, ${PROXY_CPU[*]:-unpinned} for the proxies, ${LOAD_CPU[*]:-unpinned} for load"
echo "$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); $pinning"
if [ -n "$THREADS" ]; then
    conns="$CONNS_PER_THREAD connections per proxy thread"
    [ -z "$CONNS_GIVEN" ] || conns="$CONNS connections"
    echo "cpu: hey -n $CPU_REQUESTS -c 50 at $RATE req/s (1m: a tenth of both); max: wrk -t$LOAD_THREADS, $conns, -d$DURATION; upstream nginx: $UPSTREAM_WORKERS worker(s)"
    echo "$ROUNDS alternating rounds per thread count, medians; proxy threads (nginx: workers): $THREADS${ALT_THREADS:+ (alt: $ALT_THREADS)}"
else
    echo "cpu: hey -n $CPU_REQUESTS -c 50 at $RATE req/s (1m: a tenth of both); max: wrk -t$LOAD_THREADS -c$(conns_for 1) -d$DURATION; $ROUNDS alternating rounds, medians; tokenward threads=$TW_THREADS"
fi
for n in $STEPS; do
    start_proxies "$n"
    for size in $SIZES; do
        for round in $(seq 1 "$ROUNDS"); do
            for t in $TARGETS; do
                # Not in a command substitution: a failed check must stop the run.
                measure_cpu "$t" "$size" >>"$WORK/cpu-$t-$size-$n"
                echo >>"$WORK/cpu-$t-$size-$n"
                measure_max "$t" "$size" "$n" >>"$WORK/max-$t-$size-$n"
                echo >>"$WORK/max-$t-$size-$n"
            done
            echo "  ${THREADS:+threads $n, }$size round $round done" >&2
        done
    done
    stop_proxies
done

# One row per (N, size, target): medians and the ratios to nginx with the same N. Outside a
# sweep the threads column is left out, as before the many-core mode.
if [ -n "$THREADS" ]; then
    printf '\n%-7s %-6s %-10s %12s %12s %10s %12s %10s %8s\n' threads size proxy "cpu µs/req" "×nginx" "req/s" "×nginx" "p99 ms" "×nginx"
else
    printf '\n%-6s %-10s %12s %12s %10s %12s %10s %8s\n' size proxy "cpu µs/req" "×nginx" "req/s" "×nginx" "p99 ms" "×nginx"
fi
declare -A RPS_AT=()
for n in $STEPS; do
    for size in $SIZES; do
        declare -A CPU=() RPS=() P99=()
        for t in $TARGETS; do
            CPU[$t]=$(median <"$WORK/cpu-$t-$size-$n")
            RPS[$t]=$(awk '{ print $1 }' "$WORK/max-$t-$size-$n" | median)
            P99[$t]=$(awk '{ print $2 }' "$WORK/max-$t-$size-$n" | median)
            RPS_AT[$t-$size-$n]=${RPS[$t]}
        done
        for t in $TARGETS; do
            awk -v n="${THREADS:+$n}" -v s="$size" -v t="$t" -v c="${CPU[$t]}" -v r="${RPS[$t]}" -v p="${P99[$t]}" \
                -v cn="${CPU[nginx]:-0}" -v rn="${RPS[nginx]:-0}" -v pn="${P99[nginx]:-0}" '
                function x(a, b) { return b > 0 ? sprintf("%.2f", a / b) : "-" }
                BEGIN {
                    if (n != "") printf "%-7s ", n
                    printf "%-6s %-10s %12.1f %12s %10.0f %12s %10.3f %8s\n", s, t, c, x(c, cn), r, x(r, rn), p, x(p, pn)
                }'
        done
        unset CPU RPS P99
    done
done
if [ -n "$THREADS" ]; then
    read -r first _ <<<"$THREADS"
    printf '\nthroughput (req/s) at each thread count N ÷ throughput at N = %s:\n' "$first"
    for size in $SIZES; do
        for t in $TARGETS; do
            line=$(printf '%-6s %-10s' "$size" "$t")
            for n in $STEPS; do
                line+=$(awk -v n="$n" -v r="${RPS_AT[$t-$size-$n]}" -v r1="${RPS_AT[$t-$size-$first]}" \
                    'BEGIN { printf "   %s: %s", n, (r1 > 0 ? sprintf("%.2f×", r / r1) : "-") }')
            done
            echo "$line"
        done
    done
fi
