#!/bin/sh
# Installs the packages the project needs (idempotent: only what is
# missing, one apt-get update at most).
#
#   deps.sh            Debian packages to build, run and test (make deps, make run)
#   deps.sh --bench    also the peers and tools of scripts/bench.py (make bench)
#   deps.sh --s3emu-only
#                      only the S3 emulator from npm, for the tests that use it
#                      (make test, make e2e-s3, make unit); `make run` never
#                      installs it and works without npm or its registry.
set -e
if [ "${1:-}" != "--s3emu-only" ]; then
  # --bench (make bench): git, fcgiwrap (git smart HTTP via git-http-backend
  # behind nginx, and a fixed body to compare with), wrk (load), hyperfine,
  # valgrind (callgrind profiles). make test never needs them.
  BENCH_PKGS=""
  [ "${1:-}" = "--bench" ] && BENCH_PKGS="git fcgiwrap wrk hyperfine valgrind"
  # nginx: test/e2e/test_nginx.py runs docs/nginx.conf in front of the server.
  # python3-prometheus-client: test/e2e/test_ops.py parses /metrics with it.
  # python3-zstandard: the clients (scripts/muse) read and write mpack v2
  # (and test/unit/mpack_xcheck.py cross-checks the C reader with it).
  # systemd: systemd-analyze verifies the installed unit (test_ops.py); nothing is started.
  # universal-ctags: scripts/funclen.sh (function lengths); clang-format: the
  # pinned .clang-format.
  PKGS="$BENCH_PKGS build-essential pkg-config libuv1-dev node-llhttp libpq-dev libmbedtls-dev libcurl4-openssl-dev
libmsgpack-dev libjansson-dev libssl-dev libzstd-dev postgresql postgresql-client clang libclang-rt-14-dev
python3 python3-pytest python3-httpx python3-msgpack python3-zstandard python3-cryptography python3-boto3 python3-prometheus-client
git curl nginx systemd universal-ctags clang-format"
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
  exit 0
fi

# The S3 emulator for the s3 store tests (scripts/s3emu.js): npm package
# @20minutes/s3rver@5.0.0, pinned by third_party/s3emu/package-lock.json,
# installed into third_party/s3emu/node_modules (not committed). Skipped
# when present. Without node/npm, or when the registry cannot be reached,
# the s3 tests skip themselves (saying why) and everything else runs.
S3EMU_DIR="$(dirname "$0")/../third_party/s3emu"
if [ ! -f "$S3EMU_DIR/node_modules/@20minutes/s3rver/package.json" ]; then
  if command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1; then
    echo "deps: installing the S3 emulator (npm @20minutes/s3rver@5.0.0) into third_party/s3emu"
    npm ci --prefix "$S3EMU_DIR" --no-audit --no-fund --loglevel=error >/dev/null ||
      echo "deps: npm could not install the S3 emulator: the s3 store tests will be skipped"
  else
    echo "deps: node/npm not found: the s3 store tests will be skipped"
  fi
fi
exit 0
