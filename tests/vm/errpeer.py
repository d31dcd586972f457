#!/usr/bin/env python3
"""A ring peer whose answers the test chooses: statuses per operation, held answers, REMOVE_DEVICE.

    errpeer.py MINOR SECTORS [--flags N] [--recover]

Maps the ring of an allocated tap, creates its disk (flags default 0x2c: FLUSH, DISCARD, FUA;
--recover attaches to a disk kept for recovery instead) and serves it from memory. What it
answers is steered by the control file /tmp/errpeer-MINOR.ctl, read again whenever it changes,
one `key value` per line:

    read S | write S | fua S | flush S | discard S   answer that operation with status S (an
                                                     int16; default 0, the data is then served)
    hold 1 | hold 0       keep answers back (not answered, not published) / answer them all
    remove N              with a new N: try REMOVE_DEVICE once, print `remove N: OK|ERRNO`

A request answered with a status other than 0 changes nothing in the store, and a read's data
pages are filled with 0xEE first: an application that gets such a read as a success reads
0xEE bytes. Each answer is printed (`answer op=.. sector=.. status=..`), as are the ring's PAUSE
and RESUME messages, which it obeys with the ioctls. On SIGTERM it removes the disk (retrying
while it is busy) and exits. Independent of the Rust userspace and of tests/vm/pytap.py.
"""
import ctypes, errno, mmap, os, select, signal, struct, sys

PAGE = 4096
RING_SIZE, SEGS = 32, 11
READ, WRITE, FLUSH, DISCARD, WRITE_FUA = 0, 1, 2, 3, 4
NAMES = {READ: "read", WRITE: "write", FLUSH: "flush", DISCARD: "discard", WRITE_FUA: "fua"}
MSG_PAUSE, MSG_RESUME = 1, 2
IOCTL_RESPOND, IOCTL_PAUSE, IOCTL_RESUME, IOCTL_REMOVE = 1, 204, 206, 207
libc = ctypes.CDLL(None, use_errno=True)


def ioctl(fd, cmd, arg=0):
    r = libc.ioctl(fd, ctypes.c_ulong(cmd), arg)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def say(line):
    print(f"errpeer: {line}", flush=True)


class Control:
    """The control file, parsed again at each change."""

    def __init__(self, path):
        self.path = path
        self.stamp = None
        self.values = {}

    def poll(self):
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp == self.stamp:
            return False
        self.stamp = stamp
        values = {}
        if stamp is not None:
            with open(self.path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 2:
                        values[parts[0]] = parts[1]
        self.values = values
        return True

    def status(self, op):
        return int(self.values.get(NAMES.get(op, "other"), "0"), 0)

    def get(self, key, default=None):
        return self.values.get(key, default)


def main():
    minor, sectors = int(sys.argv[1]), int(sys.argv[2])
    flags = int(sys.argv[sys.argv.index("--flags") + 1], 0) if "--flags" in sys.argv else 0x2C
    recover = "--recover" in sys.argv
    store = bytearray(sectors * 512)
    ctl = Control(f"/tmp/errpeer-{minor}.ctl")
    fd = os.open(f"/dev/xen/blktap-2/blktap{minor}", os.O_RDWR)
    m = mmap.mmap(fd, PAGE * (1 + RING_SIZE * SEGS), mmap.MAP_SHARED,
                  mmap.PROT_READ | mmap.PROT_WRITE)
    if not recover:
        info = struct.pack("QIIQ4Q", sectors, 512, 512, flags, 0, 0, 0, 0)
        ioctl(fd, 208, ctypes.create_string_buffer(info))
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    req_cons = rsp_prod = 0
    held = []  # (id, op, status) answered but not yet published
    removes_done = None
    p = select.poll()
    p.register(fd, select.POLLIN)
    say(f"serving tap {minor}, flags {flags:#x}")
    while not stop:
        p.poll(50)
        if ctl.poll():
            say("control: " + " ".join(f"{k}={v}" for k, v in sorted(ctl.values.items())))
        n_remove = ctl.get("remove")
        if n_remove is not None and n_remove != removes_done:
            removes_done = n_remove
            try:
                ioctl(fd, IOCTL_REMOVE)
                say(f"remove {n_remove}: OK")
            except OSError as e:
                say(f"remove {n_remove}: {errno.errorcode[e.errno]}")
        msg = m[16]
        if msg in (MSG_PAUSE, MSG_RESUME):
            ioctl(fd, IOCTL_PAUSE if msg == MSG_PAUSE else IOCTL_RESUME)
            say("paused" if msg == MSG_PAUSE else "resumed")
        req_prod = struct.unpack_from("I", m, 0)[0]
        while req_cons != req_prod:
            off = 64 + (req_cons % RING_SIZE) * 112
            op, nseg, rid, sector = struct.unpack_from("BBxxxxxxQQ", m, off)
            status = ctl.status(op)
            pos = sector * 512
            if op == DISCARD:
                (count,) = struct.unpack_from("Q", m, off + 24)
                if status == 0:
                    store[pos:pos + count * 512] = bytes(count * 512)
            elif op in (READ, WRITE, WRITE_FUA) and rid < RING_SIZE:
                for j in range(min(nseg, SEGS)):
                    first, last = struct.unpack_from("BB", m, off + 24 + 8 * j + 4)
                    page = PAGE * (1 + rid * SEGS + j)
                    a, ln = page + first * 512, (last - first + 1) * 512
                    if op == READ:
                        m[a:a + ln] = bytes(store[pos:pos + ln]) if status == 0 else b"\xee" * ln
                    elif status == 0:
                        store[pos:pos + ln] = m[a:a + ln]
                    pos += ln
            say(f"answer op={NAMES.get(op, op)} sector={sector} status={status}")
            held.append((rid, op, status))
            req_cons = (req_cons + 1) & 0xFFFFFFFF
        if held and ctl.get("hold", "0") == "0":
            for rid, op, status in held:
                roff = 64 + (rsp_prod % RING_SIZE) * 112
                struct.pack_into("QBxh", m, roff, rid, op, status)
                rsp_prod = (rsp_prod + 1) & 0xFFFFFFFF
            say(f"published {len(held)} answer(s)")
            held = []
            struct.pack_into("I", m, 8, rsp_prod)
            ioctl(fd, IOCTL_RESPOND)
    for _ in range(50):
        try:
            ioctl(fd, IOCTL_REMOVE)
            say("disk removed")
            break
        except OSError as e:
            say(f"remove at exit: {errno.errorcode[e.errno]}")
            select.select([], [], [], 0.1)
    m.close()
    os.close(fd)


if __name__ == "__main__":
    main()
