# shellcheck shell=bash disable=SC2034  # sourced by suite.sh, which declares and reads these
# The VM suite's crash-recovery group (warden mode only). Sourced by guest/suite.sh, which calls
# recovery_main after its main checks; it uses suite.sh's helpers (check, why, wait_for, bg_wait,
# mk_user, link_lun, find_sd, ...) and variables (R, CFS, LOGS, DAEMON_LOG, ...).
#
# It proves, on the real kernel, that the supervisor's crash recovery keeps data intact while
# the initiator writes: two fresh `file` backstores (`crash0`, `crash1`, served by the same `file`
# worker, so every fault hits both) are served by a daemon started with short heartbeats and
# restart delays, exported through tcm_loop, and one fio job per disk writes random 4 KiB blocks
# with crc32c verification (O_DIRECT, libaio, iodepth 16; verify_backlog interleaves verifying
# reads with the writes, so faults hit both) while faults are injected:
#
#   recovery/worker-kill-fio          the file worker is killed with SIGKILL every few seconds
#   recovery/successor-kill-fio       the file worker is killed, then its successor 0-150 ms after
#                                     its exec (often while it is still recovering the journals)
#   recovery/worker-hang-fio          the file worker is stopped (SIGSTOP): the heartbeat must find
#                                     it and the supervisor must replace it
#   recovery/supervisor-restart-fio   the supervisor itself is killed with SIGKILL (its workers die
#                                     with it; every other time the worker is frozen first, so it
#                                     cannot finish its commands) and a new one is started: it must
#                                     recover the devices from the journals under
#                                     /run/tcmu-warden/journal
#   recovery/journal-lost-fio         the same, with the journals deleted before the new supervisor
#                                     starts: it must reset the rings (BUSY, retried), not guess
#   recovery/quarantine               a worker killed quarantine_after times within the window is
#                                     not restarted; its devices are handed to the refusals worker
#                                     and fail fast: the initiator's first I/O error comes seconds
#                                     after the quarantine (NOT READY, 04/03 in the kernel log), not
#                                     after its SCSI timeout
#   recovery/quarantine-lift          `tcmu-warden quarantine lift file` (after an unknown and a
#                                     wrong name are refused) starts the worker again; the devices
#                                     serve I/O again (direct write, read back, compare)
#
# A fault is injected only while the disks have I/O in flight, and each waits for both devices
# to be recovered from the previous one; fio runs are repeated until every fault of the scenario
# has been injected (TCG speed varies too much to size one run), and every run must end with
# err=0 and a passing verify on both disks. The daemon log must show one crash per fault and one
# journal recovery per device and fault, no device failure, and (but in journal-lost-fio, which
# expects one per busy ring) no ring-reset fallback; the kernel log must show no broken ring and
# no I/O error. The PASS line says how many of each.
#
# Knobs: VM_RECOVERY_FIO_SIZE (default 8m per disk), RECOVERY_* below.

RECOVERY_FIO_SIZE=${VM_RECOVERY_FIO_SIZE:-8m}
RECOVERY_KILLS=6          # worker SIGKILLs in recovery/worker-kill-fio
RECOVERY_DOUBLE_KILLS=3   # worker + successor SIGKILLs in recovery/successor-kill-fio
RECOVERY_HANGS=2          # worker SIGSTOPs in recovery/worker-hang-fio
RECOVERY_RESTARTS=2       # supervisor SIGKILLs in recovery/supervisor-restart-fio
RECOVERY_JOURNAL_LOSSES=2 # supervisor SIGKILLs with the journals deleted, recovery/journal-lost-fio
RECOVERY_QUARANTINE=3     # quarantine_after in recovery/quarantine
# Seconds between a recovery and the next fault (random in [MIN, MIN + SPREAD]): 3-5 s for the
# worker kills; the other scenarios (local overrides) use 1-3 s to keep the VM run short.
RECOVERY_GAP_MIN=3
RECOVERY_GAP_SPREAD=2
# Deadline of one scenario, and of one recovery (the guest is slow; restarts are not).
RECOVERY_SCENARIO_TIMEOUT=600
RECOVERY_STEP_TIMEOUT=120
# The LUN's cmd_time_out: far above any restart, so the kernel never fails a command that waits
# in the ring for a successor.
RECOVERY_CMD_TIME_OUT=120

RDEVS=(crash0 crash1)     # the backstores
# crash1's command ring is the smallest the kernel allows (1 MiB instead of 8): it wraps every few
# thousand commands, so faults also find PAD entries between the tail and the fetch position.
declare -A RING_OPTS=([crash1]=cmd_ring_size_mb=1)
RDAEMON_LOG=$R/daemon-recovery.log
RCONFIG=/tmp/warden-recovery.toml
JOURNAL_DIR=/run/tcmu-warden/journal   # the default journal_dir

# ---- helpers -------------------------------------------------------------------------------------

# The recovery daemon's log without colour codes.
rlog() { sed 's/\x1b\[[0-9;]*m//g' "$RDAEMON_LOG" 2>/dev/null; }
rlog_lines() { rlog | wc -l; }
# rlog_since N: the log after its first N lines.
rlog_since() { rlog | tail -n +$(( $1 + 1 )); }
# count_since N PATTERN: lines after the first N matching the extended regex PATTERN.
count_since() { rlog_since "$1" | grep -Ec -- "$2"; }
dmesg_lines() { dmesg | wc -l; }

# The journal recoveries of our devices (the supervisor logs them with backstore=user_0/<name>).
RECOVERED_RE="device recovered.*backstore=user_[0-9]+/crash[0-9]"
# The worker's line saying it serves one of our devices.
READY_RE="device=\"?crash[0-9]\"?([^[:alnum:]_.-]|\$)"

write_recovery_config() { # write_recovery_config QUARANTINE_AFTER
    cat > "$RCONFIG" <<TOML
[daemon]
heartbeat_interval = "1s"
heartbeat_timeout = "3s"
restart_backoff_initial = "100ms"
restart_backoff_max = "1s"
quarantine_after = $1
quarantine_window = "10m"

[handler.file]
allow_paths = ["/srv/tcmu"]
TOML
    cp "$RCONFIG" "$R/warden-recovery.toml"
}

# start_rdaemon: a new supervisor on $RCONFIG, appending to $RDAEMON_LOG; sets DPID.
start_rdaemon() {
    echo "=== starting: ${VM_BIN_DIR}/tcmu-warden run --config $RCONFIG" >> "$RDAEMON_LOG"
    RUST_LOG=$VM_RUST_LOG NO_COLOR=1 RUST_BACKTRACE=1 \
        "${VM_BIN_DIR}/tcmu-warden" run --config "$RCONFIG" >> "$RDAEMON_LOG" 2>&1 &
    DPID=$!
    echo "supervisor pid $DPID"
}

# The supervisor follows netlink and uevents and has scanned sysfs: devices created from now on
# are answered.
rdaemon_listening() {
    kill -0 "$DPID" 2>/dev/null || { why "the supervisor is no longer running"; return 2; }
    rlog | grep -q 'start-up scan complete'
}

# The live (not zombie) worker children of the supervisor.
worker_pid() {
    local p st
    for p in $(pgrep -P "$DPID" 2>/dev/null); do
        [[ $(readlink "/proc/$p/exe" 2>/dev/null) == */tcmu-warden-worker ]] || continue
        st=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$p/status" 2>/dev/null)
        [[ -n $st && $st != Z && $st != X ]] || continue
        echo "$p"; return 0
    done
    return 1
}

# marks_and_recoveries BASE MARK_RE [SETTLE_RE]: after log line BASE, how many lines match
# MARK_RE, and how many lines matching SETTLE_RE (default: journal recoveries) follow the last.
marks_and_recoveries() {
    rlog_since "$1" | awk -v m="$2" -v r="${3:-$RECOVERED_RE}" \
        '$0 ~ m { n++; k = 0; next } $0 ~ r { k++ } END { print n + 0, k + 0 }'
}

# settled BASE MARKS MARK_RE SETTLE_RE: at least MARKS lines match MARK_RE after log line BASE (a
# crash, a supervisor start), and a SETTLE_RE line (a journal recovery, or the worker saying it
# serves the device) followed the last of them for every device.
settled() {
    kill -0 "$DPID" 2>/dev/null || { why "the supervisor is no longer running"; return 2; }
    local n k
    read -r n k < <(marks_and_recoveries "$1" "$3" "$4")
    (( n >= $2 && k >= ${#RDEVS[@]} ))
}

# ready_at_least BASE N: the worker said N times that it serves one of our devices, after log
# line BASE.
ready_at_least() {
    kill -0 "$DPID" 2>/dev/null || { why "the supervisor is no longer running"; return 2; }
    (( $(rlog_since "$1" | grep -E -- "$READY_PATTERN" | grep -Ec -- "$READY_RE") >= $2 ))
}

# Commands the block layer has in flight on our disks (queued in the ring or being executed).
inflight_io() {
    local d n=0 r w
    for d in "${RDEVS[@]}"; do
        read -r r w < "/sys/block/${SDEV[$d]#/dev/}/inflight" || continue
        n=$((n + r + w))
    done
    echo "$n"
}
io_in_flight() { (( $(inflight_io) > 0 )); }

# pause SECONDS: sleep without forking (a read that times out on a FIFO nobody writes to; the
# FIFO is opened by recovery_main).
PAUSE_FD=""
pause() { read -r -t "$1" -u "$PAUSE_FD" _; }

# Milliseconds (bash's EPOCHREALTIME), for fault times finer than a second.
now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo $((t / 1000)); }
# When the next fault is due: RECOVERY_GAP_MIN..+SPREAD seconds from now, at a random millisecond.
next_fault_ms() { echo $(( $(now_ms) + RECOVERY_GAP_MIN * 1000 + (RANDOM * 32768 + RANDOM) % (RECOVERY_GAP_SPREAD * 1000 + 1) )); }

# ---- fio runs in the background ------------------------------------------------------------------
FIO_PID=""
FIO_OUT=""
FIO_RUNS=0

fio_start() { # fio_start TAG
    FIO_RUNS=$((FIO_RUNS + 1))
    FIO_OUT=$LOGS/recovery_$1-fio$FIO_RUNS.out
    local d jobs=()
    for d in "${RDEVS[@]}"; do jobs+=(--name="$d" --filename="${SDEV[$d]}"); done
    timeout "$IO_TIMEOUT" fio --direct=1 --rw=randwrite --bs=4k --size="$RECOVERY_FIO_SIZE" \
        --iodepth=16 --ioengine=libaio --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --verify_backlog=1024 --randseed=$((RANDOM * 32768 + RANDOM)) "${jobs[@]}" \
        > "$FIO_OUT" 2>&1 &
    FIO_PID=$!
    echo "fio run $FIO_RUNS (pid $FIO_PID) started at ${SECONDS}s, output $FIO_OUT"
}

# fio_result: wait for the current run (bounded) and judge it; 0 when it passed.
fio_result() {
    local rc
    bg_wait "$IO_TIMEOUT" "$FIO_PID"; rc=$?
    FIO_PID=""
    echo "fio run $FIO_RUNS ended at ${SECONDS}s with status $rc"
    grep -E 'err=|WRITE:|READ:|verify' "$FIO_OUT"
    (( rc == 0 )) || { why "fio run $FIO_RUNS exited with status $rc (see ${FIO_OUT##*/})"; return 1; }
    local ok bad
    ok=$(grep -c 'err= 0' "$FIO_OUT"); bad=$(grep -E 'err= *[1-9]' "$FIO_OUT" | head -n1)
    [[ -z $bad ]] || { why "fio run $FIO_RUNS reports errors: $bad"; return 1; }
    (( ok == ${#RDEVS[@]} )) ||
        { why "fio run $FIO_RUNS: $ok of ${#RDEVS[@]} jobs report err=0"; return 1; }
    ! grep -qi 'verify.*bad\|crc32c: verify failed\|bad magic' "$FIO_OUT" ||
        { why "fio run $FIO_RUNS: verify failed"; return 1; }
}

fio_stop() {
    [[ -n $FIO_PID ]] || return 0
    kill "$FIO_PID" 2>/dev/null
    bg_wait 60 "$FIO_PID" >/dev/null 2>&1
    FIO_PID=""
}

# ---- faults --------------------------------------------------------------------------------------
# Each fault_* injects one fault, describes it in LAST_FAULT and says in FAULT_MARKS how many
# marker lines (crashes, supervisor starts) it causes in the log; it returns nonzero if it could
# not inject anything.
LAST_FAULT=""
FAULT_MARKS=0
MID_RECOVERY_KILLS=0
CRASH_MARK='worker crashed'
START_MARK='^=== starting'

fault_kill_worker() {
    local p
    p=$(worker_pid) || { echo "no worker to kill"; return 1; }
    kill -KILL "$p" || return 1
    LAST_FAULT="SIGKILL worker $p"
    FAULT_MARKS=1
}

# A worker child of the supervisor other than $1, in REPLY, found with shell builtins only (no
# fork, so it notices a new worker within milliseconds even under TCG): the supervisor's children
# whose command name is the worker's (a forked child not yet exec'd still has the supervisor's).
new_worker_fast() {
    local kids=() k comm
    # The file has no newline: read reports end-of-file even when it read the list.
    read -r -a kids < "/proc/$DPID/task/$DPID/children" 2>/dev/null
    for k in "${kids[@]}"; do
        [[ $k != "$1" ]] || continue
        read -r comm < "/proc/$k/comm" 2>/dev/null || continue
        [[ $comm == tcmu-warden-wor* ]] && { REPLY=$k; return 0; }
    done
    return 1
}

# The worker, then its successor a random 0-150 ms after its exec: often while the successor
# is still recovering the journals its predecessor left (a crash loop in miniature). Nothing
# slow (no fork, no log parsing) runs between finding the successor and killing it.
fault_kill_successor() {
    local p q end=$((SECONDS + 60)) delay k base
    p=$(worker_pid) || { echo "no worker to kill"; return 1; }
    base=$(rlog_lines)
    kill -KILL "$p" || return 1
    FAULT_MARKS=1
    until new_worker_fast "$p"; do
        if (( SECONDS >= end )); then
            LAST_FAULT="SIGKILL worker $p (no successor within 60s)"
            return 0
        fi
        pause 0.005
    done
    q=$REPLY
    delay=$((RANDOM % 150))
    pause "$(( delay / 1000 )).$(printf '%03d' $(( delay % 1000 )))"
    kill -KILL "$q" 2>/dev/null || { LAST_FAULT="SIGKILL worker $p (its successor $q ended by itself)"; return 0; }
    FAULT_MARKS=2
    # How far the successor got: the journal recoveries between the two crashes.
    wait_for 60 "the crash of $q" successor_crash_logged "$base" "$q" > /dev/null
    k=$(rlog_since "$base" | awk -v p="pid=$p " -v q="pid=$q " -v r="$RECOVERED_RE" '
        /worker crashed/ && index($0, p) { a = 1; next }
        /worker crashed/ && index($0, q) { print k + 0; exit }
        a && $0 ~ r { k++ }')
    (( ${k:-0} < ${#RDEVS[@]} )) && MID_RECOVERY_KILLS=$((MID_RECOVERY_KILLS + 1))
    LAST_FAULT="SIGKILL worker $p, then its successor $q ${delay}ms after its exec (${k:-?} of ${#RDEVS[@]} devices recovered by then)"
}
successor_crash_logged() { rlog_since "$1" | grep -q "worker crashed.*pid=$2 "; }

fault_stop_worker() {
    local p
    p=$(worker_pid) || { echo "no worker to stop"; return 1; }
    kill -STOP "$p" || return 1
    STOPPED+=("$p")
    LAST_FAULT="SIGSTOP worker $p"
    FAULT_MARKS=1
}

# Disks with commands in flight.
busy_disks() {
    local d n=0 r w
    for d in "${RDEVS[@]}"; do
        read -r r w < "/sys/block/${SDEV[$d]#/dev/}/inflight" || continue
        (( r + w > 0 )) && n=$((n + 1))
    done
    echo "$n"
}

# kill_supervisor [frozen] [lose-journals]: SIGKILL the supervisor and start a new one. Its
# workers die with it (PDEATHSIG), but a worker that sees the supervisor's socket close first
# stops fetching and finishes what it has in flight, racing the signal: with `frozen` the worker
# is stopped (SIGSTOP) first, and killed a second later, when fio's next commands wait in the
# rings (FROZEN_BUSY says on how many disks). With `lose-journals` the journals are deleted
# before the new supervisor starts.
FROZEN_BUSY=0
kill_supervisor() {
    local old=$DPID p=""
    local what="SIGKILL supervisor $old"
    FROZEN_BUSY=0
    if [[ " $* " == *" frozen "* ]]; then
        p=$(worker_pid) || { echo "no worker to stop"; return 1; }
        kill -STOP "$p" || return 1
        # What the kernel completes on its own (answers already in the ring) drains meanwhile.
        sleep 1
        FROZEN_BUSY=$(busy_disks)
        what="SIGSTOP worker $p, 1s later $FROZEN_BUSY disks with commands in flight, $what"
    fi
    kill -KILL "$old" || return 1
    wait "$old" 2>/dev/null
    if [[ " $* " == *" lose-journals "* ]]; then
        rm -rf "$JOURNAL_DIR" || return 1
        what+=", journals deleted"
    fi
    # The new supervisor waits (a few seconds) for the dying workers' uio descriptors.
    start_rdaemon > /dev/null
    LAST_FAULT="$what, new supervisor $DPID"
    FAULT_MARKS=1
}

# Every other supervisor kill freezes the worker first.
fault_kill_supervisor() {
    if (( FAULTS % 2 )); then kill_supervisor frozen; else kill_supervisor; fi
}

# The journals are lost (as after an emptied /run, a changed journal_dir, or a takeover from
# another TCMU daemon): nothing says what the frozen, killed worker had in flight. Each disk that
# had commands in flight must have its ring reset.
EXPECT_RESETS=0
fault_lose_journals() {
    kill_supervisor frozen lose-journals || return 1
    EXPECT_RESETS=$((EXPECT_RESETS + FROZEN_BUSY))
}

# faults_under_fio TAG FAULT COUNT BASE MARK_RE [SETTLE_RE]: fio runs (repeated as needed) while
# COUNT faults are injected, each RECOVERY_GAP_MIN..+SPREAD seconds after every device settled
# from the previous one (a SETTLE_RE line, default a journal recovery, after the fault's last
# MARK_RE line, in the log after line BASE), and only while I/O is in flight. Sets FAULTS
# (injected), MARKS and FIO_RUNS; returns nonzero on any fio failure or missed recovery.
faults_under_fio() {
    local tag=$1 fault=$2 count=$3 base=$4 mark=$5 settle=${6:-$RECOVERED_RE}
    local end=$((SECONDS + RECOVERY_SCENARIO_TIMEOUT))
    local next
    local waiting=0 t0=0 inflight
    next=$(next_fault_ms)
    FAULTS=0; FIO_RUNS=0; MARKS=0
    fio_start "$tag"
    while :; do
        if ! kill -0 "$FIO_PID" 2>/dev/null; then
            fio_result || return 1
            (( FAULTS >= count && ! waiting )) && return 0
            fio_start "$tag"
        fi
        if (( waiting )); then
            if settled "$base" "$MARKS" "$mark" "$settle"; then
                echo "  recovered after $((SECONDS - t0))s"
                waiting=0
                next=$(next_fault_ms)
            elif (( $? == 2 )) || (( SECONDS - t0 > RECOVERY_STEP_TIMEOUT )); then
                why "no recovery within ${RECOVERY_STEP_TIMEOUT}s of fault $FAULTS ($LAST_FAULT)"
                fio_stop; return 1
            fi
        elif (( FAULTS < count && $(now_ms) >= next )) && inflight=$(inflight_io) &&
             (( inflight > 0 )); then
            FAULT_MARKS=0
            if "$fault"; then
                FAULTS=$((FAULTS + 1)); MARKS=$((MARKS + FAULT_MARKS)); waiting=1; t0=$SECONDS
                echo "fault $FAULTS at ${SECONDS}s, $inflight commands in flight: $LAST_FAULT"
            else
                next=$(( $(now_ms) + 500 ))
            fi
        fi
        if (( SECONDS >= end )); then
            why "scenario deadline (${RECOVERY_SCENARIO_TIMEOUT}s) passed after $FAULTS faults"
            fio_stop; return 1
        fi
        sleep 0.2
    done
}

# judge_log BASE DMESG_BASE [RESETS_OK]: what the daemon and kernel logs say since the scenario
# started. Sets CRASHES, RECOVERIES, RESETS, HB_KILLS, REPLAYED; fails on a broken ring, an I/O
# error, a device failure, or (unless RESETS_OK is 1) a ring reset.
judge_log() {
    local base=$1 dbase=$2 resets_ok=${3:-0} k
    CRASHES=$(count_since "$base" 'worker crashed')
    RECOVERIES=$(count_since "$base" "$RECOVERED_RE")
    RESETS=$(count_since "$base" 'ring reset: every command in flight')
    FAILED=$(count_since "$base" 'device failed|cannot serve the device')
    HB_KILLS=$(count_since "$base" 'killing worker.*no answer to heartbeat')
    REPLAYED=0
    for k in $(rlog_since "$base" | grep 'recovered the ring from the previous worker' |
               sed -n 's/.* running=\([0-9]*\).*/\1/p'); do
        REPLAYED=$((REPLAYED + k))
    done
    echo "daemon log since the scenario started:"
    rlog_since "$base" | grep -E 'crashed|killing worker|recovered|reset|quarantine|RecoveryFailed|journal|ERROR|WARN' | head -n 200
    echo "crashes=$CRASHES recoveries=$RECOVERIES resets=$RESETS failed=$FAILED" \
         "heartbeat_kills=$HB_KILLS replayed=$REPLAYED"
    echo "kernel log since the scenario started:"
    dmesg | tail -n +$((dbase + 1)) | grep -Ei 'tcmu|target|ring|sd [0-9]|I/O error|timed out|abort' | head -n 100
    if dmesg | tail -n +$((dbase + 1)) | grep -Eqi 'ring is broken|ring broken|not found, ring'; then
        why "the kernel says the ring broke: $(dmesg | tail -n +$((dbase + 1)) | grep -Ei 'ring' | head -n1)"
        return 1
    fi
    if dmesg | tail -n +$((dbase + 1)) | grep -Eqi 'I/O error'; then
        why "the kernel logged I/O errors on the initiator side"
        return 1
    fi
    (( resets_ok || RESETS == 0 )) ||
        { why "$RESETS ring-reset fallbacks (a journal was not usable)"; return 1; }
    (( FAILED == 0 )) || { why "$FAILED device failures logged"; return 1; }
}

# ---- set-up and the scenarios --------------------------------------------------------------------

r_setup() {
    # Start from a clean slate: the main checks' targets and backstores are gone by now.
    BS=(); TPG=(); SDEV=(); SIZE=()
    local d i=8 blk
    # The daemon starts first and the devices are hot-plugged: once any daemon has turned on
    # the kernel's netlink replies (SET_FEATURES, as the hot-plug group's did), creating a TCMU
    # device waits, uninterruptibly, for a daemon to answer.
    write_recovery_config 100
    : > "$RDAEMON_LOG"
    start_rdaemon
    wait_for "$READY_TIMEOUT" "the daemon to start" rdaemon_listening ||
        { rlog | tail -n 20; return 1; }
    for d in "${RDEVS[@]}"; do
        WWN_IDX["$d"]=$((i += 1))
        truncate -s $((64 * MIB)) "/srv/tcmu/$d.img" || return 1
        mk_user "$d" "file//srv/tcmu/$d.img" $((64 * MIB)) ${RING_OPTS[$d]:+"${RING_OPTS[$d]}"} || return 1
        write_attr "${BS[$d]}/attrib/cmd_time_out" "$RECOVERY_CMD_TIME_OUT" || return 1
        echo "$d cmd_time_out: $(cat "${BS[$d]}/attrib/cmd_time_out")"
    done
    wait_for "$READY_TIMEOUT" "the daemon to serve ${RDEVS[*]}" ready_at_least 0 "${#RDEVS[@]}" ||
        { rlog | tail -n 20; return 1; }
    for d in "${RDEVS[@]}"; do
        export_dev "$d" || return 1
        blk=${SDEV[$d]#/dev/}
        # The initiator's own command timeout: above any restart under TCG, so the SCSI error
        # handler (aborts, resets) stays out of what this group measures.
        echo "$RECOVERY_CMD_TIME_OUT" > "/sys/block/$blk/device/timeout" || return 1
        echo "$d initiator timeout: $(cat "/sys/block/$blk/device/timeout")s"
    done
    echo "worker: $(worker_pid)"
}

# ---- what `tcmu-warden status --json` says -------------------------------------------------------
# rstatus_check WHAT PYTHON_EXPR: polls (generous deadline: every status call is slow under TCG)
# until the expression holds for the daemon's JSON report, with `r` the report, `devs` our devices'
# entries and `w` the entry of the worker serving them (None if there is none); on timeout the
# report is saved and the check fails saying WHAT.
rstatus_check() {
    local what=$1 expr=$2 end=$((SECONDS + 60)) out
    while :; do
        out=$("${VM_BIN_DIR}/tcmu-warden" status --json --config "$RCONFIG" 2>&1) &&
            printf '%s' "$out" | python3 -c '
import json, sys
r = json.load(sys.stdin)
names = sys.argv[2].split()
devs = [d for d in r["devices"] if d["backstore"].split("/")[-1] in names]
ws = [x for x in r["workers"] if x["name"] == "file"]
w = ws[0] if ws else None
sys.exit(0 if len(devs) == len(names) and eval(sys.argv[1]) else 1)' "$expr" "${RDEVS[*]}" && {
            echo "status: $what"; return 0; }
        if (( SECONDS >= end )); then
            printf '%s\n' "$out" > "$LOGS/recovery_status_${what// /_}.json"
            why "status --json does not show $what (report in logs/)"
            return 1
        fi
        sleep 0.5
    done
}

r_fault_scenario() { # r_fault_scenario TAG FAULT COUNT WHAT MARK_RE
    local tag=$1 fault=$2 count=$3 what=$4 mark=$5 base dbase t0=$SECONDS
    base=$(rlog_lines); dbase=$(dmesg_lines)
    faults_under_fio "$tag" "$fault" "$count" "$base" "$mark" ||
        { judge_log "$base" "$dbase"; return 1; }
    judge_log "$base" "$dbase" || return 1
    # Every fault ends with each device recovered (a successor killed mid-way may not have).
    (( RECOVERIES >= FAULTS * ${#RDEVS[@]} )) ||
        { why "$FAULTS faults on ${#RDEVS[@]} devices but only $RECOVERIES journal recoveries"; return 1; }
    SCENARIO_NOTE="$FAULTS $what, $RECOVERIES device recoveries, $REPLAYED commands replayed, 0 ring resets, $FIO_RUNS fio runs x ${#RDEVS[@]} disks err=0, $((SECONDS - t0))s"
}

c_worker_kill() {
    r_fault_scenario worker-kill fault_kill_worker "$RECOVERY_KILLS" kills "$CRASH_MARK" || return 1
    rstatus_check "the kills (crashes, restarts, SIGKILL as the last cause, devices ready and recovered)" \
        'w and w["crashes"] >= '"$FAULTS"' and w["restarts"] >= '"$FAULTS"' and "SIGKILL" in (w["last_crash"] or "") and w["state"] == "ready" and all(d["state"] == "ready" and not d["blocked"] and d["recoveries"] >= '"$FAULTS"' and d["resets"] == 0 and d["worker_pid"] == w["pid"] for d in devs)' || return 1
    (( CRASHES >= FAULTS )) || { why "$FAULTS kills but $CRASHES crashes logged"; return 1; }
    (( HB_KILLS == 0 )) || SCENARIO_NOTE+=", $HB_KILLS extra heartbeat kills"
    echo "note: $SCENARIO_NOTE"
}

c_successor_kill() {
    local RECOVERY_GAP_MIN=1 RECOVERY_GAP_SPREAD=2
    MID_RECOVERY_KILLS=0
    r_fault_scenario successor-kill fault_kill_successor "$RECOVERY_DOUBLE_KILLS" \
        "double kills" "$CRASH_MARK" || return 1
    (( CRASHES >= MARKS )) || { why "$MARKS kills but $CRASHES crashes logged"; return 1; }
    (( MARKS == 2 * FAULTS )) ||
        { why "only $((MARKS - FAULTS)) of $FAULTS successors were found and killed"; return 1; }
    SCENARIO_NOTE=${SCENARIO_NOTE/double kills,/double kills ($MARKS kills, $MID_RECOVERY_KILLS successors killed before they had recovered every device),}
    echo "note: $SCENARIO_NOTE"
}

declare -a STOPPED=()
c_worker_hang() {
    local RECOVERY_GAP_MIN=1 RECOVERY_GAP_SPREAD=2
    STOPPED=()
    r_fault_scenario worker-hang fault_stop_worker "$RECOVERY_HANGS" hangs "$CRASH_MARK" || return 1
    (( HB_KILLS >= FAULTS )) ||
        { why "$FAULTS hung workers but $HB_KILLS heartbeat kills logged"; return 1; }
    rstatus_check "the hangs (last cause: the heartbeat, devices ready)" \
        'w and "heartbeat" in (w["last_crash"] or "") and w["state"] == "ready" and all(d["state"] == "ready" and not d["blocked"] for d in devs)' || return 1
    local p
    for p in "${STOPPED[@]}"; do
        if [[ -d /proc/$p ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$p/status" 2>/dev/null; then
            why "the stopped worker $p is still alive"; return 1
        fi
    done
    echo "note: $SCENARIO_NOTE, $HB_KILLS heartbeat kills"
}

c_supervisor_restart() {
    local RECOVERY_GAP_MIN=1 RECOVERY_GAP_SPREAD=2
    local base0
    base0=$(rlog_lines)
    r_fault_scenario supervisor-restart fault_kill_supervisor "$RECOVERY_RESTARTS" \
        "supervisor kills" "$START_MARK" || return 1
    local found
    found=$(count_since "$base0" 'found the journal of a previous supervisor')
    (( found >= FAULTS * ${#RDEVS[@]} )) ||
        { why "$FAULTS supervisor restarts but $found found the journal"; return 1; }
    rstatus_check "the restarted supervisor's recoveries (new daemon pid, devices recovered and ready)" \
        'r["daemon"]["pid"] == '"$DPID"' and w and all(d["state"] == "ready" and d["recoveries"] >= 1 and d["resets"] == 0 for d in devs)' || return 1
    echo "note: $SCENARIO_NOTE"
}

# Without journals, the new supervisor cannot know which commands in the rings the dead worker had
# finished: serving the rings from cmd_tail would complete some twice (the kernel then breaks the
# ring) and lose others. It must reset them (every command in flight answered BUSY, which the
# initiator retries) before a worker serves them.
c_journal_lost() {
    local RECOVERY_GAP_MIN=1 RECOVERY_GAP_SPREAD=2
    local base dbase t0=$SECONDS
    base=$(rlog_lines); dbase=$(dmesg_lines)
    EXPECT_RESETS=0
    faults_under_fio journal-lost fault_lose_journals "$RECOVERY_JOURNAL_LOSSES" "$base" \
        "$START_MARK" "$READY_PATTERN.*$READY_RE" || { judge_log "$base" "$dbase" 1; return 1; }
    judge_log "$base" "$dbase" 1 || return 1
    (( RECOVERIES == 0 )) || { why "$RECOVERIES journal recoveries without journals"; return 1; }
    (( EXPECT_RESETS > 0 )) || { why "no disk had commands in flight at a supervisor kill"; return 1; }
    (( RESETS >= EXPECT_RESETS )) ||
        { why "$EXPECT_RESETS busy rings without journals but only $RESETS ring resets"; return 1; }
    rstatus_check "the restart without journals (no journal recoveries, devices ready)" \
        'w and all(d["state"] == "ready" and d["recoveries"] == 0 for d in devs)' || return 1
    echo "note: $FAULTS supervisor kills with the worker frozen and the journals deleted, $RESETS ring resets for $EXPECT_RESETS busy rings, $FIO_RUNS fio runs x ${#RDEVS[@]} disks err=0, $((SECONDS - t0))s"
}

# direct_read DEV: one 4 KiB O_DIRECT read of DEV, bounded far above any SCSI timeout of ours (a
# read that never ends is a failure to fail fast, reported by the caller's timing).
direct_read() { timeout 600 dd if="$1" of=/dev/null bs=4k count=1 iflag=direct status=none; }

# first_error_ms DEV DEADLINE_S: O_DIRECT reads of DEV, one after the other, until one fails; prints
# the millisecond clock when it failed. Nonzero if none failed within DEADLINE_S seconds.
first_error_ms() {
    local end=$((SECONDS + $2))
    while (( SECONDS < end )); do
        if ! direct_read "$1" 2>> "$LOGS/recovery_quarantine-dd.err"; then now_ms; return 0; fi
        pause 0.2
    done
    return 1
}

# The time from quarantine to the initiator's first I/O error: the last kill quarantines the file
# worker; its devices must be handed to the refusals worker and fail their reads with NOT READY
# within seconds, not after the initiator's SCSI timeout (RECOVERY_CMD_TIME_OUT, 120 s here, and
# Linux retries a command several times before it gives up).
QUARANTINE_FAIL_FAST_MAX=30   # seconds, under TCG
c_quarantine() {
    local old=$DPID base dbase t0=$SECONDS i t_kill t_err d
    kill -TERM "$old"
    bg_wait 60 "$old" || { why "the supervisor did not stop on SIGTERM"; return 1; }
    write_recovery_config "$RECOVERY_QUARANTINE"
    base=$(rlog_lines); dbase=$(dmesg_lines)
    QBASE=$base
    start_rdaemon
    for (( i = 1; i <= RECOVERY_QUARANTINE; i++ )); do
        # The devices are served by worker i (the first one recovers what the stopped supervisor
        # left in the journals).
        wait_for "$RECOVERY_STEP_TIMEOUT" "worker $i to serve ${RDEVS[*]}" \
            ready_at_least "$base" $((i * ${#RDEVS[@]})) || return 1
        t_kill=$(now_ms)
        fault_kill_worker || { why "no worker to kill (crash $i)"; return 1; }
        echo "crash $i at ${SECONDS}s: $LAST_FAULT"
    done
    # The first read after the quarantining kill waits while the device is blocked for the
    # hand-over, then fails.
    t_err=$(first_error_ms "${SDEV[${RDEVS[0]}]}" 300) ||
        { why "no I/O error on ${SDEV[${RDEVS[0]}]} within 300s of the quarantine"; return 1; }
    FAIL_FAST_S=$(( (t_err - t_kill) / 1000 )).$(printf '%03d' $(( (t_err - t_kill) % 1000 )))
    echo "first I/O error on ${SDEV[${RDEVS[0]}]} ${FAIL_FAST_S}s after the kill that quarantined the worker"
    (( t_err - t_kill < QUARANTINE_FAIL_FAST_MAX * 1000 )) ||
        { why "the first I/O error came ${FAIL_FAST_S}s after the quarantine (limit ${QUARANTINE_FAIL_FAST_MAX}s)"; return 1; }
    # Every later command fails at once, on every device.
    local t1 t2 slowest=0
    for d in "${RDEVS[@]}"; do
        t1=$(now_ms)
        if direct_read "${SDEV[$d]}" 2>> "$LOGS/recovery_quarantine-dd.err"; then
            why "a read of the quarantined device $d (${SDEV[$d]}) succeeded"; return 1
        fi
        t2=$(now_ms)
        (( t2 - t1 > slowest )) && slowest=$((t2 - t1))
        echo "$d: read failed after $((t2 - t1)) ms"
    done
    (( slowest < QUARANTINE_FAIL_FAST_MAX * 1000 )) ||
        { why "a read of a quarantined device took ${slowest} ms to fail"; return 1; }
    # shellcheck disable=SC2317  # called through wait_for
    quarantined() { (( $(count_since "$base" 'worker quarantined') >= 1 )); }
    wait_for 60 "the quarantine" quarantined || { rlog_since "$base" | tail -n 20; return 1; }
    echo "kernel log:"
    dmesg | tail -n +$((dbase + 1)) | grep -Ei 'sense|not ready|intervention|I/O error' | head -n 20
    dmesg | tail -n +$((dbase + 1)) | grep -qi 'not ready, manual intervention required' ||
        { why "the kernel did not log the NOT READY, MANUAL INTERVENTION REQUIRED sense"; return 1; }
    # No successor of the file worker, for long enough to have seen one after the longest
    # backoff (1 s); the refusals worker is the only one started since.
    pause 5
    local started refusals
    started=$(count_since "$base" 'worker started.* worker=file( |$)')
    refusals=$(count_since "$base" 'worker started.* worker=refused( |$)')
    (( started == RECOVERY_QUARANTINE )) ||
        { why "$started file workers started for $RECOVERY_QUARANTINE crashes"; return 1; }
    (( refusals == 1 )) || { why "$refusals refusals workers started (expected 1)"; return 1; }
    local blocked
    for d in "${RDEVS[@]}"; do
        blocked=$(cat "${BS[$d]}/action/block_dev" 2>/dev/null)
        echo "$d block_dev: $blocked"
        [[ $blocked != blocked ]] || { why "the quarantined device $d is still blocked"; return 1; }
    done
    rstatus_check "the quarantine (worker quarantined, devices quarantined, answered by the refusals worker, not blocked)" \
        'w and w["quarantined"] and w["state"] == "exited" and w["crashes"] >= '"$RECOVERY_QUARANTINE"' and all(d["state"] == "quarantined" and not d["blocked"] and d["worker"] == "refused" and d["home_worker"] == "file" and "quarantine" in (d["refusal"] or "") and d["id"] in w["devices"] for d in devs)' || return 1
    rlog_since "$base" | grep -E 'crashed|quarantine|blocked|refusals'
    echo "note: $RECOVERY_QUARANTINE crashes within 10m -> quarantined; first I/O error ${FAIL_FAST_S}s after the quarantine (initiator timeout ${RECOVERY_CMD_TIME_OUT}s), later reads fail in <= ${slowest} ms with NOT READY 04/03, ${#RDEVS[@]} devices answered by the refusals worker, no restart, $((SECONDS - t0))s"
}

# The operator lifts the quarantine: wrong names are refused; the file worker is started again,
# takes its devices back from the refusals worker, and they serve I/O again.
c_quarantine_lift() {
    local t0=$SECONDS out rc d blk i
    out=$("${VM_BIN_DIR}/tcmu-warden" quarantine lift nosuch --config "$RCONFIG" 2>&1); rc=$?
    echo "lift nosuch: rc=$rc: $out"
    (( rc != 0 )) && [[ $out == *'no worker is named "nosuch"'* ]] ||
        { why "lifting an unknown worker did not fail clearly (rc=$rc: $out)"; return 1; }
    out=$("${VM_BIN_DIR}/tcmu-warden" quarantine lift file --config "$RCONFIG" 2>&1); rc=$?
    echo "lift file: rc=$rc: $out"
    (( rc == 0 )) && [[ $out == *'quarantine of worker file lifted'* ]] ||
        { why "the lift failed (rc=$rc: $out)"; return 1; }
    out=$("${VM_BIN_DIR}/tcmu-warden" quarantine lift file --config "$RCONFIG" 2>&1); rc=$?
    echo "lift file again: rc=$rc: $out"
    (( rc != 0 )) && [[ $out == *'is not quarantined'* ]] ||
        { why "lifting a worker that is not quarantined did not fail clearly (rc=$rc: $out)"; return 1; }
    rstatus_check "the lift (worker file ready, not quarantined, lifted once; devices ready, not blocked)" \
        'w and not w["quarantined"] and w["lifts"] == 1 and w["state"] == "ready" and all(d["state"] == "ready" and not d["blocked"] and d["worker"] == "file" and d["home_worker"] is None and d["refusal"] is None and d["worker_pid"] == w["pid"] for d in devs)' || return 1
    head -c $((1 * MIB)) /dev/urandom > /tmp/lift-pattern || return 1
    for d in "${RDEVS[@]}"; do
        blk=${SDEV[$d]}
        # The first command after the hand-over may meet the POWER ON unit attention, which the
        # kernel retries; direct I/O so the page cache proves nothing.
        timeout 300 dd if=/tmp/lift-pattern of="$blk" bs=64k seek=16 oflag=direct conv=fsync status=none ||
            { why "writing $d ($blk) after the lift failed"; return 1; }
        timeout 300 dd if="$blk" of=/tmp/lift-back bs=64k skip=16 count=16 iflag=direct status=none ||
            { why "reading $d ($blk) back after the lift failed"; return 1; }
        cmp /tmp/lift-pattern /tmp/lift-back || { why "$d read back other data than was written"; return 1; }
        echo "$d: 1 MiB written, read back and compared after the lift"
    done
    for d in "${RDEVS[@]}"; do
        i=$(cat "${BS[$d]}/action/block_dev" 2>/dev/null)
        [[ $i != blocked ]] || { why "$d is still blocked after the lift"; return 1; }
    done
    rlog_since "$QBASE" | grep -E 'lift|released|handing|recovered' | tail -n 20
    echo "note: unknown and unquarantined names refused (exit 1); lifted; ${#RDEVS[@]} devices back with worker file, 1 MiB direct write + read back + cmp each, $((SECONDS - t0))s"
}

r_cleanup() {
    local ok=0
    unexport_all || ok=1
    remove_backstores || ok=1
    if kill -0 "$DPID" 2>/dev/null; then
        kill -TERM "$DPID"
        bg_wait 60 "$DPID" > /dev/null || { kill -KILL "$DPID"; why "the supervisor did not stop"; ok=1; }
    fi
    DPID=""
    local d
    for d in "${RDEVS[@]}"; do rm -f "/srv/tcmu/$d.img"; done
    return $ok
}

RECOVERY_CHECKS=(worker-kill-fio successor-kill-fio worker-hang-fio supervisor-restart-fio
                 journal-lost-fio quarantine quarantine-lift)

recovery_main() {
    local c
    mkfifo /tmp/recovery-pause.fifo && exec {PAUSE_FD}<>/tmp/recovery-pause.fifo
    if ! check recovery/setup r_setup; then
        for c in "${RECOVERY_CHECKS[@]}"; do skip "recovery/$c" recovery/setup; done
        r_cleanup > "$LOGS/recovery_cleanup.log" 2>&1
        return
    fi
    check recovery/worker-kill-fio c_worker_kill
    fio_stop
    check recovery/successor-kill-fio c_successor_kill
    fio_stop
    check recovery/worker-hang-fio c_worker_hang
    fio_stop
    # Stopped workers the heartbeat missed must not outlive the scenario.
    for c in "${STOPPED[@]}"; do kill -KILL "$c" 2>/dev/null; done
    check recovery/supervisor-restart-fio c_supervisor_restart
    fio_stop
    check recovery/journal-lost-fio c_journal_lost
    fio_stop
    if kill -0 "$DPID" 2>/dev/null; then
        if check recovery/quarantine c_quarantine; then
            check recovery/quarantine-lift c_quarantine_lift
        else
            skip recovery/quarantine-lift recovery/quarantine
        fi
    else
        skip recovery/quarantine "a running supervisor"
        skip recovery/quarantine-lift "a running supervisor"
    fi
    check recovery/cleanup r_cleanup
}
