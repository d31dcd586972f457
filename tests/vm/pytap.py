#!/usr/bin/env python3
"""A minimal blktap2 ring peer in Python, independent of the Rust userspace.

    pytap.py MINOR SECTORS [--ro] [--compat] [--for SECONDS]

Maps the ring of an allocated tap, creates its disk, serves reads and writes from memory (like
an old tapdisk: READ and WRITE only), and on SIGTERM (or after --for seconds) removes the disk
and exits. Used by the VM tests to check the kernel against a second implementation.
"""
import ctypes, fcntl, mmap, os, select, signal, struct, sys, time

PAGE = 4096
RING_SIZE, SEGS = 32, 11
libc = ctypes.CDLL(None, use_errno=True)


def ioctl(fd, cmd, arg=0):
    r = libc.ioctl(fd, ctypes.c_ulong(cmd), arg)
    if r < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return r


def main():
    minor, sectors = int(sys.argv[1]), int(sys.argv[2])
    ro = "--ro" in sys.argv
    compat = "--compat" in sys.argv
    until = None
    if "--for" in sys.argv:
        until = time.time() + float(sys.argv[sys.argv.index("--for") + 1])
    fd = os.open(f"/dev/xen/blktap-2/blktap{minor}", os.O_RDWR)
    m = mmap.mmap(fd, PAGE * (1 + RING_SIZE * SEGS), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    if compat:
        buf = ctypes.create_string_buffer(struct.pack("256sQQ", b"pytap", sectors, 512))
        ioctl(fd, 202, buf)
    else:
        buf = ctypes.create_string_buffer(struct.pack("QIIQ4Q", sectors, 512, 512, 1 if ro else 0, 0, 0, 0, 0))
        ioctl(fd, 208, buf)
    disk = bytearray(sectors * 512)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    req_cons = rsp_prod = 0
    ops = {0: 0, 1: 0, "other": 0}
    p = select.poll()
    p.register(fd, select.POLLIN)
    print(f"pytap: serving tap {minor}", flush=True)
    while not stop and (until is None or time.time() < until):
        p.poll(200)
        req_prod = struct.unpack_from("I", m, 0)[0]
        n = 0
        while req_cons != req_prod:
            off = 64 + (req_cons % RING_SIZE) * 112
            op, nseg, rid, sector = struct.unpack_from("BBxxxxxxQQ", m, off)
            ops[op if op in (0, 1) else "other"] += 1
            status = 0
            pos = sector * 512
            for j in range(nseg):
                first, last = struct.unpack_from("BB", m, off + 24 + 8 * j + 4)
                page = PAGE * (1 + rid * SEGS + j)
                a, ln = page + first * 512, (last - first + 1) * 512
                if op == 0:
                    m[a:a + ln] = disk[pos:pos + ln]
                elif op == 1 and not ro:
                    disk[pos:pos + ln] = m[a:a + ln]
                else:
                    status = -1 if op == 1 else -2
                pos += ln
            roff = 64 + (rsp_prod % RING_SIZE) * 112
            struct.pack_into("QBxh", m, roff, rid, op, status)
            rsp_prod = (rsp_prod + 1) & 0xFFFFFFFF
            req_cons = (req_cons + 1) & 0xFFFFFFFF
            n += 1
        if n:
            struct.pack_into("I", m, 8, rsp_prod)
            ioctl(fd, 1)
    for _ in range(50):
        try:
            ioctl(fd, 207)
            break
        except OSError as e:
            print(f"pytap: remove: {e}", flush=True)
            time.sleep(0.1)
    print(f"pytap: ops read={ops[0]} write={ops[1]} other={ops['other']}", flush=True)
    m.close()
    os.close(fd)


if __name__ == "__main__":
    main()
