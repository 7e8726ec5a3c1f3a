#!/usr/bin/env bash
# pg_hba.conf for the PostgreSQL container of docker-compose.yml: the same
# rules scripts/services writes for its private cluster, opened to the
# compose network and the published port instead of 127.0.0.1 only.
# Run by the postgres image's entrypoint from /docker-entrypoint-initdb.d on
# the first start (after bootstrap.sql); the server started afterwards reads it.
set -euo pipefail

hba="${PGDATA:?PGDATA is not set}/pg_hba.conf"
{
  printf '# Written by pgoutbox docker-hba.sh. Specific users first (first match wins).\n'
  printf '# TYPE  DATABASE     USER            ADDRESS         METHOD\n'
  printf 'local   all          all                             trust\n'
  printf 'local   replication  all                             trust\n'
  for addr in 0.0.0.0/0 ::/0; do
    for db in all replication; do
      printf 'host    %-12s %-15s %-15s %s\n' "$db" pgoutbox_md5 "$addr" md5
      printf 'host    %-12s %-15s %-15s %s\n' "$db" pgoutbox_clear "$addr" password
      printf 'host    %-12s %-15s %-15s %s\n' "$db" pgoutbox_trust "$addr" trust
    done
  done
  for addr in 0.0.0.0/0 ::/0; do
    for db in all replication; do
      printf 'host    %-12s %-15s %-15s %s\n' "$db" all "$addr" scram-sha-256
    done
  done
} >"$hba"
