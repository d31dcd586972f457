#!/usr/bin/env python3
"""A minimal blktap2 ring peer in Python, independent of the Rust userspace.

    pytap.py MINOR SECTORS [--ro] [--compat] [--for SECONDS] [--flags N] [--file PATH]
                           [--delay SECONDS] [--recover]

Maps the ring of an allocated tap, creates its disk, serves it from memory (or from --file),
and on SIGTERM (or after --for seconds) removes the disk and exits. Used by the VM tests to
check the kernel against a second implementation.

By default it behaves like an old tapdisk: READ and WRITE only. With --flags it negotiates the
extensions (FLUSH 0x4, DISCARD 0x8, FUA 0x20, RECOVERY 0x40) and serves what they bring. It
answers the ring's PAUSE and RESUME messages with the ioctls of the same names. --delay answers
every request that many seconds late (for request deadlines). --recover attaches to the disk a
dead peer left (RECOVERY): it maps the ring and serves, without creating the disk. Every op it
sees is counted and printed at exit, and on SIGUSR1 into /tmp/pytap-MINOR.ops.
"""
import ctypes, mmap, os, select, signal, struct, sys, time

PAGE = 4096
RING_SIZE, SEGS = 32, 11
READ, WRITE, FLUSH, DISCARD, WRITE_FUA = 0, 1, 2, 3, 4
MSG_PAUSE, MSG_RESUME = 1, 2
IOCTL_RESPOND, IOCTL_PAUSE, IOCTL_RESUME = 1, 204, 206
libc = ctypes.CDLL(None, use_errno=True)


def ioctl(fd, cmd, arg=0):
    r = libc.ioctl(fd, ctypes.c_ulong(cmd), arg)
    if r < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return r


def opt(name, conv, default):
    if name in sys.argv:
        return conv(sys.argv[sys.argv.index(name) + 1])
    return default


class Store:
    """The disk's bytes: memory, or a file that outlives the peer (for recovery)."""

    def __init__(self, sectors, path):
        self.fd = None
        if path:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT)
            os.ftruncate(self.fd, sectors * 512)
        else:
            self.mem = bytearray(sectors * 512)

    def read(self, pos, ln):
        if self.fd is not None:
            return os.pread(self.fd, ln, pos)
        return self.mem[pos:pos + ln]

    def write(self, pos, data):
        if self.fd is not None:
            os.pwrite(self.fd, data, pos)
        else:
            self.mem[pos:pos + len(data)] = data


def main():
    minor, sectors = int(sys.argv[1]), int(sys.argv[2])
    ro = "--ro" in sys.argv
    compat = "--compat" in sys.argv
    recover = "--recover" in sys.argv
    flags = opt("--flags", lambda v: int(v, 0), 0)
    delay = opt("--delay", float, 0.0)
    until = opt("--for", lambda v: time.time() + float(v), None)
    store = Store(sectors, opt("--file", str, None))
    fd = os.open(f"/dev/xen/blktap-2/blktap{minor}", os.O_RDWR)
    m = mmap.mmap(fd, PAGE * (1 + RING_SIZE * SEGS), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    if recover:
        pass
    elif compat:
        buf = ctypes.create_string_buffer(struct.pack("256sQQ", b"pytap", sectors, 512))
        ioctl(fd, 202, buf)
    else:
        buf = ctypes.create_string_buffer(
            struct.pack("QIIQ4Q", sectors, 512, 512, (1 if ro else 0) | flags, 0, 0, 0, 0))
        ioctl(fd, 208, buf)
    stop = []
    ops = {READ: 0, WRITE: 0, FLUSH: 0, DISCARD: 0, WRITE_FUA: 0, "other": 0, "pause": 0, "resume": 0}

    def dump(*_):
        with open(f"/tmp/pytap-{minor}.ops", "w") as f:
            f.write(" ".join(f"{k}={v}" for k, v in names(ops).items()) + "\n")

    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    signal.signal(signal.SIGUSR1, dump)
    req_cons = rsp_prod = 0
    later = []  # (due time, id, op, status) of answers held back by --delay
    p = select.poll()
    p.register(fd, select.POLLIN)
    print(f"pytap: serving tap {minor}", flush=True)
    while not stop and (until is None or time.time() < until):
        p.poll(50 if later else 200)
        msg = m[16]
        if msg in (MSG_PAUSE, MSG_RESUME):
            ioctl(fd, IOCTL_PAUSE if msg == MSG_PAUSE else IOCTL_RESUME)
            ops["pause" if msg == MSG_PAUSE else "resume"] += 1
        req_prod = struct.unpack_from("I", m, 0)[0]
        while req_cons != req_prod:
            off = 64 + (req_cons % RING_SIZE) * 112
            op, nseg, rid, sector = struct.unpack_from("BBxxxxxxQQ", m, off)
            ops[op if op in ops else "other"] += 1
            status = 0
            pos = sector * 512
            if op == DISCARD and flags & 0x8:
                (count,) = struct.unpack_from("Q", m, off + 24)
                store.write(pos, bytes(count * 512))
            elif op == FLUSH and flags & 0x4:
                if store.fd is not None:
                    os.fdatasync(store.fd)
            elif op in (READ, WRITE) or (op == WRITE_FUA and flags & 0x20):
                for j in range(nseg):
                    first, last = struct.unpack_from("BB", m, off + 24 + 8 * j + 4)
                    page = PAGE * (1 + rid * SEGS + j)
                    a, ln = page + first * 512, (last - first + 1) * 512
                    if op == READ:
                        m[a:a + ln] = store.read(pos, ln)
                    elif not ro:
                        store.write(pos, m[a:a + ln])
                    else:
                        status = -1
                    pos += ln
            else:
                status = -2
            later.append((time.time() + delay, rid, op, status))
            req_cons = (req_cons + 1) & 0xFFFFFFFF
        now, n = time.time(), 0
        while later and later[0][0] <= now:
            _, rid, op, status = later.pop(0)
            roff = 64 + (rsp_prod % RING_SIZE) * 112
            struct.pack_into("QBxh", m, roff, rid, op, status)
            rsp_prod = (rsp_prod + 1) & 0xFFFFFFFF
            n += 1
        if n:
            struct.pack_into("I", m, 8, rsp_prod)
            ioctl(fd, IOCTL_RESPOND)
    for _ in range(50):
        try:
            ioctl(fd, 207)
            break
        except OSError as e:
            print(f"pytap: remove: {e}", flush=True)
            time.sleep(0.1)
    print("pytap: ops " + " ".join(f"{k}={v}" for k, v in names(ops).items()), flush=True)
    m.close()
    os.close(fd)


def names(ops):
    return {{READ: "read", WRITE: "write", FLUSH: "flush", DISCARD: "discard",
             WRITE_FUA: "fua"}.get(k, k): v for k, v in ops.items()}


if __name__ == "__main__":
    main()
