#!/bin/busybox sh
# shellcheck shell=dash
# /init of the end-to-end test guest (packed into the initramfs by tests/e2e/guest.sh).
# Loads the virtio modules, checks the vhost-user disk (/dev/vda) and its queues, runs fio with
# verify over every queue, makes an ext4 filesystem, writes files of known content, syncs, checks
# the filesystem, and prints exactly one result line on the serial console:
#   VHOST-QCOW2-E2E: PASS            or    VHOST-QCOW2-E2E: FAIL <reason>
# then powers the VM off. Parameters come from the kernel command line:
#   e2e.queues=N   number of virtqueues the disk must have (default 2)
#   e2e.fio_size=S size of each fio job's region (default 64M)
#   e2e.mode=M     full (default): everything above, from an empty disk;
#                  reverify: a later boot on the same disk (after the backend served another VMM
#                  connection): fsck -n, then check the files the full run wrote (/SUMS);
#                  crash: e2e.rounds rounds of fio randwrite + verify (direct, no flush until
#                  the end) while the host kills and restarts the backend (tests/e2e_restart.rs).
#                  vm: what `./run vm` shows a newcomer: ext4 made on an empty disk (any
#                  other content is refused, never overwritten), fsck, a short fio with verify
#                  on a file inside, fsck again.
#                  migrate: random data written, then read e2e.rounds times with O_DIRECT
#                  into buffers only the device writes, each read's checksum compared with
#                  the first (what a migration's dirty logging must get right;
#                  tests/e2e_migration.rs).
#                  resize: fio randwrite with verify on every queue in the background while
#                  the host grows the disk (QMP block_resize, tests/e2e_resize.rs): the size in
#                  /sys/block/vda/size must change while fio runs (polled, 60 s at most);
#                  then fio with verify at the start and the end of the new area, and the
#                  background fio must pass.
#   e2e.rounds=N   rounds of the crash mode, read passes of the migrate mode (default 3)
/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt /etc /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
ln -sf /proc/mounts /etc/mtab

MARK=VHOST-QCOW2-E2E
finish() {
    sync
    echo "$MARK: $*"
    sleep 1
    poweroff -f
    # poweroff returned: make the kernel panic, which exits QEMU (-no-reboot, panic=-1).
    exit 1
}
fail() { finish "FAIL $*"; }
step() { echo "e2e: == $*"; }

QUEUES=2
FIO_SIZE=64M
MODE=full
ROUNDS=3
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        e2e.queues=*) QUEUES="${arg#e2e.queues=}" ;;
        e2e.fio_size=*) FIO_SIZE="${arg#e2e.fio_size=}" ;;
        e2e.mode=*) MODE="${arg#e2e.mode=}" ;;
        e2e.rounds=*) ROUNDS="${arg#e2e.rounds=}" ;;
    esac
done

step "loading virtio modules"
for m in virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio virtio_pci virtio_blk; do
    insmod "/modules/$m.ko" || fail "insmod $m"
done

i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ "$i" -le 100 ] || fail "no /dev/vda after 10 s"
    sleep 0.1
done
echo "e2e: vda: $(cat /sys/block/vda/size) sectors, logical block $(cat /sys/block/vda/queue/logical_block_size)"

nq=$(ls -d /sys/block/vda/mq/[0-9]* | wc -l)
echo "e2e: vda has $nq queues"
[ "$nq" = "$QUEUES" ] || fail "vda has $nq queues, expected $QUEUES"

# Completions per virtqueue, from the MSI-X vectors' interrupt counts (virtioN-req.Q).
irq_counts() {
    awk '/-req\.[0-9]+$/ {
        s = 0
        for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i
        printf "%s ", s
    }' /proc/interrupts
}
echo "e2e: interrupts per virtqueue before fio: $(irq_counts)"

if [ "$MODE" = reverify ]; then
    step "fsck.ext4 -n -f (filesystem from an earlier boot)"
    /usr/sbin/fsck.ext4 -n -f /dev/vda || fail "fsck.ext4 found problems (exit $?)"
    mount -t ext4 -o ro /dev/vda /mnt || fail "mount ext4"
    [ -s /mnt/SUMS ] || fail "no /SUMS on the filesystem"
    (cd /mnt && sha256sum -c SUMS) >/tmp/check 2>&1 || { cat /tmp/check; fail "files differ from what the earlier boot wrote"; }
    echo "e2e: $(wc -l </mnt/SUMS) files as written by the earlier boot"
    umount /mnt || fail "umount"
    finish PASS
fi
CPUS="0-$(($(nproc) - 1))"
if [ "$MODE" = vm ]; then
    # ext4's superblock magic (0xEF53, little endian) sits 1080 bytes into the disk.
    magic="$(dd if=/dev/vda bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')"
    if [ "$magic" = 53ef ]; then
        echo "e2e: the disk holds an ext4 filesystem"
    elif cmp -s -n 1048576 /dev/vda /dev/zero; then
        step "empty disk: mkfs.ext4"
        /usr/sbin/mkfs.ext4 -q -F /dev/vda || fail "mkfs.ext4"
    else
        fail "the disk holds something other than ext4: not touching it"
    fi
    step "fsck.ext4 -n -f"
    /usr/sbin/fsck.ext4 -n -f /dev/vda || fail "fsck.ext4 found problems (exit $?)"
    mount -t ext4 /dev/vda /mnt || fail "mount ext4"
    step "fio: 4k random reads and writes with crc32c verify on a 32M file"
    /usr/bin/fio --name=vm --filename=/mnt/vuq-vm.fio --size=32M --rw=randrw --bs=4k \
        --iodepth=8 --ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 \
        || fail "fio verify (exit $?)"
    rm -f /mnt/vuq-vm.fio
    echo boot >>/mnt/vuq-vm-boots
    echo "e2e: boots of ./run vm on this disk: $(wc -l </mnt/vuq-vm-boots)"
    umount /mnt || fail "umount"
    step "fsck.ext4 -n -f after the run"
    /usr/sbin/fsck.ext4 -n -f /dev/vda || fail "fsck.ext4 found problems (exit $?)"
    finish PASS
fi
if [ "$MODE" = migrate ]; then
    # Reads with O_DIRECT into dd's buffers: pages only the device writes, never the guest's
    # CPU, so after a migration they hold the right data only if the backend marked them in
    # the dirty log.
    mb="${FIO_SIZE%M}"
    half=$((mb / 2))
    step "migrate: writing ${mb}M of random data"
    /usr/bin/fio --name=fill --filename=/dev/vda --ioengine=libaio --direct=1 --rw=write \
        --bs=1M --size="${mb}M" --iodepth=4 >/dev/null || fail "fio fill (exit $?)"
    readsums() {
        for h in 0 1; do
            dd if=/dev/vda bs=1M count="$half" skip=$((h * half)) iflag=direct 2>"/tmp/dd$h" \
                | sha256sum >"/tmp/$1$h" &
        done
        wait
        for h in 0 1; do
            grep -q "^$half+0 records in" "/tmp/dd$h" || fail "dd read failed: $(cat /tmp/dd$h)"
        done
    }
    readsums ref
    echo "e2e: first read: $(cat /tmp/ref0 /tmp/ref1 | cut -c1-16 | tr '\n' ' ')"
    r=1
    while [ "$r" -le "$ROUNDS" ]; do
        step "migrate: read pass $r of $ROUNDS"
        readsums now
        for h in 0 1; do
            cmp -s "/tmp/ref$h" "/tmp/now$h" \
                || fail "read pass $r: half $h differs from the first read ($(cat /tmp/now$h))"
        done
        r=$((r + 1))
    done
    finish PASS
fi
if [ "$MODE" = resize ]; then
    old=$(cat /sys/block/vda/size)
    step "resize: fio randwrite 4k iodepth 16 x $QUEUES jobs, verify crc32c, in the background"
    /usr/bin/fio --name=resize-verify --filename=/dev/vda --ioengine=libaio --direct=1 \
        --rw=randwrite --bs=4k --iodepth=16 --size="$FIO_SIZE" --offset_increment="$FIO_SIZE" \
        --numjobs="$QUEUES" --cpus_allowed="$CPUS" --cpus_allowed_policy=split \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting >/tmp/fio.log 2>&1 &
    fiopid=$!
    # The host waits for this line, then grows the disk.
    echo "e2e: resize: fio started, vda has $old sectors"
    i=0
    while [ "$(cat /sys/block/vda/size)" = "$old" ]; do
        i=$((i + 1))
        [ "$i" -le 600 ] || { cat /tmp/fio.log; fail "vda still has $old sectors after 60 s"; }
        sleep 0.1
    done
    new=$(cat /sys/block/vda/size)
    if kill -0 "$fiopid" 2>/dev/null; then running=yes; else running=no; fi
    echo "e2e: resize: vda grew from $old to $new sectors (fio still running: $running)"
    [ "$new" -gt "$old" ] || fail "vda shrank from $old to $new sectors"
    step "resize: fio write + verify crc32c at the start and the end of the new area"
    for at in $((old * 512)) $((new * 512 - 4194304)); do
        if ! /usr/bin/fio --name=new-area --filename=/dev/vda --ioengine=libaio --direct=1 \
            --rw=randwrite --bs=4k --iodepth=8 --offset="$at" --size=4M --verify=crc32c \
            --do_verify=1 --verify_fatal=1 >/tmp/fio2.log 2>&1; then
            cat /tmp/fio2.log
            fail "fio verify in the new area at byte $at"
        fi
    done
    rc=0
    wait "$fiopid" || rc=$?
    grep -E "err=|WRITE:|verify" /tmp/fio.log | head -5
    [ "$rc" = 0 ] || { cat /tmp/fio.log; fail "background fio verify during the resize (exit $rc)"; }
    finish PASS
fi
if [ "$MODE" = crash ]; then
    # Every write fio saw complete must read back, whatever the backend went through. Each
    # round writes its own region, so every round allocates clusters (new L2 entries: the
    # metadata a crash could lose), not only the first.
    r=1
    while [ "$r" -le "$ROUNDS" ]; do
        step "crash round $r of $ROUNDS: fio randwrite 4k iodepth 16 x $QUEUES jobs, verify crc32c"
        case "$FIO_SIZE" in
            *K) size_bytes=$(( ${FIO_SIZE%K} * 1024 )) ;;
            *M) size_bytes=$(( ${FIO_SIZE%M} * 1048576 )) ;;
            *G) size_bytes=$(( ${FIO_SIZE%G} * 1073741824 )) ;;
            *) size_bytes=$FIO_SIZE ;;
        esac
        region=$(( (r - 1) * QUEUES * size_bytes ))
        /usr/bin/fio --name=crash-verify --filename=/dev/vda --ioengine=libaio --direct=1 \
            --rw=randwrite --bs=4k --iodepth=16 --size="$FIO_SIZE" --offset="$region" \
            --offset_increment="$FIO_SIZE" \
            --numjobs="$QUEUES" --cpus_allowed="$CPUS" --cpus_allowed_policy=split --randseed="$r" \
            --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting \
            || fail "fio verify in crash round $r (exit $?)"
        r=$((r + 1))
    done
    finish PASS
fi
[ "$MODE" = full ] || fail "unknown e2e.mode=$MODE"

step "fio randwrite 4k iodepth 16 x $QUEUES jobs, verify crc32c"
# One job per CPU (cpus_allowed_policy=split): with 2 vCPUs and 2 queues each job lands on its
# own hardware queue. offset_increment keeps the jobs' regions apart so that verify is exact.
/usr/bin/fio --name=randwrite-verify --filename=/dev/vda --ioengine=libaio --direct=1 \
    --rw=randwrite --bs=4k --iodepth=16 --size="$FIO_SIZE" --offset_increment="$FIO_SIZE" \
    --numjobs="$QUEUES" --cpus_allowed="$CPUS" --cpus_allowed_policy=split --verify=crc32c --do_verify=1 \
    --verify_fatal=1 --group_reporting || fail "fio randwrite verify (exit $?)"

step "fio mixed block sizes 4k-256k, verify sha256"
/usr/bin/fio --name=mixed-verify --filename=/dev/vda --ioengine=libaio --direct=1 \
    --rw=randwrite --bsrange=4k-256k --iodepth=8 --size="$FIO_SIZE" --offset_increment="$FIO_SIZE" \
    --offset="$FIO_SIZE" --numjobs="$QUEUES" --cpus_allowed="$CPUS" --cpus_allowed_policy=split --verify=sha256 \
    --do_verify=1 --verify_fatal=1 --group_reporting || fail "fio mixed verify (exit $?)"

counts=$(irq_counts)
echo "e2e: interrupts per virtqueue after fio: $counts"
[ "$(echo $counts | wc -w)" = "$QUEUES" ] || fail "expected $QUEUES request vectors in /proc/interrupts, got: $counts"
for c in $counts; do
    [ "$c" != 0 ] || fail "a virtqueue completed no request: $counts"
done

step "mkfs.ext4"
/usr/sbin/mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 /dev/vda || fail "mkfs.ext4"
mount -t ext4 /dev/vda /mnt || fail "mount ext4"

step "writing files"
mkdir -p /mnt/dir/sub || fail "mkdir"
n=1
while [ "$n" -le 8 ]; do
    dd if=/dev/urandom of="/mnt/file$n" bs=64k count=$((n * 16)) 2>/dev/null || fail "dd file$n"
    echo "small file $n" >"/mnt/dir/sub/small$n" || fail "write small$n"
    n=$((n + 1))
done
(cd /mnt && sha256sum file* dir/sub/*) >/tmp/sums || fail "sha256sum"
cp /tmp/sums /mnt/SUMS || fail "write SUMS"
sync || fail "sync"
umount /mnt || fail "umount"

step "fsck.ext4 -n -f"
/usr/sbin/fsck.ext4 -n -f /dev/vda || fail "fsck.ext4 found problems (exit $?)"

step "reading the files back from disk"
echo 3 >/proc/sys/vm/drop_caches
mount -t ext4 -o ro /dev/vda /mnt || fail "remount ext4"
(cd /mnt && sha256sum -c /tmp/sums) >/tmp/check 2>&1 || { cat /tmp/check; fail "checksums differ after remount"; }
umount /mnt || fail "umount after check"
# The host side compares these against the image (tests/e2e/guest.sh verify-image).
while read -r sum name; do echo "E2E-SUM $sum $name"; done </tmp/sums

finish PASS
