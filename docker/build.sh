#!/usr/bin/env bash
# Build the sam3pipe images from the last commit (git archive HEAD), so an image is exactly one
# commit and records it (SAM3PIPE_GIT_COMMIT, OCI revision label).
#
#   docker/build.sh [cuda|cpu|all]          default: all
#
# Environment: SAM3PIPE_REGISTRY (default localhost) and SAM3PIPE_VERSION (default: pyproject's
# version) name the images <registry>/sam3pipe-<variant>:<version>, the names the pipeline
# settings (image) and manifests/ use by default; SAM3PIPE_BASE_IMAGE overrides the pinned base
# (docker/base.sh builds one from Debian packages where Docker Hub is out of reach).
# The build's RUN steps use the host's network (SAM3PIPE_BUILD_NETWORK, default host): an engine
# started without a bridge (dockerd --bridge=none) gives them none otherwise, and a proxied
# site's package registries are reached the way this machine reaches them.
# Uses docker, else podman, else buildah. Push with `<engine> push <image>` afterwards.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
variants="${1:-all}"
case "$variants" in
  all) variants="cuda cpu" ;;
  cuda | cpu) ;;
  *) echo "usage: docker/build.sh [cuda|cpu|all]" >&2; exit 2 ;;
esac

engine=""
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  engine=docker
elif command -v podman >/dev/null 2>&1; then
  engine=podman
elif command -v buildah >/dev/null 2>&1; then
  engine=buildah
fi
if [ -z "$engine" ]; then
  cat >&2 <<'MSG'
error: no container engine found. Install one of:
  - Docker Engine (https://docs.docker.com/engine/install/), with its daemon running;
  - Podman or Buildah (e.g. `apt-get install podman`), which need no daemon.
Or build on a machine that has one, e.g. in CI, from this repository's last commit.
MSG
  exit 1
fi

cd "$repo"
if ! git rev-parse --verify HEAD >/dev/null 2>&1; then
  echo "error: $repo has no commit to build; commit first (the image is built from git HEAD)" >&2
  exit 1
fi
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  echo "warning: uncommitted changes are not in the image (it is built from HEAD $(git rev-parse --short HEAD))" >&2
fi

commit="$(git rev-parse HEAD)"
version="${SAM3PIPE_VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n1)}"
registry="${SAM3PIPE_REGISTRY:-localhost}"
context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
git archive --format=tar HEAD | tar -x -C "$context"

for variant in $variants; do
  image="$registry/sam3pipe-$variant:$version"
  args=(--file "$context/docker/Containerfile.$variant" --tag "$image" --build-arg "GIT_COMMIT=$commit"
    --network "${SAM3PIPE_BUILD_NETWORK:-host}")
  if [ -n "${SAM3PIPE_BASE_IMAGE:-}" ]; then
    args+=(--build-arg "BASE_IMAGE=$SAM3PIPE_BASE_IMAGE")
  fi
  echo "building $image with $engine from commit ${commit:0:12}"
  case "$engine" in
    docker | podman) "$engine" build "${args[@]}" "$context" ;;
    buildah) buildah bud "${args[@]}" "$context" ;;
  esac
done
