#!/usr/bin/env python3
"""Minimal reproducer: processes that each ALLOC_TAP then FREE_TAP their tap, in a loop.

    alloc-free-race.py PROCS SECONDS

Prints `cycles N` and one line `ERRNO COUNT` per failed call; exits 1 if any call failed.
A FREE_TAP must leave no trace that makes a concurrent ALLOC_TAP of the same minor fail.
"""
import ctypes, errno, os, struct, sys, time

libc = ctypes.CDLL(None, use_errno=True)
procs, seconds = int(sys.argv[1]), float(sys.argv[2])
end = time.time() + seconds
pids = []
for p in range(procs):
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rd)
        fd = os.open("/dev/xen/blktap-2/control", os.O_RDWR)
        buf = ctypes.create_string_buffer(12)
        n, fails = 0, {}
        while time.time() < end:
            if libc.ioctl(fd, ctypes.c_ulong(200), buf) < 0:
                e = errno.errorcode[ctypes.get_errno()]
                fails[e] = fails.get(e, 0) + 1
                continue
            minor = struct.unpack("III", buf.raw)[2]
            if libc.ioctl(fd, ctypes.c_ulong(201), ctypes.c_ulong(minor)) < 0:
                e = "free:" + errno.errorcode[ctypes.get_errno()]
                fails[e] = fails.get(e, 0) + 1
            n += 1
        os.write(wr, repr((n, fails)).encode())
        os._exit(0)
    os.close(wr)
    pids.append((pid, rd))
total, fails = 0, {}
for pid, rd in pids:
    data = b""
    while chunk := os.read(rd, 4096):
        data += chunk
    os.waitpid(pid, 0)
    n, f = eval(data.decode())
    total += n
    for k, v in f.items():
        fails[k] = fails.get(k, 0) + v
print(f"cycles {total}")
for k, v in sorted(fails.items()):
    print(f"{k} {v}")
sys.exit(1 if fails else 0)
