#!/usr/bin/env python3
"""The bench client's --interfere queue on a raw file, for the latency rows' fio-raw floor.

Usage: raw_interfere.py RAW OFFSET LENGTH SECONDS [buffered]

Writes 8 MiB of RAW from OFFSET (1 MiB O_DIRECT writes, one at a time; through the page
cache with "buffered"), punches the 8 MiB out (fallocate PUNCH_HOLE), goes on with the next
8 MiB (wrapping inside LENGTH) until SECONDS have passed, then prints the rate it wrote at to
stderr. One process, no gaps between steps: the most a direct user of the file could do to its
readers.
"""
import ctypes
import mmap
import os
import sys
import time

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
MIB, CHUNK = 1 << 20, 8 << 20


def main():
    raw, off, length, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    n = length // CHUNK
    if n == 0:
        sys.exit("raw_interfere.py: LENGTH must be at least 8 MiB")
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    direct = 0 if sys.argv[5:6] == ["buffered"] else os.O_DIRECT
    fd = os.open(raw, os.O_WRONLY | direct)
    buf = mmap.mmap(-1, MIB)  # page-aligned, as O_DIRECT needs
    buf.write(b"\x5a" * MIB)
    t0, k, written = time.monotonic(), 0, 0
    while time.monotonic() - t0 < secs:
        at = off + (k % n) * CHUNK
        for w in range(CHUNK // MIB):
            os.pwritev(fd, [buf], at + w * MIB)
            written += MIB
        if libc.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, at, CHUNK) != 0:
            sys.exit("raw_interfere.py: fallocate: errno %d" % ctypes.get_errno())
        k += 1
    print("raw_interfere.py: wrote %.0f MB/s" % (written / (time.monotonic() - t0) / 1e6),
          file=sys.stderr)


if __name__ == "__main__":
    main()
