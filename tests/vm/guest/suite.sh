#!/bin/bash
# The VM suite, guest side. Runs as root inside the guest's chroot (the host's root under an
# overlay, see tests/vm/init), started by /init with the variables of /vmresults/params.env:
#   VM_DAEMON   warden | tcmu-runner | kernel  (who serves the backstores)
#   VM_BIN_DIR  where tcmu-warden and tcmu-warden-worker are (warden mode)
#   VM_RESULTS  the writable results share (/vmresults)
#   VM_FIO_SIZE size of the fio verify run per device (e.g. 64m)
#   VM_RUST_LOG the daemon's log filter (warden mode)
#   VM_GROUPS   which groups of checks run: `main` (everything below), `hotplug` (warden only:
#               configfs hot-plug, see guest/hotplug.sh), `luns` (warden only: LUNs above 0 on
#               targets without LUN 0, see guest/luns.sh), `recovery` (warden only: crash
#               recovery under fio, see guest/recovery.sh) and/or `jail` (warden only: the jail's
#               escape and runtime tests on this kernel, see guest/jail.sh); default
#               "main hotplug luns recovery jail"
#   VM_JAIL_TESTS  (jail group) the test binaries, `<target>=<path>` words
#
# It creates LIO backstores, starts the daemon, exports every backstore through tcm_loop (a local
# SCSI host: each LUN shows up as /dev/sdX), runs the checks, cleans up, and writes:
#   results.txt    one line per check: `PASS <check>` or `FAIL <check>: <reason>`
#   logs/<check>.log  the output of each check
#   daemon.log, inotify.log, dmesg.txt
#   suite.done     written last: its absence tells the host the suite did not finish.
set -u
shopt -s nullglob

# ---- knobs the lead may adjust -------------------------------------------------------------------
# A daemon log line saying the daemon serves a device: matches READY_PATTERN and names the device
# as `device=<name>` (tracing's structured field; quotes around the name are accepted).
READY_PATTERN=${VM_READY_PATTERN:-device ready}
# A daemon log line saying the policy refused a device (with `device=<name>`).
REFUSE_PATTERN=${VM_REFUSE_PATTERN:-refus}
# How the warden is started (its config is written to WARDEN_CONFIG first).
WARDEN_CONFIG=/tmp/warden.toml
WARDEN_CMD=("${VM_BIN_DIR:-}/tcmu-warden" run --config "$WARDEN_CONFIG")
# Deadlines (seconds). The guest is 10-30x slower than the host: keep them generous.
READY_TIMEOUT=180
DEVICE_TIMEOUT=120
FAST_FAIL_TIMEOUT=60
IO_TIMEOUT=900

DAEMON=${VM_DAEMON:-warden}
R=${VM_RESULTS:-/vmresults}
RESULTS=$R/results.txt
LOGS=$R/logs
DAEMON_LOG=$R/daemon.log
CFS=/sys/kernel/config/target
FIO_SIZE=${VM_FIO_SIZE:-64m}
MIB=$((1024 * 1024))

mkdir -p "$LOGS"
: > "$RESULTS"
say() { echo "vm-suite: $*"; }

# ---- result bookkeeping, checks, waits: shared with conformance.sh ------------------------------
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ---- devices -------------------------------------------------------------------------------------
# DEVICES: the devices the checks run against; REFUSED: the one the policy must refuse (warden).
declare -a DEVICES=()
REFUSED=""
declare -A BS=()        # name -> configfs backstore directory
declare -A SIZE=()      # name -> bytes
declare -A TPG=()       # name -> tcm_loop tpgt_1 directory
declare -A SDEV=()      # name -> /dev/sdX
declare -A WWN_IDX=()   # name -> index for the tcm_loop WWNs
declare -A SERIAL=()    # name -> unit serial number written to configfs

# LIO reports VPD pages (and derives the NAA designator) only once a unit serial has been written
# through configfs, as targetcli does: give every backstore one.
set_serial() { # set_serial NAME
    local serial
    serial=$(cat /proc/sys/kernel/random/uuid) || return 1
    write_attr "${BS[$1]}/wwn/vpd_unit_serial" "$serial" || return 1
    SERIAL[$1]=$serial
}

mk_user() { # mk_user NAME DEV_CONFIG BYTES [CONTROL...]: CONTROL options (k=v) before enable
    local name=$1 cfg=$2 bytes=$3 dir=$CFS/core/user_0/$1 opt
    mkdir -p "$dir" || { why "mkdir $dir failed"; return 1; }
    write_attr "$dir/control" "dev_config=$cfg" || return 1
    write_attr "$dir/control" "dev_size=$bytes" || return 1
    for opt in "${@:4}"; do write_attr "$dir/control" "$opt" || return 1; done
    write_attr "$dir/enable" 1 || return 1
    BS[$name]=$dir; SIZE[$name]=$bytes
    set_serial "$name" || return 1
    echo "user backstore $name: dev_config=$cfg dev_size=$bytes serial=${SERIAL[$name]}"
}

mk_fileio() { # mk_fileio NAME PATH BYTES
    local name=$1 path=$2 bytes=$3 dir=$CFS/core/fileio_0/$1
    mkdir -p "$dir" || { why "mkdir $dir failed"; return 1; }
    write_attr "$dir/control" "fd_dev_name=$path,fd_dev_size=$bytes" || return 1
    write_attr "$dir/enable" 1 || return 1
    BS[$name]=$dir; SIZE[$name]=$bytes
    set_serial "$name" || return 1
    echo "fileio backstore $name: $path, $bytes bytes"
}

mk_ramdisk() { # mk_ramdisk NAME BYTES
    local name=$1 bytes=$2 dir=$CFS/core/rd_mcp_0/$1
    mkdir -p "$dir" || { why "mkdir $dir failed"; return 1; }
    write_attr "$dir/control" "rd_pages=$((bytes / 4096))" || return 1
    write_attr "$dir/enable" 1 || return 1
    BS[$name]=$dir; SIZE[$name]=$bytes
    set_serial "$name" || return 1
    echo "rd_mcp backstore $name: $bytes bytes"
}

# ---- 1. prepare ----------------------------------------------------------------------------------
prepare() {
    [[ -d $CFS ]] || { why "no $CFS (target_core_mod not loaded, or configfs not mounted)"; return 1; }
    mkdir -p /var/target/pr /etc/target /srv/tcmu /mnt /run/backing || return 1
    [[ -e /dev/fd ]] || ln -s /proc/self/fd /dev/fd || return 1
    # The backing filesystem: ext4 on a loop device over a tmpfs file.
    truncate -s 512M /run/backing/fs.img || return 1
    mkfs.ext4 -q -F /run/backing/fs.img || { why "mkfs.ext4 of the backing filesystem failed"; return 1; }
    mount -o loop /run/backing/fs.img /srv/tcmu || { why "mounting the backing filesystem failed"; return 1; }
    findmnt /srv/tcmu
}

create_backstores() {
    case $DAEMON in
        warden)
            truncate -s $((256 * MIB)) /srv/tcmu/disk0.img || return 1
            mk_user file "file//srv/tcmu/disk0.img" $((256 * MIB)) || return 1
            mk_user ram "ram/" $((256 * MIB)) || return 1
            # Outside the allowed directory: the policy must refuse it without touching the file.
            mkdir -p /srv/outside
            head -c $MIB /dev/urandom > /srv/outside/secret.img || return 1
            truncate -s $((16 * MIB)) /srv/outside/secret.img || return 1
            mk_user outside "file//srv/outside/secret.img" $((16 * MIB)) || return 1
            # A device that is not served must fail fast, not make the initiator wait 30 s per try.
            write_attr "${BS[outside]}/attrib/cmd_time_out" 120 || return 1
            DEVICES=(file ram); REFUSED=outside
            ;;
        tcmu-runner)
            # tcmu-runner 1.5 has no plain file handler: its qcow handler serves a file-backed disk.
            qemu-img create -q -f qcow2 /srv/tcmu/disk0.qcow2 $((256 * MIB)) || return 1
            mk_user file "qcow//srv/tcmu/disk0.qcow2" $((256 * MIB)) || return 1
            DEVICES=(file)
            ;;
        kernel)
            truncate -s $((256 * MIB)) /srv/tcmu/disk0.img || return 1
            mk_fileio file /srv/tcmu/disk0.img $((256 * MIB)) || return 1
            mk_ramdisk ram $((256 * MIB)) || return 1
            DEVICES=(file ram)
            ;;
    esac
    ls -lR "$CFS/core"
}

# ---- 2/3. the daemon -----------------------------------------------------------------------------
DPID=""
INOTIFY_PID=""

inotify_ready() {
    grep -q 'Watches established' "$R/inotify.err" 2>/dev/null && return 0
    kill -0 "$INOTIFY_PID" 2>/dev/null || return 2
    return 1
}

start_inotify() {
    inotifywait -m -e open,access,modify --format '%e %w%f' /srv/outside/secret.img \
        > "$R/inotify.log" 2> "$R/inotify.err" &
    INOTIFY_PID=$!
    wait_for 60 "inotifywait to watch /srv/outside/secret.img" inotify_ready || {
        cat "$R/inotify.err"; return 1; }
    echo "inotifywait $INOTIFY_PID watching /srv/outside/secret.img"
}

write_warden_config() {
    cat > "$WARDEN_CONFIG" <<'TOML'
[handler.file]
allow_paths = ["/srv/tcmu"]

[handler.ram]
TOML
    cp "$WARDEN_CONFIG" "$R/warden.toml"
}

# The daemon has started: it logged something or holds a device, and is still running.
started() {
    kill -0 "$DPID" 2>/dev/null || return 2
    [[ -s $DAEMON_LOG ]] || [[ -n $(uio_holder "${DEVICES[0]}") ]]
}

start_daemon() {
    case $DAEMON in
        warden)
            write_warden_config
            [[ -x ${WARDEN_CMD[0]} ]] || { why "${WARDEN_CMD[0]} is not an executable"; return 1; }
            echo "starting: ${WARDEN_CMD[*]}"
            RUST_LOG=$VM_RUST_LOG NO_COLOR=1 RUST_BACKTRACE=1 "${WARDEN_CMD[@]}" \
                > "$DAEMON_LOG" 2>&1 &
            DPID=$!
            ;;
        tcmu-runner)
            mkdir -p "$R/tcmu-runner"
            echo "starting: tcmu-runner -l $R/tcmu-runner"
            tcmu-runner -l "$R/tcmu-runner" > "$DAEMON_LOG" 2>&1 &
            DPID=$!
            ;;
    esac
    echo "daemon pid $DPID"
    # It must still be running a moment later: poll for its first log output or its death.
    wait_for "$READY_TIMEOUT" "the daemon to start" started || {
        kill -0 "$DPID" 2>/dev/null || { wait "$DPID"; why "the daemon exited with status $?"; }
        tail -n 20 "$DAEMON_LOG"
        return 1
    }
}

# The uio device of a user backstore: /sys/class/uio/uioN/name is tcm-user/<hba>/<name>/...
uio_of() {
    local u n
    for u in /sys/class/uio/uio*; do
        n=$(cat "$u/name" 2>/dev/null) || continue
        case $n in tcm-user/*/"$1"/*|tcm-user/*/"$1") echo "${u##*/}"; return 0 ;; esac
    done
    return 1
}

# A process holding /dev/uioN of the device open.
uio_holder() {
    local uio f
    uio=$(uio_of "$1") || return 1
    for f in /proc/[0-9]*/fd/*; do
        if [[ $(readlink "$f" 2>/dev/null) == "/dev/$uio" ]]; then
            f=${f#/proc/}; echo "${f%%/*}"; return 0
        fi
    done
    return 1
}

# Daemon log lines without terminal colour codes.
daemon_log() { sed 's/\x1b\[[0-9;]*m//g' "$DAEMON_LOG" 2>/dev/null; }
log_names_device() { # log_names_device PATTERN NAME
    daemon_log | grep -E -- "$1" | grep -Eq -- "device=\"?$2\"?([^[:alnum:]_.-]|\$)"
}

served() { # served NAME: the daemon says (or shows) it serves the device
    kill -0 "$DPID" 2>/dev/null || { why "the daemon is no longer running"; return 2; }
    case $DAEMON in
        warden) log_names_device "$READY_PATTERN" "$1" ;;
        tcmu-runner) [[ -n $(uio_holder "$1") ]] ;;
    esac
}

check_served() {
    wait_for "$READY_TIMEOUT" "the daemon to serve $1" served "$1" || {
        tail -n 20 "$DAEMON_LOG"; return 1; }
    echo "uio: $(uio_of "$1"), held by pid $(uio_holder "$1")"
}

# ---- 4. export through tcm_loop ------------------------------------------------------------------
wwn() { printf 'naa.%s%09x' "$1" "$2"; }

link_lun() { # link_lun NAME: create the tcm_loop target and link the backstore as LUN 0
    local name=$1 idx=${WWN_IDX[$1]} tpg
    tpg=$CFS/loopback/$(wwn 5001405 "$idx")/tpgt_1
    mkdir -p "$tpg" || { why "mkdir $tpg failed"; return 1; }
    # The nexus (the initiator side) must exist before the LUN, or the scan finds no nexus.
    write_attr "$tpg/nexus" "$(wwn 5001406 "$idx")" || return 1
    TPG[$name]=$tpg
    mkdir "$tpg/lun/lun_0" || { why "mkdir $tpg/lun/lun_0 failed"; return 1; }
    ln -s "${BS[$name]}" "$tpg/lun/lun_0/$name" || { why "linking ${BS[$name]} failed"; return 1; }
}

# The SCSI address of a tcm_loop target: its tpgt_1/address says <host>:0:<tpgt>; LUN 0.
scsi_addr() { local a; a=$(cat "${TPG[$1]}/address" 2>/dev/null) || return 1; echo "$a:0"; }

find_sd() { # find_sd NAME: the disk is attached and has a capacity
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

export_dev() { # export_dev NAME
    link_lun "$1" || return 1
    echo "tcm_loop target ${TPG[$1]}, scsi address $(scsi_addr "$1")"
    wait_for "$DEVICE_TIMEOUT" "a disk for $1 at $(scsi_addr "$1")" find_sd "$1" || return 1
    echo "$1 is ${SDEV[$1]} ($(cat "/sys/block/${SDEV[$1]#/dev/}/device/vendor")" \
         "$(cat "/sys/block/${SDEV[$1]#/dev/}/device/model"))"
}

# ---- 5. checks on a served disk ------------------------------------------------------------------
c_sg_inq() {
    local out
    out=$(timeout 120 sg_inq "$1" 2>&1); local rc=$?
    echo "$out"
    (( rc == 0 )) || { why "sg_inq exited with status $rc"; return 1; }
    grep -Eq 'Vendor identification: *[^ ]' <<< "$out" || { why "no vendor identification"; return 1; }
    grep -Eq 'Product identification: *[^ ]' <<< "$out" || { why "no product identification"; return 1; }
}

c_sg_vpd_naa() {
    local out
    out=$(timeout 120 sg_vpd -p 0x83 "$1" 2>&1); local rc=$?
    echo "$out"
    (( rc == 0 )) || { why "sg_vpd -p 0x83 exited with status $rc"; return 1; }
    grep -Eq 'designator.*NAA|NAA [0-9]' <<< "$out" ||
        { why "no NAA designator in the device identification page"; return 1; }
}

c_sg_vpd_serial() { # c_sg_vpd_serial DEV NAME: the unit serial number page shows configfs's serial
    local out
    out=$(timeout 120 sg_vpd -p 0x80 "$1" 2>&1); local rc=$?
    echo "$out"
    echo "configured serial: ${SERIAL[$2]}"
    (( rc == 0 )) || { why "sg_vpd -p 0x80 exited with status $rc"; return 1; }
    grep -Fq -- "${SERIAL[$2]}" <<< "$out" ||
        { why "the unit serial number page does not show ${SERIAL[$2]}"; return 1; }
}

c_sg_readcap() { # c_sg_readcap DEV NAME
    local out blocks bsz want_bs want_blocks
    out=$(timeout 120 sg_readcap -l "$1" 2>&1); local rc=$?
    echo "$out"
    (( rc == 0 )) || { why "sg_readcap -l exited with status $rc"; return 1; }
    blocks=$(sed -n 's/.*Number of logical blocks=\([0-9]*\).*/\1/p' <<< "$out" | head -n1)
    bsz=$(sed -n 's/.*Logical block length=\([0-9]*\) bytes.*/\1/p' <<< "$out" | head -n1)
    # LIO's block size: attrib/block_size, or hw_block_size for user (TCMU) backstores.
    want_bs=$(cat "${BS[$2]}/attrib/block_size" 2>/dev/null ||
              cat "${BS[$2]}/attrib/hw_block_size" 2>/dev/null)
    [[ $want_bs =~ ^[1-9][0-9]*$ ]] || { why "cannot read the backstore's block size"; return 1; }
    want_blocks=$(( SIZE[$2] / want_bs ))
    echo "got $blocks blocks of $bsz bytes; want $want_blocks blocks of $want_bs bytes"
    [[ $bsz == "$want_bs" ]] || { why "block size $bsz, want $want_bs"; return 1; }
    [[ $blocks == "$want_blocks" ]] || { why "$blocks blocks, want $want_blocks"; return 1; }
}

c_dd_direct() { # c_dd_direct DEV NAME: 8 MiB of random data at a 3 MiB offset, O_DIRECT both ways
    local pat=/tmp/dd-$2.pattern back=/tmp/dd-$2.readback
    head -c $((8 * MIB)) /dev/urandom > "$pat" || return 1
    timeout "$IO_TIMEOUT" dd if="$pat" of="$1" bs=1M seek=3 oflag=direct conv=fsync,notrunc ||
        { why "writing with dd failed"; return 1; }
    timeout "$IO_TIMEOUT" dd if="$1" of="$back" bs=1M skip=3 count=8 iflag=direct ||
        { why "reading with dd failed"; return 1; }
    cmp "$pat" "$back" || { why "data read back differs from data written"; return 1; }
    rm -f "$pat" "$back"
}

write_files() { # write_files DIR MANIFEST: files of assorted sizes, and their checksums
    local dir=$1 i
    for i in 1 2 3 4 5 6; do
        head -c $(( (i * i * 97 + 13) * 1024 + i * 511 )) /dev/urandom > "$dir/file$i" || return 1
    done
    mkdir "$dir/small" || return 1
    for i in $(seq 1 100); do
        head -c $((i * 37)) /dev/urandom > "$dir/small/s$i" || return 1
    done
    (cd "$dir" && find . -type f ! -path './lost+found/*' -print0 | sort -z |
        xargs -0 sha256sum) > "$2" || return 1
}

c_ext4() { # c_ext4 DEV NAME: mkfs, files with checksums, fsck, remount and verify
    local dev=$1 mnt=/mnt/$2 manifest=/tmp/ext4-$2.sha256 i
    mkdir -p "$mnt"
    timeout "$IO_TIMEOUT" mkfs.ext4 -q -F "$dev" || { why "mkfs.ext4 failed"; return 1; }
    mount -t ext4 "$dev" "$mnt" || { why "mount failed"; return 1; }
    write_files "$mnt" "$manifest" || { umount "$mnt"; why "writing files failed"; return 1; }
    echo "$(wc -l < "$manifest") files written"
    umount "$mnt" || { why "umount failed"; return 1; }
    timeout "$IO_TIMEOUT" fsck.ext4 -fn "$dev" || { why "fsck.ext4 -fn reports errors"; return 1; }
    echo 3 > /proc/sys/vm/drop_caches
    mount -t ext4 "$dev" "$mnt" || { why "remount failed"; return 1; }
    (cd "$mnt" && sha256sum --quiet -c "$manifest") ||
        { umount "$mnt"; why "checksums differ after remount"; return 1; }
    umount "$mnt" || { why "final umount failed"; return 1; }
}

c_fio_verify() {
    local out
    out=$(timeout "$IO_TIMEOUT" fio --name=v --filename="$1" --direct=1 --rw=randwrite --bs=4k \
          --size="$FIO_SIZE" --iodepth=16 --ioengine=libaio --verify=crc32c --do_verify=1 \
          --verify_fatal=1 2>&1); local rc=$?
    echo "$out"
    (( rc == 0 )) || { why "fio exited with status $rc"; return 1; }
    grep -q 'err= 0' <<< "$out" || { why "fio reports errors"; return 1; }
    ! grep -qi 'verify.*bad\|crc32c: verify failed' <<< "$out" || { why "fio verify failed"; return 1; }
}

# ---- the refused device --------------------------------------------------------------------------
c_refused_logged() {
    daemon_log | grep -E -- "$REFUSE_PATTERN" || true
    log_names_device "$REFUSE_PATTERN" "$REFUSED" ||
        { why "no daemon log line matching /$REFUSE_PATTERN/ with device=$REFUSED"; return 1; }
}

c_refused_untouched() {
    if [[ -n $INOTIFY_PID ]]; then
        kill "$INOTIFY_PID" 2>/dev/null
        wait "$INOTIFY_PID" 2>/dev/null
        INOTIFY_PID=""
    fi
    echo "inotify events on /srv/outside/secret.img:"
    cat "$R/inotify.log"
    [[ ! -s $R/inotify.log ]] ||
        { why "the refused file was accessed: $(head -n1 "$R/inotify.log")"; return 1; }
}

# The refused LUN must answer (NOT READY), not leave the initiator waiting for cmd_time_out.
c_refused_fails_fast() {
    local name=$REFUSED pid rc addr
    # Known before the (background) link completes, so that cleanup finds it whatever happens.
    TPG[$name]=$CFS/loopback/$(wwn 5001405 "${WWN_IDX[$name]}")/tpgt_1
    ( link_lun "$name" ) &
    pid=$!
    bg_wait "$FAST_FAIL_TIMEOUT" "$pid"; rc=$?
    if (( rc == 124 )); then
        why "exporting the refused LUN (the SCSI scan) did not finish within ${FAST_FAIL_TIMEOUT}s"
        wait "$pid"
        return 1
    fi
    (( rc == 0 )) || return 1
    addr=$(scsi_addr "$name") || { why "no address for ${TPG[$name]}"; return 1; }
    if [[ ! -e /sys/bus/scsi/devices/$addr ]]; then
        echo "no SCSI device at $addr: the kernel's scan got no usable INQUIRY answer, quickly"
        return 0
    fi
    local sg=""
    for sg in "/sys/bus/scsi/devices/$addr"/scsi_generic/*; do sg=${sg##*/}; break; done
    [[ -n $sg ]] || { why "no sg device for $addr"; return 1; }
    timeout "$FAST_FAIL_TIMEOUT" sg_turs -v "/dev/$sg"; rc=$?
    (( rc == 2 )) || { why "TEST UNIT READY on /dev/$sg: status $rc, want 2 (not ready)"; return 1; }
}

# ---- 6. clean up ---------------------------------------------------------------------------------
unexport_all() {
    local name tpg l ok=0
    for name in "${!TPG[@]}"; do
        tpg=${TPG[$name]}
        for l in "$tpg"/lun/lun_0/*; do [[ -L $l ]] && { rm "$l" || ok=1; }; done
        [[ -d $tpg/lun/lun_0 ]] && { rmdir "$tpg/lun/lun_0" || ok=1; }
        [[ -d $tpg ]] && { rmdir "$tpg" || ok=1; }
        rmdir "${tpg%/tpgt_1}" || ok=1
    done
    (( ok == 0 )) || why "removing a tcm_loop target failed"
    return $ok
}

remove_backstores() {
    local name pid rc ok=0
    for name in "${!BS[@]}"; do
        rmdir "${BS[$name]}" &
        pid=$!
        bg_wait "$DEVICE_TIMEOUT" "$pid"; rc=$?
        if (( rc == 124 )); then
            why "rmdir ${BS[$name]} hangs (netlink reply?); resetting netlink"
            echo 1 > /sys/module/target_core_user/parameters/reset_netlink
            wait "$pid"
            ok=1
        elif (( rc != 0 )); then
            why "rmdir ${BS[$name]} failed"; ok=1
        fi
    done
    return $ok
}

stop_daemon() {
    [[ -n $DPID ]] || return 0
    kill -0 "$DPID" 2>/dev/null || { wait "$DPID"; why "the daemon had already exited ($?)"; return 1; }
    kill -TERM "$DPID"
    bg_wait 60 "$DPID"; local rc=$?
    if (( rc == 124 )); then
        kill -KILL "$DPID"; wait "$DPID"
        why "the daemon did not exit within 60s of SIGTERM"
        return 1
    fi
    echo "daemon exited with status $rc"
    DPID=""
}

daemon_alive() {
    kill -0 "$DPID" 2>/dev/null && return 0
    wait "$DPID"; why "the daemon died (status $?)"; return 1
}

# ---- LUNs above 0 on targets without LUN 0 (warden) ---------------------------------------------
# shellcheck source=luns.sh
. "$(dirname "${BASH_SOURCE[0]}")/luns.sh"

# ---- crash recovery (warden) ---------------------------------------------------------------------
# shellcheck source=recovery.sh
. "$(dirname "${BASH_SOURCE[0]}")/recovery.sh"

# ---- the jail's tests (warden) --------------------------------------------------------------------
# shellcheck source=jail.sh
. "$(dirname "${BASH_SOURCE[0]}")/jail.sh"

# ---- main ----------------------------------------------------------------------------------------
say "daemon: $DAEMON, kernel $(uname -r)"
GROUPS_RUN=${VM_GROUPS:-main hotplug luns recovery jail}
want_group() { [[ " $GROUPS_RUN " == *" $1 "* ]]; }

DEVICE_CHECKS=(sg_inq sg_vpd-naa sg_vpd-serial sg_readcap dd-direct ext4 fio-verify)
skip_device() { # skip_device NAME PREREQ
    local c
    for c in export "${DEVICE_CHECKS[@]}"; do
        [[ -n ${STATUS[$1/$c]:-} ]] || skip "$1/$c" "$2"
    done
}

# A bash expansion error (e.g. bad arithmetic) abandons the whole top-level command: MAIN_DONE tells
# a finished run from an abandoned one, and only a finished run writes suite.done.
MAIN_DONE=0
main() {
    # The jail group first: it needs no LIO device and no backing filesystem.
    if want_group jail && [[ $DAEMON == warden ]]; then
        jail_main
    fi
    # The other groups serve LIO devices from files on a real filesystem.
    if want_group main || want_group hotplug || want_group luns || want_group recovery; then
        if ! check setup/backing-fs prepare; then
            MAIN_DONE=1
            return
        fi
    fi
    if want_group main; then
        main_checks
    fi
    if want_group hotplug && [[ $DAEMON == warden ]]; then
        run_hotplug
    fi
    if want_group luns && [[ $DAEMON == warden ]]; then
        luns_main
    fi
    if want_group recovery && [[ $DAEMON == warden ]]; then
        recovery_main
    fi
    MAIN_DONE=1
}

main_checks() {
    if check setup/backstores create_backstores; then
        i=0
        for name in "${DEVICES[@]}" $REFUSED; do WWN_IDX[$name]=$((i += 1)); done

        daemon_ok=1
        if [[ -n $REFUSED ]]; then
            check refused/watch start_inotify
        fi
        if [[ $DAEMON != kernel ]]; then
            check daemon/start start_daemon || daemon_ok=0
        fi

        for name in "${DEVICES[@]}"; do
            if [[ $DAEMON != kernel ]]; then
                if (( ! daemon_ok )); then
                    skip "$name/served" daemon/start; skip_device "$name" daemon/start; continue
                fi
                check "$name/served" check_served "$name" || { skip_device "$name" "$name/served"; continue; }
            fi
            check "$name/export" export_dev "$name" || { skip_device "$name" "$name/export"; continue; }
            dev=${SDEV[$name]}
            check "$name/sg_inq" c_sg_inq "$dev"
            check "$name/sg_vpd-naa" c_sg_vpd_naa "$dev"
            check "$name/sg_vpd-serial" c_sg_vpd_serial "$dev" "$name"
            check "$name/sg_readcap" c_sg_readcap "$dev" "$name"
            check "$name/dd-direct" c_dd_direct "$dev" "$name"
            check "$name/ext4" c_ext4 "$dev" "$name"
            check "$name/fio-verify" c_fio_verify "$dev"
        done

        if [[ -n $REFUSED ]]; then
            if (( daemon_ok )); then
                check refused/logged c_refused_logged
                check refused/fails-fast c_refused_fails_fast
            else
                skip refused/logged daemon/start
                skip refused/fails-fast daemon/start
            fi
            if passed refused/watch; then
                check refused/untouched c_refused_untouched
            else
                skip refused/untouched refused/watch
            fi
        fi

        if [[ $DAEMON != kernel ]] && (( daemon_ok )); then
            check daemon/alive daemon_alive
        fi
        check cleanup/luns unexport_all
        check cleanup/backstores remove_backstores
        if [[ $DAEMON != kernel ]] && (( daemon_ok )); then
            check daemon/stop stop_daemon
        fi
    fi
}

# Hot-plug scenarios (guest/hotplug.sh): with the daemon running, create, resize, reconfigure,
# refuse and delete backstores through configfs. It starts its own daemon; each of its checks is
# reported here as hotplug/<check>.
run_hotplug() {
    local hp=$VM_REPO/tests/vm/guest/hotplug.sh out=$R/hotplug
    mkdir -p "$out" /srv/tcmu/hotplug
    say "running the hot-plug scenarios"
    WARDEN=$VM_BIN_DIR/tcmu-warden RESULTS=$out WORK=/srv/tcmu/hotplug RUST_LOG=${VM_RUST_LOG:-info} \
        timeout 900 bash "$hp" > "$LOGS/hotplug.log" 2>&1
    local rc=$? line name
    while IFS= read -r line; do
        case $line in
            "PASS "*) pass "hotplug/${line#PASS }" ;;
            "FAIL "*) name=${line#FAIL }; fail "hotplug/${name%%: *}" "${name#*: }" ;;
        esac
    done < <(grep -E '^(PASS|FAIL) ' "$out/hotplug.txt" 2>/dev/null)
    if (( rc != 0 )) && ! grep -q '^FAIL ' "$out/hotplug.txt" 2>/dev/null; then
        fail hotplug/run "hotplug.sh exited with status $rc (see logs/hotplug.log)"
    fi
}
main

[[ -n $DPID ]] && kill -KILL "$DPID" 2>/dev/null
[[ -n $INOTIFY_PID ]] && kill "$INOTIFY_PID" 2>/dev/null
dmesg > "$R/dmesg.txt" 2>&1
sync
if (( MAIN_DONE )); then
    date -u +%FT%TZ > "$R/suite.done"
    say "done"
else
    say "ABANDONED: the suite hit a shell error (see the console log above)"
fi
