#!/bin/sh
# Fuzzing with libFuzzer (clang). Every test/fuzz/fuzz_<name>.c target is
# built against the library compiled with -fsanitize=fuzzer-no-link,address,
# undefined into build-fuzz/.
#   fuzz.sh replay   run every corpus input (test/fuzz/corpus/<name>/) once
#   fuzz.sh run [NAME...]
#                    fuzz each target (or only the named ones) for
#                    $FUZZ_SECONDS (default 60); new inputs land in
#                    build-fuzz/corpus/<name>, crashes in build-fuzz/crashes/
#                    (minimise them with `build-fuzz/fuzz_<name>
#                    -minimize_crash=1 -runs=100000 FILE`, fix, then add them
#                    to test/fuzz/corpus/<name>/ so `make test` replays them).
#                    Each target's full libFuzzer output goes to
#                    build-fuzz/fuzz_<name>.log; one summary line per target
#                    (executions, exec/s, cov: edges, ft: features, corpus
#                    size, new units, peak RSS, result) is printed and kept
#                    in build-fuzz/fuzz_summary.tsv. Exits 1 when any target
#                    crashed, leaked or timed out.
set -e
cd "$(dirname "$0")/.."
mode=${1:-replay}
make --no-print-directory -s BUILD=build-fuzz FUZZ=1 CC=clang build-fuzz/libmh.a
LIBS="$(pkg-config --libs libuv libpq jansson msgpack libcurl libcrypto libzstd) -lmbedtls -lmbedx509 -lmbedcrypto -lpthread -lm"
CFL="-std=c11 -D_GNU_SOURCE -g -O1 -Iinclude -I/usr/share/include/llhttp $(pkg-config --cflags libuv libpq jansson msgpack)"
# summarise NAME LOG RC: one line from libFuzzer's final stats. The last
# "cov:" line is the final pulse (DONE) or the last before a crash;
# stat::* lines come from -print_final_stats=1. Returns 1 on a failure.
summarise() {
  awk -v name="$1" -v rc="$3" -v tsv="$summary" '
    / cov: / { for (i = 1; i <= NF; i++) { if ($i == "cov:") cov = $(i+1); if ($i == "ft:") ft = $(i+1);
                                         if ($i == "corp:") { corp = $(i+1); sub(/\/.*/, "", corp) } } }
    /^stat::number_of_executed_units:/ { execs = $2 }
    /^stat::average_exec_per_sec:/ { eps = $2 }
    /^stat::new_units_added:/ { nu = $2 }
    /^stat::peak_rss_mb:/ { rss = $2 }
    /^==[0-9]+==ERROR: |^SUMMARY: |ERROR: libFuzzer: / { if (!err) err = $0 }
    /Test unit written to / { art = $NF }
    END {
      res = "ok"
      if (rc != 0 || err != "") { res = "FAILED"; if (err != "") res = res ": " err; if (art != "") res = res " -> " art }
      printf "%-10s %10s %8s %6s %7s %7s %5s %7s  %s\n", name, execs, eps, cov, ft, corp, nu, rss, res
      printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", name, execs, eps, cov, ft, corp, nu, rss, res >> tsv
      exit (res == "ok" ? 0 : 1)
    }' "$2"
}
[ $# -gt 0 ] && shift
only="$*"
total=0
failed=0
summary=build-fuzz/fuzz_summary.tsv
if [ "$mode" = run ]; then
  printf 'target\texecs\texec_per_s\tcov\tft\tcorpus\tnew_units\tpeak_rss_mb\tresult\n' >"$summary"
  printf '%-10s %10s %8s %6s %7s %7s %5s %7s  %s\n' target execs exec/s cov ft corpus new rss_mb result
fi
for src in test/fuzz/fuzz_*.c; do
  [ -e "$src" ] || continue
  name=$(basename "$src" .c); name=${name#fuzz_}
  if [ -n "$only" ]; then
    case " $only " in *" $name "*) ;; *) continue ;; esac
  fi
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
    log=build-fuzz/fuzz_$name.log
    # -timeout: one input taking 25 s is a denial-of-service bug too.
    rc=0
    "$bin" -max_total_time="${FUZZ_SECONDS:-60}" -timeout=25 -print_final_stats=1 \
      -artifact_prefix=build-fuzz/crashes/${name}- build-fuzz/corpus/$name "$corpus" >"$log" 2>&1 || rc=$?
    summarise "$name" "$log" "$rc" || failed=1
  fi
done
if [ "$mode" = replay ]; then
  echo "fuzz replay: $total inputs, all targets ok"
  exit 0
fi
echo "fuzz: per-target logs in build-fuzz/fuzz_<name>.log, summary in $summary"
[ "$failed" = 0 ] || { echo "fuzz: at least one target FAILED (inputs in build-fuzz/crashes/)"; exit 1; }
exit 0
