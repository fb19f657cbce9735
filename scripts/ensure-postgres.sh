#!/usr/bin/env bash
# Make sure the machine's PostgreSQL is up; print its URL for the tests if it is reachable.
# Prints nothing when there is none: the tests then start a throwaway server from the
# installed binaries (initdb, pg_ctl), or skip PostgreSQL loudly (fail under
# EXECUTUS_CKPT_REQUIRE_PG=1).
set -u
host=127.0.0.1 port=${PGPORT:-5432}
url="postgresql+asyncpg://postgres@${host}:${port}/postgres"
ready() { pg_isready -q -h "$host" -p "$port" -t 3 >/dev/null 2>&1; }
if command -v pg_isready >/dev/null 2>&1 && ! ready; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    for v in $(ls /etc/postgresql); do
      pg_ctlcluster --skip-systemctl-redirect "$v" main start >&2 2>/dev/null || true
    done
    for _ in $(seq 1 30); do ready && break; sleep 1; done
  fi
fi
if command -v psql >/dev/null 2>&1 && \
   PGCONNECT_TIMEOUT=5 psql -w -h "$host" -p "$port" -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
  echo "$url"
fi
