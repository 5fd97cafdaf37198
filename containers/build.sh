#!/usr/bin/env bash
# Build the axpo-nemo image (the repository's Dockerfile, on nvcr.io/nvidia/nemo-rl:v0.7.0) and turn
# it into an Enroot squashfs for pyxis (`CONTAINER=/path/axpo-nemo.sqsh sbatch slurm/axpo_8b.sh`).
#
#   containers/build.sh [--tag TAG] [--out FILE.sqsh] [--base IMAGE] [--force] [--no-sqsh]
#
#   --tag TAG       image tag (default: axpo-nemo:<git short sha>, or axpo-nemo:latest outside git)
#   --out FILE      the .sqsh to write (default: containers/axpo-nemo.sqsh); refused if it exists
#                   unless --force
#   --base IMAGE    the NeMo-RL image to build on (default: nvcr.io/nvidia/nemo-rl:v0.7.0)
#   --no-sqsh       build the image only (e.g. to push it: pyxis can pull from a registry too)
#
# Environment: DOCKER (default: docker; podman works) is the build engine; enroot must be on PATH
# for the .sqsh (it reads the image from the local engine: dockerd:// or podman://). Pulling the
# NGC base may need `docker login nvcr.io` (user $oauthtoken, an NGC API key) beforehand; no
# credential is passed to or stored in the image.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
engine=${DOCKER:-docker}
base=nvcr.io/nvidia/nemo-rl:v0.7.0
out=$here/axpo-nemo.sqsh
tag=""
force=0
sqsh=1

die() { echo "build.sh: error: $*" >&2; exit 2; }

while (($#)); do
  case $1 in
    --tag) tag=${2:?--tag needs a value}; shift 2 ;;
    --out) out=${2:?--out needs a value}; shift 2 ;;
    --base) base=${2:?--base needs a value}; shift 2 ;;
    --force) force=1; shift ;;
    --no-sqsh) sqsh=0; shift ;;
    -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
if [[ -z $tag ]]; then
  tag="axpo-nemo:$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo latest)"
fi

command -v "$engine" >/dev/null || die "'$engine' is not installed (set DOCKER to another engine, e.g. podman)"
if ((sqsh)); then
  command -v enroot >/dev/null || die "enroot is not installed (needed for the .sqsh; or pass --no-sqsh)"
  if [[ -e $out && $force -eq 0 ]]; then
    die "$out exists (pass --force to replace it, or --out another path)"
  fi
fi

echo "build.sh: building $tag on $base"
"$engine" build --file "$repo/Dockerfile" --build-arg "NEMO_RL_IMAGE=$base" --tag "$tag" "$repo"

if ((sqsh)); then
  case $(basename "$engine") in
    podman) source_uri="podman://$tag" ;;
    *) source_uri="dockerd://$tag" ;;
  esac
  tmp="$out.tmp-$$"
  trap 'rm -f "$tmp"' EXIT  # a failed import leaves no half-written image behind
  echo "build.sh: enroot import $source_uri -> $out"
  enroot import --output "$tmp" "$source_uri"
  mv -f "$tmp" "$out"
  echo "build.sh: wrote $out ($(du -h "$out" | cut -f1)); use it with CONTAINER=$out"
fi
