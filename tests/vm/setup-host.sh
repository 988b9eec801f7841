#!/usr/bin/env bash
# Prepare a machine to run the VM suite (tests/vm/run.sh). Idempotent: a second run on a prepared
# machine touches neither apt nor the network.
#
#   1. Host packages: qemu (TCG), busybox-static + cpio + kmod for the initramfs, the tools the
#      guest runs from the shared host root (fio, sg3-utils, e2fsprogs, inotify-tools, tcmu-runner...),
#      and systemd, whose systemd-analyze the workspace tests run on dist/tcmu-warden.service
#      (tests/tests/systemd_unit.rs).
#   2. Debian's distribution kernel (linux-image-6.1.x-amd64), unpacked into tests/vm/cache/ with
#      modules.dep generated. The host kernel is never touched; the guest boots this one.
#
# Prints, as its last line, `KERNEL_DIR=<dir> KERNEL_VERSION=<ver>` for callers that want them
# (run.sh finds them itself from the cache).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache="$here/cache"

PACKAGES=(qemu-system-x86 qemu-utils busybox-static cpio kmod fio sg3-utils e2fsprogs
          iproute2 libiscsi-bin tcmu-runner inotify-tools util-linux coreutils python3 systemd
          nbdkit
          # The rbd handler: a throwaway one-node Ceph cluster (mon + memstore OSD) for its
          # tests, the rbd CLI to check images, and librbd/librados headers to link against.
          ceph-mon ceph-osd ceph-common librbd-dev)

log() { printf 'setup-host: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

missing_packages() {
    local p status
    for p in "${PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
        [[ $status == installed ]] || printf '%s\n' "$p"
    done
}

apt_updated=0
apt_update() {
    if (( ! apt_updated )); then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
        apt_updated=1
    fi
}

install_packages() {
    local missing
    mapfile -t missing < <(missing_packages)
    if (( ${#missing[@]} == 0 )); then
        log "host packages present"
        return
    fi
    (( EUID == 0 )) || die "missing packages (${missing[*]}); run this script as root to install them"
    log "installing: ${missing[*]}"
    apt_update
    local -a base=()
    local p
    for p in "${PACKAGES[@]}"; do
        [[ $p == qemu-utils ]] || base+=("$p")
    done
    export DEBIAN_FRONTEND=noninteractive
    # qemu-system-x86 and qemu-utils must come from the same Debian release and be installed in
    # one command: some images ship a newer (backports) qemu-utils that qemu-system-x86 from the
    # main release cannot coexist with, and installing qemu-system-x86 alone would remove it.
    if ! apt-get install -y -q --allow-downgrades "${base[@]}" qemu-utils/bookworm >&2; then
        local ver
        ver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
        log "retrying with qemu-utils pinned to $ver"
        apt-get install -y -q --allow-downgrades "${base[@]}" "qemu-utils=$ver" >&2 ||
            die "apt-get install failed"
    fi
    mapfile -t missing < <(missing_packages)
    (( ${#missing[@]} == 0 )) || die "still missing after install: ${missing[*]}"
}

# The kernel package linux-image-amd64 depends on, e.g. linux-image-6.1.0-56-amd64.
kernel_package() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}

# A usable cache is any cache/kernel-<ver>/ holding a kernel image and modules.dep; the newest wins.
cached_kernel() {
    local d best=""
    for d in "$cache"/kernel-*/; do
        d=${d%/}
        [[ -f $d/.complete ]] || continue
        best=$d
    done
    [[ -n $best ]] && printf '%s\n' "$best"
}

fetch_kernel() {
    local pkg ver dir deb tmp
    pkg=$(kernel_package)
    if [[ -z $pkg ]]; then
        # A fresh machine may have empty apt lists.
        if [[ $(id -u) -eq 0 ]]; then apt_update; pkg=$(kernel_package); fi
    fi
    if [[ -z $pkg ]]; then
        # Offline but with an older cache: use it.
        if dir=$(cached_kernel); then
            log "apt does not name a kernel; using cached $dir"
            printf '%s\n' "$dir"; return
        fi
        die "cannot find the kernel package (apt-cache depends linux-image-amd64)"
    fi
    ver=${pkg#linux-image-}
    dir="$cache/kernel-$ver"
    if [[ -f $dir/.complete ]]; then
        log "kernel $ver cached"
        printf '%s\n' "$dir"; return
    fi
    log "downloading $pkg"
    mkdir -p "$cache"
    tmp=$(mktemp -d "$cache/.dl.XXXXXX")
    chmod 0755 "$tmp"
    # apt-get download writes into the current directory, which apt's unprivileged "_apt" user may
    # not reach: download as root rather than print a warning.
    ( cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2 ) || {
        apt_update
        ( cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2 ) || die "apt-get download $pkg failed"
    }
    deb=$(ls "$tmp"/*.deb)
    rm -rf "$dir"
    mkdir -p "$dir/root"
    dpkg-deb -x "$deb" "$dir/root"
    rm -rf "$tmp"
    local modroot
    # merged-/usr packages put modules under lib/ or usr/lib/; depmod -b wants <base>/lib/modules.
    if [[ -d $dir/root/lib/modules/$ver ]]; then modroot=$dir/root
    elif [[ -d $dir/root/usr/lib/modules/$ver ]]; then modroot=$dir/root/usr
    else die "no modules for $ver in $pkg"; fi
    depmod -b "$modroot" "$ver"
    ln -sfn "${modroot#"$dir"/}/lib/modules/$ver" "$dir/modules"
    ln -sfn "root/boot/vmlinuz-$ver" "$dir/vmlinuz"
    [[ -f $dir/vmlinuz ]] || die "no vmlinuz in $pkg"
    printf '%s\n' "$ver" > "$dir/version"
    touch "$dir/.complete"
    log "kernel $ver ready in $dir"
    # Older kernels' caches are dead weight (about 400 MB each).
    local old
    for old in "$cache"/kernel-*; do
        [[ $old == "$dir" ]] || rm -rf "$old"
    done
    printf '%s\n' "$dir"
}

install_packages
kdir=$(fetch_kernel)
printf 'KERNEL_DIR=%s KERNEL_VERSION=%s\n' "$kdir" "$(cat "$kdir/version")"
