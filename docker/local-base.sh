#!/usr/bin/env bash
# Builds the base image for local image builds on a machine that reaches Debian's package mirror
# but no image registry (no `docker pull`): a Debian bookworm root file system made from Debian's
# packages with mmdebstrap, with Debian's Python 3.11, imported with `docker import`.
#
#   docker/local-base.sh                    # -> citi-local/python:3.11-bookworm
#   docker build -f docker/api.Dockerfile \
#     --build-arg BASE_IMAGE=citi-local/python:3.11-bookworm --network host -t citi-api:local .
#
# It stands in for python:3.11.13-slim-bookworm (the API image) and, with the CPU torch wheel,
# for the CUDA base of the worker image (docker-compose.local.yml passes both). The Python is
# Debian's 3.11 (/usr/bin/python3, `python` through python-is-python3), not the python image's
# /usr/local build; the Dockerfiles need only `python` and its venv module.
#
# Environment:
#   CITI_LOCAL_BASE    the tag to import as (default citi-local/python:3.11-bookworm)
#   DEBIAN_MIRROR      Debian archive (default http://deb.debian.org/debian)
#   DEBIAN_SECURITY    Debian security archive (default http://deb.debian.org/debian-security)
#   CITI_LOCAL_BASE_FORCE=1   rebuild even when the tag exists
#   CITI_LOCAL_CA_DIR  certificates (*.crt) this machine trusts beyond Debian's, added to the image's
#                      store so pip inside a build reaches PyPI through a TLS-inspecting proxy
#                      (default /usr/local/share/ca-certificates, where Debian keeps local ones)
# Needs root (or mmdebstrap's unshare mode), mmdebstrap (apt-get install mmdebstrap) and a
# running Docker engine. The root file system streams from mmdebstrap into `docker import`:
# nothing is left on disk but the image.
set -euo pipefail

tag="${CITI_LOCAL_BASE:-citi-local/python:3.11-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security="${DEBIAN_SECURITY:-http://deb.debian.org/debian-security}"
ca_dir="${CITI_LOCAL_CA_DIR:-/usr/local/share/ca-certificates}"

if ! command -v mmdebstrap >/dev/null 2>&1; then
    echo "local-base.sh: mmdebstrap is missing: apt-get install mmdebstrap" >&2
    exit 2
fi
if ! docker info >/dev/null 2>&1; then
    echo "local-base.sh: no Docker engine answers (docker info failed)" >&2
    exit 2
fi
if [[ "${CITI_LOCAL_BASE_FORCE:-0}" != 1 ]] && docker image inspect "$tag" >/dev/null 2>&1; then
    echo "local-base.sh: $tag exists (CITI_LOCAL_BASE_FORCE=1 rebuilds it)"
    exit 0
fi

# python3.11-venv: `python -m venv` (ensurepip); passwd: groupadd/useradd in the Dockerfiles;
# ca-certificates: pip over HTTPS. Documentation and man pages are left out, as in Debian's slim
# images, and so are apt's package lists (a Dockerfile that installs runs apt-get update itself).
shopt -s nullglob
cas=("$ca_dir"/*.crt)
ca_hooks=()
if ((${#cas[@]})); then
    # The hooks run in mmdebstrap's shell, with the root file system's directory as "$1".
    # shellcheck disable=SC2016
    ca_hooks=(--customize-hook="copy-in ${cas[*]} /usr/local/share/ca-certificates"
              --customize-hook='chroot "$1" update-ca-certificates')
fi

packages=python3.11,python3.11-venv,python-is-python3,ca-certificates,passwd
started=$(date +%s)
# The hooks run in mmdebstrap's shell, with the root file system's directory as "$1".
# shellcheck disable=SC2016
mmdebstrap \
    --variant=minbase \
    --include="$packages" \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    "${ca_hooks[@]}" \
    --customize-hook='chroot "$1" python3 --version' \
    --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
    bookworm - \
    "deb $mirror bookworm main" \
    "deb $mirror bookworm-updates main" \
    "deb $security bookworm-security main" \
    | docker import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["python3"]' \
        --message "Debian bookworm from mmdebstrap with $packages (docker/local-base.sh)" \
        - "$tag"

echo "local-base.sh: $tag built in $(($(date +%s) - started)) s," \
    "$(docker image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1 / 1e6}')"
docker run --rm --network host "$tag" python --version
