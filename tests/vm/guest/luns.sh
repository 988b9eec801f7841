# shellcheck shell=bash disable=SC2034  # sourced by suite.sh, which declares and reads these
# The VM suite's LUN-numbering group (warden mode only). Sourced by guest/suite.sh, which calls
# luns_main after the main checks and the hot-plug group; it uses suite.sh's helpers (check, why,
# wait_for, bg_wait, mk_user, wwn, ...) and variables (R, CFS, LOGS, MIB, ...).
#
# A LUN (logical unit number: the address of one disk behind a SCSI target) above 0 on a target
# that has no LUN 0 must appear to the Linux initiator and serve data. While Linux probes a LUN of
# a target it knows nothing about yet, it takes the target for a SCSI-2 device and writes the LUN
# into bits 7..5 of CDB byte 1 of its INQUIRY (scsi_sysfs_device_initialize() sets lun_in_cdb from
# the target's scsi_level, which scsi_alloc_target() starts at SCSI_2; scsi_dispatch_cmd() then
# stores `lun << 5` in cdb[1]). A target whose LUN 0 was probed first has learnt the real level,
# so the main group's LUN 0 exports never see those bits; a LUN that is the first device of its
# target does. Each LUN here is the only one of its own tcm_loop target, so each probe starts
# from SCSI_2:
#
#   luns/setup   a new daemon is started first (the backstores are hot-plugged), three `file`
#                backstores lun1, lun2, lun5 (16 MiB each, a distinct random pattern written
#                into each backing file beforehand) are served
#   luns/lun_N   (N = 1, 2, 5; the CDB byte 1 bits are 001b, 010b, 101b) the backstore lunN is
#                linked as lun_N of a target without lun_0: the disk appears at
#                <host>:0:<tpgt>:N with the backstore's capacity, it reads the pattern written
#                into its backing file (so the LUN reaches the right backstore), and 4 MiB of new
#                random data written at a 2 MiB offset with O_DIRECT reads back identical, from
#                the disk and from the backing file after a flush
#   luns/cleanup LUNs, targets and backstores removed, the daemon stopped
#
# The deadline for the disks is shared (all three are linked before the first is waited for), so
# a daemon that fails every probe costs one DEVICE_TIMEOUT, not three.
#
# Knobs: LUNS_NUMBERS (default "1 2 5").

LUNS_NUMBERS=${LUNS_NUMBERS:-1 2 5}
LUNS_SIZE=$((16 * MIB))
LCONFIG=/tmp/warden-luns.toml
LDAEMON_LOG=$R/daemon-luns.log
declare -A LUN_TPG=()     # N -> tcm_loop tpgt_1 directory of lun_N
declare -A LUN_DISK=()    # N -> /dev/sdX
LUNS_DEADLINE=0

llog() { sed 's/\x1b\[[0-9;]*m//g' "$LDAEMON_LOG" 2>/dev/null; }

ldaemon_listening() {
    kill -0 "$DPID" 2>/dev/null || { why "the daemon is no longer running"; return 2; }
    llog | grep -q 'start-up scan complete'
}

# lserved NAME: the daemon's log says it serves backstore NAME.
lserved() {
    kill -0 "$DPID" 2>/dev/null || { why "the daemon is no longer running"; return 2; }
    llog | grep -E -- "$READY_PATTERN" | grep -Eq -- "device=\"?$1\"?([^[:alnum:]_.-]|\$)"
}

l_setup() {
    BS=(); SIZE=()
    local n
    cat > "$LCONFIG" <<'TOML'
[handler.file]
allow_paths = ["/srv/tcmu"]
TOML
    cp "$LCONFIG" "$R/warden-luns.toml"
    # The daemon first: once a daemon has turned on the kernel's netlink replies, creating a TCMU
    # device with no daemon running waits for an answer (see guest/recovery.sh).
    echo "=== starting: ${VM_BIN_DIR}/tcmu-warden run --config $LCONFIG" > "$LDAEMON_LOG"
    RUST_LOG=$VM_RUST_LOG NO_COLOR=1 RUST_BACKTRACE=1 \
        "${VM_BIN_DIR}/tcmu-warden" run --config "$LCONFIG" >> "$LDAEMON_LOG" 2>&1 &
    DPID=$!
    echo "daemon pid $DPID"
    wait_for "$READY_TIMEOUT" "the daemon to start" ldaemon_listening || { llog | tail -n 20; return 1; }
    for n in $LUNS_NUMBERS; do
        head -c "$LUNS_SIZE" /dev/urandom > "/srv/tcmu/lun$n.img" || return 1
        mk_user "lun$n" "file//srv/tcmu/lun$n.img" "$LUNS_SIZE" || return 1
    done
    for n in $LUNS_NUMBERS; do
        wait_for "$READY_TIMEOUT" "the daemon to serve lun$n" lserved "lun$n" || { llog | tail -n 20; return 1; }
    done
    # Every LUN on its own target, linked now: the probes run while the ln returns.
    LUNS_DEADLINE=$((SECONDS + DEVICE_TIMEOUT))
    for n in $LUNS_NUMBERS; do
        l_link "$n" || return 1
    done
}

# l_link N: a tcm_loop target with a nexus and lun_N only, the backstore lunN linked there.
l_link() {
    local n=$1 tpg
    tpg=$CFS/loopback/$(wwn 5001405 $((40 + n)))/tpgt_1
    mkdir -p "$tpg" || { why "mkdir $tpg failed"; return 1; }
    LUN_TPG[$n]=$tpg
    write_attr "$tpg/nexus" "$(wwn 5001406 $((40 + n)))" || return 1
    mkdir "$tpg/lun/lun_$n" || { why "mkdir $tpg/lun/lun_$n failed"; return 1; }
    ln -s "${BS[lun$n]}" "$tpg/lun/lun_$n/lun$n" || { why "linking ${BS[lun$n]} as lun_$n failed"; return 1; }
    echo "lun$n linked as $tpg/lun/lun_$n (address $(cat "$tpg/address"):$n); LUNs of the target: $(ls "$tpg/lun")"
}

# l_disk N: the disk at <host>:0:<tpgt>:N is attached and has a capacity.
l_disk() {
    local n=$1 addr b
    addr=$(cat "${LUN_TPG[$n]}/address" 2>/dev/null) || return 1
    for b in /sys/bus/scsi/devices/"$addr:$n"/block/*; do
        [[ -b /dev/${b##*/} ]] || return 1
        [[ $(cat "$b/size" 2>/dev/null) =~ ^[1-9][0-9]*$ ]] || return 1
        LUN_DISK[$n]=/dev/${b##*/}
        return 0
    done
    return 1
}

c_lun() { # c_lun N
    local n=$1 disk addr bytes left t0=$SECONDS
    local pat=/tmp/lun$n.pattern back=/tmp/lun$n.readback head=/tmp/lun$n.head
    addr=$(cat "${LUN_TPG[$n]}/address"):$n
    left=$(( LUNS_DEADLINE - SECONDS )); (( left > 10 )) || left=10
    wait_for "$left" "a disk at $addr (lun_$n of a target without lun_0)" l_disk "$n" || {
        echo "SCSI devices:"; ls /sys/bus/scsi/devices/
        dmesg | grep -iE 'scsi|sd ' | tail -n 20
        llog | tail -n 20
        return 1
    }
    disk=${LUN_DISK[$n]}
    echo "lun_$n is $disk at $addr, $((SECONDS - t0))s after the wait began"
    bytes=$(blockdev --getsize64 "$disk") || { why "blockdev --getsize64 $disk failed"; return 1; }
    (( bytes == LUNS_SIZE )) || { why "$disk has $bytes bytes, want $LUNS_SIZE"; return 1; }
    # The pattern written into the backing file before the device existed: the right backstore.
    timeout "$IO_TIMEOUT" dd if="$disk" of="$head" bs=1M count=1 iflag=direct ||
        { why "reading $disk failed"; return 1; }
    cmp "$head" <(head -c "$MIB" "/srv/tcmu/lun$n.img") ||
        { why "$disk does not read the contents of lun$n's backing file"; return 1; }
    head -c $((4 * MIB)) /dev/urandom > "$pat" || return 1
    timeout "$IO_TIMEOUT" dd if="$pat" of="$disk" bs=1M seek=2 oflag=direct conv=fsync,notrunc ||
        { why "writing $disk with dd failed"; return 1; }
    timeout "$IO_TIMEOUT" dd if="$disk" of="$back" bs=1M skip=2 count=4 iflag=direct ||
        { why "reading $disk back with dd failed"; return 1; }
    cmp "$pat" "$back" || { why "data read back from $disk differs from data written"; return 1; }
    cmp "$pat" <(dd if="/srv/tcmu/lun$n.img" bs=1M skip=2 count=4 2>/dev/null) ||
        { why "lun$n's backing file does not hold the data written to $disk"; return 1; }
    rm -f "$pat" "$back" "$head"
    echo "note: $disk at $addr, 4 MiB written and read back"
}

l_cleanup() {
    local n tpg l ok=0 name pid rc
    for n in "${!LUN_TPG[@]}"; do
        tpg=${LUN_TPG[$n]}
        for l in "$tpg/lun/lun_$n"/*; do [[ -L $l ]] && { rm "$l" || ok=1; }; done
        [[ -d $tpg/lun/lun_$n ]] && { rmdir "$tpg/lun/lun_$n" || ok=1; }
        [[ -d $tpg ]] && { rmdir "$tpg" || ok=1; }
        rmdir "${tpg%/tpgt_1}" || ok=1
    done
    LUN_TPG=()
    (( ok == 0 )) || why "removing a tcm_loop target failed"
    for name in "${!BS[@]}"; do
        rmdir "${BS[$name]}" &
        pid=$!
        bg_wait "$DEVICE_TIMEOUT" "$pid"; rc=$?
        (( rc == 0 )) || { why "rmdir ${BS[$name]} failed or hangs ($rc)"; ok=1; }
    done
    BS=(); SIZE=()
    if [[ -n $DPID ]] && kill -0 "$DPID" 2>/dev/null; then
        kill -TERM "$DPID"
        bg_wait 60 "$DPID" > /dev/null || { kill -KILL "$DPID"; why "the daemon did not stop"; ok=1; }
    fi
    DPID=""
    for n in $LUNS_NUMBERS; do rm -f "/srv/tcmu/lun$n.img"; done
    return $ok
}

luns_main() {
    local n
    if ! check luns/setup l_setup; then
        for n in $LUNS_NUMBERS; do skip "luns/lun_$n" luns/setup; done
        check luns/cleanup l_cleanup
        return
    fi
    for n in $LUNS_NUMBERS; do
        check "luns/lun_$n" c_lun "$n"
    done
    check luns/cleanup l_cleanup
}
