#!/bin/bash
# The benchmark suite, guest side: the same fio jobs against the kernel's own `fileio` backstore,
# tcmu-runner 1.5.4's plain file handler and tcmu-warden's `file` and `ram` handlers, one after
# another in one VM boot, each exported through tcm_loop (a local SCSI host: each LUN is a
# /dev/sdX). Started by /init like guest/suite.sh (`tests/vm/run.sh --suite bench`), with the
# variables of /vmresults/params.env.
#
# A *target* is who serves the LUNs:
#   fileio       LIO's own file backstore, in the kernel (no TCMU, no daemon)
#   tcmu-runner  Debian's tcmu-runner 1.5.4 with the upstream example `file` handler
#                (handler_file.so, loaded with --handler-path from VM_BENCH_RUNNER_DIR)
#   warden-file  tcmu-warden, its `file` handler
#   warden-ram   tcmu-warden, its `ram` handler (no storage cost: the ring and threading path)
# A *mode* is the write cache the LUN advertises (LIO's `attrib/emulate_write_cache`, WCE):
#   wce1  volatile write cache: a write may complete before it is durable; SYNCHRONIZE CACHE
#         makes it durable. fileio runs buffered (fd_buffered_io=1, which forces WCE=1).
#   wce0  no volatile cache: fileio (O_DSYNC) and tcmu-warden `file` complete a write only once
#         it is durable; tcmu-runner's example handler does NOT (it syncs only on SYNCHRONIZE
#         CACHE, and its MODE SENSE says WCE=1 whatever the attribute says); `ram` is never
#         durable.
# A *session* is one target in one mode: start its daemon, create and export the LUNs, check the
# initiator sees the mode (the disk's cache_type), run every job of the mode, tear down. Sessions
# run in rounds; odd rounds take the targets in the given order, even rounds in reverse
# (A B, B A, ...), so that the VM's drift spreads over all targets; the host takes medians.
#
# Knobs (environment, from params.env; see tests/vm/README.md):
#   VM_BENCH_QUICK     1: a smoke run (1 round, 3 s jobs, 3 jobs at WCE=1, 1 at WCE=0)
#   VM_BENCH_ROUNDS    rounds (default 2)
#   VM_BENCH_RUNTIME   seconds each job measures (default 10)
#   VM_BENCH_RAMP      seconds each job runs before measuring (default 2)
#   VM_BENCH_TARGETS   default "fileio tcmu-runner warden-file warden-ram"
#   VM_BENCH_MODES     default "wce1 wce0"
#   VM_BENCH_JOBS      jobs at WCE=1 (default: all of JOB_ORDER below)
#   VM_BENCH_WCE0_JOBS jobs at WCE=0 (default: the ones that write)
#   VM_BENCH_SIZE_MB   the single LUN's backing file (default 256)
#   VM_BENCH_MULTI_LUNS / VM_BENCH_MULTI_SIZE_MB  the multi-device job's LUNs (default 8 x 32)
#   VM_BENCH_RUNNER_DIR  the folder holding handler_file.so (host path, seen through the share)
#
# Writes to the results share:
#   results.txt          `PASS <check>` / `FAIL <check>: <reason>` (sessions and jobs)
#   bench.env            the effective settings (read by the host's report)
#   sessions.txt         one line per session: round target mode cache_type LUNs (the cache
#                        type the initiator saw on the first LUN, spaces as dashes)
#   commands.txt         the exact fio command line of every job
#   fio/<round>_<target>_<mode>_<job>.json   fio's JSON output
#   logs/<check>.log, daemon-<target>.log, dmesg.txt
#   suite.done           written last
set -u
shopt -s nullglob

R=${VM_RESULTS:-/vmresults}
RESULTS=$R/results.txt
LOGS=$R/logs
CFS=/sys/kernel/config/target
PARAMS=/sys/module/target_core_user/parameters
MIB=$((1024 * 1024))
WARDEN_CONFIG=/tmp/warden-bench.toml
READY_TIMEOUT=180
DEVICE_TIMEOUT=120

mkdir -p "$LOGS" "$R/fio"
: > "$RESULTS"
: > "$R/sessions.txt"
: > "$R/commands.txt"
say() { echo "vm-bench: $*"; }
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ---- settings ------------------------------------------------------------------------------------
# Every job: fio, libaio, O_DIRECT, time-based. The multi-device job runs one fio job per LUN.
JOB_ORDER=(randread4k-qd1 randread4k-qd32 randwrite4k-qd32 randrw70-4k-qd16 read128k-qd8
           write128k-qd8 multi-randread4k-qd8)
declare -A JOB_ARGS=(
    [randread4k-qd1]="--rw=randread --bs=4k --iodepth=1"
    [randread4k-qd32]="--rw=randread --bs=4k --iodepth=32"
    [randwrite4k-qd32]="--rw=randwrite --bs=4k --iodepth=32"
    [randrw70-4k-qd16]="--rw=randrw --rwmixread=70 --bs=4k --iodepth=16"
    [read128k-qd8]="--rw=read --bs=128k --iodepth=8"
    [write128k-qd8]="--rw=write --bs=128k --iodepth=8"
    [multi-randread4k-qd8]="--rw=randread --bs=4k --iodepth=8"
)
if [[ ${VM_BENCH_QUICK:-0} == 1 ]]; then
    ROUNDS=${VM_BENCH_ROUNDS:-1}; RUNTIME=${VM_BENCH_RUNTIME:-3}; RAMP=${VM_BENCH_RAMP:-1}
    JOBS=${VM_BENCH_JOBS:-randread4k-qd1 randwrite4k-qd32 multi-randread4k-qd8}
    WCE0_JOBS=${VM_BENCH_WCE0_JOBS:-randwrite4k-qd32}
else
    ROUNDS=${VM_BENCH_ROUNDS:-2}; RUNTIME=${VM_BENCH_RUNTIME:-10}; RAMP=${VM_BENCH_RAMP:-2}
    JOBS=${VM_BENCH_JOBS:-${JOB_ORDER[*]}}
    WCE0_JOBS=${VM_BENCH_WCE0_JOBS:-randwrite4k-qd32 randrw70-4k-qd16 write128k-qd8}
fi
TARGETS=${VM_BENCH_TARGETS:-fileio tcmu-runner warden-file warden-ram}
MODES=${VM_BENCH_MODES:-wce1 wce0}
SIZE_MB=${VM_BENCH_SIZE_MB:-256}
MULTI_LUNS=${VM_BENCH_MULTI_LUNS:-8}
MULTI_SIZE_MB=${VM_BENCH_MULTI_SIZE_MB:-32}
RUNNER_DIR=${VM_BENCH_RUNNER_DIR:-}

settings_ok() {
    local j t m
    for j in $JOBS $WCE0_JOBS; do
        [[ -n ${JOB_ARGS[$j]:-} ]] || { why "unknown job $j (known: ${JOB_ORDER[*]})"; return 1; }
    done
    for t in $TARGETS; do
        case $t in fileio|tcmu-runner|warden-file|warden-ram) ;;
            *) why "unknown target $t"; return 1 ;; esac
    done
    for m in $MODES; do
        case $m in wce1|wce0) ;; *) why "unknown mode $m"; return 1 ;; esac
    done
    for v in ROUNDS RUNTIME RAMP SIZE_MB MULTI_LUNS MULTI_SIZE_MB; do
        [[ ${!v} =~ ^[0-9]+$ ]] || { why "$v=${!v} is not a number"; return 1; }
    done
    (( ROUNDS >= 1 && RUNTIME >= 1 && MULTI_LUNS >= 1 )) || { why "rounds, runtime and LUNs must be >= 1"; return 1; }
    if [[ " $TARGETS " == *" tcmu-runner "* ]]; then
        [[ -f $RUNNER_DIR/handler_file.so ]] ||
            { why "no handler_file.so in '$RUNNER_DIR' (VM_BENCH_RUNNER_DIR)"; return 1; }
        command -v tcmu-runner || { why "tcmu-runner is not installed"; return 1; }
    fi
    if [[ " $TARGETS " == *" warden-"* ]]; then
        [[ -x ${VM_BIN_DIR:-}/tcmu-warden ]] || { why "no tcmu-warden in '${VM_BIN_DIR:-}'"; return 1; }
    fi
    command -v fio || { why "fio is not installed"; return 1; }
    {
        printf 'ROUNDS=%s\nRUNTIME=%s\nRAMP=%s\n' "$ROUNDS" "$RUNTIME" "$RAMP"
        printf 'JOBS=%s\nWCE0_JOBS=%s\nTARGETS=%s\nMODES=%s\n' "$JOBS" "$WCE0_JOBS" "$TARGETS" "$MODES"
        printf 'SIZE_MB=%s\nMULTI_LUNS=%s\nMULTI_SIZE_MB=%s\n' "$SIZE_MB" "$MULTI_LUNS" "$MULTI_SIZE_MB"
        printf 'QUICK=%s\nKERNEL=%s\nCPUS=%s\nFIO=%s\n' "${VM_BENCH_QUICK:-0}" "$(uname -r)" \
            "$(nproc)" "$(fio --version)"
        printf 'RUNNER=%s\n' "$(tcmu-runner -V 2>&1 | head -n1)"
    } > "$R/bench.env"
    cat "$R/bench.env"
}

# ---- the backing filesystem ----------------------------------------------------------------------
# ext4 on a loop device over a tmpfs file, as the conformance run has it; the backing files are
# written in full once (no holes, no unwritten extents) and shared by every target.
prepare() {
    [[ -d $CFS ]] || { why "no $CFS"; return 1; }
    mkdir -p /var/target/pr /etc/target/pr /srv/tcmu /run/backing /etc/tcmu /var/log || return 1
    [[ -e /dev/fd ]] || ln -s /proc/self/fd /dev/fd || return 1
    local fs_mb=$(( (SIZE_MB + MULTI_LUNS * MULTI_SIZE_MB) * 5 / 4 + 64 )) i
    truncate -s "${fs_mb}M" /run/backing/fs.img || return 1
    mkfs.ext4 -q -F /run/backing/fs.img || { why "mkfs.ext4 failed"; return 1; }
    mount -o loop /run/backing/fs.img /srv/tcmu || { why "mounting the backing fs failed"; return 1; }
    dd if=/dev/zero of=/srv/tcmu/disk0.img bs=1M count="$SIZE_MB" conv=fsync status=none ||
        { why "writing disk0.img failed"; return 1; }
    for (( i = 0; i < MULTI_LUNS; i++ )); do
        dd if=/dev/zero of="/srv/tcmu/m$i.img" bs=1M count="$MULTI_SIZE_MB" conv=fsync status=none ||
            { why "writing m$i.img failed"; return 1; }
    done
    findmnt /srv/tcmu
    df -h /srv/tcmu
}

# ---- daemons -------------------------------------------------------------------------------------
DPID=""
DAEMON_LOG=""

# Both daemons block the kernel's TCMU netlink requests while they start and unblock them once
# they listen (tcmu-warden's supervisor, and tcmu-runner's libtcmu). Blocking before the start
# makes that the readiness signal, and makes a premature configfs write fail (EAGAIN) instead of
# waiting, uninterruptibly, for an answer nobody gives.
netlink_unblocked() {
    kill -0 "$DPID" 2>/dev/null || { why "the daemon exited"; return 2; }
    [[ ! -e $PARAMS/block_netlink ]] && return 0
    [[ $(cat "$PARAMS/block_netlink") == unblocked || $(cat "$PARAMS/block_netlink") == 0 ]]
}

start_daemon() { # start_daemon TARGET
    [[ -e $PARAMS/block_netlink ]] && echo 1 > "$PARAMS/block_netlink"
    DAEMON_LOG=$R/daemon-$1.log
    echo "=== $(date -u +%T) starting for round $ROUND" >> "$DAEMON_LOG"
    case $1 in
        tcmu-runner)
            mkdir -p "$R/tcmu-runner-log"
            tcmu-runner --handler-path "$RUNNER_DIR" -l "$R/tcmu-runner-log" >> "$DAEMON_LOG" 2>&1 &
            DPID=$!
            ;;
        warden-*)
            printf '[handler.file]\nallow_paths = ["/srv/tcmu"]\n\n[handler.ram]\n' > "$WARDEN_CONFIG"
            cp "$WARDEN_CONFIG" "$R/warden.toml"
            RUST_LOG=${VM_RUST_LOG:-info} NO_COLOR=1 RUST_BACKTRACE=1 \
                "$VM_BIN_DIR/tcmu-warden" run --config "$WARDEN_CONFIG" >> "$DAEMON_LOG" 2>&1 &
            DPID=$!
            ;;
    esac
    echo "daemon pid $DPID"
    wait_for "$READY_TIMEOUT" "the daemon to listen (block_netlink unblocked)" netlink_unblocked ||
        { tail -n 20 "$DAEMON_LOG"; return 1; }
}

stop_daemon() {
    [[ -n $DPID ]] || return 0
    local rc=0
    if kill -0 "$DPID" 2>/dev/null; then
        kill -TERM "$DPID"
        bg_wait 60 "$DPID"; rc=$?
        if (( rc == 124 )); then kill -KILL "$DPID"; wait "$DPID"; why "no exit within 60 s of SIGTERM"; fi
    else
        wait "$DPID"; why "the daemon had exited (status $?)"; rc=1
    fi
    DPID=""
    # tcmu-warden leaves block_netlink=1 when it stops; the next daemon's start sets it anyway.
    [[ -e $PARAMS/block_netlink ]] && echo 0 > "$PARAMS/block_netlink"
    (( rc == 0 || rc == 143 ))
}

# ---- backstores and the tcm_loop export ----------------------------------------------------------
declare -a BSDIRS=()     # configfs backstore directories of the session, LUN order
declare -a BSNAMES=()
declare -a SDEVS=()      # /dev/sdX per LUN
TPG=""

uio_held() { # uio_held NAME: a process holds the backstore's /dev/uioN (tcmu-runner's readiness)
    local u n f uio=""
    for u in /sys/class/uio/uio*; do
        n=$(cat "$u/name" 2>/dev/null) || continue
        case $n in tcm-user/*/"$1"/*|tcm-user/*/"$1") uio=${u##*/} ;; esac
    done
    [[ -n $uio ]] || return 1
    for f in /proc/[0-9]*/fd/*; do
        [[ $(readlink "$f" 2>/dev/null) == "/dev/$uio" ]] && return 0
    done
    return 1
}

served() { # served TARGET NAME
    [[ $1 == fileio ]] && return 0
    kill -0 "$DPID" 2>/dev/null || { why "the daemon is no longer running"; return 2; }
    case $1 in
        tcmu-runner) uio_held "$2" ;;
        warden-*) sed 's/\x1b\[[0-9;]*m//g' "$DAEMON_LOG" | grep 'device ready' |
                      grep -Eq "device=\"?$2\"?([^[:alnum:]_.-]|\$)" ;;
    esac
}

# bounded CMD...: a configfs operation that a daemon must answer, in the background with a
# deadline; on timeout the kernel's waiting netlink requests are failed (reset_netlink).
bounded() {
    "$@" &
    local pid=$! rc
    bg_wait "$DEVICE_TIMEOUT" "$pid"; rc=$?
    if (( rc == 124 )); then
        why "'$*' hangs; resetting netlink"
        [[ -e $PARAMS/reset_netlink ]] && echo 1 > "$PARAMS/reset_netlink"
        wait "$pid"
        return 1
    fi
    return "$rc"
}

mk_backstore() { # mk_backstore TARGET MODE NAME FILE MB
    local target=$1 mode=$2 name=$3 file=$4 bytes=$(( $5 * MIB )) dir wce=0
    [[ $mode == wce1 ]] && wce=1
    case $target in
        fileio)
            dir=$CFS/core/fileio_0/$name
            mkdir -p "$dir" || { why "mkdir $dir failed"; return 1; }
            if (( wce )); then
                write_attr "$dir/control" "fd_dev_name=$file,fd_dev_size=$bytes,fd_buffered_io=1" || return 1
            else
                write_attr "$dir/control" "fd_dev_name=$file,fd_dev_size=$bytes" || return 1
            fi
            write_attr "$dir/enable" 1 || return 1
            ;;
        *)
            dir=$CFS/core/user_0/$name
            mkdir -p "$dir" || { why "mkdir $dir failed"; return 1; }
            if [[ $target == warden-ram ]]; then
                write_attr "$dir/control" "dev_config=ram/" || return 1
            else
                write_attr "$dir/control" "dev_config=file/$file" || return 1
            fi
            write_attr "$dir/control" "dev_size=$bytes" || return 1
            # Before enable: the daemon reads it when the device is added.
            write_attr "$dir/attrib/emulate_write_cache" "$wce" || return 1
            bounded write_attr "$dir/enable" 1 || { why "enabling $name failed"; return 1; }
            ;;
    esac
    BSDIRS+=("$dir"); BSNAMES+=("$name")
    write_attr "$dir/wwn/vpd_unit_serial" "$(cat /proc/sys/kernel/random/uuid)" || return 1
    [[ $(cat "$dir/attrib/emulate_write_cache") == "$wce" ]] ||
        { why "$name: emulate_write_cache is $(cat "$dir/attrib/emulate_write_cache"), want $wce"; return 1; }
}

find_sd() { # find_sd LUN: prints /dev/sdX once the LUN is attached with a capacity
    local addr b
    addr=$(cat "$TPG/address" 2>/dev/null) || return 1
    for b in /sys/bus/scsi/devices/"$addr:$1"/block/*; do
        [[ -b /dev/${b##*/} && $(cat "$b/size" 2>/dev/null) =~ ^[1-9][0-9]*$ ]] || return 1
        echo "/dev/${b##*/}"
        return 0
    done
    return 1
}
have_sd() { find_sd "$1" > /dev/null; }

setup_session() { # setup_session TARGET MODE
    local target=$1 mode=$2 i n sd q ct want_cache
    BSDIRS=(); BSNAMES=(); SDEVS=(); TPG=""
    if [[ $target != fileio ]]; then start_daemon "$target" || return 1; fi
    mk_backstore "$target" "$mode" b0 /srv/tcmu/disk0.img "$SIZE_MB" || return 1
    if [[ " $(mode_jobs "$mode") " == *" multi-"* ]]; then
        for (( i = 0; i < MULTI_LUNS; i++ )); do
            mk_backstore "$target" "$mode" "m$i" "/srv/tcmu/m$i.img" "$MULTI_SIZE_MB" || return 1
        done
    fi
    for n in "${BSNAMES[@]}"; do
        wait_for "$READY_TIMEOUT" "$n to be served" served "$target" "$n" || return 1
    done
    TPG=$CFS/loopback/naa.5001405000000b01/tpgt_1
    mkdir -p "$TPG" || { why "mkdir $TPG failed"; return 1; }
    # The nexus must exist before the LUNs, or the scan finds nothing.
    write_attr "$TPG/nexus" naa.5001406000000b01 || return 1
    for i in "${!BSDIRS[@]}"; do
        mkdir "$TPG/lun/lun_$i" || { why "mkdir lun_$i failed"; return 1; }
        ln -s "${BSDIRS[i]}" "$TPG/lun/lun_$i/${BSNAMES[i]}" || { why "linking ${BSNAMES[i]} failed"; return 1; }
    done
    want_cache="write through"; [[ $mode == wce1 ]] && want_cache="write back"
    for i in "${!BSDIRS[@]}"; do
        wait_for "$DEVICE_TIMEOUT" "LUN $i's disk" have_sd "$i" || return 1
        sd=$(find_sd "$i")
        SDEVS+=("$sd")
        q=/sys/block/${sd#/dev/}/queue
        # No I/O scheduler between fio and the LUN, whoever serves it.
        { echo none > "$q/scheduler"; } 2>/dev/null
        ct=$(cat /sys/block/"${sd#/dev/}"/device/scsi_disk/*/cache_type 2>/dev/null)
        [[ $ct == "$want_cache" ]] && continue
        # tcmu-runner answers MODE SENSE itself, and its example file handler declares a write
        # cache whatever emulate_write_cache says: recorded, not a failure of the harness.
        if [[ $target == tcmu-runner ]]; then
            echo "$sd (${BSNAMES[i]}) shows cache_type '$ct' (emulate_write_cache=${mode#wce})"
            continue
        fi
        why "$sd (${BSNAMES[i]}) shows cache_type '$ct', want '$want_cache'"
        return 1
    done
    ct=$(cat /sys/block/"${SDEVS[0]#/dev/}"/device/scsi_disk/*/cache_type 2>/dev/null)
    echo "LUNs: ${SDEVS[*]}; cache_type $ct; scheduler $(cat "$q/scheduler")"
    echo "$ROUND $target $mode ${ct// /-} ${#SDEVS[@]}" >> "$R/sessions.txt"
    echo "note: ${#SDEVS[@]} LUNs, $ct"
}

teardown_session() {
    local ok=0 l i
    if [[ -n $TPG && -d $TPG ]]; then
        for l in "$TPG"/lun/lun_*/*; do [[ -L $l ]] && { rm "$l" || ok=1; }; done
        for l in "$TPG"/lun/lun_*; do rmdir "$l" || ok=1; done
        rmdir "$TPG" "${TPG%/tpgt_1}" || ok=1
    fi
    for i in "${!BSDIRS[@]}"; do
        [[ -d ${BSDIRS[i]} ]] || continue
        bounded rmdir "${BSDIRS[i]}" || { why "removing ${BSNAMES[i]} failed"; ok=1; }
    done
    BSDIRS=(); BSNAMES=(); SDEVS=(); TPG=""
    stop_daemon || ok=1
    return $ok
}

# ---- jobs ----------------------------------------------------------------------------------------
mode_jobs() { if [[ $1 == wce1 ]]; then echo "$JOBS"; else echo "$WCE0_JOBS"; fi; }

run_job() { # run_job TARGET MODE JOB
    local target=$1 mode=$2 job=$3 out i rc
    out=$R/fio/${ROUND}_${target}_${mode}_${job}.json
    local -a cmd
    # shellcheck disable=SC2206 # the job's arguments are words
    cmd=(fio --output-format=json "--output=$out" --ioengine=libaio --direct=1 --time_based
         "--runtime=$RUNTIME" "--ramp_time=$RAMP" --norandommap --randrepeat=0 --group_reporting
         ${JOB_ARGS[$job]})
    if [[ $job == multi-* ]]; then
        (( ${#SDEVS[@]} > MULTI_LUNS )) || { why "the session has no multi-device LUNs"; return 1; }
        for (( i = 1; i <= MULTI_LUNS; i++ )); do
            cmd+=("--name=lun$i" "--filename=${SDEVS[i]}")
        done
    else
        cmd+=("--name=$job" "--filename=${SDEVS[0]}")
    fi
    echo "${cmd[*]}"
    echo "$ROUND $target $mode $job: ${cmd[*]}" >> "$R/commands.txt"
    timeout $(( RUNTIME + RAMP + 300 )) "${cmd[@]}"; rc=$?
    (( rc == 0 )) || { why "fio exited with status $rc"; cat "$out"; return 1; }
    python3 - "$out" <<'PY' || { why "fio's JSON output is unusable"; return 1; }
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
if j["error"]:
    print("why: fio job error %d" % j["error"]); sys.exit(1)
r, w = j["read"], j["write"]
if r["io_bytes"] + w["io_bytes"] == 0:
    print("why: no I/O done"); sys.exit(1)
print("note: %.0f IOPS, %.1f MiB/s" % (r["iops"] + w["iops"], (r["bw_bytes"] + w["bw_bytes"]) / 2**20))
PY
}

# ---- main ----------------------------------------------------------------------------------------
ROUND=0
MAIN_DONE=0
main() {
    say "kernel $(uname -r), $(nproc) CPUs"
    check bench/settings settings_ok || { MAIN_DONE=1; return; }
    check bench/backing-fs prepare || { MAIN_DONE=1; return; }
    local -a order
    read -r -a order <<< "$TARGETS"
    local target mode job r i s
    for (( r = 1; r <= ROUNDS; r++ )); do
        ROUND=$r
        local -a these=("${order[@]}")
        if (( r % 2 == 0 )); then
            these=()
            for (( i = ${#order[@]} - 1; i >= 0; i-- )); do these+=("${order[i]}"); done
        fi
        for target in "${these[@]}"; do
            for mode in $MODES; do
                s=bench/r$r/$target/$mode
                if check "$s/setup" setup_session "$target" "$mode"; then
                    for job in $(mode_jobs "$mode"); do
                        check "$s/$job" run_job "$target" "$mode" "$job"
                    done
                fi
                check "$s/teardown" teardown_session
            done
        done
    done
    MAIN_DONE=1
}
main
dmesg > "$R/dmesg.txt" 2>&1
sync
if (( MAIN_DONE )); then date -u +%FT%TZ > "$R/suite.done"; fi
