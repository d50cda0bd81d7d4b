#!/usr/bin/env bash
# The Docker engine for `make test-docker`: install Debian's docker.io, docker-compose and
# debootstrap when they are missing (as root), start dockerd when no daemon answers, and wait
# for it. Bounded waits; when it cannot, one line starting with FATAL and a non-zero exit.
set -euo pipefail

fatal() { echo "FATAL: $*" >&2; exit 1; }

if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null || ! command -v debootstrap >/dev/null; then
  [ "$(id -u)" = 0 ] || fatal "docker.io, docker-compose and debootstrap are missing and installing them needs root"
  echo "installing docker.io docker-compose debootstrap (apt-get)"
  timeout 600 apt-get update -q >/dev/null || fatal "apt-get update failed (no package mirror reachable?)"
  DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q docker.io docker-compose debootstrap >/dev/null \
    || fatal "apt-get install docker.io docker-compose debootstrap failed"
fi

if timeout 20 docker info >/dev/null 2>&1; then
  exit 0
fi
[ "$(id -u)" = 0 ] || fatal "no Docker daemon answers and starting dockerd needs root"
log=/var/log/dockerd-aifarm.log
echo "starting dockerd (log: $log)"
# Not under this shell's process group: the daemon outlives `make test-docker`, like a system service.
setsid nohup dockerd >"$log" 2>&1 < /dev/null &
for _ in $(seq 1 120); do
  if timeout 5 docker info >/dev/null 2>&1; then exit 0; fi
  sleep 0.5
done
fatal "dockerd did not answer 'docker info' within 60 s (see $log: $(tail -n 1 "$log" 2>/dev/null))"
