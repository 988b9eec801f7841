# shellcheck shell=bash
# What the guest-side runners (suite.sh, conformance.sh) share: the PASS/FAIL bookkeeping of
# results.txt, the per-check logs, polling with a deadline and readable configfs writes.
#
# Sourced, never run. The sourcing script sets RESULTS (the results.txt path) and LOGS (the folder
# for logs/<check>.log) and defines say() (its console prefix) before calling anything here.
# Nothing here sleeps for a fixed time to let something happen: waits poll a condition.

declare -A STATUS=()    # check name -> pass | fail

pass() { # pass NAME [NOTE]: NOTE (numbers worth seeing) goes in parentheses after the name
    STATUS[$1]=pass
    printf 'PASS %s%s\n' "$1" "${2:+ ($2)}" >> "$RESULTS"
    say "PASS $1${2:+ ($2)}"
}

fail() { # fail NAME REASON
    local reason=${2//$'\n'/ }
    STATUS[$1]=fail
    printf 'FAIL %s: %s\n' "$1" "${reason:-failed}" >> "$RESULTS"
    say "FAIL $1: ${reason:-failed}"
}

passed() { [[ ${STATUS[$1]:-} == pass ]]; }

# Functions run by `check` explain a failure with a line `why: <reason>` on their output; the last
# such line is the reason reported (otherwise the last line of output). On success, the last line
# `note: <text>` is shown on the PASS line.
why() { echo "why: $*"; }

# check NAME FUNCTION [ARGS...]: run FUNCTION with its output in logs/NAME.log, report PASS/FAIL.
check() {
    local name=$1; shift
    local logf=$LOGS/${name//\//_}.log reason
    say "running $name"
    if "$@" > "$logf" 2>&1; then
        pass "$name" "$(grep '^note: ' "$logf" | tail -n1 | sed 's/^note: //')"
        return 0
    fi
    reason=$(grep '^why: ' "$logf" | tail -n1 | sed 's/^why: //')
    [[ -n $reason ]] || reason=$(grep -v '^[[:space:]]*$' "$logf" | tail -n1)
    fail "$name" "$reason"
    return 1
}

# skip NAME PREREQ: report a check that cannot run because PREREQ failed.
skip() { fail "$1" "not run: $2 failed"; }

# wait_for SECONDS WHAT FUNCTION [ARGS...]: poll FUNCTION until it succeeds (0), gives up (2) or the
# deadline passes.
wait_for() {
    local limit=$1 what=$2; shift 2
    local end=$((SECONDS + limit)) rc
    while :; do
        "$@"; rc=$?
        (( rc == 0 )) && return 0
        (( rc == 2 )) && { why "gave up waiting for $what"; return 1; }
        (( SECONDS >= end )) && { why "timed out after ${limit}s waiting for $what"; return 1; }
        sleep 0.2
    done
}

# bg_wait SECONDS PID: wait for a background process to end within the deadline; its status is
# returned, 124 on timeout (the process is left running).
bg_wait() {
    local end=$((SECONDS + $1)) pid=$2
    while kill -0 "$pid" 2>/dev/null; do
        (( SECONDS >= end )) && return 124
        sleep 0.2
    done
    wait "$pid"
}

write_attr() { # write_attr FILE VALUE: configfs write with a readable error
    printf '%s' "$2" > "$1" || { why "writing '$2' to $1 failed"; return 1; }
}
