#!/bin/sh
# Fuzzing with libFuzzer (clang). Every test/fuzz/fuzz_<name>.c target is
# built against the library compiled with -fsanitize=fuzzer-no-link,address,
# undefined into build-fuzz/.
#   fuzz.sh replay   run every corpus input (test/fuzz/corpus/<name>/) once
#   fuzz.sh run      fuzz each target for $FUZZ_SECONDS (default 60), new
#                    inputs land in build-fuzz/corpus/<name>, crashes in
#                    build-fuzz/crashes/ (add them to the corpus to keep them)
set -e
cd "$(dirname "$0")/.."
mode=${1:-replay}
make --no-print-directory -s BUILD=build-fuzz FUZZ=1 CC=clang build-fuzz/libmh.a
LIBS="$(pkg-config --libs libuv libpq jansson msgpack libcurl libcrypto) -lmbedtls -lmbedx509 -lmbedcrypto -lpthread -lm"
CFL="-std=c11 -D_GNU_SOURCE -g -O1 -Iinclude -I/usr/share/include/llhttp $(pkg-config --cflags libuv libpq jansson msgpack)"
total=0
for src in test/fuzz/fuzz_*.c; do
  [ -e "$src" ] || continue
  name=$(basename "$src" .c); name=${name#fuzz_}
  bin=build-fuzz/fuzz_$name
  clang $CFL -fsanitize=fuzzer,address,undefined -o "$bin" "$src" build-fuzz/libmh.a $LIBS
  corpus=test/fuzz/corpus/$name
  mkdir -p "$corpus"
  if [ "$mode" = replay ]; then
    n=$(find "$corpus" -type f | wc -l)
    if [ "$n" -gt 0 ]; then
      find "$corpus" -type f -print0 | xargs -0 "$bin" -runs=1 >build-fuzz/replay_$name.log 2>&1 || {
        cat build-fuzz/replay_$name.log; echo "fuzz replay: $name FAILED"; exit 1; }
    fi
    echo "fuzz replay: $name: $n inputs ok"
    total=$((total + n))
  else
    mkdir -p build-fuzz/corpus/$name build-fuzz/crashes
    "$bin" -max_total_time="${FUZZ_SECONDS:-60}" -print_final_stats=1 -artifact_prefix=build-fuzz/crashes/${name}- \
      build-fuzz/corpus/$name "$corpus" 2>&1 | grep -E "stat::|cov:|ERROR|SUMMARY" | tail -6
  fi
done
[ "$mode" = replay ] && echo "fuzz replay: $total inputs, all targets ok"
exit 0
