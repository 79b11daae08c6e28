#!/usr/bin/env bash
# Build the bento's OCI image with podman, on a machine that may have no container registry (./dev.sh image).
#
#   deploy/image.sh [--pypi-only|--cpu-index] [--ca FILE]... [--host-cas] [--bento TAG] [--detector VALUE]
#                   [--tag-file F] [--infra-only]
#
# 1. podman: installed (apt, as root) and configured when missing. Where root may not raise the open-file limit or
#    cgroups run in hybrid mode (crun cannot start a container there), a drop-in sets runc and explicit ulimits.
# 2. Base images: the bentofile's python:3.11-slim, and debian:bookworm-slim for the infrastructure image
#    (deploy/infra.Containerfile: Redis and HAProxy). They are pulled where a registry answers; otherwise stand-ins
#    are made from Debian's packages (debootstrap) under the same names, so the generated Dockerfile is unchanged.
#    --ca FILE makes the stand-ins trust an extra CA (a TLS-intercepting proxy between the build and the package
#    registries); --host-cas: every CA this machine's admin added (/usr/local/share/ca-certificates/*.crt). Explicit
#    options on purpose: a CA of the build machine never goes into an image by default.
# 3. The bento: the shipped shapes CLIP imported into the model store, then `bentoml build` (the bento records the
#    model settings it was built with) -- or an existing bento with --bento TAG.
# 4. `bentoml containerize --backend podman`. --pypi-only (automatic when PyTorch's CPU wheel index does not answer)
#    builds from a copy of bentofile.yaml without that index: torch then comes from PyPI (its Linux wheel is the CUDA
#    build: a larger image that runs the same on a CPU).
#
# Prints the image's name:tag as the last line (and writes it to --tag-file). Users with Docker or podman and a
# registry need none of this: `bentoml build` and `bentoml containerize TAG` (README, "Build and ship a bento").
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${ZSS_VENV:-.venv}
PYPI_ONLY=auto
CAS=()
BENTO=""
DETECTOR=none
TAG_FILE=""
PY_BASE=docker.io/library/python:3.11-slim
DEB_BASE=docker.io/library/debian:bookworm-slim
INFRA=localhost/zss-infra:bookworm

while [ $# -gt 0 ]; do
  case "$1" in
    --pypi-only) PYPI_ONLY=yes ;;
    --cpu-index) PYPI_ONLY=no ;;
    --ca) CAS+=("$2"); shift ;;
    --host-cas) for ca in /usr/local/share/ca-certificates/*.crt; do [ -f "$ca" ] && CAS+=("$ca"); done ;;
    --bento) BENTO=$2; shift ;;
    --detector) DETECTOR=$2; shift ;;
    --tag-file) TAG_FILE=$2; shift ;;
    --infra-only) BENTO=-; ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "deploy/image.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

say() { echo "image.sh: $*" >&2; }

ensure_podman() {
  if ! command -v podman >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      say "podman is missing; installing Debian's podman, runc and debootstrap (apt-get)"
      apt-get update -q >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc debootstrap >/dev/null
    else
      say "podman is missing: run 'apt-get install -y podman runc debootstrap' as root"; exit 1
    fi
  fi
  command -v debootstrap >/dev/null || { [ "$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap runc >/dev/null; } || true
  # crun (podman's default runtime) fails where root cannot raise RLIMIT_NOFILE to podman's default or cgroups are in
  # hybrid mode (containers.md in the team notes); runc with explicit ulimits works there.
  local conf=/etc/containers/containers.conf.d/zss-runtime.conf
  local hard
  hard=$(ulimit -Hn)
  local limited=no
  [ "$hard" = unlimited ] || [ "$hard" -ge 1048576 ] || limited=yes
  if [ "$(id -u)" = 0 ] && [ ! -f "$conf" ] && { [ -d /sys/fs/cgroup/unified ] || [ $limited = yes ]; }; then
    say "configuring podman for this machine (runc, nofile=$hard): $conf"
    mkdir -p "$(dirname "$conf")"
    [ "$hard" = unlimited ] && hard=1048576
    printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=32768:32768"]\n[engine]\nruntime = "runc"\n' \
      "$hard" "$hard" > "$conf"
  fi
}

# A stand-in for a base image that cannot be pulled: Debian bookworm from Debian's own mirror, plus the CAs asked for.
debian_rootfs_image() {
  local name=localhost/zss-bookworm:rootfs
  podman image exists "$name" && return 0
  command -v debootstrap >/dev/null || { say "debootstrap is missing (apt-get install debootstrap)"; exit 1; }
  local mirror rootfs
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  rootfs=$(mktemp -d)
  say "no registry: making Debian bookworm from $mirror (debootstrap, about a minute)"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import --change 'CMD ["bash"]' - "$name" >/dev/null
  rm -rf "$rootfs"
}

stand_in() {  # stand_in IMAGE PACKAGES...: a base image of Debian's packages under IMAGE's name
  local image=$1; shift
  local ctx
  ctx=$(mktemp -d)
  mkdir -p "$ctx/ca"
  local ca_lines=""
  if [ ${#CAS[@]} -gt 0 ]; then
    for ca in "${CAS[@]}"; do cp "$ca" "$ctx/ca/$(basename "$ca" .crt).crt"; done
    # Debian's pip and uv (UV_NATIVE_TLS) read the system store once the CA is in it.
    ca_lines=$'COPY ca/ /usr/local/share/ca-certificates/\nENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt UV_NATIVE_TLS=1 REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt'
  fi
  cat > "$ctx/Containerfile" <<EOF
FROM localhost/zss-bookworm:rootfs
$ca_lines
# On a busy build machine uv's defaults failed: a 30 s read timeout for torch's large wheels, and a 60 s limit on
# compiling one file to bytecode.
ENV UV_HTTP_TIMEOUT=300 UV_COMPILE_BYTECODE_TIMEOUT=900
RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ca-certificates $* \\
 && update-ca-certificates >/dev/null && rm -rf /var/lib/apt/lists/* \\
 && rm -f /usr/lib/python3*/EXTERNALLY-MANAGED
LABEL org.opencontainers.image.description="zeroshot-server stand-in for $image (Debian bookworm)"
EOF
  podman build -q -t "$image" "$ctx" >/dev/null
  rm -rf "$ctx"
}

ensure_base() {  # ensure_base IMAGE PACKAGES...
  local image=$1; shift
  podman image exists "$image" && return 0
  if timeout 60 podman pull -q "$image" >/dev/null 2>&1; then
    return 0
  fi
  say "$image cannot be pulled here: building a stand-in from Debian's packages"
  debian_rootfs_image
  stand_in "$image" "$@"
}

cpu_index_reachable() {
  "$VENV/bin/python" - <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen("https://download.pytorch.org/whl/cpu/torch/", timeout=10)
except Exception:
    sys.exit(1)
EOF
}

ensure_podman
# Debian 12's Python is 3.11, the version the project is tested on; BentoML's Dockerfile installs uv with pip.
ensure_base "$PY_BASE" python3 python3-venv python3-pip python-is-python3
ensure_base "$DEB_BASE"
if ! podman image exists "$INFRA"; then
  say "building $INFRA (Debian's redis-server and haproxy, for the replica set-up)"
  podman build -q -t "$INFRA" -f deploy/infra.Containerfile deploy >/dev/null
fi
[ "$BENTO" = - ] && { echo "$INFRA"; exit 0; }

[ -x "$VENV/bin/bentoml" ] || ./dev.sh setup
if [ -z "$BENTO" ]; then
  say "importing the shipped shapes CLIP into the model store and building the bento (detector: $DETECTOR)"
  clip=$("$VENV/bin/python" -m tools.models clip --model models/shapes-clip/shapes-clip.json \
         --pretrained models/shapes-clip/shapes-clip.fp16.pt | tail -n 1)
  bentofile=bentofile.yaml
  if [ "$PYPI_ONLY" = auto ]; then
    if cpu_index_reachable; then PYPI_ONLY=no; else PYPI_ONLY=yes; say "PyTorch's CPU index does not answer: PyPI only"; fi
  fi
  if [ "$PYPI_ONLY" = yes ]; then
    # The same bentofile without PyTorch's CPU index (bentoml reads the includes relative to the build context).
    bentofile=.zss-bentofile.pypi.yaml
    "$VENV/bin/python" - "$bentofile" <<'EOF'
import sys, yaml
spec = yaml.safe_load(open("bentofile.yaml"))
spec["python"].pop("extra_index_url", None)
spec["labels"]["torch-wheels"] = "pypi"
yaml.safe_dump(spec, open(sys.argv[1], "w"), sort_keys=False)
EOF
  fi
  BENTO=$(env "${clip%%=*}=${clip#*=}" ZSS_DETECTOR_MODEL="$DETECTOR" \
          "$VENV/bin/bentoml" build -f "$bentofile" --output tag . | tail -n 1)
  BENTO=${BENTO#__tag__:}
  [ "$bentofile" = bentofile.yaml ] || rm -f "$bentofile"
fi
say "containerizing $BENTO with podman"
"$VENV/bin/bentoml" containerize "$BENTO" --backend podman >&2
image="$BENTO"
podman image exists "$image" || { say "podman has no image $image after containerize"; exit 1; }
[ -z "$TAG_FILE" ] || echo "$image" > "$TAG_FILE"
echo "$image"
