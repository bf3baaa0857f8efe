#!/usr/bin/env bash
# Build the CPU image and serve one chat completion from a container, with podman, on a
# Debian host that can pull no base image: the base is made locally by debootstrap
# (Debian's archive is enough) and stands in for python:3.11-slim-bookworm.
#   sudo apt-get install podman debootstrap runc
#   scripts/image_smoke.sh     # WORK: folder for the rootfs and the cache volume
# pip inside the build reads the base's /etc/pip.conf ($WORK/rootfs/etc/pip.conf: an index,
# a CA bundle, find-links to a CPU torch wheel); BUILD_ARGS are added to `podman build`
# (e.g. "-v /wheels:/wheels:ro" for that folder).
# Hosts whose cgroups are in hybrid mode make crun fail ("cgroups in hybrid mode not
# supported"): runc runs there. Hosts without CAP_SYS_RESOURCE cannot raise a container's
# rlimits (crun/runc: "setrlimit RLIMIT_NOFILE: Operation not permitted"): the explicit,
# lower --ulimit values below avoid that. --format docker keeps the HEALTHCHECK (OCI drops it).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(realpath -m "${WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/engine-smoke}"); PORT=${PORT:-31555}; NAME=engine-smoke
PODMAN=(podman --runtime "${RUNTIME:-runc}")
LIMITS=(--ulimit nofile=4096:4096 --ulimit nproc=4096:4096)
mkdir -p "$WORK"
if ! podman image exists localhost/debian-python:bookworm; then
  [[ -d $WORK/rootfs ]] || debootstrap --variant=minbase \
    --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs"
  tar -C "$WORK/rootfs" -c . | podman import - localhost/debian-python:bookworm
fi
# shellcheck disable=SC2086
"${PODMAN[@]}" build --format docker "${LIMITS[@]}" --network host ${BUILD_ARGS:-} \
  --build-arg BACKEND=cpu --build-arg CPU_BASE=localhost/debian-python:bookworm -f docker/Dockerfile \
  -t localhost/engine:cpu .
mkdir -p "$WORK/cache" && chown 10001:10001 "$WORK/cache"  # the image's user owns its cache
"${PODMAN[@]}" run -d --name "$NAME" "${LIMITS[@]}" --network host -e ENGINE_PORT="$PORT" \
  -v "$WORK/cache:/var/cache/engine" localhost/engine:cpu --config cpu
trap '"${PODMAN[@]}" rm -f "$NAME" >/dev/null' EXIT
for _ in $(seq 300); do
  curl -sf "localhost:$PORT/health" >/dev/null && break
  [[ $(podman inspect -f '{{.State.Running}}' "$NAME") == true ]] || { podman logs "$NAME"; exit 1; }
  sleep 2
done
podman exec "$NAME" engine-healthcheck && echo "health check: ok"
curl -s "localhost:$PORT/v1/chat/completions" -H 'Content-Type: application/json' -d \
  '{"model": "smollm2-135m-instruct", "max_tokens": 16, "temperature": 0,
    "messages": [{"role": "user", "content": "What is the capital of France?"}]}'
echo
"${PODMAN[@]}" stop -t 60 "$NAME" >/dev/null
echo "exit code after SIGTERM: $(podman inspect -f '{{.State.ExitCode}}' "$NAME")"
