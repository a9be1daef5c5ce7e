#!/bin/sh
# Installs every Debian package the project needs (idempotent: only what
# is missing, one apt-get update at most). Used by make run/test/bench.
set -e
PKGS="build-essential pkg-config libuv1-dev node-llhttp libpq-dev libmbedtls-dev libcurl4-openssl-dev
libmsgpack-dev libjansson-dev libssl-dev postgresql postgresql-client clang libclang-rt-14-dev
python3 python3-pytest python3-httpx python3-msgpack python3-cryptography python3-boto3 git curl"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "deps: installing:$missing"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi
