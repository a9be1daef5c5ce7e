#!/bin/sh
# make run: a throwaway PostgreSQL under var/pg, the fs store under
# var/store, the server on 127.0.0.1:1337 in development mode (unsigned
# requests act as the admin identity $MUSEHUB_DEV_IDENTITY, default "dev").
# Ctrl-C stops the server and PostgreSQL and leaves no process behind.
# Exit status: the server's (so a port already in use, or a bad setting,
# fails `make run`); 0 after Ctrl-C. MUSEHUB_RUN_DIR moves var/ elsewhere.
set -e
cd "$(dirname "$0")/.."
VAR="${MUSEHUB_RUN_DIR:-$PWD/var}"
mkdir -p "$VAR"
URL=$(/usr/bin/python3 scripts/pgtmp.py start "$VAR/pg")
echo "run: PostgreSQL at $URL (data in $VAR/pg)"
INTERRUPTED=0
cleanup() {
  trap - INT TERM EXIT
  if [ -n "$SERVER" ] && kill -0 "$SERVER" 2>/dev/null; then
    kill -TERM "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
  fi
  /usr/bin/python3 scripts/pgtmp.py stop "$VAR/pg" >/dev/null 2>&1 || true
  echo "run: stopped"
}
trap 'INTERRUPTED=1; cleanup' INT TERM
trap cleanup EXIT
MUSEHUB_DATABASE_URL="$URL" \
MUSEHUB_STORE="${MUSEHUB_STORE:-fs:$VAR/store}" \
MUSEHUB_LISTEN="${MUSEHUB_LISTEN:-127.0.0.1:1337}" \
MUSEHUB_DEV_IDENTITY="${MUSEHUB_DEV_IDENTITY-dev}" \
  build/musehubd serve &
SERVER=$!
set +e
wait "$SERVER"
STATUS=$?
set -e
if [ "$INTERRUPTED" = 1 ]; then
  exit 0
fi
if [ "$STATUS" -ne 0 ]; then
  echo "run: musehubd exited with status $STATUS" >&2
fi
exit "$STATUS"
