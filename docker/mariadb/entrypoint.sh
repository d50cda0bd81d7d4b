#!/bin/sh
# First start on an empty /var/lib/mysql: make the system tables, the database and its user from
# MYSQL_* (as the official image does), then run mariadbd in the foreground as PID 1.
set -eu
case "$1" in -*) set -- mariadbd "$@" ;; esac
if [ "$1" = mariadbd ] && [ ! -d /var/lib/mysql/mysql ]; then
  : "${MYSQL_DATABASE:?set MYSQL_DATABASE}" "${MYSQL_USER:?set MYSQL_USER}" "${MYSQL_PASSWORD:?set MYSQL_PASSWORD}"
  mariadb-install-db --datadir=/var/lib/mysql --auth-root-authentication-method=normal --skip-test-db >/dev/null
  sock=/run/mysqld/init.sock
  mariadbd --skip-networking --socket="$sock" &
  pid=$!
  i=0
  until mariadb-admin --socket="$sock" -uroot ping >/dev/null 2>&1; do
    i=$((i + 1)); [ "$i" -lt 120 ] || { echo "FATAL: mariadbd did not start for initialisation" >&2; exit 1; }
    sleep 0.5
  done
  quote() { printf '%s' "$1" | sed "s/\\\\/\\\\\\\\/g; s/'/\\\\'/g"; }
  root=$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')
  mariadb --socket="$sock" -uroot <<SQL
CREATE DATABASE IF NOT EXISTS \`$MYSQL_DATABASE\` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci;
CREATE USER '$(quote "$MYSQL_USER")'@'%' IDENTIFIED BY '$(quote "$MYSQL_PASSWORD")';
GRANT ALL ON \`$MYSQL_DATABASE\`.* TO '$(quote "$MYSQL_USER")'@'%';
ALTER USER 'root'@'localhost' IDENTIFIED BY '$root';
FLUSH PRIVILEGES;
SQL
  kill "$pid"
  wait "$pid" || true
  echo "initialised: database $MYSQL_DATABASE, user $MYSQL_USER (root: a random password)"
fi
exec "$@"
