#!/usr/bin/env bash
# Proves a real Linux kernel can use nbd-server: boots Debian's cloud kernel (which ships nbd.ko)
# under qemu (TCG) with a small busybox initramfs; the guest attaches the server with nbd-client,
# runs mkfs.ext4, mounts, writes and verifies files, runs e2fsck and detaches (scripts/kernel-test/init).
#
# Usage: scripts/kernel-test.sh [PORT]
#   PORT given: test the nbd-server already listening on 127.0.0.1:PORT.
#   no PORT:    build and start our own nbd-server (memory backend, 512M) on a free port.
# Exit 0 only if the guest printed the success marker.
#
# Needs Debian packages qemu-system-x86 busybox-static cpio nbd-client e2fsprogs, and the Debian
# apt mirror once (the kernel package is cached under .cache/kernel-test/).
# Environment: KT_TIMEOUT (seconds for the whole guest run, default 480), KT_LOG (console log path),
#   KT_TLS_DIR: a TLS directory with ca-cert.pem, client-cert.pem and client-key.pem; when set, the
#   guest also attaches over TLS (nbd-client -certfile/-keyfile/-cacertfile -tlshostname) in a last
#   round, so the server must offer TLS (tls on) with a certificate for KT_TLS_HOSTNAME (default
#   localhost). The files reach the guest in a second initramfs archive, built per run.
#   KT_SUITE=fio: instead of the file system rounds the guest runs the fio suite
#   (scripts/kernel-test/fio-suite.sh with the job files of scripts/fio), which needs the Debian
#   package fio; fio and its libraries travel in a cached archive of their own, so the default
#   suite's initramfs stays small. KT_SUITE=bench: scripts/bench-kernel.sh's guest side
#   (scripts/kernel-test/bench-suite.sh). KT_CTL_PORT: a TCP port on the host's 127.0.0.1 where the test
#   makes the faults the fio suite asks for (see fio-suite.sh); KT_GUEST_ARGS: more kt.* settings
#   for the guest (e.g. kt.rounds=12); KT_MEM: guest memory (default 512M).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache="$root/.cache/kernel-test"
init_template="$root/scripts/kernel-test/init"
marker="KT-RESULT: KERNEL-NBD-OK"
timeout_s=${KT_TIMEOUT:-480}
log=${KT_LOG:-$cache/console.log}
port=${1:-}
tls_dir=${KT_TLS_DIR:-}
tls_hostname=${KT_TLS_HOSTNAME:-localhost}
suite=${KT_SUITE:-fs}
ctl_port=${KT_CTL_PORT:-}
guest_args=${KT_GUEST_ARGS:-}
guest_mem=${KT_MEM:-512M}
fio_template_dir="$root/scripts/fio"
fio_suites=("$root/scripts/kernel-test/fio-suite.sh" "$root/scripts/kernel-test/bench-suite.sh")

say() { echo "kernel-test: $*" >&2; }
die() { say "$*"; exit 2; }

for tool in qemu-system-x86_64 busybox cpio gzip dpkg-deb apt-get nbd-client mke2fs e2fsck ldd flock timeout; do
    command -v "$tool" >/dev/null || die "missing $tool (Debian: qemu-system-x86 busybox-static cpio nbd-client e2fsprogs)"
done
case "$suite" in
    fs) ;;
    fio | bench) command -v fio >/dev/null || die "missing fio (Debian: fio)" ;;
    *) die "KT_SUITE must be fs, fio or bench, not '$suite'" ;;
esac
[ -z "$ctl_port" ] || [[ "$ctl_port" =~ ^[0-9]+$ ]] || die "bad KT_CTL_PORT '$ctl_port'"
mkdir -p "$cache/debs"

# ---------------------------------------------------------------- kernel
# apt-get download into the cache; `apt-get update` only if the first attempt fails.
apt_download() {
    (cd "$cache/debs" && apt-get download "$@" >/dev/null 2>"$cache/apt.err") && return 0
    say "apt-get download $* failed; running apt-get update once"
    apt-get update -qq >/dev/null 2>&1 || true
    (cd "$cache/debs" && apt-get download "$@" >/dev/null 2>"$cache/apt.err") || {
        cat "$cache/apt.err" >&2; die "cannot download $*"; }
}

# Concurrent runs share the cache: prepare it under a lock (released before booting).
exec 9>"$cache/.lock"
flock 9

kernel_dir="$cache/kernel"
if [ ! -e "$kernel_dir/.complete" ]; then
    say "fetching Debian's linux-image-cloud-amd64"
    rm -f "$cache"/debs/linux-image-cloud-amd64_*.deb
    apt_download linux-image-cloud-amd64
    meta=$(ls "$cache"/debs/linux-image-cloud-amd64_*.deb | head -n1)
    # Depends: linux-image-6.1.0-NN-cloud-amd64 (= 6.1.X-Y)
    dep=$(dpkg-deb -f "$meta" Depends | tr ',' '\n' | grep -o 'linux-image-[0-9][^ ]*-cloud-amd64' | head -n1)
    [ -n "$dep" ] || die "cannot find the versioned kernel package in $(dpkg-deb -f "$meta" Depends)"
    say "downloading $dep"
    rm -f "$cache/debs/${dep}"_*.deb
    apt_download "$dep"
    deb=$(ls "$cache/debs/${dep}"_*.deb | head -n1)
    rm -rf "$kernel_dir" "$kernel_dir.tmp"
    mkdir -p "$kernel_dir.tmp"
    dpkg-deb -x "$deb" "$kernel_dir.tmp"
    mv "$kernel_dir.tmp" "$kernel_dir"
    touch "$kernel_dir/.complete"
fi
vmlinuz=$(ls "$kernel_dir"/boot/vmlinuz-* | head -n1)
kver=${vmlinuz##*/vmlinuz-}
moddir=""
for d in "$kernel_dir"/lib/modules/* "$kernel_dir"/usr/lib/modules/*; do
    [ -d "$d" ] && { moddir=$d; break; }
done
[ -n "$moddir" ] || die "no modules in $kernel_dir"

# ---------------------------------------------------------------- initramfs
# Modules the guest needs: nbd plus the virtio network card, each after its dependencies
# (read from the module's own .modinfo "depends=" field; no modinfo/depmod needed on the host).
module_file() {
    find "$moddir" \( -name "$1.ko" -o -name "$1.ko.xz" -o -name "$1.ko.zst" -o -name "$1.ko.gz" \) | head -n1
}
module_plain() { # prints the module as an uncompressed .ko to stdout
    case "$1" in
        *.ko.xz) xz -dc "$1" ;;
        *.ko.zst) zstd -qdc "$1" ;;
        *.ko.gz) gzip -dc "$1" ;;
        *) cat "$1" ;;
    esac
}
declare -A seen=()
load_order=()
add_module() {
    local name=$1 file dep
    [ -n "${seen[$name]:-}" ] && return 0
    seen[$name]=1
    file=$(module_file "$name")
    [ -n "$file" ] || die "module $name not found in $moddir"
    for dep in $(module_plain "$file" | tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' ' '); do
        add_module "$dep"
    done
    load_order+=("$name")
}

# Dynamically linked host tools with the shared libraries ldd finds (same paths in the guest).
# The file system staging tree is $staging.
copy_with_libs() {
    local bin=$1 lib
    mkdir -p "$staging/sbin"
    cp -L "$bin" "$staging/sbin/$(basename "$bin")"
    for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
        mkdir -p "$staging$(dirname "$lib")"
        [ -e "$staging$lib" ] || cp -L "$lib" "$staging$lib"
    done
}

initramfs="$cache/initramfs-$kver.cpio.gz"
# Rebuild when the guest script, this script or the host tools change.
key=$( { echo "$kver"; cat "$init_template" "$0"; ls -l --time-style=+%s "$(command -v nbd-client)" "$(command -v mke2fs)" "$(command -v e2fsck)" "$(command -v busybox)"; } | sha256sum | cut -c1-16)
if [ ! -e "$initramfs" ] || [ "$(cat "$initramfs.key" 2>/dev/null)" != "$key" ]; then
    say "building the initramfs"
    staging="$cache/initramfs.tmp"
    rm -rf "$staging"
    mkdir -p "$staging"/{bin,sbin,etc,proc,sys,dev,tmp,mnt,run,lib/modules}
    for m in nbd virtio_net virtio_pci; do add_module "$m"; done
    for m in "${load_order[@]}"; do
        module_plain "$(module_file "$m")" >"$staging/lib/modules/$m.ko"
    done
    printf '%s\n' "${load_order[@]}" >"$staging/lib/modules/load-order"

    copy_with_libs "$(command -v nbd-client)"
    copy_with_libs "$(command -v mke2fs)"
    copy_with_libs "$(command -v e2fsck)"
    ln -s mke2fs "$staging/sbin/mkfs.ext4"
    [ -e /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$staging/etc/"
    : >"$staging/etc/fstab"
    : >"$staging/etc/mtab"

    cp "$(command -v busybox)" "$staging/bin/busybox"
    for applet in $(busybox --list); do
        [ -e "$staging/sbin/$applet" ] || [ -e "$staging/bin/$applet" ] || ln -s busybox "$staging/bin/$applet"
    done
    cp "$init_template" "$staging/init"
    chmod 755 "$staging/init"
    (cd "$staging" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1) >"$initramfs.tmp"
    mv "$initramfs.tmp" "$initramfs"
    echo "$key" >"$initramfs.key"
    rm -rf "$staging"
    say "modules: ${load_order[*]}"
fi

# The fio suite's archive: fio with its libraries (about 80 MiB: Debian's fio links the rbd,
# gluster and rdma engines), the job files and the guest script. The kernel unpacks it over the
# main initramfs; a library both hold is the same host file.
fio_archive=""
if [ "$suite" != fs ]; then
    fio_archive="$cache/fio-$kver.cpio.gz"
    fio_key=$( { cat "${fio_suites[@]}" "$fio_template_dir"/*.fio "$0"; ls -l --time-style=+%s "$(command -v fio)"; } | sha256sum | cut -c1-16)
    if [ ! -e "$fio_archive" ] || [ "$(cat "$fio_archive.key" 2>/dev/null)" != "$fio_key" ]; then
        say "building the fio archive"
        staging="$cache/fio.tmp"
        rm -rf "$staging"
        mkdir -p "$staging/etc/fio" "$staging/etc/kt"
        copy_with_libs "$(command -v fio)"
        cp "$fio_template_dir"/*.fio "$staging/etc/fio/"
        cp "${fio_suites[@]}" "$staging/etc/kt/"
        (cd "$staging" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1) >"$fio_archive.tmp"
        mv "$fio_archive.tmp" "$fio_archive"
        echo "$fio_key" >"$fio_archive.key"
        rm -rf "$staging"
    fi
fi

flock -u 9

# ---------------------------------------------------------------- TLS files (per run)
# The kernel unpacks concatenated cpio archives in order, so the certificates travel in a small
# archive of their own after the cached one, and the cached initramfs is never rebuilt for them.
boot_initramfs=$initramfs
tls_args=""
if [ -n "$fio_archive" ] || [ -n "$tls_dir" ]; then
    boot_initramfs=$(mktemp --suffix=.cpio.gz)
    cat "$initramfs" ${fio_archive:+"$fio_archive"} >"$boot_initramfs"
fi
if [ -n "$tls_dir" ]; then
    for f in ca-cert.pem client-cert.pem client-key.pem; do
        [ -r "$tls_dir/$f" ] || die "KT_TLS_DIR=$tls_dir has no readable $f"
    done
    tls_stage=$(mktemp -d)
    mkdir -p "$tls_stage/etc/nbd-tls"
    cp "$tls_dir"/ca-cert.pem "$tls_dir"/client-cert.pem "$tls_dir"/client-key.pem "$tls_stage/etc/nbd-tls/"
    chmod 600 "$tls_stage/etc/nbd-tls/client-key.pem"
    (cd "$tls_stage" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1) >>"$boot_initramfs"
    rm -rf "$tls_stage"
    tls_args="kt.tls=1 kt.tlshost=$tls_hostname"
fi

# ---------------------------------------------------------------- server (only without PORT)
server_pid=""
cleanup() {
    if [ -n "${boot_initramfs:-}" ] && [ "$boot_initramfs" != "$initramfs" ]; then
        rm -f "$boot_initramfs"
    fi
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT

if [ -z "$port" ]; then
    say "building nbd-server"
    dotnet build "$root/src/NbdFrontend" -c Release -nologo -v quiet >"$cache/build.log" 2>&1 || {
        cat "$cache/build.log" >&2; die "build failed"; }
    server_log="$cache/server.log"
    "$root/src/NbdFrontend/bin/Release/net10.0/nbd-server" --memory 512M --listen 127.0.0.1:0 >"$server_log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 300); do
        port=$(sed -n 's/.*Serving NBD on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$server_log" | head -n1)
        [ -n "$port" ] && break
        kill -0 "$server_pid" 2>/dev/null || { cat "$server_log" >&2; die "nbd-server exited"; }
        sleep 0.1
    done
    [ -n "$port" ] || { cat "$server_log" >&2; die "nbd-server did not start listening"; }
    say "started nbd-server (pid $server_pid) on 127.0.0.1:$port, log $server_log"
fi
[[ "$port" =~ ^[0-9]+$ ]] || die "bad port '$port'"

# ---------------------------------------------------------------- boot
# In qemu's user-mode network the guest reaches the host's 127.0.0.1 at 10.0.2.2 (every guest
# connection becomes a new host connection, unlike a chardev guestfwd which is a single one).
say "booting $kver under TCG against 127.0.0.1:$port (console: $log, limit ${timeout_s}s)"
mkdir -p "$(dirname "$log")"
start=$(date +%s)
set +e
timeout --kill-after=10 "$timeout_s" qemu-system-x86_64 \
    -accel tcg -cpu max -smp 2 -m "$guest_mem" \
    -kernel "$vmlinuz" -initrd "$boot_initramfs" \
    -append "console=ttyS0 panic=-1 loglevel=4 kt.host=10.0.2.2 kt.port=$port kt.export=vol0 kt.suite=$suite ${ctl_port:+kt.ctl=$ctl_port} $tls_args $guest_args" \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0 \
    -display none -monitor none -serial stdio -no-reboot \
    </dev/null >"$log" 2>&1
status=$?
set -e
elapsed=$(( $(date +%s) - start ))

if grep -q "^$marker" <(tr -d '\r' <"$log"); then
    grep '^kt: ===' <(tr -d '\r' <"$log") >&2 || true
    if [ "$suite" != fs ]; then
        say "PASSED in ${elapsed}s: the $suite suite (fio on /dev/nbd0 through the kernel nbd client)"
    else
        say "PASSED in ${elapsed}s: the kernel nbd client attached, ran mkfs.ext4/mount/write/verify/e2fsck and detached"
    fi
    exit 0
fi
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    say "FAILED: guest timed out after ${elapsed}s"
else
    say "FAILED after ${elapsed}s (qemu exit $status)"
fi
say "--- last console lines ($log) ---"
tail -n 60 "$log" | tr -d '\r' >&2
say "--- steps ---"
grep -a '^kt: \(===\|FAILED\)' <(tr -d '\r' <"$log") >&2 || say "(the guest never reached its init script)"
exit 1
