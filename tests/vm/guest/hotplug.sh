#!/bin/bash
# Hot-plug scenarios for tcmu-warden against the real kernel (run inside the test VM, as root,
# with configfs mounted and target_core_user, uio and optionally tcm_loop loaded).
#
# With the daemon running it creates, resizes, reconfigures and deletes LIO `user` backstores
# through configfs and checks what the kernel and `tcmu-warden status --json` say:
#   - an admitted device's `enable` write succeeds and the device is served (state "ready");
#   - a device the policy refuses (unknown subtype, path outside allow_paths) makes the `enable`
#     write FAIL, and the daemon's log says why;
#   - dev_size and emulate_write_cache changes are accepted and show in status; a size above
#     handler.ram.max_size is refused (the write fails, the size stays); with tcm_loop and
#     sg3_utils, the initiator sees the new capacity after a CAPACITY DATA HAS CHANGED unit
#     attention;
#   - a dev_config change to another allowed file reopens the device; one outside allow_paths
#     fails;
#   - deleting a backstore removes it from status; re-creating it under the same name gives a
#     new device;
#   - SIGTERM stops the daemon cleanly and leaves block_netlink=1.
# Every configfs write is bounded by `timeout 30`: a write the daemon never answers would
# otherwise block forever.
#
# Variables (all optional except WARDEN):
#   WARDEN         the tcmu-warden binary (required)
#   WARDEN_WORKER  the worker binary (default: tcmu-warden-worker next to WARDEN)
#   RESULTS        folder for results: hotplug.txt (PASS/FAIL lines, a closing
#                  "N passed, M failed" line), hotplug-daemon.log, hotplug-status-*.json
#                  (default: /tmp/hotplug-results)
#   WORK           scratch folder for backing files, config and control socket; put it on a
#                  real filesystem (default: /tmp/hotplug-work)
#   CONFIGFS       LIO's configfs root (default: /sys/kernel/config/target)
#   HBA            the user_<HBA> directory to use (default: 7)
# Exit status: 0 when every check passed, 1 otherwise, 2 when the set-up failed.

set -u
WARDEN=${WARDEN:?set WARDEN to the tcmu-warden binary}
WARDEN_WORKER=${WARDEN_WORKER:-$(dirname "$WARDEN")/tcmu-warden-worker}
RESULTS=${RESULTS:-/tmp/hotplug-results}
WORK=${WORK:-/tmp/hotplug-work}
CONFIGFS=${CONFIGFS:-/sys/kernel/config/target}
HBA=${HBA:-7}
CORE=$CONFIGFS/core/user_$HBA
SOCK=$WORK/run/control.sock
PARAMS=/sys/module/target_core_user/parameters

mkdir -p "$RESULTS" "$WORK/allowed" "$WORK/run" || exit 2
OUT=$RESULTS/hotplug.txt
: > "$OUT"
PASSED=0
FAILED=0

pass() { echo "PASS $1" | tee -a "$OUT"; PASSED=$((PASSED + 1)); }
fail() { echo "FAIL $1: $2" | tee -a "$OUT"; FAILED=$((FAILED + 1)); }
check() { # name, command...
    local name=$1; shift
    if "$@"; then pass "$name"; else fail "$name" "$*"; fi
}

# A configfs write bounded in time; returns the write's status (124 on timeout).
cfs_write() { # value, file
    # shellcheck disable=SC2016 # expanded by the inner shell
    timeout 30 sh -c 'printf "%s" "$1" > "$2"' sh "$1" "$2"
}

status_json() {
    "$WARDEN" status --json --socket "$SOCK"
}

# Prints a field of the device whose backstore is user_$HBA/<name>, or "absent".
dev_field() { # name, field
    status_json 2>/dev/null | python3 -c '
import json, sys
r = json.load(sys.stdin)
want = "user_%s/%s" % (sys.argv[1], sys.argv[2])
d = [x for x in r["devices"] if x["backstore"] == want]
print(json.dumps(d[-1][sys.argv[3]]) if d else "absent")' "$HBA" "$1" "$2"
}

# Polls until dev_field equals the expected value (60 s; a deadline in time, not a number of
# tries: under TCG every status call is slow).
wait_field() { # name, field, expected
    local got deadline=$((SECONDS + 60))
    while [ "$SECONDS" -lt "$deadline" ]; do
        got=$(dev_field "$1" "$2")
        [ "$got" = "$3" ] && return 0
        sleep 0.2
    done
    echo "  $1.$2 is $got, expected $3" >&2
    return 1
}

create() { # name, dev_config, size
    mkdir -p "$CORE/$1" || return 1
    cfs_write "dev_config=$2" "$CORE/$1/control" || return 1
    cfs_write "dev_size=$3" "$CORE/$1/control" || return 1
    cfs_write 1 "$CORE/$1/enable"
}

delete() { # name
    timeout 30 rmdir "$CORE/$1"
}

log_has() { grep -q "$1" "$RESULTS/hotplug-daemon.log"; }

# ---- the initiator's view, through tcm_loop (optional: needs the module and sg3_utils) ----------
TPG=$CONFIGFS/loopback/naa.50014057000000a1/tpgt_1

export_lun() { # name: LUN 0 of a tcm_loop target (the nexus must exist before the LUN)
    mkdir -p "$TPG" || return 1
    cfs_write naa.50014067000000a1 "$TPG/nexus" || return 1
    mkdir "$TPG/lun/lun_0" || return 1
    ln -s "$CORE/$1" "$TPG/lun/lun_0/$1"
}

unexport_lun() { # name
    rm -f "$TPG/lun/lun_0/$1"
    rmdir "$TPG/lun/lun_0" "$TPG" "$(dirname "$TPG")"
} 2>/dev/null

# Prints the disk of the exported LUN once it is attached (60 s).
find_disk() {
    local addr b deadline=$((SECONDS + 60))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if addr=$(cat "$TPG/address" 2>/dev/null); then
            for b in /sys/bus/scsi/devices/"$addr":0/block/*; do
                [ -b "/dev/${b##*/}" ] && { echo "/dev/${b##*/}"; return 0; }
            done
        fi
        sleep 0.5
    done
    return 1
}

last_lba_is() { # disk, lba
    sg_readcap --long "$1" > "$WORK/readcap.txt" 2>&1
    grep -Eq "Last LBA=$2( |$)" "$WORK/readcap.txt" || { cat "$WORK/readcap.txt" >&2; return 1; }
}

# CAPACITY DATA HAS CHANGED reaches the initiator: TEST UNIT READY gets the unit attention
# (sg_turs exit status 6), or the kernel's SCSI layer consumed it first and logged it.
capacity_changed_seen() { # disk, dmesg lines before
    sg_turs "$1" > /dev/null 2>&1
    local rc=$?
    [ "$rc" -eq 6 ] && return 0
    [ "$(dmesg | grep -c 'Capacity data has changed')" -gt "$2" ] && return 0
    echo "  sg_turs exit status $rc, no kernel message" >&2
    return 1
}

# ---- set-up ---------------------------------------------------------------------------------
cat > "$WORK/warden.toml" <<TOML || exit 2
[daemon]
worker_exe = "$WARDEN_WORKER"
control_socket = "$SOCK"
uevent_source = "kernel"
drain_timeout = "20s"
log_format = "text"

[handler.file]
allow_paths = ["$WORK/allowed"]

[handler.ram]
max_size = "256MiB"
TOML
truncate -s 64M "$WORK/allowed/a.img" "$WORK/allowed/b.img" "$WORK/outside.img" || exit 2
mkdir -p "$CORE" || exit 2

RUST_LOG=${RUST_LOG:-debug} "$WARDEN" run --config "$WORK/warden.toml" \
    > /dev/null 2> "$RESULTS/hotplug-daemon.log" &
DAEMON=$!
deadline=$((SECONDS + 60))
while [ "$SECONDS" -lt "$deadline" ]; do
    status_json > /dev/null 2>&1 && break
    kill -0 "$DAEMON" 2>/dev/null || { echo "the daemon exited"; cat "$RESULTS/hotplug-daemon.log"; exit 2; }
    sleep 0.2
done
status_json > "$RESULTS/hotplug-status-start.json" 2>&1 || { echo "no status"; exit 2; }
check "netlink connected" grep -q '"netlink": "connected"' "$RESULTS/hotplug-status-start.json"
# The kernel shows the parameter as "blocked"/"unblocked" (older kernels: 1/0).
param_is() { # name, words...
    local v
    local name=$1
    v=$(cat "$PARAMS/$name") || return 1
    shift
    for w in "$@"; do [ "$v" = "$w" ] && return 0; done
    echo "  $name is $v" >&2
    return 1
}
if [ -e "$PARAMS/block_netlink" ]; then
    check "block_netlink is off while serving" param_is block_netlink unblocked 0
fi

# ---- scenarios ------------------------------------------------------------------------------
check "ram device: enable succeeds" create ram0 ram/ 67108864
check "ram device: served" wait_field ram0 state '"ready"'
check "ram device: size" wait_field ram0 size 67108864

if create qc qcow//images/x.qcow2 67108864; then
    fail "unknown subtype: enable fails" "the enable write succeeded"
else
    pass "unknown subtype: enable fails"
fi
check "unknown subtype: not served" wait_field qc state absent
check "unknown subtype: logged with its rule" log_has "refused by policy at creation.*rule=handler.qcow"
delete qc 2>/dev/null

if create outside "file/$WORK/outside.img" 67108864; then
    fail "outside allow_paths: enable fails" "the enable write succeeded"
else
    pass "outside allow_paths: enable fails"
fi
check "outside allow_paths: logged with its rule" log_has "refused by policy at creation.*rule=handler.file.allow_paths"
delete outside 2>/dev/null

SD=""
if command -v sg_readcap > /dev/null && command -v sg_turs > /dev/null &&
    mkdir -p "$CONFIGFS/loopback" 2> /dev/null; then
    check "initiator: LUN exported" export_lun ram0
    SD=$(find_disk) || SD=""
    check "initiator: disk attached" test -n "$SD"
fi
if [ -n "$SD" ]; then
    sg_turs "$SD" > /dev/null 2>&1 # takes the power-on unit attention, if any
    check "initiator: capacity before the resize" last_lba_is "$SD" 131071
fi
UA_BEFORE=$(dmesg | grep -c 'Capacity data has changed')
check "resize: dev_size write succeeds" cfs_write 134217728 "$CORE/ram0/attrib/dev_size"
check "resize: status shows the new size" wait_field ram0 size 134217728
if [ -n "$SD" ]; then
    check "initiator: CAPACITY DATA HAS CHANGED" capacity_changed_seen "$SD" "$UA_BEFORE"
    check "initiator: capacity after the resize" last_lba_is "$SD" 262143
fi
if cfs_write 1073741824 "$CORE/ram0/attrib/dev_size"; then
    fail "resize above max_size fails" "the dev_size write succeeded"
else
    pass "resize above max_size fails"
fi
check "resize above max_size: size kept" wait_field ram0 size 134217728

check "write cache: write succeeds" cfs_write 1 "$CORE/ram0/attrib/emulate_write_cache"
check "write cache: status shows it" wait_field ram0 write_cache true

check "file device: enable succeeds" create file0 "file/$WORK/allowed/a.img" 67108864
check "file device: served" wait_field file0 state '"ready"'
check "dev_config change: write succeeds" cfs_write "file/$WORK/allowed/b.img" "$CORE/file0/attrib/dev_config"
check "dev_config change: reopened on the new file" wait_field file0 cfgstring "\"$WORK/allowed/b.img\""
check "dev_config change: served again" wait_field file0 state '"ready"'
if cfs_write "file/$WORK/outside.img" "$CORE/file0/attrib/dev_config"; then
    fail "dev_config outside allow_paths fails" "the dev_config write succeeded"
else
    pass "dev_config outside allow_paths fails"
fi
check "dev_config outside allow_paths: file kept" wait_field file0 cfgstring "\"$WORK/allowed/b.img\""

OLD_ID=$(dev_field ram0 id)
[ -n "$SD" ] && unexport_lun ram0
check "delete: rmdir succeeds" delete ram0
check "delete: gone from status" wait_field ram0 state absent
check "re-create under the same name: enable succeeds" create ram0 ram/ 67108864
check "re-create: served" wait_field ram0 state '"ready"'
NEW_ID=$(dev_field ram0 id)
check "re-create: a new device" test "$OLD_ID" != "$NEW_ID"

status_json > "$RESULTS/hotplug-status-end.json" 2>&1

# ---- shutdown -------------------------------------------------------------------------------
kill -TERM "$DAEMON"
deadline=$((SECONDS + 60))
while [ "$SECONDS" -lt "$deadline" ]; do
    kill -0 "$DAEMON" 2>/dev/null || break
    sleep 0.2
done
if kill -0 "$DAEMON" 2>/dev/null; then
    fail "SIGTERM stops the daemon" "still running after 60 s"
    kill -KILL "$DAEMON"
else
    wait "$DAEMON"
    check "SIGTERM: clean exit" test $? -eq 0
fi
if [ -e "$PARAMS/block_netlink" ]; then
    check "block_netlink is on after exit" param_is block_netlink blocked 1
    # Unblock for the groups that follow: each starts its own daemon before creating devices
    # (with netlink replies on, a device created while no daemon runs waits for one).
    echo 0 > "$PARAMS/block_netlink"
fi
delete file0 2>/dev/null
delete ram0 2>/dev/null

echo "$PASSED passed, $FAILED failed" | tee -a "$OUT"
[ "$FAILED" -eq 0 ]
