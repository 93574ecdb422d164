#!/usr/bin/env bash
# Whole-proxy throughput and latency: tokenward against nginx doing a static header injection,
# both in front of the same nginx upstream, on loopback, on this machine.
#
#   benches/load.sh                # defaults: 10 s per run, 64 connections, 1 worker each
#   DURATION=30s CONNS=128 WORKERS=2 benches/load.sh
#
# Installs nginx and wrk (Debian) when missing. Every run is bounded by DURATION; every server
# it starts listens on 127.0.0.1 and is stopped on exit. Prints one line per target and the
# ratios of tokenward to nginx.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
WORKERS=${WORKERS:-1}
WRK_THREADS=${WRK_THREADS:-1}
BASE=${BASE_PORT:-18080}
UPSTREAM=$((BASE + 1)) PROVIDER=$((BASE + 2)) NGINX_PROXY=$((BASE + 10)) TW=$BASE ADMIN=$((BASE + 11))

for tool in nginx wrk; do
    if ! command -v "$tool" >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tool" >/dev/null
    fi
done
cargo build --release --locked --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/tokenward

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for conf in "$WORK"/nginx-*.conf; do nginx -c "$conf" -p "$WORK" -s stop 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

nginx_conf() { # name, port, body of the location
    cat > "$WORK/nginx-$1.conf" <<CONF
worker_processes $WORKERS;
pid $WORK/nginx-$1.pid;
error_log $WORK/nginx-$1.err warn;
events { worker_connections 4096; }
http {
    access_log off;
    upstream backend { server 127.0.0.1:$UPSTREAM; keepalive 128; }
    server {
        listen 127.0.0.1:$2;
        location / { $3 }
    }
}
CONF
    nginx -c "$WORK/nginx-$1.conf" -p "$WORK"
}

# The upstream both proxies forward to: a fixed small answer.
nginx_conf upstream "$UPSTREAM" 'default_type text/plain; return 200 "ok\n";'
# The reference: nginx injecting a static header over a keep-alive upstream pool.
nginx_conf proxy "$NGINX_PROXY" 'proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host 127.0.0.1:'"$UPSTREAM"'; proxy_set_header Authorization "Bearer static-token-for-the-benchmark";'

"$BIN" dev --component provider --listen "127.0.0.1:$PROVIDER" --token-lifetime 1h >"$WORK/provider.log" 2>&1 &
PIDS+=($!)
cat > "$WORK/tokenward.toml" <<CONF
[server]
threads = $WORKERS
[log]
level = "warn"
[admin]
listen = "127.0.0.1:$ADMIN"
[state]
dir = "$WORK/state"
[[routes]]
name = "bench"
listen = "127.0.0.1:$TW"
upstream = "http://127.0.0.1:$UPSTREAM"
credential = "bench"
[credentials.bench]
dialect = "oauth2"
token_url = "http://127.0.0.1:$PROVIDER/oauth2/token"
client_id = "demo"
client_secret = "demo-secret"
CONF
"$BIN" run --config "$WORK/tokenward.toml" >"$WORK/tokenward.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null && break
    sleep 0.1
done
curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null || { cat "$WORK/tokenward.log"; exit 1; }
curl -sf "http://127.0.0.1:$TW/" >/dev/null

run() { # name, port → "name rps p50_ms p99_ms"
    wrk -t"$WRK_THREADS" -c"$CONNS" -d"$DURATION" --latency "http://127.0.0.1:$2/" >"$WORK/$1.wrk"
    awk -v name="$1" '
        function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
        /Requests\/sec/ { rps = $2 }
        $1 == "50%" { p50 = ms($2) }
        $1 == "99%" { p99 = ms($2) }
        /Non-2xx/ { errors = $NF }
        END { printf "%-10s %10.0f req/s   p50 %7.3f ms   p99 %7.3f ms   non-2xx %s\n", name, rps, p50, p99, errors + 0 }
    ' "$WORK/$1.wrk"
}

echo "wrk -t$WRK_THREADS -c$CONNS -d$DURATION, $WORKERS worker(s) per proxy, $(nproc) cores"
run upstream "$UPSTREAM" | tee "$WORK/r-upstream"
run nginx "$NGINX_PROXY" | tee "$WORK/r-nginx"
run tokenward "$TW" | tee "$WORK/r-tokenward"
awk 'FNR == 1 { rps[FILENAME] = $2; p50[FILENAME] = $5; p99[FILENAME] = $8 }
     END {
        n = ARGV[1]; t = ARGV[2];
        printf "tokenward / nginx: throughput %.2f, p50 latency %.2f, p99 latency %.2f\n", rps[t] / rps[n], p50[t] / p50[n], p99[t] / p99[n]
     }' "$WORK/r-nginx" "$WORK/r-tokenward"
