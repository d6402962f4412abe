#!/usr/bin/env bash
# End-to-end harness: a real QEMU guest (TCG) on a vhost-user-blk backend.
#
#   guest.sh initramfs
#       Build (or reuse from .cache/e2e) the guest initramfs: busybox, fio, mke2fs/e2fsck with
#       their shared libraries, the virtio modules of the cached kernel, and tests/e2e/init.sh as
#       /init. Prints its path.
#   guest.sh boot --socket SOCK [--log FILE] [--queues N] [--timeout SECS] [--fio-size SIZE]
#                 [--mode full|reverify|crash|vm|migrate|resize] [--rounds N] [--reconnect-ms MS] [--event-idx on|off]
#                 [--smp N] [--plain-device] [--qmp PATH] [--incoming URI]
#       Boot the guest against a backend already listening on SOCK. Exit 0 only if the guest
#       printed "VHOST-QCOW2-E2E: PASS"; non-zero on FAIL, a missing marker, or a timeout.
#       full: fio, mkfs, files (see init.sh); reverify: a second boot on the same backend and
#       disk that checks the filesystem and files the full boot left; crash: rounds of fio
#       verify while the caller kills and restarts the backend; resize: fio verify while the
#       caller grows the disk (see init.sh). --reconnect-ms: QEMU reconnects
#       to a backend that went away (chardev reconnect-ms). --event-idx: the device's event_idx.
#       --smp: vCPUs (default 2). --plain-device: no num-queues on the device line (QEMU's
#       default, one queue per vCPU); --queues is then what the guest must see. --qmp: a QMP
#       socket for the caller (migration tests); --incoming: the destination of a migration.
#   guest.sh verify-image IMG LOG
#       After the guest and backend are gone: convert IMG to raw with qemu-img, run the host's
#       e2fsck on it, and compare every file's SHA-256 the guest printed (E2E-SUM lines in LOG)
#       with the file read out of the image with debugfs.
#   guest.sh run [--backend qsd|ours|'CMD'] [--queues N] [--keep DIR]
#       The whole test in one go: fresh 1 GiB qcow2, start the backend, boot (full), boot again
#       on the same backend process (reverify: it must take a second connection), SIGTERM the
#       backend (must exit 0), qemu-img check (must exit 0), verify-image. In CMD, $IMG and
#       $SOCK are replaced by the image and socket paths. Default backend: qsd
#       (qemu-storage-daemon); 'ours' is target/release/vhost-user-qcow2 serve.
#
# The kernel comes from .cache/kernel (put there by `./run test` / `./run deps`). Every missing
# tool is a loud error: this harness never skips.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="${E2E_CACHE:-$ROOT/.cache}"
KDIR="$CACHE/kernel"
MARK="VHOST-QCOW2-E2E"
MODULES="virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio virtio_pci virtio_blk"

die() { printf 'guest.sh: error: %s\n' "$*" >&2; exit 1; }
log() { printf 'guest.sh: %s\n' "$*" >&2; }

need_tool() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' not found: run ./run deps (or ./run test) to install what the tests need"
}

kernel_check() {
    [ -f "$KDIR/vmlinuz" ] && [ -f "$KDIR/VERSION" ] \
        || die "no guest kernel in $KDIR: run ./run deps (or ./run test) to fetch it"
}

find_module() {
    local f
    f="$(find "$KDIR/modules" -name "$1.ko" -o -name "$1.ko.xz" -o -name "$1.ko.zst" | sed -n 1p)"
    [ -n "$f" ] || die "kernel module $1 not found under $KDIR/modules"
    echo "$f"
}

# Copy a binary and every shared library ldd lists (plus the program interpreter) into $1.
copy_with_libs() {
    local root="$1" bin="$2" dest="$3" lib
    install -D -m 0755 "$bin" "$root$dest"
    ldd "$bin" >/dev/null 2>&1 || die "ldd failed on $bin"
    for lib in $(ldd "$bin" | sed -n 's/.*=> \(\/[^ ]*\) (.*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) (.*/\1/p'); do
        [ -e "$root$lib" ] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}

cmd_initramfs() {
    kernel_check
    local t
    for t in busybox fio mke2fs e2fsck ldd cpio sha256sum; do need_tool "$t"; done
    [ -x /bin/busybox ] || die "/bin/busybox missing: run ./run deps"
    if ldd /bin/busybox >/dev/null 2>&1; then
        die "/bin/busybox is dynamically linked: install busybox-static (./run deps)"
    fi
    local fio mke2fs e2fsck
    fio="$(command -v fio)"
    mke2fs="$(command -v mke2fs)"
    e2fsck="$(command -v e2fsck)"

    # The cache key covers everything that goes in.
    local key
    key="$({
        cat "$HERE/init.sh" "$0"
        cat "$KDIR/VERSION"
        sha256sum /bin/busybox "$fio" "$mke2fs" "$e2fsck"
    } | sha256sum | cut -c1-16)"
    local out="$CACHE/e2e/initramfs-$key.cpio"
    if [ -s "$out" ]; then
        echo "$out"
        return
    fi

    log "building the guest initramfs ($out)"
    mkdir -p "$CACHE/e2e"
    local root
    root="$(mktemp -d "$CACHE/e2e/root.XXXXXX")"
    # shellcheck disable=SC2064
    trap "rm -rf '$root'" EXIT
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,usr/lib,usr/lib64,proc,sys,dev,tmp,mnt,etc,modules}
    ln -s usr/lib "$root/lib"
    ln -s usr/lib64 "$root/lib64"
    install -m 0755 /bin/busybox "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"
    install -m 0755 "$HERE/init.sh" "$root/init"
    copy_with_libs "$root" "$fio" /usr/bin/fio
    copy_with_libs "$root" "$mke2fs" /usr/sbin/mke2fs
    copy_with_libs "$root" "$e2fsck" /usr/sbin/e2fsck
    ln -s mke2fs "$root/usr/sbin/mkfs.ext4"
    ln -s e2fsck "$root/usr/sbin/fsck.ext4"
    local m f
    for m in $MODULES; do
        f="$(find_module "$m")"
        case "$f" in
            *.ko.xz) xz -dc "$f" >"$root/modules/$m.ko" ;;
            *.ko.zst) zstd -qdc "$f" >"$root/modules/$m.ko" ;;
            *) cp "$f" "$root/modules/$m.ko" ;;
        esac
    done
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$out.tmp"
    rm -rf "$root"
    trap - EXIT
    # Drop initramfs images built from older inputs.
    find "$CACHE/e2e" -maxdepth 1 -name 'initramfs-*.cpio' ! -name "initramfs-$key.cpio" -delete
    mv "$out.tmp" "$out"
    log "initramfs: $(du -h "$out" | cut -f1)"
    echo "$out"
}

cmd_boot() {
    local sock="" logf="" queues=2 timeout_s="${E2E_TIMEOUT:-600}" fio_size=64M mode=full
    local rounds=3 reconnect="" event_idx=on smp=2 plain="" extra=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --socket) sock="$2"; shift 2 ;;
            --log) logf="$2"; shift 2 ;;
            --queues) queues="$2"; shift 2 ;;
            --timeout) timeout_s="$2"; shift 2 ;;
            --fio-size) fio_size="$2"; shift 2 ;;
            --mode) mode="$2"; shift 2 ;;
            --rounds) rounds="$2"; shift 2 ;;
            --reconnect-ms) reconnect=",reconnect-ms=$2"; shift 2 ;;
            --event-idx) event_idx="$2"; shift 2 ;;
            --smp) smp="$2"; shift 2 ;;
            --plain-device) plain=1; shift ;;
            --qmp) extra+=(-qmp "unix:$2,server=on,wait=off"); shift 2 ;;
            --incoming) extra+=(-incoming "$2"); shift 2 ;;
            *) die "boot: unknown argument $1" ;;
        esac
    done
    [ -n "$sock" ] || die "boot: --socket is required"
    [ -S "$sock" ] || die "boot: $sock is not a listening UNIX socket (is the backend running?)"
    need_tool qemu-system-x86_64
    need_tool timeout
    local qopt=",num-queues=$queues"
    [ -z "$plain" ] || qopt=""
    local initrd
    initrd="$(cmd_initramfs)"
    [ -n "$logf" ] || logf="$(mktemp /tmp/e2e-serial.XXXXXX.log)"
    : >"$logf"

    # TCG, never exactly one vCPU (see the README: with one TCG vCPU the guest's barrier between
    # writing used_event and re-reading used->idx races the backend and a notification is lost).
    # shellcheck disable=SC2054  # commas inside QEMU option values
    local qemu=(
        qemu-system-x86_64
        -machine pc -accel tcg,thread=multi -cpu max -smp "$smp" -m 1G
        -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem
        -chardev "socket,id=c,path=$sock$reconnect"
        -device "vhost-user-blk-pci,chardev=c$qopt,event_idx=$event_idx"
        -kernel "$KDIR/vmlinuz" -initrd "$initrd"
        -append "console=ttyS0 panic=-1 e2e.queues=$queues e2e.fio_size=$fio_size e2e.mode=$mode e2e.rounds=$rounds"
        -nodefaults -nographic -serial "file:$logf" -monitor none -no-reboot
        "${extra[@]}"
    )
    log "booting the guest (timeout ${timeout_s}s), serial log: $logf"
    log "${qemu[*]}"
    local rc=0 start=$SECONDS
    timeout --kill-after=10 "$timeout_s" "${qemu[@]}" </dev/null || rc=$?
    log "QEMU exited with status $rc after $((SECONDS - start))s"
    sed 's/\r$//' "$logf" >&2
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        die "FAIL: the guest did not finish within ${timeout_s}s (hung?); serial log: $logf"
    fi
    [ "$rc" = 0 ] || die "FAIL: QEMU exited with status $rc; serial log: $logf"
    if tr -d '\r' <"$logf" | grep "^$MARK: FAIL" >/dev/null; then
        die "FAIL: the guest reported: $(tr -d '\r' <"$logf" | grep "^$MARK: FAIL" | sed -n 1p)"
    fi
    tr -d '\r' <"$logf" | grep -x "$MARK: PASS" >/dev/null \
        || die "FAIL: no '$MARK: PASS' line on the guest's console; serial log: $logf"
    log "PASS: the guest finished its checks"
}

cmd_verify_image() {
    local img="$1" logf="$2"
    need_tool qemu-img
    need_tool e2fsck
    need_tool debugfs
    local tmp
    tmp="$(mktemp -d)"
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" RETURN
    qemu-img convert -O raw "$img" "$tmp/disk.raw"
    e2fsck -f -n "$tmp/disk.raw" >&2 || die "FAIL: host e2fsck on the image found problems (exit $?)"
    local sums n=0 sum name got
    sums="$(tr -d '\r' <"$logf" | sed -n 's/^E2E-SUM \([0-9a-f]\{64\}\) \(.*\)$/\1 \2/p')"
    [ -n "$sums" ] || die "FAIL: no E2E-SUM lines in $logf"
    while read -r sum name; do
        debugfs -R "dump /$name $tmp/file" "$tmp/disk.raw" >/dev/null 2>&1 \
            || die "FAIL: debugfs could not read /$name from the image"
        got="$(sha256sum "$tmp/file" | cut -d' ' -f1)"
        [ "$got" = "$sum" ] || die "FAIL: /$name in the image has SHA-256 $got, the guest wrote $sum"
        n=$((n + 1))
    done <<<"$sums"
    log "PASS: host e2fsck clean, $n files in the image match what the guest wrote"
}

wait_for_socket() {
    local sock="$1" pid="$2" i=0
    while [ ! -S "$sock" ]; do
        kill -0 "$pid" 2>/dev/null || die "the backend exited before listening on $sock"
        i=$((i + 1))
        [ "$i" -le 200 ] || die "the backend did not create $sock within 20 s"
        sleep 0.1
    done
}

cmd_run() {
    local backend=qsd queues=2 keep=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --backend) backend="$2"; shift 2 ;;
            --queues) queues="$2"; shift 2 ;;
            --keep) keep="$2"; shift 2 ;;
            *) die "run: unknown argument $1" ;;
        esac
    done
    need_tool qemu-img
    local dir
    if [ -n "$keep" ]; then dir="$keep"; mkdir -p "$dir"; else dir="$(mktemp -d)"; fi
    local IMG="$dir/disk.qcow2" SOCK="$dir/vhost.sock"
    rm -f "$IMG" "$SOCK"
    qemu-img create -q -f qcow2 "$IMG" 1G
    local cmd
    case "$backend" in
        qsd)
            need_tool qemu-storage-daemon
            cmd="qemu-storage-daemon --blockdev driver=file,node-name=f0,filename=$IMG
                --blockdev driver=qcow2,node-name=d0,file=f0
                --export type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=$queues"
            ;;
        ours)
            local bin="${CARGO_TARGET_DIR:-$ROOT/target}/release/vhost-user-qcow2"
            [ -x "$bin" ] || die "$bin not built: cargo build --release"
            cmd="$bin serve --image $IMG --socket $SOCK --num-queues $queues"
            ;;
        *) cmd="${backend//\$IMG/$IMG}"; cmd="${cmd//\$SOCK/$SOCK}" ;;
    esac
    log "backend: $cmd"
    # shellcheck disable=SC2086
    $cmd >"$dir/backend.log" 2>&1 &
    local pid=$!
    # shellcheck disable=SC2064
    trap "kill -KILL $pid 2>/dev/null || true" EXIT
    wait_for_socket "$SOCK" "$pid"
    local rc=0
    # A separate process, so that its failures (die, set -e) come back here as a status and the
    # backend is still stopped and its log shown.
    bash "$HERE/guest.sh" boot --socket "$SOCK" --queues "$queues" --log "$dir/serial.log" || rc=$?
    if [ "$rc" = 0 ]; then
        bash "$HERE/guest.sh" boot --socket "$SOCK" --queues "$queues" --mode reverify \
            --log "$dir/serial2.log" || rc=$?
    fi
    kill -TERM "$pid" 2>/dev/null || true
    local brc=0
    wait "$pid" || brc=$?
    trap - EXIT
    log "backend log:"
    sed 's/^/  backend: /' "$dir/backend.log" >&2
    [ "$rc" = 0 ] || die "FAIL: guest run failed"
    [ "$brc" = 0 ] || die "FAIL: the backend exited with status $brc after SIGTERM"
    qemu-img check "$IMG" >&2 || die "FAIL: qemu-img check exited $? on $IMG"
    cmd_verify_image "$IMG" "$dir/serial.log"
    [ -n "$keep" ] || rm -rf "$dir"
    log "PASS: end-to-end run with backend '$backend'"
}

case "${1:-}" in
    initramfs) shift; cmd_initramfs "$@" ;;
    boot) shift; cmd_boot "$@" ;;
    verify-image) shift; [ $# = 2 ] || die "usage: verify-image IMG LOG"; cmd_verify_image "$@" ;;
    run) shift; cmd_run "$@" ;;
    *) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
