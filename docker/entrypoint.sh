#!/bin/sh
# Entry point of the engine images: `engine serve` on all interfaces, on $ENGINE_PORT
# (default 30000, also what the image's health check asks), with the container's
# arguments appended (a model path, --config, engine options; later flags win).
set -e
# Ascend images: CANN's libraries and environment come from its set_env.sh.
for f in /usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/nnal/atb/set_env.sh; do
    if [ -f "$f" ]; then . "$f"; fi
done
exec engine serve --host "${ENGINE_HOST:-0.0.0.0}" --port "${ENGINE_PORT:-30000}" "$@"
