#!/usr/bin/env bash
# The real-kernel VM suite, host side.
#
# Boots Debian's distribution kernel under qemu (TCG) with the host's root shared read-only, runs
# tests/vm/guest/suite.sh inside the guest against LIO + TCMU + tcm_loop, and reports one line per
# check (`PASS <check>` / `FAIL <check>: <reason>`) and the summary line `vm: N passed, M failed`.
# Exits nonzero on any failed check, on a boot failure, or on timeout.
#
# Usage: tests/vm/run.sh [--suite main|conformance|systemd|bench] [--daemon warden|tcmu-runner|kernel] [--no-build]
#                        [--timeout SECONDS] [--update-baseline]
#   --suite main          (default) the checks of guest/suite.sh
#   --suite conformance   libiscsi's iscsi-test-cu (all 230 tests) against one LUN exported
#                         through LIO's iSCSI target on the guest's loopback (guest/conformance.sh);
#                         the host compares the results with conformance/baseline-*.txt and, for
#                         warden, fails below the recorded figure (conformance/report.sh)
#   --suite systemd       (warden only) systemd as the guest's init: the shipped unit
#                         (dist/tcmu-warden.service) runs the daemon, whose supervisor is killed
#                         under fio and restarted by systemd (guest/systemd.sh)
#   --suite bench         the benchmark suite (guest/bench.sh): the same fio jobs against the
#                         kernel's fileio, tcmu-runner's file handler and tcmu-warden's file and
#                         ram, WCE=1 and WCE=0, in alternating rounds; bench/report.py prints the
#                         medians and ratios (--daemon is ignored: every target runs). Not in CI.
#   --update-baseline     (conformance) record this run as the daemon's baseline
#   --daemon warden       (default) our daemon, target/release/tcmu-warden, `file` and `ram` devices
#                         plus one `file` device outside the allowed directory that must be refused
#   --daemon tcmu-runner  Debian's tcmu-runner; its qcow handler serves the `file` device
#   --daemon kernel       no TCMU at all: the kernel's own fileio and rd_mcp backstores (validates
#                         the harness, tcm_loop and the checks themselves)
#   --no-build            do not run `cargo build --release --bins` first (warden mode only builds;
#                         the jail group's test binaries are still built, see VM_JAIL_TESTS)
#   --timeout SECONDS     whole-VM deadline (default 2400; 3600 for the conformance suite, 5400
#                         for the bench)
# Environment: VM_FIO_SIZE (default 64m), VM_RUST_LOG (daemon log filter, default info),
#   VM_MEMORY_MB (default 3072), VM_CPUS (default 2), VM_BIN_DIR (take tcmu-warden and
#   tcmu-warden-worker from there, no build), VM_READY_PATTERN / VM_REFUSE_PATTERN (the daemon log
#   lines the guest waits for, see guest/suite.sh), VM_SUITE (another guest script, for debugging),
#   VM_GROUPS (default "main hotplug luns recovery jail": which check groups run; hotplug, luns,
#   recovery and jail are warden-only), VM_RECOVERY_FIO_SIZE (default 8m: the fio size per disk of one run
#   in the recovery group), VM_JAIL_TESTS (the jail group's test binaries as `<target>=<path>`
#   words; default: built here with `cargo test -p tcmu-warden-tests --test escape --test
#   jail_runtime --no-run`), VM_JAIL_TEST_TIMEOUT (default 900: seconds per jail test),
#   VM_CONF_TESTS (conformance: iscsi-test-cu's --test selection, default ALL), VM_BENCH_*
#   (the bench's rounds, job times, targets, modes, jobs and sizes: see guest/bench.sh and
#   tests/vm/README.md).
# Output: tests/vm/out/<daemon>/ (console.log, results.txt, daemon logs, per-check logs), or
#   tests/vm/out/conformance-<daemon>/ (conformance.xml, tests.txt, diff-table.txt, ...), or
#   tests/vm/out/bench/ (results.json, results.md, fio/*.json, commands.txt, ...).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

daemon=warden
build=1
timeout_s=""
suite=main
update_baseline=0
while (( $# )); do
    case $1 in
        --suite) suite=${2:?--suite needs a value}; shift 2 ;;
        --suite=*) suite=${1#*=}; shift ;;
        --update-baseline) update_baseline=1; shift ;;
        --daemon) daemon=${2:?--daemon needs a value}; shift 2 ;;
        --daemon=*) daemon=${1#*=}; shift ;;
        --no-build) build=0; shift ;;
        --timeout) timeout_s=${2:?--timeout needs a value}; shift 2 ;;
        --timeout=*) timeout_s=${1#*=}; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "run.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done
case $daemon in
    warden|tcmu-runner|kernel) ;;
    *) echo "run.sh: --daemon must be warden, tcmu-runner or kernel" >&2; exit 2 ;;
esac
case $suite in
    main) default_guest=$here/guest/suite.sh; timeout_s=${timeout_s:-2400} ;;
    conformance) default_guest=$here/guest/conformance.sh; timeout_s=${timeout_s:-3600} ;;
    systemd) default_guest=$here/guest/systemd.sh; timeout_s=${timeout_s:-1500}
             [[ $daemon == warden ]] || { echo "run.sh: --suite systemd runs our daemon only" >&2; exit 2; } ;;
    bench) default_guest=$here/guest/bench.sh; timeout_s=${timeout_s:-5400} ;;
    *) echo "run.sh: --suite must be main, conformance, systemd or bench" >&2; exit 2 ;;
esac

groups=${VM_GROUPS:-main hotplug luns recovery jail}
log() { printf 'vm: %s\n' "$*" >&2; }
die() { log "error: $*"; echo "FAIL vm/setup: $*"; echo "vm: 0 passed, 1 failed"; exit 1; }

# Modules for the initramfs, inserted in this order (each after its dependencies).
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci netfs fscache
         9pnet 9pnet_virtio 9p overlay scsi_common scsi_mod crct10dif_common crc-t10dif crc64
         crc64-rocksoft t10-pi sd_mod sg configfs uio target_core_mod target_core_user
         target_core_file tcm_loop crc32c_generic iscsi_target_mod crc16 mbcache jbd2 ext4 loop)

# One VM at a time on this machine (TCG guests are CPU-bound, and runs share tests/vm/out): a
# second run waits for the first instead of colliding with it.
exec 9> "${VM_LOCK:-/tmp/tcmu-warden-vm.lock}"
if ! flock -n 9; then
    log "another VM run holds ${VM_LOCK:-/tmp/tcmu-warden-vm.lock}; waiting for it"
    flock 9
fi

# ---- 1. host packages and the guest kernel ------------------------------------------------------
setup_out=$("$here/setup-host.sh") || die "tests/vm/setup-host.sh failed"
kdir=$(printf '%s\n' "$setup_out" | sed -n 's/^KERNEL_DIR=\([^ ]*\) .*/\1/p' | tail -n1)
kver=$(printf '%s\n' "$setup_out" | sed -n 's/.* KERNEL_VERSION=//p' | tail -n1)
[[ -n $kdir && -n $kver && -f $kdir/vmlinuz ]] || die "no kernel from setup-host.sh"
kmoddir=$(cd "$kdir/modules" && pwd -P)

# ---- 2. our binaries -----------------------------------------------------------------------------
# The daemon serves devices in every group but `jail` (which runs test binaries only).
want_daemon=0
if [[ $daemon == warden ]]; then
    if [[ $suite != main ]]; then
        want_daemon=1
    else
        for g in main hotplug luns recovery; do
            [[ " $groups " == *" $g "* ]] && want_daemon=1
        done
    fi
fi
bindir=""
if (( want_daemon )) && [[ -n ${VM_BIN_DIR:-} ]]; then
    bindir=$(cd "$VM_BIN_DIR" && pwd) || die "VM_BIN_DIR=$VM_BIN_DIR is not a directory"
elif (( want_daemon )); then
    if (( build )); then
        log "cargo build --release --bins"
        (cd "$repo" && cargo build --release --bins) >&2 || die "cargo build --release --bins failed"
    fi
    target_dir=$(cd "$repo" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
                 sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    [[ -n $target_dir ]] || target_dir=$repo/target
    bindir=$target_dir/release
fi
if (( want_daemon )); then
    for b in tcmu-warden tcmu-warden-worker; do
        [[ -x $bindir/$b ]] || die "$bindir/$b is missing (build first, or drop --no-build)"
    done
fi

# The jail group (tests/vm/guest/jail.sh) runs the jail's integration tests in the guest: the
# debug test binaries, found in cargo's JSON messages (the executable of each `test` target).
# They and the helper executables compiled into them (hostile-worker, jailed-runtime: absolute
# paths under the target directory) reach the guest through the shared host root.
jail_tests=""
jail_dir=""
if [[ $daemon == warden && $suite == main && " $groups " == *" jail "* ]]; then
    if [[ -n ${VM_JAIL_TESTS:-} ]]; then
        jail_tests=$VM_JAIL_TESTS
    else
        log "cargo test -p tcmu-warden-tests --test escape --test jail_runtime --no-run"
        json=$(cd "$repo" && cargo test -p tcmu-warden-tests --test escape --test jail_runtime \
                   --no-run --message-format=json) || die "building the jail group's tests failed"
        jail_tests=$(printf '%s\n' "$json" | grep '"reason":"compiler-artifact"' |
                     grep '"kind":\["test"\]' |
                     sed -n 's/.*"target":{[^}]*"name":"\([^"]*\)".*"executable":"\([^"]*\)".*/\1=\2/p' |
                     tr '\n' ' ' || true)
    fi
    for entry in $jail_tests; do
        [[ -x ${entry#*=} ]] || die "jail test binary ${entry#*=} is missing"
        jail_dir=$(dirname "${entry#*=}")
    done
    [[ -n $jail_dir ]] || die "no jail test binaries found"
fi

# The bench's tcmu-runner target: Debian's tcmu-runner loads the upstream example file handler
# from this folder (read-only, shared with the guest through the host root).
bench_runner_dir=""
if [[ $suite == bench && " ${VM_BENCH_TARGETS:-tcmu-runner} " == *" tcmu-runner "* ]]; then
    bench_runner_dir=${VM_BENCH_RUNNER_DIR:-$repo/../shared/bench/tcmu-runner-file}
    [[ -f $bench_runner_dir/handler_file.so ]] ||
        die "no handler_file.so in $bench_runner_dir (set VM_BENCH_RUNNER_DIR, or leave tcmu-runner out of VM_BENCH_TARGETS)"
    bench_runner_dir=$(cd "$bench_runner_dir" && pwd -P)
fi

# ---- 3. initramfs --------------------------------------------------------------------------------
out=$here/out
mkdir -p "$out"
initrd=$out/initrd-$kver.gz
build_initrd() {
    local stage m path dep
    stage=$(mktemp -d "$out/.initrd.XXXXXX")
    # etc/target is LIO's db_root (it must exist when target_core_mod loads); the kernel writes
    # persistent-reservation state to <db_root>/pr from its own threads, whose root is this
    # initramfs, not the guest's chroot: without etc/target/pr, PERSISTENT RESERVE OUT fails.
    mkdir -p "$stage"/{bin,sbin,mods,proc,sys,dev,tmp,etc/target/pr}
    local bb
    bb=$(command -v busybox) || { rm -rf "$stage"; die "busybox not found"; }
    # The initramfs has no libraries: only busybox-static's binary works there.
    if ldd "$bb" >/dev/null 2>&1; then rm -rf "$stage"; die "$bb is not static (install busybox-static)"; fi
    cp "$bb" "$stage/bin/busybox"
    cp "$here/init" "$stage/init"
    chmod 0755 "$stage/init"
    : > "$stage/modules.list"
    local -A seen=()
    for m in "${MODULES[@]}"; do
        path=$(modinfo -b "$kdir/root" -k "$kver" -n "$m" 2>/dev/null) ||
            { rm -rf "$stage"; die "module $m not found in kernel $kver"; }
        # Every hard dependency must have been inserted before.
        for dep in $(modinfo -b "$kdir/root" -k "$kver" -F depends "$m" | tr ',' ' '); do
            [[ -n ${seen[${dep//-/_}]:-} ]] ||
                { rm -rf "$stage"; die "module $m needs $dep earlier in the list"; }
        done
        seen[${m//-/_}]=1
        cp "$path" "$stage/mods/$m.ko"
        echo "$m" >> "$stage/modules.list"
    done
    (cd "$stage" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) > "$initrd.tmp"
    mv "$initrd.tmp" "$initrd"
    rm -rf "$stage"
}
build_initrd

# ---- 4. results share ----------------------------------------------------------------------------
case $suite in
    main) res=$out/$daemon ;;
    bench) res=$out/bench ;;
    *) res=$out/$suite-$daemon ;;
esac
rm -rf "$res"
mkdir -p "$res"
console=$res/console.log
{
    printf 'VM_DAEMON=%q\n' "$daemon"
    printf 'VM_REPO=%q\n' "$repo"
    printf 'VM_SUITE=%q\n' "${VM_SUITE:-$default_guest}"
    printf 'VM_BIN_DIR=%q\n' "$bindir"
    printf 'VM_KMODDIR=%q\n' "$kmoddir"
    printf 'VM_RESULTS=/vmresults\n'
    [[ $suite != systemd ]] || printf 'VM_INIT=systemd\n'
    printf 'VM_FIO_SIZE=%q\n' "${VM_FIO_SIZE:-64m}"
    printf 'VM_RUST_LOG=%q\n' "${VM_RUST_LOG:-info}"
    printf 'VM_GROUPS=%q\n' "$groups"
    printf 'VM_JAIL_TESTS=%q\n' "$jail_tests"
    printf 'VM_JAIL_DIR=%q\n' "$jail_dir"
    printf 'VM_JAIL_TEST_TIMEOUT=%q\n' "${VM_JAIL_TEST_TIMEOUT:-900}"
    printf 'VM_RECOVERY_FIO_SIZE=%q\n' "${VM_RECOVERY_FIO_SIZE:-8m}"
    [[ -z ${VM_READY_PATTERN:-} ]] || printf 'VM_READY_PATTERN=%q\n' "$VM_READY_PATTERN"
    [[ -z ${VM_REFUSE_PATTERN:-} ]] || printf 'VM_REFUSE_PATTERN=%q\n' "$VM_REFUSE_PATTERN"
    printf 'export VM_DAEMON VM_REPO VM_SUITE VM_BIN_DIR VM_KMODDIR VM_RESULTS VM_FIO_SIZE VM_RUST_LOG\n'
    printf 'VM_CONF_TESTS=%q\n' "${VM_CONF_TESTS:-ALL}"
    printf 'VM_CONF_TIMEOUT=%q\n' "$(( timeout_s > 600 ? timeout_s - 300 : timeout_s / 2 ))"
    printf 'export VM_READY_PATTERN VM_REFUSE_PATTERN VM_CONF_TESTS VM_CONF_TIMEOUT VM_GROUPS VM_RECOVERY_FIO_SIZE\n'
    printf 'export VM_JAIL_TESTS VM_JAIL_DIR VM_JAIL_TEST_TIMEOUT\n'
    printf 'VM_BENCH_RUNNER_DIR=%q\nexport VM_BENCH_RUNNER_DIR\n' "$bench_runner_dir"
    for v in VM_BENCH_QUICK VM_BENCH_ROUNDS VM_BENCH_RUNTIME VM_BENCH_RAMP VM_BENCH_TARGETS \
             VM_BENCH_MODES VM_BENCH_JOBS VM_BENCH_WCE0_JOBS VM_BENCH_SIZE_MB VM_BENCH_MULTI_LUNS \
             VM_BENCH_MULTI_SIZE_MB; do
        [[ -z ${!v:-} ]] || printf '%s=%q\nexport %s\n' "$v" "${!v}" "$v"
    done
} > "$res/params.env"

# ---- 5. boot -------------------------------------------------------------------------------------
qemu=(qemu-system-x86_64 -accel tcg -m "${VM_MEMORY_MB:-3072}" -smp "${VM_CPUS:-2}"
      -nodefaults -display none -no-reboot -nic none
      -serial "file:$console"
      -kernel "$kdir/vmlinuz" -initrd "$initrd"
      -append "console=ttyS0 quiet panic=-1 oops=panic"
      -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
      -virtfs "local,path=$res,mount_tag=results,security_model=none")

start=$(date +%s)
log "booting kernel $kver (daemon: $daemon, timeout ${timeout_s}s); console: $console"
"${qemu[@]}" </dev/null >"$res/qemu.log" 2>&1 &
qpid=$!

printed=0
passed=0
failed=0
# Print the result lines the guest has written since the last call, exactly once each.
emit_new() {
    [[ -f $res/results.txt ]] || return 0
    local -a lines
    mapfile -t lines < "$res/results.txt"
    local n=${#lines[@]} i line
    # The guest may be mid-way through a line: only take complete lines (the file ends in \n).
    if (( n > 0 )) && [[ -n $(tail -c1 "$res/results.txt") ]]; then n=$((n - 1)); fi
    for (( i = printed; i < n; i++ )); do
        line=${lines[i]}
        case $line in
            PASS\ *) passed=$((passed + 1)); echo "$line" ;;
            FAIL\ *) failed=$((failed + 1)); echo "$line" ;;
            *) ;;
        esac
    done
    printed=$n
}

timed_out=0
deadline=$((start + timeout_s))
while kill -0 "$qpid" 2>/dev/null; do
    emit_new
    if (( $(date +%s) >= deadline )); then
        timed_out=1
        log "timeout after ${timeout_s}s: stopping qemu"
        kill -TERM "$qpid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$qpid" 2>/dev/null || true
        break
    fi
    sleep 1
done
qrc=0
wait "$qpid" || qrc=$?
emit_new
elapsed=$(( $(date +%s) - start ))

# ---- 6. verdict ----------------------------------------------------------------------------------
vm_ok=1
if (( timed_out )); then
    echo "FAIL vm/complete: timed out after ${timeout_s}s"; failed=$((failed + 1)); vm_ok=0
elif [[ ! -f $res/suite.done ]]; then
    echo "FAIL vm/complete: the guest suite did not finish (qemu exit status $qrc; see $console)"
    failed=$((failed + 1)); vm_ok=0
elif (( passed + failed == 0 )); then
    echo "FAIL vm/complete: the guest suite reported no checks"; failed=$((failed + 1)); vm_ok=0
fi
# The conformance suite: per-test results, the table of differences, and the gate.
if [[ $suite == conformance ]] && (( vm_ok )); then
    report_args=(--daemon "$daemon" "$res")
    (( update_baseline )) && report_args+=(--update)
    while IFS= read -r line; do
        case $line in
            PASS\ *) passed=$((passed + 1)); echo "$line" ;;
            FAIL\ *) failed=$((failed + 1)); echo "$line" ;;
            *) echo "$line" ;;
        esac
    done < <("$here/conformance/report.sh" "${report_args[@]}" || true)
fi
# The bench: medians over the rounds, the tables and the ratios (results.json, results.md).
if [[ $suite == bench ]] && (( vm_ok )); then
    python3 "$here/bench/report.py" "$res" || { echo "FAIL bench/report: see above"; failed=$((failed + 1)); }
fi
if (( failed > 0 )); then
    log "---- last lines of $console ----"
    tail -n 60 "$console" >&2 2>/dev/null || true
    if (( vm_ok )); then
        log "---- per-check logs: $res/logs/ ----"
    fi
    [[ -s $res/qemu.log ]] && { log "---- qemu ----"; tail -n 20 "$res/qemu.log" >&2; }
fi
log "daemon $daemon, $elapsed s in the VM"
echo "vm: $passed passed, $failed failed"
(( failed == 0 ))
