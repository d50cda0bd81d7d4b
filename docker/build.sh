#!/usr/bin/env bash
# make test-docker's images, from the repository's Dockerfile unchanged, on a machine where
# registry images cannot be pulled and PyTorch's index cannot be reached:
#   1. the local base image (docker/base-image.sh: debootstrap; skipped when it is there already)
#   2. the stand-ins for mysql:8.0 and redis:7 (docker/mariadb, docker/redis) from that base
#   3. aifarm-server:worker and aifarm-server:web with BASE_IMAGE=that base, and torch from the
#      wheel directory pip's configuration names (TORCH_WHEELS overrides), served on 127.0.0.1 to
#      `docker build --network host` as PIP_FIND_LINKS; no wheel there: PyTorch's CPU index.
# One line starting with FATAL and a non-zero exit when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."

export BASE_IMAGE=${BASE_IMAGE:-aifarm-local/debian-python:bookworm}
PYTHON=${PYTHON:-.venv/bin/python}
fatal() { echo "FATAL: $*" >&2; exit 1; }

docker/base-image.sh

build() {  # what, docker build arguments...
  local what=$1; shift
  local log
  log=$(mktemp /tmp/aifarm-build.XXXXXX)
  echo "building $what"
  if ! DOCKER_BUILDKIT=0 timeout 1800 docker build --network host --build-arg BASE_IMAGE="$BASE_IMAGE" "$@" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    fatal "docker build of $what failed (last lines above; whole log: $log)"
  fi
  rm -f "$log"
}

build aifarm-local/mariadb:bookworm -t aifarm-local/mariadb:bookworm docker/mariadb
build aifarm-local/redis:bookworm -t aifarm-local/redis:bookworm docker/redis

wheels=${TORCH_WHEELS:-$("$PYTHON" -m pip config get global.find-links 2>/dev/null | awk '{print $1}' || true)}
torch_args=()
server=""
if [ -n "$wheels" ] && compgen -G "$wheels/torch-*.whl" >/dev/null; then
  # A fixed port when it is free: the URL is a build argument, part of the torch layer's cache key.
  port=$("$PYTHON" -c 'import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", 38765))
except OSError:
    s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
  "$PYTHON" -m http.server "$port" --bind 127.0.0.1 --directory "$wheels" >/dev/null 2>&1 &
  server=$!
  trap 'kill "$server" 2>/dev/null || true' EXIT
  for _ in $(seq 1 40); do
    "$PYTHON" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/', timeout=1)" 2>/dev/null && break
    sleep 0.25
  done
  echo "torch from $wheels (served on 127.0.0.1:$port)"
  torch_args=(--build-arg TORCH_INDEX_URL= --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$port/")
fi
build aifarm-server:worker --target worker -t aifarm-server:worker "${torch_args[@]}" .
build aifarm-server:web --target web -t aifarm-server:web "${torch_args[@]}" .
