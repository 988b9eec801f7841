# shellcheck shell=bash
# The VM suite's jail group (warden mode only). Sourced by guest/suite.sh, which calls jail_main
# first (it needs no LIO device); it uses suite.sh's helpers (pass, fail, say) and R.
#
# It runs the jail's integration tests on the guest's kernel (Debian's 6.1, landlock ABI 2):
#   tests/tests/escape.rs       a hostile worker started by the real supervisor tries to escape,
#                               one attempt per worker, each one asserted to fail the way the
#                               policy says it must on this kernel
#   tests/tests/jail_runtime.rs the real worker runtime serves ram and file devices under both
#                               jail stages (no system call it needs is missing from a list)
# The host builds the test binaries (run.sh, `cargo test --no-run`) and names them in
# VM_JAIL_TESTS as `<test target>=<absolute path>` words; the guest sees them (and the
# hostile-worker and jailed-runtime executables compiled into them as absolute paths) through
# the shared host root.
#
# Before the tests: the loopback interface comes up (the TCP attempts connect to listeners on
# 127.0.0.1; the guest has no other network), and the kernel's printk rate limit is lifted
# (kernel.printk_ratelimit=0), so the audit record of every seccomp kill reaches the kernel log
# instead of 10 per 5 s: the escape tests assert the system call the supervisor names whenever it
# has one, so more names make the assertions stronger, never weaker.
#
# Each libtest test runs on its own (`--exact NAME --nocapture --test-threads=1`, bounded by
# JAIL_TEST_TIMEOUT) and is reported as `jail/<target>/<test>`: PASS when libtest says it
# passed, FAIL with the panic message otherwise, and FAIL as well when the test printed that it
# skipped itself (a skip proves nothing about this kernel). Results:
#   jail/<target>.<test>.out   the test's stdout (libtest's lines and the printed tables)
#   jail/<target>.<test>.log   its stderr (the supervisor's and workers' logs)
#   jail-tables.md             every table the escape suite printed, in run order, with a column
#                              added: the kernel's audit record (type=1326) of the worker's pid,
#                              `syscall=NR (name) sig=S`; it names the call of a seccomp kill
#                              even when the supervisor could not (the record can reach the
#                              kernel log after the supervisor has reaped the worker)
#   jail/dmesg.txt             the kernel log after the last test

JAIL_TEST_TIMEOUT=${VM_JAIL_TEST_TIMEOUT:-900}
# System call numbers, for naming the audit records (the host's kernel headers, x86_64).
JAIL_UNISTD=/usr/include/x86_64-linux-gnu/asm/unistd_64.h

# jail_reason OUT LOG: the first line after libtest's "panicked at" (the assertion's message),
# or a fallback.
jail_reason() {
    local msg
    msg=$(cat "$1" "$2" 2>/dev/null | sed -n '/panicked at/{n;p;q}')
    [[ -n $msg ]] || msg=$(grep -m1 -E 'panicked at|error:' "$1" "$2" 2>/dev/null)
    printf '%s' "${msg:-see the log of the test}"
}

# jail_run_test TARGET BIN TEST: run one test and report it.
jail_run_test() {
    local target=$1 bin=$2 test=$3 check="jail/$1/$3"
    local out=$R/jail/$target.$test.out log=$R/jail/$target.$test.log
    local t0=$SECONDS rc skipped
    say "running $check"
    (cd "$VM_REPO/tests" &&
        RUST_LOG=${VM_RUST_LOG:-info} NO_COLOR=1 timeout "$JAIL_TEST_TIMEOUT" \
            "$bin" --exact "$test" --nocapture --test-threads=1) > "$out" 2> "$log"
    rc=$?
    local dt=$((SECONDS - t0))
    # The tests say `...; skipping` (on stderr) when the machine cannot run them.
    skipped=$(cat "$log" "$out" 2>/dev/null | grep -m1 -E '; skipping$')
    if (( rc == 124 )); then
        fail "$check" "timed out after ${JAIL_TEST_TIMEOUT}s"
    elif (( rc != 0 )); then
        fail "$check" "$(jail_reason "$out" "$log") (exit status $rc)"
    elif ! grep -q '^test result: ok\. 1 passed' "$out"; then
        fail "$check" "libtest did not report one passed test (see jail/$target.$test.out)"
    elif [[ -n $skipped ]]; then
        fail "$check" "the test skipped itself: $skipped"
    else
        pass "$check" "${dt}s"
    fi
}

# jail_tables TARGET TEST: append the tables of one test's output to jail-tables.md, each row
# joined with the audit record of its worker pid.
jail_tables() {
    local out=$R/jail/$1.$2.out unistd=$JAIL_UNISTD
    [[ -r $unistd ]] || unistd=/dev/null
    dmesg > "$R/jail/dmesg.txt" 2>&1
    awk -v t="$1/$2" '
        FILENAME == ARGV[1] {                # the syscall table: #define __NR_name nr
            if ($1 == "#define" && $2 ~ /^__NR_/) name[$3] = substr($2, 6)
            next
        }
        FILENAME == ARGV[2] {                # the kernel log: audit records of seccomp actions
            if ($0 !~ /type=1326/) next
            pid = ""; nr = ""; sig = ""
            for (i = 1; i <= NF; i++) {
                if ($i ~ /^pid=/) pid = substr($i, 5)
                if ($i ~ /^syscall=/) nr = substr($i, 9)
                if ($i ~ /^sig=/) sig = substr($i, 5)
            }
            if (pid != "") rec[pid] = "syscall=" nr " (" ((nr in name) ? name[nr] : "?") ") sig=" sig
            next
        }
        /^\| attempt \| outcome \| worker pid \|$/ {
            printf "\n### %s: %s\n\n", t, prev
            print "| attempt | outcome | worker pid | kernel audit record |"
            next
        }
        /^\|---/ { print "|---|---|---|---|"; next }
        /^\|/ {
            n = split($0, f, "|")
            pid = f[n - 1]; gsub(/ /, "", pid)
            print $0 " " ((pid in rec) ? rec[pid] : "none") " |"
        }
        { prev = $0 }
    ' "$unistd" "$R/jail/dmesg.txt" "$out" >> "$R/jail-tables.md"
}

jail_main() {
    local entry target bin test
    local -a tests
    mkdir -p "$R/jail"
    : > "$R/jail-tables.md"
    ip link set lo up || say "cannot bring the loopback interface up"
    echo 0 > /proc/sys/kernel/printk_ratelimit || say "cannot lift the printk rate limit"
    if [[ -z ${VM_JAIL_TESTS:-} ]]; then
        fail jail/setup "no test binaries named (VM_JAIL_TESTS is empty)"
        return
    fi
    say "jail group: landlock and seccomp on kernel $(uname -r)"
    for entry in $VM_JAIL_TESTS; do
        target=${entry%%=*}
        bin=${entry#*=}
        if [[ ! -x $bin ]]; then
            fail "jail/$target" "test binary $bin is not visible in the guest"
            continue
        fi
        mapfile -t tests < <("$bin" --list 2>/dev/null | sed -n 's/: test$//p')
        if (( ${#tests[@]} == 0 )); then
            fail "jail/$target" "$bin --list names no test"
            continue
        fi
        for test in "${tests[@]}"; do
            jail_run_test "$target" "$bin" "$test"
            jail_tables "$target" "$test"
        done
    done
}
