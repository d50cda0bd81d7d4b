#!/bin/sh
# redis-server without a config file listens on every interface of the container; protected mode
# (on by default without a config file) would refuse the other containers.
set -eu
if [ "$1" = redis-server ]; then
  shift
  exec redis-server --protected-mode no --dir /data "$@"
fi
exec "$@"
