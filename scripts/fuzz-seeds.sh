#!/usr/bin/env bash
# Seed corpus for the fuzz targets (fuzz/): qcow2 images of many shapes made by qemu-img and
# qemu-io (cluster sizes 512 B to 2 MiB, refcount widths 1 to 64 bits, v2, snapshots, backing
# files, compressed clusters, lazy refcounts clean and dirty, dedup with its index), wrapped
# in each target's input format, plus hand-made inputs for the virtio, QMP and dedup targets.
#
# Usage: scripts/fuzz-seeds.sh OUTDIR     (writes OUTDIR/{image,check,virtio,qmp,dedup}/)
# Environment: VUQ_BIN, the vhost-user-qcow2 binary for the dedup images (skipped without it).
set -euo pipefail
out="${1:?usage: fuzz-seeds.sh OUTDIR}"
command -v qemu-img >/dev/null || { echo "fuzz-seeds: qemu-img is needed" >&2; exit 1; }
command -v qemu-io >/dev/null || { echo "fuzz-seeds: qemu-io is needed" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
img="$work/img"
mkdir -p "$img"

# Backing files: names the fuzz harness also provides (fuzz/src/harness/mod.rs, `backing`).
qemu-img create -q -f raw "$img/base.raw" 1M
qemu-io -f raw -c 'write -P 0x11 0 64k' -c 'write -P 0x22 512k 64k' "$img/base.raw" >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=4k "$img/base.qcow2" 1M
qemu-io -f qcow2 -c 'write -P 0x33 0 64k' "$img/base.qcow2" >/dev/null

# io IMAGE CMD...: run qemu-io commands on a qcow2 image.
io() {
    local f="$1"
    shift
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    qemu-io -f qcow2 "${args[@]}" "$f" >/dev/null
}
# Some data, some zeros, some discards: every kind of L2 entry.
fill() {
    io "$1" 'write -P 0xa5 0 8k' 'write -P 0x5a 40k 3k' 'write -z 64k 64k' \
        'write -P 0x01 128k 64k' 'discard 160k 16k' 'write -P 0xa5 300k 8k'
}

n=0
mk() { # mk NAME OPTIONS [SIZE]: create, fill
    local f="$img/$1.qcow2"
    qemu-img create -q -f qcow2 -o "$2" "$f" "${3:-1M}"
    fill "$f"
    n=$((n + 1))
}
for cs in 512 1k 4k 16k 64k; do
    mk "cs$cs" "cluster_size=$cs"
done
mk cs2m "cluster_size=2M" 4M
for rb in 1 2 4 8 32 64; do
    mk "rc$rb" "cluster_size=4k,refcount_bits=$rb"
done
mk v2 "compat=0.10,cluster_size=4k"
mk v2-64k "compat=0.10"
mk lazy "cluster_size=4k,lazy_refcounts=on"
mk prealloc "cluster_size=4k,preallocation=metadata"
mk big "cluster_size=4k" 64G
mk extl2 "cluster_size=64k,extended_l2=on"
mk zstd "cluster_size=4k,compression_type=zstd"
# Empty images.
qemu-img create -q -f qcow2 -o cluster_size=4k "$img/empty4k.qcow2" 1M
qemu-img create -q -f qcow2 "$img/empty64k.qcow2" 1M
# Dirty lazy image: qemu-io killed after a write leaves DIRTY set and refcounts behind.
qemu-img create -q -f qcow2 -o cluster_size=4k,lazy_refcounts=on "$img/dirty.qcow2" 1M
(qemu-io -f qcow2 -c 'write -P 0x77 0 64k' -c 'sigraise 9' "$img/dirty.qcow2" >/dev/null 2>&1 || true) 2>/dev/null
# Snapshots: an internal snapshot, then writes after it (shared clusters, COPIED clear).
cp "$img/cs4k.qcow2" "$img/snap.qcow2"
qemu-img snapshot -c s1 "$img/snap.qcow2"
io "$img/snap.qcow2" 'write -P 0xee 0 4k' 'discard 128k 8k'
qemu-img snapshot -c s2 "$img/snap.qcow2"
cp "$img/v2.qcow2" "$img/snap-v2.qcow2"
qemu-img snapshot -c s1 "$img/snap-v2.qcow2"
io "$img/snap-v2.qcow2" 'write -P 0xef 4k 4k'
# Backing files (relative names, as the harness allows).
(cd "$img" && qemu-img create -q -f qcow2 -o cluster_size=4k -b base.qcow2 -F qcow2 back-q.qcow2 1M)
(cd "$img" && qemu-img create -q -f qcow2 -o cluster_size=4k -b base.raw -F raw back-r.qcow2 1M)
io "$img/back-q.qcow2" 'write -P 0x44 2k 1k' 'write -P 0x45 600k 4k'
io "$img/back-r.qcow2" 'write -P 0x46 4k 4k' 'write -z 512k 4k'
# Compressed clusters (deflate and zstd).
qemu-img convert -c -O qcow2 -o cluster_size=4k "$img/cs4k.qcow2" "$img/comp.qcow2"
qemu-img convert -c -O qcow2 -o cluster_size=4k,compression_type=zstd "$img/cs4k.qcow2" "$img/comp-zstd.qcow2"
qemu-img convert -c -O qcow2 "$img/cs64k.qcow2" "$img/comp64k.qcow2"
# Dedup: duplicated data, then our offline dedup writes the index and the header extension.
if [ -n "${VUQ_BIN:-}" ] && [ -x "$VUQ_BIN" ]; then
    for cs in 4k 64k; do
        f="$img/dedup$cs.qcow2"
        qemu-img create -q -f qcow2 -o "cluster_size=$cs" "$f" 1M
        io "$f" 'write -P 0x61 0 128k' 'write -P 0x61 128k 128k' 'write -P 0x62 256k 64k'
        "$VUQ_BIN" dedup "$f" >/dev/null 2>&1
    done
    f="$img/dedup-created.qcow2"
    "$VUQ_BIN" create "$f" --size 1M --cluster-size 4k --dedup >/dev/null
else
    echo "fuzz-seeds: VUQ_BIN not set: no dedup images" >&2
fi
rm -f "$img/base.raw" "$img/base.qcow2.tmp"

python3 - "$img" "$out" <<'PY'
import os, struct, sys, hashlib, json
img, out = sys.argv[1], sys.argv[2]
for t in ("image", "check", "virtio", "qmp", "dedup"):
    os.makedirs(os.path.join(out, t), exist_ok=True)

def put(target, name, data):
    with open(os.path.join(out, target, name), "wb") as f:
        f.write(data)

def container(raw):
    # 3-byte length in sectors, then the image without its trailing zeros.
    sectors = (len(raw) + 511) // 512
    return struct.pack("<I", sectors)[:3] + raw.rstrip(b"\0")

def op(kind, fill, sectors, off):
    return struct.pack("<BBHI", kind, fill, sectors, off)

OPS = [
    op(0, 0, 16, 0), op(1, 0xaa, 8, 0), op(8, 0xbb, 24, 100), op(2, 0, 16, 256),
    op(4, 0, 8, 80), op(3, 0, 4, 3), op(6, 0, 0, 0), op(1, 0xaa, 8, 16),
    op(5, 0, 0, 0), op(7, 0, 40, 0), op(0, 0, 2048, 1), op(6, 0, 0, 0),
]
assert len(OPS) == 12
ops = b"".join(OPS)
# Flags: read-write default; read-only; lazy on + inline dedup; dedup background, overlap none.
FLAGS = [0x00, 0x01, 0x04 | 0x10, 0x18 | 0x60]
n = 0
for name in sorted(os.listdir(img)):
    raw = open(os.path.join(img, name), "rb").read()
    c = container(raw)
    if len(c) > 1 << 20:
        # Over the targets' -max_len (2 MiB clusters: the fuzzer reaches them by mutation).
        print(f"fuzz-seeds: {name} skipped ({len(c)} bytes)")
        continue
    for f in FLAGS:
        put("image", f"{name}-{f:02x}", bytes([f]) + ops + c)
    for f in (0, 1, 2 | 4):
        put("check", f"{name}-{f:02x}", bytes([f]) + c)
    n += 1
print(f"fuzz-seeds: {n} images")

# virtio: one chain per seed, descriptors 0.. chained with NEXT.
HDR, DATA, STATUS = 0x1000, 0x1100, 0x1ff0
def chain(descs, heads=(0,), flags=0, mem=b""):
    t = b""
    for i in range(16):
        if i < len(descs):
            a, l, f = descs[i]
            nxt = i + 1 if i + 1 < len(descs) else 0
            if i + 1 < len(descs):
                f |= 1
            t += struct.pack("<IHHHH", a, l, f, nxt, 0)
        else:
            t += struct.pack("<IHHHH", 0, 0, 0, 0, 0)
    h = bytes([len(heads)]) + b"".join(struct.pack("<H", x) for x in (list(heads) + [0] * 4)[:4])
    return bytes([flags]) + t + h + mem
def header(t, sector):
    return struct.pack("<IIQ", t, 0, sector)
def mem_with(hdr, data=b""):
    m = bytearray(0x1000)
    m[0:16] = hdr
    m[0x100:0x100 + len(data)] = data
    return bytes(m)
W = 2
put("virtio", "read", chain([(HDR, 16, 0), (DATA, 1024, W), (STATUS, 1, W)], mem=mem_with(header(0, 8))))
put("virtio", "write", chain([(HDR, 16, 0), (DATA, 512, 0), (DATA + 512, 512, 0), (STATUS, 1, W)],
    mem=mem_with(header(1, 3), b"\x5a" * 1024)))
put("virtio", "flush", chain([(HDR, 16, 0), (STATUS, 1, W)], mem=mem_with(header(4, 0))))
put("virtio", "get-id", chain([(HDR, 16, 0), (DATA, 20, W), (STATUS, 1, W)], mem=mem_with(header(8, 0))))
seg = struct.pack("<QII", 8, 16, 0) + struct.pack("<QII", 64, 8, 1)
put("virtio", "discard", chain([(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, W)], mem=mem_with(header(11, 0), seg)))
put("virtio", "write-zeroes", chain([(HDR, 16, 0), (DATA, 32, 0), (STATUS, 1, W)], mem=mem_with(header(13, 0), seg)))
put("virtio", "status-in-data", chain([(HDR, 16, 0), (DATA, 513, W)], mem=mem_with(header(0, 0))))
put("virtio", "two-chains", chain([(HDR, 16, 0), (STATUS, 1, W)], heads=(0, 0), mem=mem_with(header(4, 0))))
put("virtio", "ro-write", chain([(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)], flags=1,
    mem=mem_with(header(1, 0))))
# Indirect: descriptor 0 points at a table of three in guest memory at 0x1800.
ind = struct.pack("<QIHH", HDR, 16, 1, 1) + struct.pack("<QIHH", DATA, 512, W | 1, 2) + struct.pack("<QIHH", STATUS, 1, W, 0)
m = bytearray(mem_with(header(0, 0)))
m[0x800:0x800 + len(ind)] = ind
put("virtio", "indirect", chain([(0x1800, len(ind), 4)], mem=bytes(m)))

# qmp: the first byte seeds the chunking.
cmds = ["query-commands", "query-version", "query-status", "query-stats", "query-image",
        "query-dedup", "dedup-pause", "dedup-resume", "quit"]
neg = '{"execute": "qmp_capabilities"}\n'
put("qmp", "all", b"\x07" + (neg + "".join('{"execute": "%s", "id": %d}\n' % (c, i) for i, c in enumerate(cmds))).encode())
for m in ("inline", "background", "off", "bogus"):
    put("qmp", f"mode-{m}", b"\x03" + (neg + '{"execute": "dedup-set-mode", "arguments": {"mode": "%s"}, "id": "x"}\r\n{"execute":"query-dedup"}' % m).encode())
put("qmp", "before-neg", b"\x01" + b'{"execute": "query-status"} {"execute": "qmp_capabilities", "arguments": {}} [1, 2] "s" 12 nul {"id": {"a": [1]}}')
put("qmp", "errors", b"\x05" + (neg + '{"execute": 1}{"execute": "query-version", "arguments": {"x": 1}}{"exec-oob": "quit"}{"execute": "dedup-set-mode", "arguments": {"mode": 3}}{"execute":"query-stats","arguments":[]}').encode())
put("qmp", "escapes", b"\x02" + (neg + '{"execute": "query-\\u0073tatus", "id": "a\\"}b\\\\"}\n').encode())

# dedup: one seed per part (see fuzz/src/harness/dedup.rs).
ext = bytearray(128)
struct.pack_into(">IIIIQQQQ", ext, 0, 1, 1, 12, 32767, 0x10000, 2, 5, 0)
put("dedup", "ext", b"\x00" + bytes(ext))
ic = bytearray(4096)
struct.pack_into(">IIQQI", ic, 0, 0x44444958, 0, 5, 0, 2)
ic[32 + 32 * 3] = 0xab
ic[32 + 32 * 9 + 31] = 1
put("dedup", "index-cluster", b"\x01" + bytes([3, 5, 0, 0, 3]) + bytes(ic))
opsb = b"".join(struct.pack("<BHH", k, h, c) for k, h, c in
    [(0, 1, 5), (0, 1, 6), (1, 0x1001, 5), (10, 1, 5), (6, 1, 5), (10, 1, 6), (14, 0, 0),
     (15, 0, 6), (0x80, 2, 1), (0, 0, 0), (10, 0x1001, 5)])
put("dedup", "index-ops", b"\x02\x00" + opsb)
put("dedup", "index-ops-cap", b"\x02\x01\x40\x00" + opsb * 4)
recs = b"".join(struct.pack("<HI", c, h) for c, h in [(1, 7), (2, 7), (200, 9), (0, 3), (1, 8), (5000, 1)])
put("dedup", "records", b"\x03\x00" + struct.pack("<Q", 3) + b"\x02" + recs)
print("fuzz-seeds: done")
PY
