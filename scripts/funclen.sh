#!/bin/sh
# Lists the C functions under src/ longer than N lines (default 150),
# longest first: "<lines> <file>:<first line> <name>". Exits 1 when any
# is listed. Uses Universal Ctags (package universal-ctags), which gives
# each function's first and last line. docs/architecture.md, "Code shape".
#   sh scripts/funclen.sh        # the rule: no function over 150 lines
#   sh scripts/funclen.sh 80     # a lower bar, to find the next ones
set -e
max=${1:-150}
cd "$(dirname "$0")/.."
ctags --fields=+ne --c-kinds=f -o - $(find src -name '*.c' | sort) | awk -F'\t' -v max="$max" '
{
    line = ""; end = ""
    for (i = 4; i <= NF; i++) {
        if ($i ~ /^line:/) line = substr($i, 6)
        if ($i ~ /^end:/) end = substr($i, 5)
    }
    if (line != "" && end != "" && end - line + 1 > max) printf "%5d %s:%s %s\n", end - line + 1, $2, line, $1
}' | sort -rn > "${TMPDIR:-/tmp}/funclen.$$"
n=$(wc -l < "${TMPDIR:-/tmp}/funclen.$$")
cat "${TMPDIR:-/tmp}/funclen.$$"
rm -f "${TMPDIR:-/tmp}/funclen.$$"
echo "$n functions over $max lines"
[ "$n" -eq 0 ]
