#!/usr/bin/env bash
# Side-by-side benchmark: our vhost-user-blk daemon vs qemu-storage-daemon (qsd), same qcow2
# image (a fresh copy per run), same libblkio client (examples/bench), interleaved runs
# (ours, qsd, then qsd, ours, ...) for several rounds; prints a Markdown table of the medians and the
# spread (min-max) over the rounds, with the daemon's CPU seconds (utime+stime from /proc/PID/stat)
# and peak RSS (VmHWM).
#
# Usage: scripts/bench.sh [--quick] [--rounds N] [--runtime SECS] [--queues "1 2"]
#                         [--rows REGEX] [--out DIR] [--no-build] [--keep]
#   --quick     1 round, short runs, small images (about a minute and a half in all)
#   --cold      also the cold-cache rows (the page cache is dropped before every run; needs
#               root, else they are skipped with the reason): a COLD_SIZE image (default 4G,
#               1G with --quick) filled with random data, used in place
#   --rows      only rows whose name matches the (grep -E) regex, e.g. --rows 'randread'
#   --out DIR   where images, sockets, logs and results.jsonl go (default: a new temp dir,
#               removed at the end unless --keep); results.jsonl and table.md are copied to
#               target/bench/ in any case
#
# Environment:
#   BENCH_OURS_CMD   command template of "ours"; placeholders {image} {socket} {queues} {extra}.
#                    Default: <target>/release/vhost-user-qcow2 serve --image {image}
#                             --socket {socket} --num-queues {queues} {extra}
#   BENCH_QSD_CMD    the same for qemu-storage-daemon; {extra} goes into the qcow2 --blockdev
#                    (",opt=val,..."). Default: see QSD_CMD_DEFAULT below.
#   BENCH_OURS=qsd   run qemu-storage-daemon in the "ours" slot too. This validates the whole
#                    harness before `serve` exists, and measures the noise of the machine (the
#                    two columns should then agree within the spread):
#                        BENCH_OURS=qsd scripts/bench.sh --quick
#   CARGO_TARGET_DIR where cargo puts the binaries (default: ./target)
#
# Adding rows (later issues: lazy refcounts, overlap checks, dedup): call `row` in define_rows:
#   row NAME IMAGE QUEUES PIN "CLIENT ARGS" [VARIANT...]
#     IMAGE    fresh[:QEMU-IMG-OPTS] (empty image) or filled[:QEMU-IMG-OPTS] (random data over
#              the whole disk, all clusters allocated), e.g. fresh:lazy_refcounts=on,cluster_size=4k
#     QUEUES   virtqueues (daemon --num-queues, client --num-queues: one client thread each)
#     PIN      pin: client and daemon on CPU 0 (taskset; for QD1 latency); split: daemon on
#              CPU 0, client on CPU 1 (for a busy-polling client); nopin otherwise
#     VARIANT  LABEL=KIND[:EXTRA]; KIND is ours or qsd; EXTRA is added to the daemon command
#              ({extra}), e.g. "ours-lazy=ours:--lazy-refcounts on" "qsd-lazy=qsd:,lazy-refcounts=on".
#              KIND qsdd: qemu-storage-daemon with O_DIRECT and io_uring. KIND fio: fio on a raw
#              file instead of a daemon (see run_fio), O_DIRECT, or through the page cache with
#              EXTRA "buffered".
#              Default variants: ours=ours qsd=qsd. The IOPS ratio is taken against "qsd".
#   The client gets --socket and --num-queues from here; the row passes the rest
#   (see examples/bench/main.rs for the options: --workload --bs --iodepth --stride --no-repeat
#   --size --dedup-ratio --flush-every ...). {runtime} in CLIENT ARGS is the run time in seconds.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

QUICK=0
ROUNDS=""
RUNTIME=""
QUEUES="1 2"
ROWS_RE=""
OUT=""
BUILD=1
KEEP=0
COLD=0
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --rounds) ROUNDS=$2; shift ;;
        --runtime) RUNTIME=$2; shift ;;
        --queues) QUEUES=$2; shift ;;
        --rows) ROWS_RE=$2; shift ;;
        --out) OUT=$2; shift ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        --cold) COLD=1 ;;
        -h|--help) sed -n '2,45p' "$0"; exit 0 ;;
        *) echo "bench.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$QUICK" = 1 ]; then
    ROUNDS=${ROUNDS:-1}
    RUNTIME=${RUNTIME:-1}
    FILL_SIZE=256M      # virtual size of the data-filled image (read and overwrite rows)
    COLD_SIZE=${COLD_SIZE:-1G}
    ALLOC_SIZE=1G       # virtual size of the fresh image (allocating rows)
else
    ROUNDS=${ROUNDS:-3}
    RUNTIME=${RUNTIME:-5}
    FILL_SIZE=1G
    COLD_SIZE=${COLD_SIZE:-4G}
    ALLOC_SIZE=8G        # 131072 allocating 4 KiB writes at most; up to 8 GiB of disk per run
fi

for tool in qemu-img qemu-storage-daemon taskset; do
    command -v "$tool" >/dev/null || { echo "bench.sh: $tool not found (apt-get install qemu-utils util-linux)" >&2; exit 1; }
done

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [ "$BUILD" = 1 ]; then
    cargo build --release --examples --bins >&2
fi
CLIENT=$TARGET/release/examples/bench
[ -x "$CLIENT" ] || { echo "bench.sh: $CLIENT missing (build with cargo build --release --examples)" >&2; exit 1; }

OURS_CMD_DEFAULT="$TARGET/release/vhost-user-qcow2 serve --image {image} --socket {socket} --num-queues {queues} {extra}"
QSD_CMD_DEFAULT="qemu-storage-daemon --blockdev driver=file,node-name=f0,filename={image},cache.direct=off,discard=unmap --blockdev driver=qcow2,node-name=d0,file=f0{extra} --export type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={socket},writable=on,num-queues={queues}"
QSD_CMD=${BENCH_QSD_CMD:-$QSD_CMD_DEFAULT}
# qemu-storage-daemon as production VMs run it: O_DIRECT, io_uring (cache=none,aio=io_uring).
QSDD_CMD=${QSD_CMD/cache.direct=off/cache.direct=on,aio=io_uring}
OURS_CMD=${BENCH_OURS_CMD:-$OURS_CMD_DEFAULT}
if [ "${BENCH_OURS:-}" = qsd ]; then
    OURS_CMD=$QSD_CMD
    echo "bench.sh: BENCH_OURS=qsd: qemu-storage-daemon runs in both slots (harness check)" >&2
fi

if [ -n "$OUT" ]; then
    WORK=$OUT
    mkdir -p "$WORK"
else
    WORK=$(mktemp -d /var/tmp/vhost-user-qcow2-bench.XXXXXX)
fi
mkdir -p "$WORK/logs" "$WORK/base"
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
DAEMON_PID=""
cleanup() {
    if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -KILL "$DAEMON_PID" 2>/dev/null || true
    fi
    rm -f "$WORK"/run.img "$WORK"/run.sock "$WORK"/run.raw
    if [ "$KEEP" = 0 ] && [ -z "$OUT" ]; then
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

CLK_TCK=$(getconf CLK_TCK)

# base_image SPEC -> prints the path of a cached base image for SPEC (fresh[:opts]|filled[:opts]).
base_image() {
    local spec=$1 kind opts path
    kind=${spec%%:*}
    opts=""
    [ "$kind" != "$spec" ] && opts=${spec#*:}
    path=$WORK/base/$(printf '%s' "$spec-$FILL_SIZE-$ALLOC_SIZE-$COLD_SIZE" | tr -c 'A-Za-z0-9_.=-' '_').qcow2
    if [ ! -f "$path" ]; then
        case "$kind" in
            fresh)
                qemu-img create -q -f qcow2 ${opts:+-o "$opts"} "$path" "$ALLOC_SIZE" >&2 ;;
            cold)
                # The cold rows' image, used in place (reads and overwrites leave it valid),
                # with a raw copy of the same data for fio on a raw file.
                head -c "$(numfmt --from=iec "$COLD_SIZE")" /dev/urandom >"$WORK/base/cold.raw"
                qemu-img convert -q -f raw -O qcow2 "$WORK/base/cold.raw" "$path" >&2 ;;
            filled)
                # Incompressible, never-repeating data in every cluster (no zero or duplicate
                # cluster a daemon could shortcut).
                head -c "$(numfmt --from=iec "$FILL_SIZE")" /dev/urandom >"$WORK/base/fill.raw"
                qemu-img convert -q -f raw -O qcow2 ${opts:+-o "$opts"} "$WORK/base/fill.raw" "$path" >&2
                rm -f "$WORK/base/fill.raw" ;;
            *) echo "bench.sh: unknown image kind in '$spec'" >&2; return 1 ;;
        esac
    fi
    printf '%s\n' "$path"
}

# Row table, filled by define_rows.
ROW_NAMES=() ROW_IMAGES=() ROW_QUEUES=() ROW_PINS=() ROW_CLIENT=() ROW_VARIANTS=()
row() {
    local name=$1 image=$2 queues=$3 pin=$4 client=$5
    shift 5
    local variants=("$@")
    [ ${#variants[@]} -eq 0 ] && variants=("ours=ours" "qsd=qsd")
    if [ -n "$ROWS_RE" ] && ! grep -qE -- "$ROWS_RE" <<<"$name"; then
        return 0
    fi
    ROW_NAMES+=("$name") ROW_IMAGES+=("$image") ROW_QUEUES+=("$queues") ROW_PINS+=("$pin") ROW_CLIENT+=("$client")
    local IFS=$'\x1f'
    ROW_VARIANTS+=("${variants[*]}")
}

# Rows the later issues will add look like this (the flags of ours are theirs to define):
#   row "4k randwrite+flush QD1 lazy" fresh 1 nopin \
#       "--workload randwrite --bs 4k --iodepth 1 --stride 64k --no-repeat --flush-every 1 --runtime {runtime}" \
#       "lazy=ours:--lazy-refcounts on" "nolazy=ours:--lazy-refcounts off" \
#       "qsd-lazy=qsd:,lazy-refcounts=on" "qsd=qsd:,lazy-refcounts=off"
#   row "64k dedup 50% QD32 2q" fresh:cluster_size=64k 2 nopin \
#       "--workload randwrite --bs 64k --iodepth 32 --no-repeat --dedup-ratio 50 --runtime {runtime}" \
#       "dedup=ours:--dedup on" "nodedup=ours:--dedup off" "qsd=qsd"
define_rows() {
    local q
    for q in $QUEUES; do
        row "4k randread QD1 ${q}q pinned" filled "$q" pin \
            "--workload randread --bs 4k --iodepth 1 --runtime {runtime}"
        row "4k randread QD32 ${q}q" filled "$q" nopin \
            "--workload randread --bs 4k --iodepth 32 --runtime {runtime}"
        # Every write lands in a cluster not allocated before (64 KiB clusters, stride 64 KiB).
        row "4k randwrite QD32 ${q}q allocating" fresh "$q" nopin \
            "--workload randwrite --bs 4k --iodepth 32 --stride 64k --no-repeat --runtime {runtime}"
        row "4k randwrite QD32 ${q}q overwrite" filled "$q" nopin \
            "--workload randwrite --bs 4k --iodepth 32 --runtime {runtime}"
        # One sequential pass over a fresh image (stops at the end of the disk or the run time).
        row "1M seqwrite QD8 ${q}q" fresh "$q" nopin \
            "--workload seqwrite --bs 1M --iodepth 8 --no-repeat --runtime {runtime}"
    done
    [ "$COLD" = 1 ] && define_cold_rows
    # Latency under interference (issue 16): 4 KiB random reads at QD1 on one queue, alone and
    # while a second queue writes and discards 8 MiB ranges and the lazy-refcount timer fires
    # every second; compare the p99 of the two rows.
    # fio-raw: the same reads on a raw file (O_DIRECT), alone and while scripts/raw_interfere.py
    # writes and punches 8 MiB ranges of its other half the same way: what the disk and the
    # file system allow (ext4 serializes O_DIRECT reads of a file with its allocating writes).
    # fio-raw-buf: the same through the page cache (buffered reads of the copy, buffered writes
    # and punches): the floor of the writeback variant.
    local half lazy=("ours=ours:--lazy-refcounts on --refcount-flush-interval 1"
        "none=ours:--cache none --lazy-refcounts on --refcount-flush-interval 1" "fio-raw=fio"
        "fio-raw-buf=fio:buffered")
    half=$(($(numfmt --from=iec "$FILL_SIZE") / 2))
    row "lat 4k randread QD1 alone" filled:lazy_refcounts=on 1 nopin \
        "--workload randread --bs 4k --iodepth 1 --size $half --runtime {runtime}" "${lazy[@]}"
    row "lat 4k randread QD1 + discards, lazy timer" filled:lazy_refcounts=on 2 nopin \
        "--workload randread --bs 4k --iodepth 1 --interfere --runtime {runtime}" "${lazy[@]}"
    # Lazy refcounts (issue 4): allocating 4 KiB writes, each followed by a FLUSH.
    local d
    for d in 1 8; do
        row "4k randwrite+flush QD$d alloc lazy" fresh 1 nopin \
            "--workload randwrite --bs 4k --iodepth $d --stride 64k --no-repeat --flush-every 1 --runtime {runtime}" \
            "lazy=ours:--lazy-refcounts on" "nolazy=ours:--lazy-refcounts off" \
            "qsd-lazy=qsd:,lazy-refcounts=on" "qsd=qsd:,lazy-refcounts=off"
    done
    # Overlap checks (issue 5): all (our default) against none.
    row "4k randwrite QD32 alloc overlap" fresh 1 nopin \
        "--workload randwrite --bs 4k --iodepth 32 --stride 64k --no-repeat --runtime {runtime}" \
        "all=ours:--overlap-check all" "none=ours:--overlap-check none"
    row "4k randwrite QD32 overwrite overlap" filled 1 nopin \
        "--workload randwrite --bs 4k --iodepth 32 --runtime {runtime}" \
        "all=ours:--overlap-check all" "none=ours:--overlap-check none"
    # Acknowledged writes outlive the process (issue 17): the metadata of every allocating write
    # in the file before it completes (file, the default) against in memory until a flush.
    row "4k randwrite QD32 2q alloc ack" fresh 2 nopin \
        "--workload randwrite --bs 4k --iodepth 32 --stride 64k --no-repeat --runtime {runtime}" \
        "file=ours:--ack-durability file" "memory=ours:--ack-durability memory" "qsd=qsd"
    row "4k-cluster randwrite QD32 2q alloc ack" fresh:cluster_size=4096 2 nopin \
        "--workload randwrite --bs 4k --iodepth 32 --no-repeat --runtime {runtime}" \
        "file=ours:--ack-durability file" "memory=ours:--ack-durability memory" "qsd=qsd"
    # Dedup (issue 6): whole-cluster writes with 100%, 50% and 0% duplicate content, 2 queues.
    local pct
    for pct in 100 50 0; do
        row "64k dedup $pct% QD32 2q" fresh 2 nopin \
            "--workload randwrite --bs 64k --iodepth 32 --no-repeat --dedup-ratio $pct --runtime {runtime}" \
            "dedup=ours:--dedup on" "nodedup=ours:--dedup off" "qsd=qsd" \
            "bg=ours:--dedup background --control {control}"
        row "4k-cluster dedup $pct% QD32 2q" fresh:cluster_size=4096 2 nopin \
            "--workload randwrite --bs 4k --iodepth 32 --no-repeat --dedup-ratio $pct --runtime {runtime}" \
            "dedup=ours:--dedup on" "nodedup=ours:--dedup off" "qsd=qsd" \
            "bg=ours:--dedup background --control {control}"
    done
}

# Cold-cache rows (issue 16): data read from the disk, not the page cache. "ours" runs with
# --cache none against qemu-storage-daemon with cache.direct=on,aio=io_uring ("qsd") and fio
# on a raw file of the same size (O_DIRECT, io_uring, same depth: what the disk allows); the
# buffered rows compare both daemons without O_DIRECT on the same cold data.
define_cold_rows() {
    local q direct=("ours=ours:--cache none" "qsd=qsdd" "fio-raw=fio")
    for q in 1 2; do
        # ours-poll: the same with the workers busy-polling for 50 us after each event.
        row "cold 4k randread QD1 ${q}q" cold "$q" pin \
            "--workload randread --bs 4k --iodepth 1 --runtime {runtime}" "${direct[@]}" \
            "ours-poll=ours:--cache none --poll-us 50"
        row "cold 4k randread QD32 ${q}q" cold "$q" nopin \
            "--workload randread --bs 4k --iodepth 32 --runtime {runtime}" "${direct[@]}"
    done
    # What the QD1 latency is made of: the client busy-polls for completions (--poll; on CPU 1,
    # the daemon on CPU 0) and our workers poll for 50 us, so no thread sleeps between a
    # request and its completion. The difference to the row above is the wake-ups of sleeping
    # threads; the difference to fio-raw is the vhost-user transport itself.
    row "cold 4k randread QD1 1q polled" cold 1 split \
        "--workload randread --bs 4k --iodepth 1 --poll --runtime {runtime}" \
        "ours-poll=ours:--cache none --poll-us 50" "qsd=qsdd" "fio-raw=fio"
    row "cold 4k randwrite QD32 1q overwrite" cold 1 nopin \
        "--workload randwrite --bs 4k --iodepth 32 --runtime {runtime}" "${direct[@]}"
    row "cold 4k randread QD32 2q buffered" cold 2 nopin \
        "--workload randread --bs 4k --iodepth 32 --runtime {runtime}" "ours=ours" "qsd=qsd"
}

# fio_json ARGS...: the client's JSON fields from a fio run (--output-format=json) on stdin.
fio_json() {
    python3 -c '
import json, sys
d = json.load(sys.stdin)
ios = 0; secs = 0.0; p50 = []; p99 = []; byts = 0; errs = 0
for j in d["jobs"]:
    for k in ("read", "write"):
        x = j[k]
        if x["total_ios"] == 0:
            continue
        ios += x["total_ios"]; byts += x["io_bytes"]
        secs = max(secs, x["runtime"] / 1000.0)
        # Total latency (lat_ns: submission + completion), as the bench client measures its
        # own: from the request queued to its completion seen. clat_ns alone leaves out the
        # submitting io_uring_enter, which carries the disk notification (13 us on the test VM).
        pc = x["lat_ns"].get("percentile", {})
        p50.append(pc.get("50.000000", 0) / 1000.0); p99.append(pc.get("99.000000", 0) / 1000.0)
    errs += j.get("error", 0)
secs = max(secs, 1e-9)
print(json.dumps({"ios": ios, "bytes": byts, "errors": errs, "elapsed_s": secs,
    "iops": ios / secs, "mbps": byts / secs / 1e6,
    "lat_p50_us": max(p50) if p50 else None, "lat_p99_us": max(p99) if p99 else None}))'
}

# run_fio CLIENT-ARGS QUEUES RAW PIN [buffered]: fio on RAW with the bench client's workload (one
# job per queue, O_DIRECT unless "buffered", io_uring; on CPU 0 when PIN is not nopin), printing
# the client's JSON fields. With --interfere (the latency rows) the last queue's part is played
# by scripts/raw_interfere.py on the second half of RAW instead (it prints the rate it wrote at;
# buffered too with "buffered"), and one fio job reads the first half.
run_fio() {
    local args=$1 queues=$2 raw=$3 pin=$4 direct=1 rw="" bs="" depth="" runtime="" size="" interfere=0
    [ "${5:-}" = buffered ] && direct=0
    read -r -a a <<<"$args"
    local k
    for ((k = 0; k < ${#a[@]}; k++)); do
        case "${a[$k]}" in
            --workload) rw=${a[$((k + 1))]} ;;
            --bs) bs=${a[$((k + 1))]} ;;
            --iodepth) depth=${a[$((k + 1))]} ;;
            --runtime) runtime=${a[$((k + 1))]} ;;
            --size) size=${a[$((k + 1))]} ;;
            --interfere) interfere=1 ;;
        esac
    done
    local ipid="" half jobs=$queues
    if [ "$interfere" = 1 ]; then
        half=$(($(stat -c %s "$raw") / 2))
        size=$half
        jobs=$((queues - 1))
        python3 "$ROOT/scripts/raw_interfere.py" "$raw" "$half" "$half" "$((runtime + 2))" \
            ${5:+"$5"} &
        ipid=$!
    fi
    # A pinned row pins fio to the daemon's CPU too: which CPU takes the disk's interrupts
    # moves a QD1 p50 by 15 us on the test VM, so only the same placement compares.
    local -a fio_taskset=()
    [ "$pin" != nopin ] && fio_taskset=(taskset -c 0)
    local out rc=0
    out=$("${fio_taskset[@]}" fio --name=raw --filename="$raw" --direct="$direct" --ioengine=io_uring --rw="$rw" --bs="$bs" \
        --iodepth="$depth" --numjobs="$jobs" --runtime="$runtime" --time_based --lat_percentiles=1 \
        ${size:+--size="$size"} --randrepeat=0 --norandommap --group_reporting=0 \
        --output-format=json 2>/dev/null) || rc=$?
    if [ -n "$ipid" ]; then
        kill "$ipid" 2>/dev/null || true
        wait "$ipid" 2>/dev/null || true
    fi
    [ "$rc" = 0 ] && fio_json <<<"$out"
}

# Daemon command for KIND with EXTRA, as an array in CMD.
daemon_cmd() {
    local kind=$1 extra=$2 img=$3 sock=$4 queues=$5 tmpl
    case "$kind" in
        ours) tmpl=$OURS_CMD
              # Our CLI flags make no sense to qsd standing in for us.
              [ "${BENCH_OURS:-}" = qsd ] && extra="" ;;
        qsd) tmpl=$QSD_CMD ;;
        qsdd) tmpl=$QSDD_CMD ;;
        *) echo "bench.sh: unknown daemon kind '$kind'" >&2; return 1 ;;
    esac
    tmpl=${tmpl//\{image\}/$img}
    tmpl=${tmpl//\{socket\}/$sock}
    tmpl=${tmpl//\{queues\}/$queues}
    tmpl=${tmpl//\{extra\}/$extra}
    read -r -a CMD <<<"$tmpl"
}

json_str() { # minimal JSON string escaping for names and messages
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/ }
    printf '"%s"' "$s"
}

# wait_worker CONTROL_SOCKET: poll query-dedup until nothing is pending and the worker is idle;
# prints the seconds it took.
wait_worker() {
    python3 - "$1" <<'PY'
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rw")
def call(cmd):
    f.write(json.dumps({"execute": cmd}) + "\n")
    f.flush()
    while True:
        m = json.loads(f.readline())
        if "return" in m or "error" in m:
            return m
f.readline()
call("qmp_capabilities")
t0 = time.time()
while True:
    r = call("query-dedup")["return"]
    if r["pending-clusters"] == 0 and not r["running"]:
        break
    if time.time() - t0 > 600:
        sys.exit(1)
    time.sleep(0.2)
print(round(time.time() - t0, 2))
PY
}

# run_one ROW_INDEX VARIANT QUEUES ROUND: one daemon start, one client run, one results line.
run_one() {
    local i=$1 variant=$2 queues=$3 round=$4
    local name=${ROW_NAMES[$i]} pin=${ROW_PINS[$i]} client_args=${ROW_CLIENT[$i]}
    local label=${variant%%=*} spec=${variant#*=}
    local kind=${spec%%:*} extra=""
    [ "$kind" != "$spec" ] && extra=${spec#*:}
    # {control}: a QMP socket; the run then waits for the background dedup worker to catch up
    # before stopping the daemon (IOPS are the client's; the space is after the catch-up).
    local ctl=$WORK/run.ctl
    extra=${extra//\{control\}/$ctl}
    local img=$WORK/run.img sock=$WORK/run.sock
    local log
    log=$WORK/logs/$(printf '%s' "$name-$label-r$round" | tr -c 'A-Za-z0-9_.-' '_').log
    local base
    base=$(base_image "${ROW_IMAGES[$i]}")
    if [ "${ROW_IMAGES[$i]}" = cold ]; then
        if [ "$(id -u)" != 0 ]; then
            echo "bench.sh: $name / $label: skipped (dropping the page cache needs root)" >&2
            printf '{"row":%s,"variant":%s,"kind":%s,"round":%d,"queues":%d,"client":null,"error":"skipped: needs root to drop the page cache"}\n' \
                "$(json_str "$name")" "$(json_str "$label")" "$(json_str "$kind")" "$round" "$queues" >>"$RESULTS"
            return 0
        fi
        img=$base
        sync
        echo 3 >/proc/sys/vm/drop_caches
    else
        cp --sparse=always "$base" "$img"
        sync "$img"
    fi
    rm -f "$sock"
    if [ "$kind" = fio ]; then
        local out args=${client_args//\{runtime\}/$RUNTIME} err=""
        local raw=$WORK/base/cold.raw
        if [ "${ROW_IMAGES[$i]}" != cold ]; then
            # A raw file of the filled image's size with its own random data; the latency rows'
            # interferer writes and punches it, so each run gets a fresh copy.
            [ -f "$WORK/base/fill.raw" ] || head -c "$(numfmt --from=iec "$FILL_SIZE")" /dev/urandom >"$WORK/base/fill.raw"
            raw=$WORK/run.raw
            cp "$WORK/base/fill.raw" "$raw"
            sync "$raw"
        fi
        out=$(run_fio "$args" "$queues" "$raw" "$pin" "$extra") || err="fio failed"
        rm -f "$WORK/run.raw"
        [ -z "$out" ] && out=null
        {
            printf '{"row":%s,"variant":%s,"kind":"fio","round":%d,"queues":%d,"cpu_s":null,"client":%s' \
                "$(json_str "$name")" "$(json_str "$label")" "$round" "$queues" "$out"
            [ -n "$err" ] && printf ',"error":%s' "$(json_str "$err")"
            printf '}\n'
        } >>"$RESULTS"
        printf 'bench.sh: %-36s %-10s round %d: %s\n' "$name" "$label" "$round" "$(grep -o '"iops": [0-9.]*' <<<"$out")" >&2
        return 0
    fi

    local -a taskset_cmd=() client_taskset=()
    [ "$pin" = pin ] && taskset_cmd=(taskset -c 0) client_taskset=(taskset -c 0)
    [ "$pin" = split ] && taskset_cmd=(taskset -c 0) client_taskset=(taskset -c 1)
    daemon_cmd "$kind" "$extra" "$img" "$sock" "$queues"
    local load
    load=$(cut -d' ' -f1 /proc/loadavg)
    "${taskset_cmd[@]}" "${CMD[@]}" >"$log" 2>&1 &
    DAEMON_PID=$!
    local waited=0 error="" client_out="" cpu="null" cpu_user="null" rss="null"
    while [ ! -S "$sock" ]; do
        if ! kill -0 "$DAEMON_PID" 2>/dev/null; then error="daemon exited at start"; break; fi
        if [ $waited -ge 100 ]; then error="no socket after 10 s"; break; fi
        sleep 0.1
        waited=$((waited + 1))
    done
    if [ -z "$error" ]; then
        local args=${client_args//\{runtime\}/$RUNTIME}
        # shellcheck disable=SC2086 # the row's client arguments are meant to be split
        if ! client_out=$("${client_taskset[@]}" "$CLIENT" --socket "$sock" --num-queues "$queues" $args 2>>"$log"); then
            error="client failed: $(tail -n 1 "$log")"
        fi
        if [[ $extra == *--control* ]] && [ -z "$error" ]; then
            local caught
            if caught=$(wait_worker "$ctl"); then
                echo "bench.sh: $name / $label: background dedup caught up ${caught}s after the client" >&2
            else
                error="background dedup did not catch up"
            fi
        fi
        if [ -r "/proc/$DAEMON_PID/stat" ]; then
            local stat
            stat=$(<"/proc/$DAEMON_PID/stat")
            stat=${stat##*) }
            read -r -a f <<<"$stat"
            # After "pid (comm) ": f[0] is field 3 (state), so utime (14) is f[11], stime (15) f[12].
            cpu=$(awk -v u="${f[11]}" -v s="${f[12]}" -v t="$CLK_TCK" 'BEGIN { printf "%.3f", (u + s) / t }')
            cpu_user=$(awk -v u="${f[11]}" -v t="$CLK_TCK" 'BEGIN { printf "%.3f", u / t }')
            rss=$(awk '/^VmHWM:/ { print $2 }' "/proc/$DAEMON_PID/status")
            rss=${rss:-null}
        fi
    fi
    if kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -TERM "$DAEMON_PID" 2>/dev/null || true
        local n=0
        while kill -0 "$DAEMON_PID" 2>/dev/null && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
        if kill -0 "$DAEMON_PID" 2>/dev/null; then
            kill -KILL "$DAEMON_PID" 2>/dev/null || true
            error=${error:-"daemon ignored SIGTERM for 30 s"}
        fi
    fi
    wait "$DAEMON_PID" 2>/dev/null || true
    DAEMON_PID=""
    # Space the image takes on disk after the daemon closed it (allocated blocks, not its length).
    local disk_bytes
    disk_bytes=$(stat -c '%b %B' "$img" | awk '{ print $1 * $2 }')
    [ "${ROW_IMAGES[$i]}" = cold ] || rm -f "$img"
    rm -f "$sock" "$ctl"
    [ -z "$client_out" ] && client_out=null
    {
        printf '{"row":%s,"variant":%s,"kind":%s,"round":%d,"queues":%d,' \
            "$(json_str "$name")" "$(json_str "$label")" "$(json_str "$kind")" "$round" "$queues"
        printf '"loadavg":%s,"cpu_s":%s,"cpu_user_s":%s,"rss_kib":%s,"disk_bytes":%s,"client":%s' \
            "$load" "$cpu" "$cpu_user" "$rss" "${disk_bytes:-null}" "$client_out"
        [ -n "$error" ] && printf ',"error":%s' "$(json_str "$error")"
        printf '}\n'
    } >>"$RESULTS"
    if [ -n "$error" ]; then
        echo "bench.sh: $name / $label round $round: $error; last lines of $log:" >&2
        tail -n 5 "$log" | sed 's/^/    /' >&2
        return 0
    fi
    local iops
    iops=$(grep -o '"iops":[0-9.]*' <<<"$client_out" | cut -d: -f2)
    printf 'bench.sh: %-36s %-10s round %d: %8.0f IOPS, daemon CPU %s s (user %s)\n' "$name" "$label" "$round" "${iops:-0}" "$cpu" "$cpu_user" >&2
}

define_rows
echo "bench.sh: ${#ROW_NAMES[@]} rows, $ROUNDS round(s), ${RUNTIME}s per run, work dir $WORK" >&2
for i in "${!ROW_NAMES[@]}"; do
    IFS=$'\x1f' read -r -a variants <<<"${ROW_VARIANTS[$i]}"
    for ((round = 1; round <= ROUNDS; round++)); do
        # ABBA order (ours, qsd | qsd, ours | ...): a drift of the machine, or a run that leaves
        # work behind for the next one (page cache writeback, freed extents), favours no side.
        order=("${variants[@]}")
        if [ $((round % 2)) = 0 ]; then
            order=()
            for ((k = ${#variants[@]} - 1; k >= 0; k--)); do order+=("${variants[$k]}"); done
        fi
        for v in "${order[@]}"; do
            run_one "$i" "$v" "${ROW_QUEUES[$i]}" "$round"
        done
    done
done

mkdir -p "$TARGET/bench"
"$CLIENT" --report "$RESULTS" | tee "$WORK/table.md"
# The lazy-refcount rows: what the file system alone allows (examples/sync_floor.rs).
if printf '%s\n' "${ROW_NAMES[@]}" | grep -q 'lazy'; then
    FLOOR=$TARGET/release/examples/sync_floor
    if [ -x "$FLOOR" ]; then
        echo | tee -a "$WORK/table.md"
        "$FLOOR" --dir "$WORK" --rounds "$((ROUNDS < 3 ? 5 : ROUNDS + 2))" | tee -a "$WORK/table.md"
    fi
fi
cp "$RESULTS" "$WORK/table.md" "$TARGET/bench/"
echo "bench.sh: results in $TARGET/bench/results.jsonl and $TARGET/bench/table.md" >&2
if grep -q '"error"' "$RESULTS"; then
    echo "bench.sh: some runs failed (see above)" >&2
    exit 1
fi
