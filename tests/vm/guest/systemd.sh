#!/bin/bash
# The systemd suite, guest side (tests/vm/run.sh --suite systemd). Here the guest's init is
# systemd (tests/vm/init hands over to it, see tests/vm/systemd/), and this script runs as its
# service vm-suite.service. It installs the daemon the way an operator does, with the shipped
# unit dist/tcmu-warden.service unchanged, and proves that a supervisor crash under that unit is
# recovered from the in-flight journals: the journals (in /run/tcmu-warden, the unit's
# RuntimeDirectory) must survive systemd's Restart=on-failure restart.
#
# Checks (results.txt, one line each):
#   systemd/boot            systemd is PID 1
#   systemd/install         binaries, unit, configuration in place; systemd-analyze verify passes
#   systemd/start           `systemctl start tcmu-warden` returns (READY=1), /run/tcmu-warden 0700
#   systemd/serve           two file devices are served and exported through tcm_loop
#   systemd/crash-restart-fio   under fio, the worker is frozen and the supervisor killed with
#                           SIGKILL; systemd restarts the unit, the journal files are the same
#                           files as before the kill, every device is recovered from its journal
#                           ("device recovered", `status --json` recoveries), no ring reset, fio
#                           verifies without an error
#   systemd/no-preserve-fio the same with a drop-in RuntimeDirectoryPreserve=no (the unit as it
#                           was before): systemd deletes the journals with the directory, and the
#                           busy rings are reset instead (shows what the setting prevents)
#   systemd/clean-restart   `systemctl restart`: the devices are served again (what the daemon
#                           logs about the stale journals is shown in the note)
#   systemd/stop            `systemctl stop`: the daemon drains and exits, /run/tcmu-warden stays
#   systemd/cleanup         targets and backstores removed
# Then suite.done; the service's SuccessAction/FailureAction power the guest off.
set -u
shopt -s nullglob

R=${VM_RESULTS:-/vmresults}
RESULTS=$R/results.txt
LOGS=$R/logs
CFS=/sys/kernel/config/target
MIB=$((1024 * 1024))
UNIT=tcmu-warden.service
RUN_DIR=/run/tcmu-warden
JOURNAL_DIR=$RUN_DIR/journal                 # the default journal_dir
CONFIG=/etc/tcmu-warden/tcmu-warden.toml      # the unit's ExecStart names it
BACKING=/var/lib/tcmu                          # the unit's ReadWritePaths
FIO_SIZE=${VM_RECOVERY_FIO_SIZE:-32m}   # per disk and fio run: I/O must still run at the kill
# Deadlines (seconds); the guest runs under TCG.
READY_TIMEOUT=180
DEVICE_TIMEOUT=120
STEP_TIMEOUT=180
IO_TIMEOUT=900
CMD_TIME_OUT=120                               # the LUNs' and the initiator's command timeouts

DEVS=(crash0 crash1)
# crash1's ring is the smallest the kernel allows, so it wraps during the runs.
declare -A RING_OPTS=([crash1]=cmd_ring_size_mb=1)
declare -A BS=() TPG=() SDEV=() WWN_IDX=()

mkdir -p "$LOGS"
: > "$RESULTS"
say() { echo "vm-systemd: $*"; }
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ---- the daemon's log, from the journal ----------------------------------------------------------
# log_format = "text" in the configuration: the unit's stderr goes to the journal as text lines.
dlog() { journalctl -q -u "$UNIT" -o cat --no-pager 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g'; }
dlog_lines() { dlog | wc -l; }
dlog_since() { dlog | tail -n +$(( $1 + 1 )); }
count_since() { dlog_since "$1" | grep -Ec -- "$2"; }
RECOVERED_RE="device recovered.*backstore=user_[0-9]+/crash[0-9]"
RESET_RE="ring reset: every command in flight"
READY_RE="device ready.*device=\"?crash[0-9]\"?([^[:alnum:]_.-]|\$)"

prop() { systemctl show -p "$1" --value "$UNIT"; }
main_pid() { prop MainPID; }

worker_pid() { # the live worker child of the supervisor
    local p st
    for p in $(pgrep -P "$(main_pid)" 2>/dev/null); do
        [[ $(readlink "/proc/$p/exe" 2>/dev/null) == */tcmu-warden-worker ]] || continue
        st=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$p/status" 2>/dev/null)
        [[ -n $st && $st != Z && $st != X ]] || continue
        echo "$p"; return 0
    done
    return 1
}

inflight_io() {
    local d n=0 r w
    for d in "${DEVS[@]}"; do
        read -r r w < "/sys/block/${SDEV[$d]#/dev/}/inflight" || continue
        n=$((n + r + w))
    done
    echo "$n"
}
io_in_flight() { (( $(inflight_io) > 0 )); }
busy_disks() {
    local d n=0 r w
    for d in "${DEVS[@]}"; do
        read -r r w < "/sys/block/${SDEV[$d]#/dev/}/inflight" || continue
        (( r + w > 0 )) && n=$((n + 1))
    done
    echo "$n"
}

# The journal files' inode numbers, "name:inode ...".
journal_inodes() {
    local d out=""
    for d in "${DEVS[@]}"; do
        out+="$d:$(stat -c %i "$JOURNAL_DIR/user_0/$d" 2>/dev/null || echo none) "
    done
    echo "${out% }"
}

# ---- devices (as guest/suite.sh does) ------------------------------------------------------------
mk_user() { # mk_user NAME DEV_CONFIG BYTES [CONTROL...]
    local name=$1 dir=$CFS/core/user_0/$1 opt
    mkdir -p "$dir" || { why "mkdir $dir failed"; return 1; }
    write_attr "$dir/control" "dev_config=$2" || return 1
    write_attr "$dir/control" "dev_size=$3" || return 1
    for opt in "${@:4}"; do write_attr "$dir/control" "$opt" || return 1; done
    write_attr "$dir/enable" 1 || return 1
    write_attr "$dir/wwn/vpd_unit_serial" "$(cat /proc/sys/kernel/random/uuid)" || return 1
    BS[$name]=$dir
}
wwn() { printf 'naa.%s%09x' "$1" "$2"; }
scsi_addr() { local a; a=$(cat "${TPG[$1]}/address" 2>/dev/null) || return 1; echo "$a:0"; }
find_sd() {
    local addr b
    addr=$(scsi_addr "$1") || return 1
    for b in /sys/bus/scsi/devices/"$addr"/block/*; do
        [[ -b /dev/${b##*/} ]] || return 1
        [[ $(cat "$b/size" 2>/dev/null) =~ ^[1-9][0-9]*$ ]] || return 1
        SDEV[$1]=/dev/${b##*/}
        return 0
    done
    return 1
}
export_dev() { # export_dev NAME: a tcm_loop target with the backstore as LUN 0
    local tpg
    tpg=$CFS/loopback/$(wwn 5001405 "${WWN_IDX[$1]}")/tpgt_1
    mkdir -p "$tpg" || { why "mkdir $tpg failed"; return 1; }
    write_attr "$tpg/nexus" "$(wwn 5001406 "${WWN_IDX[$1]}")" || return 1
    TPG[$1]=$tpg
    mkdir "$tpg/lun/lun_0" || { why "mkdir $tpg/lun/lun_0 failed"; return 1; }
    ln -s "${BS[$1]}" "$tpg/lun/lun_0/$1" || { why "linking ${BS[$1]} failed"; return 1; }
    wait_for "$DEVICE_TIMEOUT" "a disk for $1" find_sd "$1" || return 1
    echo "$CMD_TIME_OUT" > "/sys/block/${SDEV[$1]#/dev/}/device/timeout" || return 1
    echo "$1 is ${SDEV[$1]} at $(scsi_addr "$1")"
}

# ---- fio -----------------------------------------------------------------------------------------
FIO_PID=""
FIO_OUT=""
fio_start() { # fio_start TAG
    FIO_OUT=$LOGS/systemd_$1-fio.out
    local d jobs=()
    for d in "${DEVS[@]}"; do jobs+=(--name="$d" --filename="${SDEV[$d]}"); done
    timeout "$IO_TIMEOUT" fio --direct=1 --rw=randwrite --bs=4k --size="$FIO_SIZE" \
        --iodepth=16 --ioengine=libaio --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --verify_backlog=1024 "${jobs[@]}" > "$FIO_OUT" 2>&1 &
    FIO_PID=$!
    echo "fio (pid $FIO_PID) started at ${SECONDS}s"
}
fio_result() {
    local rc ok bad
    bg_wait "$IO_TIMEOUT" "$FIO_PID"; rc=$?
    FIO_PID=""
    grep -E 'err=|WRITE:|READ:|verify' "$FIO_OUT"
    (( rc == 0 )) || { why "fio exited with status $rc (see ${FIO_OUT##*/})"; return 1; }
    ok=$(grep -c 'err= 0' "$FIO_OUT"); bad=$(grep -E 'err= *[1-9]' "$FIO_OUT" | head -n1)
    [[ -z $bad ]] || { why "fio reports errors: $bad"; return 1; }
    (( ok == ${#DEVS[@]} )) || { why "$ok of ${#DEVS[@]} fio jobs report err=0"; return 1; }
}
fio_stop() {
    [[ -n $FIO_PID ]] || return 0
    kill "$FIO_PID" 2>/dev/null
    bg_wait 60 "$FIO_PID" >/dev/null 2>&1
    FIO_PID=""
}

# ---- the checks ----------------------------------------------------------------------------------
c_boot() {
    local comm state
    comm=$(cat /proc/1/comm)
    state=$(systemctl is-system-running 2>&1)
    echo "PID 1: $comm; system state: $state"
    systemctl --failed --no-pager
    [[ $comm == systemd ]] || { why "PID 1 is $comm, not systemd"; return 1; }
    systemctl is-active --quiet systemd-journald.service ||
        { why "systemd-journald is not running (the daemon's log is read from the journal)"; return 1; }
    echo "note: $(systemctl --version | head -n1), state $state"
}

c_install() {
    install -D -m 0755 "$VM_BIN_DIR/tcmu-warden" /usr/bin/tcmu-warden || return 1
    install -D -m 0755 "$VM_BIN_DIR/tcmu-warden-worker" \
        /usr/libexec/tcmu-warden/tcmu-warden-worker || return 1
    install -D -m 0644 "$VM_REPO/dist/tcmu-warden.service" /etc/systemd/system/$UNIT || return 1
    mkdir -p /etc/tcmu-warden "$BACKING" /run/backing || return 1
    cat > "$CONFIG" <<TOML
[daemon]
worker_exe = "/usr/libexec/tcmu-warden/tcmu-warden-worker"
log_format = "text"
heartbeat_interval = "1s"
heartbeat_timeout = "3s"
restart_backoff_initial = "100ms"
restart_backoff_max = "1s"
quarantine_after = 100

[handler.file]
allow_paths = ["$BACKING"]
TOML
    cp "$CONFIG" "$R/tcmu-warden.toml"
    # Backing files on a real filesystem: ext4 on a loop device over a tmpfs file.
    truncate -s 256M /run/backing/fs.img || return 1
    mkfs.ext4 -q -F /run/backing/fs.img || { why "mkfs.ext4 failed"; return 1; }
    mount -o loop /run/backing/fs.img "$BACKING" || { why "mounting $BACKING failed"; return 1; }
    local out
    out=$(systemd-analyze verify --man=no --recursive-errors=no /etc/systemd/system/$UNIT 2>&1)
    echo "systemd-analyze verify: ${out:-no complaints}"
    [[ -z $out ]] || { why "systemd-analyze verify: ${out//$'\n'/ }"; return 1; }
    systemctl daemon-reload || { why "systemctl daemon-reload failed"; return 1; }
    systemctl cat "$UNIT" --no-pager | grep -E '^(RuntimeDirectory|Restart|KillMode)'
}

c_start() {
    local mode
    timeout "$READY_TIMEOUT" systemctl start "$UNIT" ||
        { systemctl status "$UNIT" --no-pager; dlog | tail -n 30; why "systemctl start failed"; return 1; }
    systemctl status "$UNIT" --no-pager
    [[ $(prop ActiveState) == active ]] || { why "the unit is $(prop ActiveState)"; return 1; }
    mode=$(stat -c %a "$RUN_DIR" 2>/dev/null)
    ls -la "$RUN_DIR"
    [[ $mode == 700 ]] || { why "$RUN_DIR has mode ${mode:-none}, not 700"; return 1; }
    [[ -S $RUN_DIR/control.sock ]] || { why "no control socket in $RUN_DIR"; return 1; }
    echo "note: main pid $(main_pid), $RUN_DIR mode $mode"
}

ready_count() { (( $(dlog_since "$1" | grep -Ec -- "$READY_RE") >= $2 )); }

c_serve() {
    local d i=20 base
    base=$(dlog_lines)
    for d in "${DEVS[@]}"; do
        WWN_IDX[$d]=$((i += 1))
        truncate -s $((64 * MIB)) "$BACKING/$d.img" || return 1
        mk_user "$d" "file/$BACKING/$d.img" $((64 * MIB)) ${RING_OPTS[$d]:+"${RING_OPTS[$d]}"} || return 1
        write_attr "${BS[$d]}/attrib/cmd_time_out" "$CMD_TIME_OUT" || return 1
    done
    wait_for "$READY_TIMEOUT" "the daemon to serve ${DEVS[*]}" ready_count "$base" "${#DEVS[@]}" ||
        { dlog | tail -n 30; return 1; }
    for d in "${DEVS[@]}"; do export_dev "$d" || return 1; done
    echo "worker: $(worker_pid)"
    ls -laR "$JOURNAL_DIR"
    echo "note: ${DEVS[*]} on ${SDEV[*]}"
}

# restarted OLD_PID OLD_RESTARTS: systemd restarted the unit (a new main pid, one more restart).
restarted() {
    [[ $(prop ActiveState) == active && $(main_pid) != 0 && $(main_pid) != "$1" ]] &&
        (( $(prop NRestarts) > $2 ))
}
# settled BASE WANT_RE: after log line BASE, a WANT_RE line for every device.
settled() { (( $(count_since "$1" "$2") >= ${#DEVS[@]} )); }
# settled_any BASE: every device served again after BASE, recovered or reset.
settled_any() {
    local d n=0
    for d in "${DEVS[@]}"; do
        dlog_since "$1" | grep -E 'device recovered|device ready|ring reset' |
            grep -Eq "user_0/$d|device=\"?$d\"?([^[:alnum:]_.-]|\$)" && n=$((n + 1))
    done
    (( n == ${#DEVS[@]} ))
}

# status_json PYTHON_EXPR: `tcmu-warden status --json` with r the report, devs our devices.
status_json() {
    local out
    out=$(tcmu-warden status --json 2>&1) || { echo "$out"; return 1; }
    printf '%s' "$out" | python3 -c '
import json, sys
r = json.load(sys.stdin)
names = sys.argv[2].split()
devs = [d for d in r["devices"] if d["backstore"].split("/")[-1] in names]
for d in devs:
    print("status:", d["backstore"], d["state"], "recoveries", d["recoveries"])
sys.exit(0 if len(devs) == len(names) and eval(sys.argv[1]) else 1)' "$1" "${DEVS[*]}"
}

# crash_under_fio TAG: under fio, freeze the worker (so commands stay in flight in the rings),
# then SIGKILL the supervisor, as a crash would; wait for systemd's restart and for every device
# to be served again. Sets BASE (the log line count before the kill), BUSY, INODES_BEFORE/AFTER.
crash_under_fio() {
    local old restarts p t0 try
    old=$(main_pid); restarts=$(prop NRestarts)
    # The kill must find commands in flight: if fio ended, or the frozen worker had none
    # outstanding, let it go on and try again (bounded).
    for (( try = 1; try <= 5; try++ )); do
        [[ -n $FIO_PID ]] && kill -0 "$FIO_PID" 2>/dev/null || {
            [[ -z $FIO_PID ]] || fio_result || return 1
            fio_start "$1"
        }
        wait_for 120 "I/O in flight" io_in_flight || { fio_stop; return 1; }
        p=$(worker_pid) || { why "no worker"; fio_stop; return 1; }
        INODES_BEFORE=$(journal_inodes)
        kill -STOP "$p" || return 1
        sleep 1
        BUSY=$(busy_disks)
        (( BUSY > 0 )) && break
        echo "try $try: worker $p stopped with no command in flight; resuming it"
        kill -CONT "$p"
    done
    (( BUSY > 0 )) || { why "no command was in flight at any of 5 tries"; fio_stop; return 1; }
    BASE=$(dlog_lines)
    echo "worker $p stopped, $BUSY disks with commands in flight; journals: $INODES_BEFORE"
    kill -KILL "$old" || return 1
    echo "supervisor $old killed (SIGKILL) at ${SECONDS}s"
    t0=$SECONDS
    wait_for "$STEP_TIMEOUT" "systemd to restart $UNIT" restarted "$old" "$restarts" ||
        { systemctl status "$UNIT" --no-pager; fio_stop; return 1; }
    echo "restarted by systemd after $((SECONDS - t0))s: main pid $(main_pid), NRestarts $(prop NRestarts)"
    INODES_AFTER=$(journal_inodes)
    echo "journals after the restart: $INODES_AFTER"
    wait_for "$STEP_TIMEOUT" "every device to be served again" settled_any "$BASE" ||
        { dlog_since "$BASE" | tail -n 30; fio_stop; return 1; }
    fio_result || return 1
    echo "daemon log since the kill:"
    dlog_since "$BASE" | grep -Ei 'journal|recover|reset|ready|started|error|warn' | head -n 60
}

c_crash_restart() {
    local t0=$SECONDS rec resets found
    crash_under_fio crash || return 1
    rec=$(count_since "$BASE" "$RECOVERED_RE")
    resets=$(count_since "$BASE" "$RESET_RE")
    found=$(count_since "$BASE" 'found the journal of a previous supervisor')
    echo "recoveries=$rec resets=$resets found_journals=$found busy=$BUSY"
    [[ $INODES_BEFORE == "$INODES_AFTER" && $INODES_BEFORE != *none* ]] ||
        { why "the journal files did not survive the restart ($INODES_BEFORE -> $INODES_AFTER)"; return 1; }
    (( found >= ${#DEVS[@]} )) ||
        { why "the restarted supervisor found $found of ${#DEVS[@]} journals"; return 1; }
    (( rec >= ${#DEVS[@]} )) || { why "$rec journal recoveries for ${#DEVS[@]} devices"; return 1; }
    (( resets == 0 )) || { why "$resets ring resets: a journal was not used"; return 1; }
    (( BUSY > 0 )) || { why "no disk had commands in flight at the kill"; return 1; }
    wait_for 60 "status --json to count the recoveries" \
        status_json 'all(d["state"] == "ready" and d["recoveries"] >= 1 for d in devs)' || return 1
    echo "note: SIGKILL of the supervisor with $BUSY busy rings, restarted by systemd (NRestarts $(prop NRestarts)), journals kept ($INODES_AFTER), $rec recoveries, 0 resets, fio err=0, $((SECONDS - t0))s"
}

DROPIN=/etc/systemd/system/$UNIT.d/zz-vm-no-preserve.conf
c_no_preserve() {
    local t0=$SECONDS rec resets found
    mkdir -p "${DROPIN%/*}" || return 1
    printf '[Service]\nRuntimeDirectoryPreserve=no\n' > "$DROPIN" || return 1
    systemctl daemon-reload || return 1
    echo "RuntimeDirectoryPreserve=$(prop RuntimeDirectoryPreserve)"
    crash_under_fio no-preserve; local rc=$?
    rm -f "$DROPIN"; systemctl daemon-reload
    echo "RuntimeDirectoryPreserve=$(prop RuntimeDirectoryPreserve) (drop-in removed)"
    (( rc == 0 )) || return 1
    rec=$(count_since "$BASE" "$RECOVERED_RE")
    resets=$(count_since "$BASE" "$RESET_RE")
    found=$(count_since "$BASE" 'found the journal of a previous supervisor')
    echo "recoveries=$rec resets=$resets found_journals=$found busy=$BUSY"
    (( found == 0 && rec == 0 )) ||
        { why "with RuntimeDirectoryPreserve=no the journals were still found ($found, $rec recoveries)"; return 1; }
    [[ $INODES_BEFORE != "$INODES_AFTER" ]] || { why "the journal files were kept"; return 1; }
    (( BUSY > 0 && resets >= BUSY )) || { why "$BUSY busy rings but $resets resets"; return 1; }
    echo "note: without RuntimeDirectoryPreserve the journals went with the directory: 0 recoveries, $resets ring resets for $BUSY busy rings (fio retried, err=0), $((SECONDS - t0))s"
}

c_clean_restart() {
    local base t0=$SECONDS stale rec
    base=$(dlog_lines)
    timeout "$STEP_TIMEOUT" systemctl restart "$UNIT" || { why "systemctl restart failed"; return 1; }
    wait_for "$STEP_TIMEOUT" "every device to be served again" settled_any "$base" ||
        { dlog_since "$base" | tail -n 30; return 1; }
    dlog_since "$base" | grep -Ei 'journal|recover|reset|ready|drain|blocked|error|warn' | head -n 40
    stale=$(count_since "$base" 'journal does not agree with the ring')
    rec=$(count_since "$base" "$RECOVERED_RE")
    local d
    for d in "${DEVS[@]}"; do
        timeout 120 dd if="${SDEV[$d]}" of=/dev/null bs=1M count=4 iflag=direct 2>&1 ||
            { why "reading ${SDEV[$d]} after the restart failed"; return 1; }
    done
    echo "note: clean restart: $stale stale journals fell back to a reset, $rec recovered, devices readable, $((SECONDS - t0))s"
}

c_cleanup() {
    local name tpg l ok=0 pid rc
    for name in "${!TPG[@]}"; do
        tpg=${TPG[$name]}
        for l in "$tpg"/lun/lun_0/*; do [[ -L $l ]] && { rm "$l" || ok=1; }; done
        rmdir "$tpg/lun/lun_0" "$tpg" "${tpg%/tpgt_1}" || ok=1
    done
    for name in "${!BS[@]}"; do
        rmdir "${BS[$name]}" &
        pid=$!
        bg_wait "$DEVICE_TIMEOUT" "$pid"; rc=$?
        (( rc == 0 )) || { why "rmdir ${BS[$name]} failed ($rc)"; ok=1; }
    done
    (( ok == 0 ))
}

c_stop() {
    timeout 120 systemctl stop "$UNIT" || { why "systemctl stop failed"; return 1; }
    echo "unit: $(prop ActiveState)/$(prop SubState), result $(prop Result)"
    ls -laR "$RUN_DIR" 2>&1
    [[ -d $RUN_DIR ]] || { why "$RUN_DIR was deleted at the stop"; return 1; }
    [[ ! -e $RUN_DIR/control.sock ]] || { why "the control socket outlived a clean stop"; return 1; }
    echo "note: drained and stopped ($(prop Result)); $RUN_DIR kept"
}

# ---- main ----------------------------------------------------------------------------------------
CHECKS=(boot install start serve crash-restart-fio no-preserve-fio clean-restart cleanup stop)
run_all() {
    check systemd/boot c_boot || return
    check systemd/install c_install || return
    check systemd/start c_start || return
    if check systemd/serve c_serve; then
        check systemd/crash-restart-fio c_crash_restart
        fio_stop
        check systemd/no-preserve-fio c_no_preserve
        fio_stop
        check systemd/clean-restart c_clean_restart
    else
        local c
        for c in crash-restart-fio no-preserve-fio clean-restart; do skip "systemd/$c" systemd/serve; done
    fi
    check systemd/cleanup c_cleanup
    check systemd/stop c_stop
}
run_all
for c in "${CHECKS[@]}"; do
    [[ -n ${STATUS[systemd/$c]:-} ]] || fail "systemd/$c" "not run: an earlier check failed"
done
dlog > "$R/daemon.log"
journalctl -b --no-pager > "$R/journal.txt" 2>&1
dmesg > "$R/dmesg.txt"
touch "$R/suite.done"
sync
say "done"
