#!/usr/bin/env bash
# Builds the Shardline container image offline: a Debian base made by debootstrap and `docker
# import` (built once, reused), then `shardline:latest` = base + aggregator, leaf, kinesis-sim and
# the shardline-health probe. BIN_DIR picks prebuilt binaries (e.g. target/debug in CI); without it
# the release binaries are built first. IMAGE and BASE_IMAGE name the images.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
IMAGE="${IMAGE:-shardline:latest}"
BASE_IMAGE="${BASE_IMAGE:-shardline-base:bookworm}"
SUITE="${DEBIAN_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BINARIES=(aggregator leaf kinesis-sim shardline-health)

die() { echo "build.sh: $*" >&2; exit 1; }
command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "the Docker daemon is not reachable (is it running? are you in the docker group?)"

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"

# 1. The base: a minimal Debian root filesystem, imported as an image. Reused when present.
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  echo "== base image $BASE_IMAGE present, reusing it"
else
  if ! command -v debootstrap >/dev/null 2>&1; then
    echo "== apt-get install debootstrap"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq debootstrap >/dev/null
  fi
  rootfs="$(mktemp -d /tmp/shardline-rootfs.XXXXXX)"
  trap '$SUDO rm -rf "$rootfs"' EXIT
  echo "== debootstrap $SUITE (minbase) from $MIRROR"
  start=$(date +%s)
  $SUDO debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$rootfs" "$MIRROR" \
    >/tmp/shardline-debootstrap.log 2>&1 \
    || { tail -20 /tmp/shardline-debootstrap.log >&2; die "debootstrap failed (log: /tmp/shardline-debootstrap.log)"; }
  # Trim what a server image never uses.
  $SUDO rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
  echo "== docker import -> $BASE_IMAGE"
  $SUDO tar -C "$rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
  echo "   base built in $(( $(date +%s) - start )) s"
fi

# 2. The binaries.
if [ -z "${BIN_DIR:-}" ]; then
  echo "== cargo build --release (aggregator, leaf, kinesis-sim, shardline-health)"
  (cd "$REPO_ROOT" && cargo build --release --locked -p aggregator -p leaf -p kinesis-sim -p deploy --bins)
  BIN_DIR="$REPO_ROOT/target/release"
fi
ctx="$(mktemp -d /tmp/shardline-image.XXXXXX)"
trap 'rm -rf "$ctx"; [ -n "${rootfs:-}" ] && $SUDO rm -rf "$rootfs"; true' EXIT
for b in "${BINARIES[@]}"; do
  [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b not found (build it, or unset BIN_DIR)"
  # Debug info is most of a debug binary's size; the image does not need it.
  objcopy --strip-debug "$BIN_DIR/$b" "$ctx/$b" 2>/dev/null || cp "$BIN_DIR/$b" "$ctx/$b"
done
cp "$REPO_ROOT/deploy/docker/Dockerfile" "$ctx/Dockerfile"

# 3. The image (the classic builder: no buildx plugin, nothing to pull).
echo "== docker build -> $IMAGE (binaries from $BIN_DIR)"
DOCKER_BUILDKIT=0 docker build -q --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$IMAGE" "$ctx" >/dev/null 2>/tmp/shardline-docker-build.log \
  || { cat /tmp/shardline-docker-build.log >&2; die "docker build failed"; }
echo "   $IMAGE: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
