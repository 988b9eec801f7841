#!/usr/bin/env bash
# The conformance run, host side: turns iscsi-test-cu's CUnit XML into per-test results, prints
# the summary and a table of differences against the recorded baselines, and (for our daemon)
# applies the CI gate.
#
# Usage: tests/vm/conformance/report.sh --daemon kernel|tcmu-runner|warden RESULTS_DIR [--update]
#   RESULTS_DIR  the VM's results folder (holds conformance.xml, written by guest/conformance.sh)
#   --update     record this run as the daemon's baseline (baseline-fileio.txt,
#                baseline-tcmu-runner.txt, or expected-warden.txt with its pass count)
#
# Files in this folder (one test a line, `PASS Suite.Test` or `FAIL Suite.Test`, sorted):
#   baseline-fileio.txt       the kernel's own fileio backstore on the same kernel
#   baseline-tcmu-runner.txt  tcmu-runner 1.5.4 with its qcow handler
#   expected-warden.txt       tcmu-warden's file handler; its first line `# min-pass: N` is the
#                             figure CI holds us to
#   flaky.txt                 tests whose outcome depends on timing in the kernel's iSCSI target
#                             (`Suite.Test  reason`): they never fail the gate, and --update
#                             leaves them out of min-pass
#
# Writes RESULTS_DIR/tests.txt (this run, same format, with the failed assertion after `--`).
# Prints `PASS conformance/<check>` / `FAIL conformance/<check>: reason` lines (the VM harness
# counts them), then `conformance: <daemon> N passed of M`.
# Gate (warden only): fails if fewer than min-pass tests pass, or if any test listed PASS in
# expected-warden.txt (and not in flaky.txt) fails.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
daemon=""
res=""
update=0
while (( $# )); do
    case $1 in
        --daemon) daemon=${2:?}; shift 2 ;;
        --daemon=*) daemon=${1#*=}; shift ;;
        --update) update=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) res=$1; shift ;;
    esac
done
[[ -n $daemon && -n $res ]] || { echo "usage: report.sh --daemon D RESULTS_DIR [--update]" >&2; exit 2; }

case $daemon in
    kernel) own=$here/baseline-fileio.txt; label=fileio ;;
    tcmu-runner) own=$here/baseline-tcmu-runner.txt; label=tcmu-runner ;;
    warden) own=$here/expected-warden.txt; label=warden ;;
    *) echo "report.sh: unknown daemon $daemon" >&2; exit 2 ;;
esac

xml=$res/conformance.xml
out=$res/tests.txt
if [[ ! -s $xml ]]; then
    echo "FAIL conformance/results: no $xml"
    exit 1
fi

# CUnit's automated XML: per suite a SUITE_NAME, then per test one CUNIT_RUN_TEST_SUCCESS record,
# or one CUNIT_RUN_TEST_FAILURE record per failed assertion (with FILE_NAME, LINE_NUMBER and
# CONDITION). A suite whose set-up failed has a CUNIT_RUN_SUITE_FAILURE and no test records.
parse() {
    awk '
        function val(s) { sub(/^[^>]*>[ \t]*/, "", s); sub(/[ \t]*<.*$/, "", s); return s }
        /<SUITE_NAME>/ { suite = val($0) }
        /<CUNIT_RUN_TEST_SUCCESS>/ { state = "PASS"; next }
        /<CUNIT_RUN_TEST_FAILURE>/ { state = "FAIL"; file = ""; line = ""; next }
        /<TEST_NAME>/ {
            t = suite "." val($0)
            if (state == "PASS") { if (!(t in res)) res[t] = "PASS" }
            else { res[t] = "FAIL"; cur = t }
            next
        }
        /<FILE_NAME>/ { file = val($0) }
        /<LINE_NUMBER>/ { line = val($0) }
        /<CONDITION>/ {
            if (!(cur in why)) why[cur] = file ":" line " " val($0)
        }
        END {
            for (t in res) {
                if (res[t] == "FAIL") print "FAIL " t " -- " why[t]
                else print "PASS " t
            }
        }
    ' "$xml" | sort -k2,2
}
parse > "$out"

# status FILE: "Suite.Test PASS|FAIL" lines from a results or baseline file.
status() { [[ -f $1 ]] && awk '$1 == "PASS" || $1 == "FAIL" { print $2, $1 }' "$1" | sort; }

total=$(wc -l < "$out")
passed=$(grep -c '^PASS ' "$out" || true)

# Known flaky tests (first word of each line of flaky.txt).
declare -A FLAKY=()
if [[ -f $here/flaky.txt ]]; then
    while read -r t _; do
        [[ -n $t && $t != \#* ]] && FLAKY[$t]=1
    done < "$here/flaky.txt"
fi

if (( update )); then
    flaky_passed=0
    while read -r s t _; do
        [[ $s == PASS && -n ${FLAKY[$t]:-} ]] && flaky_passed=$((flaky_passed + 1))
    done < "$out"
    {
        if [[ $daemon == warden ]]; then echo "# min-pass: $((passed - flaky_passed))"; fi
        cut -d' ' -f1,2 "$out"
    } > "$own"
    echo "recorded $label: $passed of $total in $own" >&2
fi

# The table: every test whose result differs between fileio, tcmu-runner and this run.
declare -A F=() T=() W=()
while read -r t s; do F[$t]=$s; done < <(status "$here/baseline-fileio.txt")
while read -r t s; do T[$t]=$s; done < <(status "$here/baseline-tcmu-runner.txt")
while read -r t s; do W[$t]=$s; done < <(status "$out")
declare -A all=()
for t in "${!F[@]}" "${!T[@]}" "${!W[@]}"; do all[$t]=1; done
mark() { case ${1:-} in PASS) echo pass ;; FAIL) echo FAIL ;; *) echo - ;; esac; }
{
    printf '%-44s %-8s %-12s %-8s\n' "test" "fileio" "tcmu-runner" "$label"
    for t in $(printf '%s\n' "${!all[@]}" | sort); do
        f=$(mark "${F[$t]:-}"); r=$(mark "${T[$t]:-}"); w=$(mark "${W[$t]:-}")
        [[ $f == "$r" && $r == "$w" ]] && continue
        printf '%-44s %-8s %-12s %-8s\n' "$t" "$f" "$r" "$w"
    done
} > "$res/diff-table.txt"
echo "---- conformance: tests whose results differ (fileio / tcmu-runner / $label) ----" >&2
cat "$res/diff-table.txt" >&2

count() { if [[ -f $1 ]]; then grep -c "^PASS " "$1" || true; else echo 0; fi; }
union=0
for t in "${!all[@]}"; do
    [[ ${F[$t]:-} == PASS || ${T[$t]:-} == PASS ]] && union=$((union + 1))
done
echo "conformance: baselines: fileio $(count "$here/baseline-fileio.txt"), tcmu-runner $(count "$here/baseline-tcmu-runner.txt"), either $union" >&2
echo "conformance: $label $passed passed of $total"

ok=0
# A run of a subset (VM_CONF_TESTS) is for debugging: no completeness check, no gate.
selection=$(sed -n 's/^VM_CONF_TESTS=//p' "$res/params.env" 2>/dev/null | head -n1)
if [[ -n $selection && $selection != ALL ]]; then
    echo "conformance: only the tests matching $selection ran: no gate" >&2
    echo "PASS conformance/complete ($total tests of the selection $selection)"
    exit 0
fi
if (( total < 200 )); then
    echo "FAIL conformance/complete: only $total test results (want all 230)"
    ok=1
else
    echo "PASS conformance/complete"
fi
if [[ $daemon == warden ]]; then
    min=$(sed -n 's/^# min-pass: *\([0-9]*\).*/\1/p' "$own" | head -n1)
    min=${min:-0}
    if (( passed < min )); then
        echo "FAIL conformance/pass-count: $passed passed, the recorded figure is $min"
        ok=1
    else
        echo "PASS conformance/pass-count ($passed >= $min)"
    fi
    regressed=()
    while read -r t s; do
        [[ $s == PASS && ${W[$t]:-} != PASS && -z ${FLAKY[$t]:-} ]] && regressed+=("$t")
    done < <(status "$own")
    if (( ${#regressed[@]} )); then
        echo "FAIL conformance/expected: ${#regressed[@]} expected test(s) failed: ${regressed[*]}"
        ok=1
    else
        echo "PASS conformance/expected"
    fi
fi
exit $ok
