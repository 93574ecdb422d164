#!/usr/bin/env bash
# Assembles the file tree of tokenward's container image from a built binary: the one place that
# decides what the image holds, used by both builds (scripts/image.sh offline, and the builder
# stage of deploy/Dockerfile).
#
#   scripts/image-rootfs.sh BINARY OUT
#
# OUT/rootfs    everything owned by root: /bin/tokenward, the ELF interpreter and exactly the
#               shared libraries the binary loads (read from the binary with readelf and ldd, so a
#               new dependency needs no edit here), CA certificates, /etc/passwd and /etc/group
#               with the non-root user 65532, /etc/nsswitch.conf, /etc/hosts (localhost), an
#               empty /etc/tokenward. The binary is stripped of its symbols.
# OUT/nonroot-tmp/tmp (mode 1777) and OUT/nonroot-state/tokenward (0750): /tmp and
#               /var/lib/tokenward, which the Containerfile copies with --chown=65532:65532 (into
#               / and /var/lib, whose own ownership a COPY leaves alone), so building needs no root.
#
# Needs ldd and readelf (binutils) on a glibc system, and the CA bundle at CA_BUNDLE
# (default /etc/ssl/certs/ca-certificates.crt, Debian's ca-certificates).
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 BINARY OUT" >&2
    exit 2
fi
BINARY=$1
OUT=$2
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

for tool in ldd readelf; do
    command -v "$tool" >/dev/null || { echo "$0: $tool is required" >&2; exit 1; }
done
[ -x "$BINARY" ] || { echo "$0: $BINARY is not an executable" >&2; exit 1; }
[ -r "$CA_BUNDLE" ] || { echo "$0: no CA bundle at $CA_BUNDLE (install ca-certificates)" >&2; exit 1; }

rm -rf "$OUT"
ROOTFS=$OUT/rootfs
install -d -m 0755 "$ROOTFS"/bin "$ROOTFS"/etc/tokenward "$ROOTFS"/etc/ssl/certs "$ROOTFS"/var/lib
install -d -m 1777 "$OUT"/nonroot-tmp/tmp
install -d -m 0750 "$OUT"/nonroot-state/tokenward
install -m 0755 "$BINARY" "$ROOTFS"/bin/tokenward
# Symbols are for profiling on a build machine (benches/README.md), not for the image: about a
# sixth of its size. Panic messages keep their text; backtraces lose function names.
command -v strip >/dev/null && strip --strip-all "$ROOTFS"/bin/tokenward

# The interpreter the kernel starts the binary with must sit at exactly the path the binary names.
interpreter=$(readelf -l "$BINARY" | sed -n 's/.*\[Requesting program interpreter: \(.*\)\]/\1/p')
[ -n "$interpreter" ] || { echo "$0: $BINARY names no ELF interpreter (static binaries need none: adapt this script)" >&2; exit 1; }

# ldd resolves the whole closure of DT_NEEDED (libraries of libraries) to the paths the loader
# would use; each is copied there (dereferenced: the image has no symlink farm). A library ldd
# cannot find fails the build rather than the container's start.
ldd_out=$(ldd "$BINARY")
if grep -q 'not found' <<<"$ldd_out"; then
    echo "$0: unresolved libraries:" >&2
    grep 'not found' <<<"$ldd_out" >&2
    exit 1
fi
libs=$(awk '$2 == "=>" && $3 ~ /^\// { print $3 }' <<<"$ldd_out")
needed=$(readelf -d "$BINARY" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
for name in $needed; do
    grep -q "/$name\$" <<<"$libs"$'\n'"$interpreter" || { echo "$0: ldd did not resolve $name" >&2; exit 1; }
done
for path in "$interpreter" $libs; do
    install -d -m 0755 "$ROOTFS$(dirname "$path")"
    cp -L "$path" "$ROOTFS$path"
    chmod 0755 "$ROOTFS$path"
done

install -m 0644 "$CA_BUNDLE" "$ROOTFS"/etc/ssl/certs/ca-certificates.crt
# The distroless layout: uid/gid 65532 "nonroot", no login shell (there is none in the image).
cat >"$ROOTFS"/etc/passwd <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin
EOF
cat >"$ROOTFS"/etc/group <<'EOF'
root:x:0:
nonroot:x:65532:
EOF
# Name lookups for upstreams and providers: /etc/hosts first, then DNS (glibc's built-in files
# and dns modules; nothing else is in the image).
printf 'hosts: files dns\n' >"$ROOTFS"/etc/nsswitch.conf
# Runtimes usually mount their own /etc/hosts over this one; where none does (`podman --no-hosts`,
# some sandboxes) `localhost` must still resolve.
printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >"$ROOTFS"/etc/hosts
chmod 0644 "$ROOTFS"/etc/passwd "$ROOTFS"/etc/group "$ROOTFS"/etc/nsswitch.conf "$ROOTFS"/etc/hosts

echo "rootfs for $BINARY in $OUT: interpreter $interpreter, libraries:" $libs
