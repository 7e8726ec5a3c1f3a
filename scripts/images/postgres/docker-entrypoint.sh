#!/usr/bin/env bash
# Entrypoint of the PostgreSQL image scripts/docker makes (see Dockerfile):
# as root, hands $PGDATA to the postgres user and runs itself again as it;
# on the first start makes the cluster (initdb with POSTGRES_USER's
# password, scram-sha-256 for TCP unless POSTGRES_INITDB_ARGS says
# otherwise), creates POSTGRES_DB, runs /docker-entrypoint-initdb.d/*.sql
# and *.sh against a server that listens on the unix socket only, stops it;
# then execs the command (postgres, listening on all addresses).
set -Eeuo pipefail

say() { printf 'docker-entrypoint: %s\n' "$*" >&2; }

# `docker run image -c x=y` means `postgres -c x=y`.
if [ "${1:0:1}" = - ]; then
  set -- postgres "$@"
fi

if [ "$1" = postgres ] && [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA"
  chown postgres:postgres "$PGDATA"
  chmod 700 "$PGDATA"
  exec setpriv --reuid=postgres --regid=postgres --init-groups "${BASH_SOURCE[0]}" "$@"
fi

if [ "$1" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    say "POSTGRES_PASSWORD is not set: set it to the superuser's password (docker run -e POSTGRES_PASSWORD=...)"
    exit 1
  fi
  user=${POSTGRES_USER:-postgres}
  db=${POSTGRES_DB:-$user}
  say "initializing $PGDATA (superuser $user, database $db)"
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
  # shellcheck disable=SC2086 # POSTGRES_INITDB_ARGS is a list of options
  initdb --username="$user" --pwfile="$pwfile" --auth-host=scram-sha-256 \
    ${POSTGRES_INITDB_ARGS:-} -D "$PGDATA" >/dev/null
  rm -f "$pwfile"
  printf "\nlisten_addresses = '*'\n" >>"$PGDATA/postgresql.conf"
  printf 'host all all all scram-sha-256\n' >>"$PGDATA/pg_hba.conf"

  pg_ctl -D "$PGDATA" -w -o "-c listen_addresses='' -c unix_socket_directories=/var/run/postgresql" start >/dev/null
  export PGHOST=/var/run/postgresql PGUSER=$user PGPASSWORD=$POSTGRES_PASSWORD
  if [ "$db" != postgres ]; then
    psql -v ON_ERROR_STOP=1 --dbname postgres --set db="$db" -q <<<'CREATE DATABASE :"db";'
  fi
  for f in /docker-entrypoint-initdb.d/*; do
    case "$f" in
      *.sql) say "running $f"; psql -v ON_ERROR_STOP=1 --dbname "$db" -q -f "$f" ;;
      *.sh)
        say "running $f"
        if [ -x "$f" ]; then "$f"; else
          # shellcheck disable=SC1090 # the user's script
          . "$f"
        fi
        ;;
      *) [ ! -e "$f" ] || say "ignoring $f" ;;
    esac
  done
  unset PGPASSWORD
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  say "initialized; starting PostgreSQL"
fi

exec "$@"
