#!/usr/bin/env bash
# Prints the per-test results table of docs/conformance.md from the recorded results
# (baseline-fileio.txt, baseline-tcmu-runner.txt, expected-warden.txt in this folder), or with
# --update-doc FILE, replaces the text between FILE's `<!-- table:begin -->` and
# `<!-- table:end -->` lines with it.
#
# Usage: tests/vm/conformance/table.sh [--update-doc docs/conformance.md]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
doc=""
case ${1:-} in
    --update-doc) doc=${2:?--update-doc needs a file} ;;
    "") ;;
    *) echo "usage: table.sh [--update-doc FILE]" >&2; exit 2 ;;
esac

declare -A F=() T=() W=() all=()
load() { # load ARRAY FILE
    local -n arr=$1
    local s t
    while read -r s t _; do
        [[ $s == PASS || $s == FAIL ]] || continue
        arr[$t]=$s
        all[$t]=1
    done < "$2"
}
load F "$here/baseline-fileio.txt"
load T "$here/baseline-tcmu-runner.txt"
load W "$here/expected-warden.txt"

cell() { case ${1:-} in PASS) echo pass ;; FAIL) echo "**fail**" ;; *) echo "–" ;; esac; }
count() { local -n arr=$1; local n=0 t; for t in "${!arr[@]}"; do [[ ${arr[$t]} == PASS ]] && n=$((n + 1)); done; echo $n; }

table() {
    local t union=0 both_fail=0
    for t in "${!all[@]}"; do
        [[ ${F[$t]:-} == PASS || ${T[$t]:-} == PASS ]] && union=$((union + 1))
    done
    echo "| | fileio | tcmu-runner | tcmu-warden |"
    echo "|---|---|---|---|"
    echo "| **passed (of ${#all[@]})** | **$(count F)** | **$(count T)** | **$(count W)** |"
    echo "| passed by fileio or tcmu-runner | $union | | |"
    echo
    echo "| test | fileio | tcmu-runner | tcmu-warden |"
    echo "|---|---|---|---|"
    while read -r t; do
        echo "| $t | $(cell "${F[$t]:-}") | $(cell "${T[$t]:-}") | $(cell "${W[$t]:-}") |"
    done < <(printf '%s\n' "${!all[@]}" | sort)
}

if [[ -z $doc ]]; then
    table
    exit 0
fi
grep -q '^<!-- table:begin -->$' "$doc" && grep -q '^<!-- table:end -->$' "$doc" ||
    { echo "table.sh: $doc has no table markers" >&2; exit 1; }
tmp=$(mktemp)
table > "$tmp"
awk -v tf="$tmp" '
    /^<!-- table:begin -->$/ { print; while ((getline l < tf) > 0) print l; skip = 1; next }
    /^<!-- table:end -->$/ { skip = 0 }
    !skip { print }
' "$doc" > "$doc.new"
mv "$doc.new" "$doc"
rm -f "$tmp"
echo "table.sh: updated $doc" >&2
