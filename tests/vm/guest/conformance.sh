#!/bin/bash
# The conformance run, guest side: libiscsi's SCSI test suite (iscsi-test-cu) against one LUN
# exported through LIO's iSCSI target on the guest's loopback interface.
#
# Started by /init (see tests/vm/init) like guest/suite.sh, with the variables of
# /vmresults/params.env:
#   VM_DAEMON   kernel       the kernel's own `fileio` backstore (no TCMU at all)
#               tcmu-runner  Debian's tcmu-runner, its `qcow` handler (no plain-file handler there)
#               warden       our daemon, the `file` handler
#   VM_BIN_DIR  where tcmu-warden and tcmu-warden-worker are (warden mode)
#   VM_RESULTS  the writable results share (/vmresults)
#   VM_RUST_LOG the daemon's log filter (warden mode)
#   VM_CONF_TESTS  the iscsi-test-cu test selection (default ALL)
#
# In every mode the backing file lives on ext4 (a loop device over a tmpfs file), 256 MiB, 512-byte
# blocks, so the three runs differ only in who serves the LUN.
#
# Before that, one check of EXTENDED COPY between two devices of one daemon (`xcopy/two-luns`):
# two more 16 MiB backstores (xa, xb) exported through tcm_loop as LUNs 0 and 1 of a local SCSI
# host, and sg_xcopy copies 8192 blocks from the one to the other with XCOPY (LID1) sent to the
# source, which must find the destination by its NAA designator.
#
# Writes to the results share:
#   results.txt                 `PASS <check>` / `FAIL <check>: <reason>` per check (the host counts
#                               them like the main suite's checks)
#   conformance.xml             iscsi-test-cu's CUnit results (CUnitAutomated-Results.xml)
#   conformance-listing.xml     the tests it registered (CUnitAutomated-Listing.xml)
#   conformance.log             iscsi-test-cu's own output
#   conformance.seconds         how long iscsi-test-cu ran
#   daemon.log, dmesg.txt, logs/<check>.log
#   suite.done                  written last
set -u
shopt -s nullglob

DAEMON=${VM_DAEMON:-warden}
R=${VM_RESULTS:-/vmresults}
RESULTS=$R/results.txt
LOGS=$R/logs
DAEMON_LOG=$R/daemon.log
CFS=/sys/kernel/config/target
TESTS=${VM_CONF_TESTS:-ALL}
MIB=$((1024 * 1024))
SIZE=$((256 * MIB))
IQN=iqn.2003-01.org.linux-iscsi.tcmu-warden:conformance
PORTAL=127.0.0.1:3260
READY_TIMEOUT=180
# iscsi-test-cu's whole run; TCG makes the guest 10-30x slower than the host.
TEST_TIMEOUT=${VM_CONF_TIMEOUT:-3000}
WARDEN_CONFIG=/tmp/warden.toml

mkdir -p "$LOGS"
: > "$RESULTS"
say() { echo "vm-conformance: $*"; }
# PASS/FAIL bookkeeping, check (run a function with its own log), wait_for, write_attr.
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BS_DIR=""
XA_DIR=""
XB_DIR=""
DPID=""

prepare() {
    [[ -d $CFS ]] || { why "no $CFS"; return 1; }
    # (LIO writes persistent-reservation state to /etc/target/pr of the initramfs: see run.sh.)
    mkdir -p /var/target/pr /etc/target/pr /srv/tcmu /run/backing || return 1
    [[ -e /dev/fd ]] || ln -s /proc/self/fd /dev/fd || return 1
    ip link set lo up || { why "ip link set lo up failed"; return 1; }
    truncate -s 512M /run/backing/fs.img || return 1
    mkfs.ext4 -q -F /run/backing/fs.img || { why "mkfs.ext4 failed"; return 1; }
    mount -o loop /run/backing/fs.img /srv/tcmu || { why "mounting the backing fs failed"; return 1; }
    findmnt /srv/tcmu
}

# mk_backstore NAME BYTES: a backstore of the mode's kind with its backing file in /srv/tcmu, and
# a unit serial (LIO reports VPD pages only once one is written). Prints its configfs directory.
mk_backstore() {
    local name=$1 bytes=$2 dir
    case $DAEMON in
        kernel)
            truncate -s "$bytes" "/srv/tcmu/$name.img" || return 1
            dir=$CFS/core/fileio_0/$name
            mkdir -p "$dir" || return 1
            write_attr "$dir/control" "fd_dev_name=/srv/tcmu/$name.img,fd_dev_size=$bytes" >&2 || return 1
            ;;
        tcmu-runner)
            qemu-img create -q -f qcow2 "/srv/tcmu/$name.qcow2" "$bytes" || return 1
            dir=$CFS/core/user_0/$name
            mkdir -p "$dir" || return 1
            write_attr "$dir/control" "dev_config=qcow//srv/tcmu/$name.qcow2" >&2 || return 1
            write_attr "$dir/control" "dev_size=$bytes" >&2 || return 1
            ;;
        warden)
            truncate -s "$bytes" "/srv/tcmu/$name.img" || return 1
            dir=$CFS/core/user_0/$name
            mkdir -p "$dir" || return 1
            write_attr "$dir/control" "dev_config=file//srv/tcmu/$name.img" >&2 || return 1
            write_attr "$dir/control" "dev_size=$bytes" >&2 || return 1
            ;;
    esac
    write_attr "$dir/enable" 1 >&2 || return 1
    write_attr "$dir/wwn/vpd_unit_serial" "$(cat /proc/sys/kernel/random/uuid)" >&2 || return 1
    echo "$dir"
}

# The backstore, and a unit serial (LIO reports VPD pages only once one is written).
create_backstore() {
    XA_DIR=$(mk_backstore xa $((16 * MIB))) || { why "creating backstore xa failed"; return 1; }
    XB_DIR=$(mk_backstore xb $((16 * MIB))) || { why "creating backstore xb failed"; return 1; }
    case $DAEMON in
        kernel)
            truncate -s "$SIZE" /srv/tcmu/disk0.img || return 1
            BS_DIR=$CFS/core/fileio_0/disk
            mkdir -p "$BS_DIR" || return 1
            write_attr "$BS_DIR/control" "fd_dev_name=/srv/tcmu/disk0.img,fd_dev_size=$SIZE" || return 1
            ;;
        tcmu-runner)
            qemu-img create -q -f qcow2 /srv/tcmu/disk0.qcow2 "$SIZE" || return 1
            BS_DIR=$CFS/core/user_0/disk
            mkdir -p "$BS_DIR" || return 1
            write_attr "$BS_DIR/control" "dev_config=qcow//srv/tcmu/disk0.qcow2" || return 1
            write_attr "$BS_DIR/control" "dev_size=$SIZE" || return 1
            ;;
        warden)
            truncate -s "$SIZE" /srv/tcmu/disk0.img || return 1
            BS_DIR=$CFS/core/user_0/disk
            mkdir -p "$BS_DIR" || return 1
            write_attr "$BS_DIR/control" "dev_config=file//srv/tcmu/disk0.img" || return 1
            write_attr "$BS_DIR/control" "dev_size=$SIZE" || return 1
            ;;
    esac
    write_attr "$BS_DIR/enable" 1 || return 1
    write_attr "$BS_DIR/wwn/vpd_unit_serial" "$(cat /proc/sys/kernel/random/uuid)" || return 1
    echo "backstore $BS_DIR"
    grep -H . "$BS_DIR"/attrib/* 2>/dev/null
    cat "$BS_DIR/info" 2>/dev/null
}

uio_holder() { # uio_holder NAME: a process holds the backstore's /dev/uioN open
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

served() { # served NAME
    kill -0 "$DPID" 2>/dev/null || { why "the daemon is no longer running"; return 2; }
    case $DAEMON in
        warden) sed 's/\x1b\[[0-9;]*m//g' "$DAEMON_LOG" | grep 'device ready' |
                    grep -Eq "device=\"?$1\"?([^[:alnum:]_.-]|\$)" ;;
        tcmu-runner) uio_holder "$1" ;;
    esac
}
served_all() { served disk && served xa && served xb; }

start_daemon() {
    case $DAEMON in
        kernel) echo "no daemon: the kernel serves fileio itself"; return 0 ;;
        warden)
            printf '[handler.file]\nallow_paths = ["/srv/tcmu"]\n' > "$WARDEN_CONFIG"
            cp "$WARDEN_CONFIG" "$R/warden.toml"
            RUST_LOG=${VM_RUST_LOG:-info} NO_COLOR=1 RUST_BACKTRACE=1 \
                "$VM_BIN_DIR/tcmu-warden" run --config "$WARDEN_CONFIG" > "$DAEMON_LOG" 2>&1 &
            DPID=$!
            ;;
        tcmu-runner)
            mkdir -p "$R/tcmu-runner"
            tcmu-runner -l "$R/tcmu-runner" > "$DAEMON_LOG" 2>&1 &
            DPID=$!
            ;;
    esac
    echo "daemon pid $DPID"
    wait_for "$READY_TIMEOUT" "the daemon to serve the devices" served_all || {
        tail -n 30 "$DAEMON_LOG"; return 1; }
}

# LIO's iSCSI target on 127.0.0.1: one target portal group, the backstore as LUN 0, no
# authentication, any initiator name (iscsi-test-cu logs in with two).
export_iscsi() {
    local tpg=$CFS/iscsi/$IQN/tpgt_1
    mkdir -p "$tpg" || { why "mkdir $tpg failed"; return 1; }
    mkdir "$tpg/np/$PORTAL" || { why "creating the portal $PORTAL failed"; return 1; }
    mkdir "$tpg/lun/lun_0" || return 1
    ln -s "$BS_DIR" "$tpg/lun/lun_0/disk" || { why "linking the backstore failed"; return 1; }
    write_attr "$tpg/attrib/authentication" 0 || return 1
    write_attr "$tpg/attrib/generate_node_acls" 1 || return 1
    write_attr "$tpg/attrib/demo_mode_write_protect" 0 || return 1
    write_attr "$tpg/enable" 1 || return 1
    ls -R "$CFS/iscsi"
}

# ---- EXTENDED COPY between two devices of one daemon, through tcm_loop ----
LOOP_TPG=""
find_sd() { # find_sd LUN: prints /dev/sdX of the tcm_loop target's LUN once it has a capacity
    local addr b
    addr=$(cat "$LOOP_TPG/address" 2>/dev/null) || return 1
    for b in /sys/bus/scsi/devices/"$addr:$1"/block/*; do
        [[ -b /dev/${b##*/} && $(cat "$b/size" 2>/dev/null) =~ ^[1-9][0-9]*$ ]] || return 1
        echo "/dev/${b##*/}"
        return 0
    done
    return 1
}
have_sd() { find_sd "$1" > /dev/null; }
find_sg() { # find_sg LUN: the LUN's SCSI generic node (sg_xcopy talks SG_IO to sg nodes)
    local addr g
    addr=$(cat "$LOOP_TPG/address" 2>/dev/null) || return 1
    for g in /sys/bus/scsi/devices/"$addr:$1"/scsi_generic/*; do
        [[ -c /dev/${g##*/} ]] && { echo "/dev/${g##*/}"; return 0; }
    done
    return 1
}

xcopy_two_luns() {
    local wwn=naa.50014050000000aa nexus=naa.50014060000000aa a b sa sb
    LOOP_TPG=$CFS/loopback/$wwn/tpgt_1
    mkdir -p "$LOOP_TPG" || { why "mkdir $LOOP_TPG failed"; return 1; }
    # The nexus must exist before the LUNs, or the scan finds nothing.
    write_attr "$LOOP_TPG/nexus" "$nexus" || return 1
    mkdir "$LOOP_TPG/lun/lun_0" "$LOOP_TPG/lun/lun_1" || return 1
    ln -s "$XA_DIR" "$LOOP_TPG/lun/lun_0/xa" || return 1
    ln -s "$XB_DIR" "$LOOP_TPG/lun/lun_1/xb" || return 1
    wait_for 120 "xa at LUN 0" have_sd 0 || return 1
    wait_for 120 "xb at LUN 1" have_sd 1 || return 1
    a=$(find_sd 0); b=$(find_sd 1)
    sa=$(find_sg 0) || { why "no sg node for xa"; return 1; }
    sb=$(find_sg 1) || { why "no sg node for xb"; return 1; }
    echo "xa is $a ($sa), xb is $b ($sb)"
    head -c $((4 * MIB)) /dev/urandom > /tmp/xcopy.pattern || return 1
    dd if=/tmp/xcopy.pattern of="$a" bs=1M seek=1 oflag=direct conv=fsync 2>&1 ||
        { why "writing the pattern to xa failed"; return 1; }
    # 8192 blocks from xa block 2048 to xb block 4096, 1024 blocks per EXTENDED COPY, sent to xa.
    timeout 300 sg_xcopy if="$sa" of="$sb" bs=512 bpt=1024 skip=2048 seek=4096 count=8192 \
        verbose=1 || { why "sg_xcopy failed (status $?)"; return 1; }
    echo 3 > /proc/sys/vm/drop_caches
    dd if="$b" of=/tmp/xcopy.back bs=1M skip=2 count=4 iflag=direct 2>&1 ||
        { why "reading xb back failed"; return 1; }
    cmp /tmp/xcopy.pattern /tmp/xcopy.back || { why "xb does not hold what xa held"; return 1; }
    echo "8192 blocks copied from xa to xb by EXTENDED COPY"
}

unexport_loop() {
    [[ -n $LOOP_TPG && -d $LOOP_TPG ]] || return 0
    rm -f "$LOOP_TPG"/lun/lun_*/x[ab]
    rmdir "$LOOP_TPG"/lun/lun_* 2>/dev/null
    rmdir "$LOOP_TPG" "${LOOP_TPG%/tpgt_1}"
}

run_tests() {
    local dir=/tmp/conformance t0 rc
    mkdir -p "$dir" && cd "$dir" || return 1
    t0=$SECONDS
    timeout "$TEST_TIMEOUT" iscsi-test-cu --dataloss --test="$TESTS" --xml \
        "iscsi://127.0.0.1/$IQN/0" > "$R/conformance.log" 2>&1
    rc=$?
    echo $((SECONDS - t0)) > "$R/conformance.seconds"
    cp CUnitAutomated-Results.xml "$R/conformance.xml" 2>/dev/null
    cp CUnitAutomated-Listing.xml "$R/conformance-listing.xml" 2>/dev/null
    echo "iscsi-test-cu exited with status $rc after $(cat "$R/conformance.seconds")s"
    (( rc != 124 )) || { why "iscsi-test-cu did not finish within ${TEST_TIMEOUT}s"; return 1; }
    [[ -s $R/conformance.xml ]] || { why "iscsi-test-cu wrote no results (status $rc)"; return 1; }
    grep -q '</CUNIT_TEST_RUN_REPORT>' "$R/conformance.xml" ||
        { why "the results file is incomplete (status $rc)"; return 1; }
}

daemon_alive() {
    [[ -n $DPID ]] || return 0
    kill -0 "$DPID" 2>/dev/null || { wait "$DPID"; why "the daemon died (status $?)"; return 1; }
}

cleanup() {
    local tpg=$CFS/iscsi/$IQN/tpgt_1 ok=0
    unexport_loop || ok=1
    if [[ -d $tpg ]]; then
        write_attr "$tpg/enable" 0 || ok=1
        rm -f "$tpg/lun/lun_0/disk"
        rmdir "$tpg/lun/lun_0" "$tpg/np/$PORTAL" || ok=1
        rmdir "$tpg" "$CFS/iscsi/$IQN" || ok=1
    fi
    local d
    for d in "$BS_DIR" "${XA_DIR:-}" "${XB_DIR:-}"; do
        [[ -n $d && -d $d ]] && { timeout 120 rmdir "$d" || ok=1; }
    done
    if [[ -n $DPID ]] && kill -0 "$DPID" 2>/dev/null; then
        kill -TERM "$DPID"
        for _ in $(seq 300); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$DPID" 2>/dev/null
    fi
    return $ok
}

MAIN_DONE=0
main() {
    say "daemon: $DAEMON, kernel $(uname -r), tests $TESTS"
    if check setup/backing-fs prepare && check setup/backstore create_backstore &&
       check daemon/start start_daemon && check setup/iscsi export_iscsi; then
        check xcopy/two-luns xcopy_two_luns
        check conformance/run run_tests
        check daemon/alive daemon_alive
    fi
    check cleanup cleanup
    MAIN_DONE=1
}
main
dmesg > "$R/dmesg.txt" 2>&1
sync
if (( MAIN_DONE )); then date -u +%FT%TZ > "$R/suite.done"; fi
