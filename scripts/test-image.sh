#!/usr/bin/env bash
# Black-box test of the container image users deploy: builds it (scripts/image.sh), runs it the
# way Kubernetes does (read-only root, non-root, config and secret mounted as files, state and
# /tmp on mounts, all capabilities dropped) with host networking to a fake provider and a fake
# upstream on loopback (scripts/test-image-fakes.py), and checks what operators rely on:
#   /healthz and /readyz answer; a request through the container reaches the upstream with the
#   token injected (the upstream refuses anything but the exact token); `tokenward check` inside
#   the container validates the mounted config (and refuses a broken one); the process is PID 1,
#   runs as uid 65532 and has no child processes; SIGTERM stops it with exit code 0 within the
#   grace period; the image is under 40 MiB and holds the expected layout.
# Prints the image size and the start-to-ready time at the end.
#
#   scripts/test-image.sh
#
# Skipped (exit 0, with the reason) only where podman is missing or cannot run any container at
# all: checked with a container that holds nothing of tokenward's, so a broken image fails.
# TOKENWARD_PODMAN overrides the podman command line (default: runc and cgroupfs, which work on
# hosts with hybrid cgroups where crun and the systemd cgroup manager do not).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

read -r -a PODMAN <<<"${TOKENWARD_PODMAN:-podman --runtime runc --cgroup-manager cgroupfs}"
# Podman's default ulimits (nofile 1048576) exceed the hard limits of some hosts (CI containers),
# where setting them fails the container's start; these fit everywhere and are plenty for a test.
ULIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
MAX_IMAGE_BYTES=$((40 * 1024 * 1024))
GRACE_SECONDS=5

skip() {
    echo "test-image: SKIPPED: $*"
    exit 0
}
fail() {
    echo "test-image: FAIL: $*" >&2
    exit 1
}
ok() { echo "ok:    $*"; }
now() { date +%s.%N; }
elapsed_ms() { python3 -c "import sys; print(round((float(sys.argv[2]) - float(sys.argv[1])) * 1000))" "$1" "$2"; }

command -v "${PODMAN[0]}" >/dev/null || skip "${PODMAN[0]} is not installed (scripts/install-deps.sh installs it)"

WORK=$(mktemp -d)
NAME=tokenward-image-test-$$
VOLUME=$NAME-state
FAKES_PID=
cleanup() {
    "${PODMAN[@]}" rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
    "${PODMAN[@]}" volume rm -f "$VOLUME" >/dev/null 2>&1 || true
    if [ -n "$FAKES_PID" ]; then kill "$FAKES_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# Can this host run a container at all? The probe's root holds only the host's ELF interpreter,
# which runs on its own (`ld.so --version`), so nothing of the image under test is involved.
loader=$(readelf -l /bin/true | sed -n 's/.*\[Requesting program interpreter: \(.*\)\]/\1/p')
mkdir -p "$WORK/probe$(dirname "$loader")"
cp -L "$loader" "$WORK/probe$loader"
if ! probe=$("${PODMAN[@]}" run --rm --network host "${ULIMITS[@]}" --rootfs "$WORK/probe" "$loader" --version 2>&1); then
    skip "podman cannot run containers on this host: $(tail -n 3 <<<"$probe")"
fi

# ------------------------------------------------------------------------------ the image
build_start=$(now)
scripts/image.sh
build_ms=$(elapsed_ms "$build_start" "$(now)")
VERSION=$(scripts/version.sh)
IMAGE=localhost/tokenward:$VERSION

size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")
[ "$size" -lt "$MAX_IMAGE_BYTES" ] || fail "image is $size bytes, over 40 MiB"
ok "image size $size bytes (< 40 MiB)"
[ "$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$IMAGE")" = \
    "$("${PODMAN[@]}" image inspect --format '{{.Id}}' localhost/tokenward:dev)" ] || fail ":dev is not :$VERSION"
ok "localhost/tokenward:dev is the same image as :$VERSION"

config=$("${PODMAN[@]}" image inspect --format \
    '{{.Config.User}}|{{json .Config.Entrypoint}}|{{json .Config.Cmd}}' "$IMAGE")
[ "$config" = '65532:65532|["/bin/tokenward"]|["run","--config","/etc/tokenward/tokenward.toml"]' ] ||
    fail "user/entrypoint/cmd: $config"
ok "USER 65532:65532, ENTRYPOINT /bin/tokenward, CMD run --config /etc/tokenward/tokenward.toml"
for label in version revision source licenses; do
    value=$("${PODMAN[@]}" image inspect --format "{{index .Config.Labels \"org.opencontainers.image.$label\"}}" "$IMAGE")
    [ -n "$value" ] && [ "$value" != "<no value>" ] || fail "label org.opencontainers.image.$label missing"
done
[ "$("${PODMAN[@]}" image inspect --format '{{index .Config.Labels "org.opencontainers.image.version"}}' "$IMAGE")" = "$VERSION" ] ||
    fail "version label is not $VERSION"
ok "OCI labels version ($VERSION), revision, source, licenses"

# The file tree itself (mounting an image needs root: rootless runs leave this part out).
if [ "$(id -u)" -eq 0 ]; then
    mnt=$("${PODMAN[@]}" image mount "$IMAGE")
    layout=$(cd "$mnt" && find . -printf '%U:%G %m %p\n' | sort -k3)
    passwd=$(cat "$mnt/etc/passwd")
    "${PODMAN[@]}" image unmount "$IMAGE" >/dev/null
    want() { grep -qx -- "$1" <<<"$layout" || fail "image lacks '$1'; it has:"$'\n'"$layout"; }
    want "0:0 755 ./bin/tokenward"
    want "65532:65532 1777 ./tmp"
    want "65532:65532 750 ./var/lib/tokenward"
    want "0:0 755 ./var/lib"
    want "0:0 644 ./etc/ssl/certs/ca-certificates.crt"
    grep -q '^nonroot:x:65532:65532:' <<<"$passwd" || fail "/etc/passwd has no nonroot 65532: $passwd"
    ! grep -q ' \./bin/sh$' <<<"$layout" || fail "the image has a shell"
    ok "layout: /bin/tokenward, /tmp and /var/lib/tokenward owned by 65532, CA bundle, no shell ($(grep -c . <<<"$layout") entries)"
fi

version_out=$("${PODMAN[@]}" run --rm --network host "${ULIMITS[@]}" "$IMAGE" --version 2>&1) ||
    fail "the binary does not start in the image: $version_out"
[ "$version_out" = "tokenward $VERSION" ] || fail "--version printed: $version_out"
ok "the binary starts in the image: $version_out"

# ------------------------------------------------------------------ fakes, config and secret
CLIENT_ID=image-test
CLIENT_SECRET=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
TOKEN=$(python3 -c 'import secrets; print("tok-" + secrets.token_urlsafe(24))')
FAKE_CLIENT_ID=$CLIENT_ID FAKE_CLIENT_SECRET=$CLIENT_SECRET FAKE_TOKEN=$TOKEN \
    python3 scripts/test-image-fakes.py "$WORK/ports.json" "$WORK/fakes.log" &
FAKES_PID=$!
for _ in $(seq 100); do [ -s "$WORK/ports.json" ] && break; sleep 0.05; done
[ -s "$WORK/ports.json" ] || fail "the fakes did not start"
port() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$WORK/ports.json" "$1"; }
PROVIDER=$(port provider)
UPSTREAM=$(port upstream)
ROUTE=$(port route)
ADMIN=$(port admin)

printf '%s' "$CLIENT_SECRET" >"$WORK/client_secret"
chmod 0644 "$WORK/client_secret" # bind-mounted as is: uid 65532 must read it
cat >"$WORK/tokenward.toml" <<EOF
[server]
threads = 1
grace_period = "${GRACE_SECONDS}s"

[log]
format = "text"

[admin]
listen = "127.0.0.1:$ADMIN"

[state]
dir = "/var/lib/tokenward"

[[routes]]
name = "api"
listen = "127.0.0.1:$ROUTE"
upstream = "http://127.0.0.1:$UPSTREAM"
credential = "fake"

[credentials.fake]
dialect = "oauth2"
token_url = "http://127.0.0.1:$PROVIDER/oauth2/token"
grant = "client_credentials"
client_id = "$CLIENT_ID"
client_secret = { file = "/run/secrets/tokenward/client_secret" }
client_auth = "client_secret_basic"
EOF
chmod 0644 "$WORK/tokenward.toml"
sed 's/^grant = .*/grant = "password_please"/' "$WORK/tokenward.toml" >"$WORK/broken.toml"
chmod 0644 "$WORK/broken.toml"

# ------------------------------------------------------------------------------ the container
"${PODMAN[@]}" volume create "$VOLUME" >/dev/null
start=$(now)
# As Kubernetes runs it: read-only root with no tmpfs added by podman, /tmp and the state
# directory on mounts of their own, no capabilities, no privilege escalation; the image's own
# USER, ENTRYPOINT and CMD.
"${PODMAN[@]}" run -d --name "$NAME" --network host "${ULIMITS[@]}" \
    --read-only --read-only-tmpfs=false --tmpfs /tmp:rw,nosuid,nodev,mode=1777 \
    --cap-drop ALL --security-opt no-new-privileges \
    -v "$VOLUME:/var/lib/tokenward" \
    -v "$WORK/tokenward.toml:/etc/tokenward/tokenward.toml:ro" \
    -v "$WORK/client_secret:/run/secrets/tokenward/client_secret:ro" \
    "$IMAGE" >/dev/null
ready=
for _ in $(seq 600); do
    if curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$ADMIN/readyz" 2>/dev/null; then
        ready=$(now)
        break
    fi
    [ "$("${PODMAN[@]}" inspect --format '{{.State.Running}}' "$NAME")" = true ] || break
    sleep 0.05
done
if [ -z "$ready" ]; then
    "${PODMAN[@]}" logs "$NAME" >&2 || true
    cat "$WORK/fakes.log" >&2 2>/dev/null || true
    fail "the container did not become ready within 30 s"
fi
started=$("${PODMAN[@]}" inspect --format '{{.State.StartedAt.UnixNano}}' "$NAME")
run_to_ready_ms=$(elapsed_ms "$start" "$ready")
started_to_ready_ms=$(elapsed_ms "$(python3 -c "print($started / 1e9)")" "$ready")
ok "/readyz 200, ${started_to_ready_ms} ms after the container started"
[ "$("${PODMAN[@]}" inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$NAME")" = true ] || fail "root is not read-only"

code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:$ADMIN/healthz")
[ "$code" = 200 ] || fail "/healthz answered $code"
ok "/healthz 200"

# Through the container to the upstream: the client sends no token, the upstream answers 200 only
# to the exact token the provider issued.
body=$(curl -sS --max-time 5 -w ' %{http_code}' "http://127.0.0.1:$ROUTE/v1/orders")
[ "$body" = $'authorized\n 200' ] || fail "request through the container: '$body'; fakes: $(cat "$WORK/fakes.log")"
grep -qx 'upstream: authorized GET /v1/orders' "$WORK/fakes.log" || fail "the upstream did not log the request"
! grep -q 'refused' "$WORK/fakes.log" || fail "a fake refused a request: $(grep refused "$WORK/fakes.log")"
ok "GET /v1/orders reached the upstream with the token injected (upstream answered 200)"

check_out=$("${PODMAN[@]}" exec "$NAME" /bin/tokenward check --config /etc/tokenward/tokenward.toml 2>&1) ||
    fail "tokenward check in the container failed: $check_out"
grep -q '^/etc/tokenward/tokenward.toml: OK' <<<"$check_out" || fail "tokenward check printed: $check_out"
grep -q 'secret client_secret: file /run/secrets/tokenward/client_secret' <<<"$check_out" ||
    fail "tokenward check did not read the mounted secret: $check_out"
ok "tokenward check in the container validates the mounted config and secret"
rc=0
broken_out=$("${PODMAN[@]}" run --rm --network host "${ULIMITS[@]}" --read-only \
    -v "$WORK/broken.toml:/etc/tokenward/broken.toml:ro" "$IMAGE" \
    check --config /etc/tokenward/broken.toml --skip-secrets 2>&1) || rc=$?
[ "$rc" = 2 ] && grep -q 'broken.toml' <<<"$broken_out" && grep -q 'grant' <<<"$broken_out" ||
    fail "tokenward check of a broken config exited $rc: $broken_out"
ok "tokenward check in the image refuses a broken config (exit 2, naming file and key)"

# The process: PID 1 in its namespace, uid 65532, and no children (tokenward starts no
# processes, so as PID 1 it has none to reap and needs no init).
pid=$("${PODMAN[@]}" inspect --format '{{.State.Pid}}' "$NAME")
status=$(cat "/proc/$pid/status")
uids=$(awk '/^Uid:/ { print $2, $3, $4, $5 }' <<<"$status")
gids=$(awk '/^Gid:/ { print $2, $3, $4, $5 }' <<<"$status")
nspid=$(awk '/^NSpid:/ { print $NF }' <<<"$status")
children=$(cat /proc/"$pid"/task/*/children | tr -d ' \n')
if [ "$(id -u)" -eq 0 ]; then
    [ "$uids" = "65532 65532 65532 65532" ] && [ "$gids" = "65532 65532 65532 65532" ] ||
        fail "process uids '$uids' gids '$gids'"
fi
in_container_user=$("${PODMAN[@]}" top "$NAME" user | tail -n 1 | tr -d ' ')
[ "$in_container_user" = nonroot ] || fail "podman top says the user is '$in_container_user'"
[ "$nspid" = 1 ] || fail "tokenward is PID $nspid in the container, not 1"
[ -z "$children" ] || fail "tokenward has child processes: $children"
ok "tokenward is PID 1, runs as uid/gid 65532 (nonroot), has no child processes"

# The state volume was initialised from the image's directory, so uid 65532 can write it.
vol_dir=$("${PODMAN[@]}" volume inspect --format '{{.Mountpoint}}' "$VOLUME")
if [ "$(id -u)" -eq 0 ]; then
    [ "$(stat -c '%u:%g %a' "$vol_dir")" = "65532:65532 750" ] || fail "state volume is $(stat -c '%u:%g %a' "$vol_dir")"
    ok "the state volume is owned by 65532 (mode 750), taken from the image"
fi

# SIGTERM, as Kubernetes and `podman stop` send it: exit 0, well within the grace period.
term=$(now)
"${PODMAN[@]}" kill --signal TERM "$NAME" >/dev/null
exit_code=$(timeout $((GRACE_SECONDS + 10)) "${PODMAN[@]}" wait "$NAME") || fail "no exit within $((GRACE_SECONDS + 10)) s of SIGTERM"
stop_ms=$(elapsed_ms "$term" "$(now)")
[ "$exit_code" = 0 ] || fail "exit code $exit_code after SIGTERM; logs: $("${PODMAN[@]}" logs "$NAME" 2>&1 | tail -n 20)"
[ "$stop_ms" -lt $((GRACE_SECONDS * 1000)) ] || fail "SIGTERM to exit took $stop_ms ms, over the ${GRACE_SECONDS} s grace period"
# conmon may still be copying the last lines to the log when `podman wait` returns: wait for it.
handled=
for _ in $(seq 40); do
    if "${PODMAN[@]}" logs "$NAME" 2>&1 | grep -q 'SIGTERM received; draining'; then handled=1; break; fi
    sleep 0.05
done
[ -n "$handled" ] || fail "the log does not show the SIGTERM handler: $("${PODMAN[@]}" logs "$NAME" 2>&1 | tail -n 5)"
ok "SIGTERM: tokenward drained and exited 0 in $stop_ms ms (grace period ${GRACE_SECONDS} s)"

echo
echo "image localhost/tokenward:$VERSION: $size bytes ($(python3 -c "print(f'{$size / 1048576:.1f}')") MiB)"
echo "build (cargo build --release + podman build): $build_ms ms"
echo "container start to /readyz 200: $started_to_ready_ms ms (podman run to ready: $run_to_ready_ms ms)"
echo "SIGTERM to exit 0: $stop_ms ms"
echo "test-image: PASS"
