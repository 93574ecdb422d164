# Sourced by the bench scripts (load.sh, tools/cost_ab.sh): the route and credential every
# bench config holds. `bench_route LISTEN_PORT UPSTREAM_PORT PROVIDER_PORT` prints them as
# TOML: one route on 127.0.0.1 to the upstream, its token from the demo provider
# (`tokenward dev --component provider`).
bench_route() {
    cat <<CONF
[[routes]]
name = "bench"
listen = "127.0.0.1:$1"
upstream = "http://127.0.0.1:$2"
credential = "bench"
[credentials.bench]
dialect = "oauth2"
token_url = "http://127.0.0.1:$3/oauth2/token"
client_id = "demo"
client_secret = "demo-secret"
CONF
}
