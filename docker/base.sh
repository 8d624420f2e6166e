#!/usr/bin/env bash
# Build the images' base from Debian packages, for sites that cannot pull from Docker Hub
# (air-gapped, or behind a TLS-inspecting proxy): Debian 12 (bookworm) with its Python 3.11,
# made by debootstrap from a Debian mirror and imported into the local engine.
#
#   sudo docker/base.sh                       # -> localhost/sam3pipe-base:bookworm
#   SAM3PIPE_BASE_IMAGE=localhost/sam3pipe-base:bookworm docker/build.sh cpu
#
# The machine's CA bundle goes into the base (as a local CA, so update-ca-certificates keeps it),
# so pip and uv inside the image trust the same certificates as this machine; a package index
# configured on this machine (pip's index-url, an http(s) URL) is passed on too.
#
# Environment (all optional):
#   SAM3PIPE_BASE_IMAGE     the image to create (default localhost/sam3pipe-base:bookworm)
#   SAM3PIPE_DEBIAN_MIRROR  Debian mirror (default: this machine's apt source for bookworm, else deb.debian.org)
#   SAM3PIPE_CA_BUNDLE      PEM bundle to trust inside (default /etc/ssl/certs/ca-certificates.crt)
#   SAM3PIPE_PIP_INDEX_URL  package index for pip and uv inside (default: this machine's pip index-url)
# Needs root (debootstrap, chroot), debootstrap, and docker or podman.
set -euo pipefail

image="${SAM3PIPE_BASE_IMAGE:-localhost/sam3pipe-base:bookworm}"
suite=bookworm
ca_bundle="${SAM3PIPE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
# what the Containerfiles need from the base: Python 3.11 with venv, trusted certificates; a C
# compiler is the CUDA image's own addition (Triton compiles its launchers at run time)
packages=ca-certificates,python3,python3-venv,python-is-python3

die() { echo "error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "docker/base.sh needs root (debootstrap and chroot); run it with sudo"
command -v debootstrap >/dev/null 2>&1 || die "debootstrap is not installed: apt-get install -y debootstrap"
[ -r "$ca_bundle" ] || die "SAM3PIPE_CA_BUNDLE=$ca_bundle: no such readable PEM bundle"
engine=""
for candidate in docker podman; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" info >/dev/null 2>&1; then
    engine=$candidate
    break
  fi
done
[ -n "$engine" ] || die "no running container engine (docker with its daemon, or podman)"

# this machine's Debian mirror: deb822 sources (URIs:) or one-line sources (deb URI suite ...)
apt_mirror() {
  local file
  for file in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$file" ] || continue
    awk -v suite="$suite" '
      /^URIs:/ { uri = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite && uri !~ /security/) { print uri; exit } }
      /^deb / { for (i = 3; i <= NF; i++) if ($i == suite && $2 !~ /security/) { print $2; exit } }
    ' "$file"
  done | head -n1
}
mirror="${SAM3PIPE_DEBIAN_MIRROR:-$(apt_mirror)}"
mirror="${mirror:-http://deb.debian.org/debian}"

index_url="${SAM3PIPE_PIP_INDEX_URL:-}"
if [ -z "$index_url" ] && command -v pip >/dev/null 2>&1; then
  index_url="$(pip config get global.index-url 2>/dev/null || true)"
fi
case "$index_url" in
  http://* | https://*) ;;
  *) index_url="" ;; # a file:// index of this machine is not reachable from a container
esac

rootfs="$(mktemp -d /tmp/sam3pipe-base.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT

echo "debootstrap $suite from $mirror into $rootfs"
debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror"

# the certificates of this machine's bundle that Debian's own set lacks (e.g. an inspecting proxy's CA),
# one file each, as update-ca-certificates wants them
mkdir -p "$rootfs/usr/local/share/ca-certificates"
awk -v known="$rootfs/etc/ssl/certs/ca-certificates.crt" -v out="$rootfs/usr/local/share/ca-certificates/sam3pipe-site" '
  BEGIN { while ((getline line < known) > 0) { if (line ~ /-----BEGIN CERTIFICATE-----/) pem = ""; pem = pem line "\n"; if (line ~ /-----END CERTIFICATE-----/) { seen[pem] = 1; pem = "" } } }
  /-----BEGIN CERTIFICATE-----/ { pem = "" }
  { pem = pem $0 "\n" }
  /-----END CERTIFICATE-----/ { if (!(pem in seen)) { n++; printf "%s", pem > (out "-" n ".crt"); close(out "-" n ".crt") } pem = "" }
  END { print n + 0 " certificate(s) of the bundle added to the base" > "/dev/stderr" }
' "$ca_bundle"
chroot "$rootfs" update-ca-certificates >/dev/null
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/*.log \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*

changes=(
  --change "ENV LANG=C.UTF-8"
  --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  # uv (rustls) trusts only what SSL_CERT_FILE names; requests and pip read the other two
  --change "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"
  --change "ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt"
  --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt"
  --change "LABEL org.opencontainers.image.title=sam3pipe-base org.opencontainers.image.description=Debian-$suite-from-$mirror"
  --change 'CMD ["/bin/bash"]'
)
if [ -n "$index_url" ]; then
  changes+=(--change "ENV PIP_INDEX_URL=$index_url" --change "ENV UV_INDEX_URL=$index_url")
fi

echo "importing $rootfs as $image ($engine)"
tar -C "$rootfs" --numeric-owner -cf - . | "$engine" import "${changes[@]}" - "$image"
"$engine" run --rm --network host "$image" python3 -c "import ssl, sys, venv; print(sys.version.split()[0])"
echo "built $image"
