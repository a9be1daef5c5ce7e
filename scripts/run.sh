#!/bin/sh
# make run: a throwaway PostgreSQL under var/pg, the fs store under
# var/store, the server on 127.0.0.1:1337 in development mode (unsigned
# requests act as the admin identity $MUSEHUB_DEV_IDENTITY, default "dev").
# Ctrl-C stops the server and PostgreSQL and leaves no process behind.
set -e
cd "$(dirname "$0")/.."
mkdir -p var
URL=$(/usr/bin/python3 scripts/pgtmp.py start var/pg)
echo "run: PostgreSQL at $URL (data in var/pg)"
cleanup() {
  trap - INT TERM EXIT
  if [ -n "$SERVER" ] && kill -0 "$SERVER" 2>/dev/null; then
    kill -TERM "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
  fi
  /usr/bin/python3 scripts/pgtmp.py stop var/pg >/dev/null 2>&1 || true
  echo "run: stopped"
}
trap cleanup INT TERM EXIT
MUSEHUB_DATABASE_URL="$URL" \
MUSEHUB_STORE="${MUSEHUB_STORE:-fs:$PWD/var/store}" \
MUSEHUB_LISTEN="${MUSEHUB_LISTEN:-127.0.0.1:1337}" \
MUSEHUB_DEV_IDENTITY="${MUSEHUB_DEV_IDENTITY-dev}" \
  build/musehubd serve &
SERVER=$!
wait "$SERVER" || true
