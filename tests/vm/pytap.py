#!/usr/bin/env python3
"""A minimal blktap2 ring peer in Python, independent of the Rust userspace.

    pytap.py MINOR SECTORS [--ro] [--compat] [--for SECONDS] [--flags N] [--file PATH]
                           [--delay SECONDS] [--recover] [--hold N] [--silent]
                           [--epoll | --epoll-et | --epoll-mod | --epoll-nested]
                           [--register-late SECONDS] [--open-retry SECONDS] [--free-alloc]
                           [--ignore-sector S] [--guess-staged S] [--poll-only | --no-poll]
                           [--req-event armed|never|ahead] [--max-segments N [--no-large-flag]]

Maps the ring of an allocated tap, creates its disk, serves it from memory (or from --file),
and on SIGTERM (or after --for seconds) removes the disk and exits. Used by the VM tests to
check the kernel against a second implementation.

By default it behaves like an old tapdisk: READ and WRITE only. With --flags it negotiates the
extensions (FLUSH 0x4, DISCARD 0x8, FUA 0x20, RECOVERY 0x40, STAGED_WRITES 0x80, REQ_EVENT
0x100) and serves what they bring. With STAGED_WRITES, writes reach the ring when the peer polls it or calls RESPOND: in
the modes that do not poll (--hold, --ignore-sector, --register-late) it calls RESPOND when the
header's `staged` count is not 0; with --poll-only it never looks at `staged` (its polls must
bring the staged writes), with --no-poll it never polls (the header must tell it). It
answers the ring's PAUSE and RESUME messages with the ioctls of the same names. --delay answers
every request that many seconds late (for request deadlines). --recover attaches to the disk a
dead peer left (RECOVERY): it maps the ring and serves, without creating the disk. Every op it
sees is counted and printed at exit, and on SIGUSR1 into /tmp/pytap-MINOR.ops.

Modes for the concurrency tests:

--hold N      collects requests (up to N, or until 20 ms passed since the first one it holds),
              then answers all of them in ONE RESPOND, out of order: reversed, or shuffled
              (alternately). Prints `pytap: hold batches=B multi=M max=X reordered=R` at exit.
--silent      maps the ring and creates the disk but never looks at the ring (a live peer that
              does not answer) until SIGUSR2; from then on it serves every entry on the ring,
              so the requests that timed out meanwhile get (late) answers.
--epoll, --epoll-et, --epoll-mod, --epoll-nested
              reads the ring only when an epoll reports the ring fd readable (no timeout-driven
              reading; the epoll wait's timeout only checks for SIGTERM): level-triggered;
              edge-triggered; registered with an empty event mask first, then EPOLL_CTL_MOD to
              EPOLLIN; the ring fd in an inner epoll whose fd is in an outer epoll. A lost
              wake-up stalls the disk.
--register-late S
              (with an epoll mode) creates and registers the epoll only S seconds after the
              disk exists, without reading the ring meanwhile, so requests issued in between
              are published before registration; it prints how many were
              (`pytap: N requests published before registration`).
--open-retry S
              retries opening the ring for up to S seconds while it is busy (EBUSY: another
              peer still holds it), as fast as it can: for races against a dying peer.
--free-alloc  first frees the tap (FREE_TAP, retried while EBUSY) and allocates it again
              (ALLOC_TAP must give back MINOR), then serves it.
--guess-staged S
              (with --flags 0x80) a hostile peer, once: it holds back its answer to the read at
              sector S and stops polling; when a write is then staged, it answers the write's
              slot (the lowest it holds no request in) as a WRITE, in the room the held read
              leaves, before the write is on the ring, and prints `pytap: guessed slot N:
              RESULT` (the kernel must refuse it: EINVAL). That RESPOND puts the write on the
              ring; the peer then serves it and the read, and polls again. (Its answers then
              run one ring entry ahead of its requests: use the disk one request at a time.)
--ignore-sector S
              serves everything but requests starting at sector S: those it takes off the
              ring and does not answer until SIGUSR2 (so their slots go late while the peer
              is alive and answers the rest).

--req-event armed|never|ahead
              (with --flags 0x100 and an epoll mode) how the peer treats the header's req_event:
              armed: before each epoll wait it sets req_event = req_cons + 1 and looks at the
              ring (req_prod, staged, msg) once more, serving instead of sleeping if anything
              came (counted: `pytap: req_event rechecks=N`), as a tapdisk must; never: it
              never writes req_event (0: the kernel must signal every request); ahead: a
              hostile peer that keeps req_event far ahead of the ring, so the kernel never
              signals it (its requests reach their deadline).

--max-segments N
              (11..128, default 11) maps the ring with N data pages per slot (1 + 32 * N pages:
              page j of slot i is page 1 + N * i + j) and, above 11, adds LARGE_REQUESTS
              (0x200) to the flags (--no-large-flag leaves it out: for the kernel's refusal).
              A request of more than 11 pages must then have nr_segments = its pages (12..N)
              and nr_sectors in ((pages - 1) * 8, pages * 8], seg[0..11] whole pages; its data
              fills the slot's pages from byte 0 on. A failed mmap prints `pytap: mmap: ERRNO`
              and exits 3 (no fallback: the caller chooses N).

Every request is checked against the ring's rules (id a slot, nr_segments 1..11, or 12..N with
LARGE_REQUESTS, nr_sectors 0 for up to 11 pages and fitting the pages above, segments inside
their page, sectors inside the disk, none for FLUSH and DISCARD): a violation prints `pytap:
VIOLATION: ...`, is answered -1 and makes the peer exit 4 (after removing the disk).

A failed CREATE_DEVICE prints `pytap: create: ERRNO` and exits 3.
"""
import ctypes, errno, mmap, os, random, select, signal, struct, sys, time

PAGE = 4096
RING_SIZE, SEGS, SEGS_LARGE = 32, 11, 128
LARGE_REQUESTS = 0x200
READ, WRITE, FLUSH, DISCARD, WRITE_FUA = 0, 1, 2, 3, 4
MSG_PAUSE, MSG_RESUME = 1, 2
IOCTL_RESPOND, IOCTL_PAUSE, IOCTL_RESUME = 1, 204, 206
ALLOC_TAP, FREE_TAP = 200, 201
HOLD_WINDOW = 0.02
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


def say(text):
    print(f"pytap: {text}", flush=True)


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


def free_and_allocate(minor, seconds):
    """FREE_TAP (retried while the ring is busy), then ALLOC_TAP, which must give MINOR back."""
    ctl = os.open("/dev/xen/blktap-2/control", os.O_RDWR)
    end, tries = time.time() + seconds, 0
    while True:
        try:
            ioctl(ctl, FREE_TAP, ctypes.c_ulong(minor))
            break
        except OSError as e:
            if e.errno != errno.EBUSY or time.time() >= end:
                say(f"free: {errno.errorcode.get(e.errno, e.errno)} after {tries} tries")
                sys.exit(2)
            tries += 1
            os.sched_yield()
    buf = ctypes.create_string_buffer(12)
    ioctl(ctl, ALLOC_TAP, buf)
    got = struct.unpack("III", buf.raw)[2]
    os.close(ctl)
    say(f"freed tap {minor} after {tries} busy tries, allocated tap {got}")
    if got != minor:
        sys.exit(2)


def open_ring(minor, seconds):
    """Opens the ring, retrying for up to SECONDS while it is busy."""
    end, tries = time.time() + seconds, 0
    while True:
        try:
            fd = os.open(f"/dev/xen/blktap-2/blktap{minor}", os.O_RDWR)
            if tries:
                say(f"ring opened after {tries} busy tries")
            return fd
        except OSError as e:
            if e.errno != errno.EBUSY or time.time() >= end:
                raise
            tries += 1
            os.sched_yield()


def main():
    minor, sectors = int(sys.argv[1]), int(sys.argv[2])
    ro = "--ro" in sys.argv
    compat = "--compat" in sys.argv
    recover = "--recover" in sys.argv
    flags = opt("--flags", lambda v: int(v, 0), 0)
    delay = opt("--delay", float, 0.0)
    until = opt("--for", lambda v: time.time() + float(v), None)
    hold = opt("--hold", int, 0)
    silent = [1] if "--silent" in sys.argv else []
    epoll_mode = next((a[2:] for a in sys.argv
                       if a in ("--epoll", "--epoll-et", "--epoll-mod", "--epoll-nested")), None)
    register_late = opt("--register-late", float, 0.0)
    req_event = opt("--req-event", str, None)
    pages = opt("--max-segments", int, SEGS)  # data pages per slot
    if not SEGS <= pages <= SEGS_LARGE:
        say(f"--max-segments {pages}: not in {SEGS}..{SEGS_LARGE}")
        sys.exit(2)
    if pages > SEGS and "--no-large-flag" not in sys.argv:
        flags |= LARGE_REQUESTS
    violations = []
    store = Store(sectors, opt("--file", str, None))
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    ignore_sector = opt("--ignore-sector", int, None)
    guess_sector = opt("--guess-staged", int, None)
    guessing = {"held": [], "done": False}
    ignored = []  # answers held back by --ignore-sector until SIGUSR2
    released = []

    def usr2(*_):
        silent.clear()
        released.append(1)

    signal.signal(signal.SIGUSR2, usr2)
    if "--free-alloc" in sys.argv:
        say(f"freeing tap {minor}")
        free_and_allocate(minor, opt("--open-retry", float, 10.0))
    say(f"opening the ring of tap {minor}")
    fd = open_ring(minor, opt("--open-retry", float, 0.0))
    try:
        m = mmap.mmap(fd, PAGE * (1 + RING_SIZE * pages), mmap.MAP_SHARED,
                      mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        say(f"mmap: {errno.errorcode.get(e.errno, e.errno)}")
        sys.exit(3)
    if pages != SEGS:
        say(f"mapped {pages} pages per slot")
    try:
        if recover:
            pass
        elif compat:
            buf = ctypes.create_string_buffer(struct.pack("256sQQ", b"pytap", sectors, 512))
            ioctl(fd, 202, buf)
        else:
            buf = ctypes.create_string_buffer(
                struct.pack("QIIQ4Q", sectors, 512, 512, (1 if ro else 0) | flags, 0, 0, 0, 0))
            ioctl(fd, 208, buf)
    except OSError as e:
        say(f"create: {errno.errorcode.get(e.errno, e.errno)}")
        sys.exit(3)
    ops = {READ: 0, WRITE: 0, FLUSH: 0, DISCARD: 0, WRITE_FUA: 0, "other": 0, "pause": 0, "resume": 0}
    ops_large = [0]  # large requests (more than 11 pages) seen valid
    stats = {"batches": 0, "multi": 0, "max": 0, "reordered": 0, "wakeups": 0, "spurious": 0,
             "rechecks": 0}

    def dump(*_):
        with open(f"/tmp/pytap-{minor}.ops", "w") as f:
            f.write(" ".join(f"{k}={v}" for k, v in names(ops).items()) + "\n")

    signal.signal(signal.SIGUSR1, dump)
    state = {"req_cons": 0, "rsp_prod": 0}
    rng = random.Random(minor)
    held, first = [], 0.0  # answers held by --hold, and when the first of them came
    later = []  # (due time, id, op, status) of answers held back by --delay

    poll_only = "--poll-only" in sys.argv
    no_poll = "--no-poll" in sys.argv

    def staged():
        if poll_only or not flags & 0x80:
            return 0
        return struct.unpack_from("I", m, 20)[0]

    def outstanding():
        """Slot ids of the requests taken and not answered yet."""
        return {a[0] for a in held + [x[1:] for x in later] + ignored + guessing["held"]}

    def drain():
        """Has the kernel put its staged writes on the ring (RESPOND with no new answer)."""
        if staged():
            ioctl(fd, IOCTL_RESPOND)

    def guess(answers):
        """--guess-staged: once a write is staged while the read at sector S is held, answers
        the write's slot before the write is on the ring (see the usage)."""
        held_ids = {a[0] for a in guessing["held"]}
        room = (state["req_cons"] - state["rsp_prod"]) & 0xFFFFFFFF
        busy = held_ids | {a[0] for a in answers}
        gid = next(i for i in range(RING_SIZE) if i not in busy)
        if room < 1 + len(answers):
            return
        result = "OK"
        try:
            answer([(gid, WRITE, 0)])
        except OSError as e:
            result = errno.errorcode.get(e.errno, str(e.errno))
        say(f"guessed slot {gid}: {result}")
        guessing["done"] = True

    def violation(text):
        violations.append(text)
        say(f"VIOLATION: {text}")

    def check(op, nseg, nsec, rid, sector, off):
        """The request's transfer as [(mapping offset, length)], or None (a violation, told)."""
        what = f"op {op} id {rid} sector {sector} nr_segments {nseg} nr_sectors {nsec}"
        if rid >= RING_SIZE:
            return violation(f"{what}: id is not a slot")
        if op not in (READ, WRITE, WRITE_FUA):
            if nseg != 0:
                return violation(f"{what}: segments on a request without data")
            return []
        large = nseg > SEGS
        if nseg == 0:
            return violation(f"{what}: a transfer without segments")
        if large and not flags & LARGE_REQUESTS:
            return violation(f"{what}: more than {SEGS} segments without LARGE_REQUESTS")
        if nseg > pages:
            return violation(f"{what}: more segments than the slot's {pages} pages")
        if not large and nsec != 0:
            return violation(f"{what}: nr_sectors set on a request of at most {SEGS} pages")
        if large and not (nseg - 1) * 8 < nsec <= nseg * 8:
            return violation(f"{what}: nr_sectors does not fit nr_segments")
        parts = []
        base = PAGE * (1 + rid * pages)
        for j in range(min(nseg, SEGS)):
            first, last = struct.unpack_from("BB", m, off + 24 + 8 * j + 4)
            if first > last or last > 7:
                return violation(f"{what}: segment {j} sectors {first}..{last}")
            if large and (first, last) != (0, 7):
                return violation(f"{what}: segment {j} of a large request is {first}..{last}")
            parts.append((base + PAGE * j + first * 512, (last - first + 1) * 512))
        if large:
            # Contiguous from byte 0 of page 0: one run in the mapping.
            parts = [(base, nsec * 512)]
            ops_large[0] += 1
        length = sum(ln for _, ln in parts)
        if sector * 512 + length > sectors * 512:
            return violation(f"{what}: beyond the disk's {sectors} sectors")
        return parts

    def take():
        """Serves every request on the ring not seen yet; returns their answers (id, op, status)."""
        if guess_sector is None or guessing["done"]:
            drain()
        answers = []
        req_prod = struct.unpack_from("I", m, 0)[0]
        req_cons = state["req_cons"]
        while req_cons != req_prod:
            off = 64 + (req_cons % RING_SIZE) * 112
            op, nseg, nsec, rid, sector = struct.unpack_from("BBHxxxxQQ", m, off)
            ops[op if op in ops else "other"] += 1
            status = 0
            pos = sector * 512
            parts = check(op, nseg, nsec, rid, sector, off)
            if parts is None:
                status = -1
            elif op == DISCARD and flags & 0x8:
                (count,) = struct.unpack_from("Q", m, off + 24)
                store.write(pos, bytes(count * 512))
            elif op == FLUSH and flags & 0x4:
                if store.fd is not None:
                    os.fdatasync(store.fd)
            elif op in (READ, WRITE) or (op == WRITE_FUA and flags & 0x20):
                for a, ln in parts:
                    if op == READ:
                        m[a:a + ln] = store.read(pos, ln)
                    elif not ro:
                        store.write(pos, m[a:a + ln])
                    else:
                        status = -1
                    pos += ln
            else:
                status = -2
            if ignore_sector is not None and sector == ignore_sector and not released:
                ignored.append((rid, op, status))
            elif op == READ and sector == guess_sector and not guessing["done"]:
                guessing["held"].append((rid, op, status))
            else:
                answers.append((rid, op, status))
            req_cons = (req_cons + 1) & 0xFFFFFFFF
        state["req_cons"] = req_cons
        if guessing["held"] and not guessing["done"] and staged():
            # Before answering anything: the held read leaves the room for the guess.
            guess([])
        elif guessing["held"] and guessing["done"]:
            answers += guessing["held"]
            guessing["held"].clear()
        if released and ignored:
            say(f"answering {len(ignored)} ignored requests")
            answers += ignored
            ignored.clear()
        return answers

    def answer(answers):
        """Writes the answers in the given order and consumes them with one RESPOND."""
        if not answers:
            return
        rsp_prod = state["rsp_prod"]
        for rid, op, status in answers:
            roff = 64 + (rsp_prod % RING_SIZE) * 112
            struct.pack_into("QBxh", m, roff, rid, op, status)
            rsp_prod = (rsp_prod + 1) & 0xFFFFFFFF
        state["rsp_prod"] = rsp_prod
        struct.pack_into("I", m, 8, rsp_prod)
        ioctl(fd, IOCTL_RESPOND)

    def message():
        msg = m[16]
        if msg in (MSG_PAUSE, MSG_RESUME):
            ioctl(fd, IOCTL_PAUSE if msg == MSG_PAUSE else IOCTL_RESUME)
            ops["pause" if msg == MSG_PAUSE else "resume"] += 1

    def running():
        return not stop and (until is None or time.time() < until)

    say(f"serving tap {minor}")
    if silent:
        say("silent until SIGUSR2")
        while silent and running():
            time.sleep(0.1)
        if running():
            say("answering from now on")
    if epoll_mode:
        if register_late:
            end = time.time() + register_late
            while running() and time.time() < end:
                time.sleep(0.05)
            waiting = (struct.unpack_from("I", m, 0)[0] - state["req_cons"]) & 0xFFFFFFFF
            say(f"{waiting} requests published before registration, {staged()} writes staged")
        ep = select.epoll()
        inner = None
        if epoll_mode == "epoll":
            ep.register(fd, select.EPOLLIN)
        elif epoll_mode == "epoll-et":
            ep.register(fd, select.EPOLLIN | select.EPOLLET)
        elif epoll_mode == "epoll-mod":
            ep.register(fd, 0)
            ep.modify(fd, select.EPOLLIN)
        else:
            inner = select.epoll()
            inner.register(fd, select.EPOLLIN)
            ep.register(inner.fileno(), select.EPOLLIN)
        say(f"registered ({epoll_mode})")

        def arm():
            """--req-event: before sleeping. True if the ring must be served first."""
            if req_event == "ahead":
                struct.pack_into("I", m, 4, (state["req_cons"] + 100000) & 0xFFFFFFFF)
            if req_event != "armed":
                return False
            struct.pack_into("I", m, 4, (state["req_cons"] + 1) & 0xFFFFFFFF)
            # (A Python peer has no fence instruction: the interpreter's work between this
            # store and the loads below, and the kernel's full barrier, stand in for it.)
            req_prod = struct.unpack_from("I", m, 0)[0]
            return req_prod != state["req_cons"] or staged() != 0 or m[16] in (MSG_PAUSE, MSG_RESUME)

        # Armed once after serving, not after an empty wait: a lost wake-up then stalls the
        # disk instead of being made up for by the next look.
        fresh = True
        while running():
            if fresh and arm():
                stats["rechecks"] += 1
                message()
                answer(take())
                continue
            fresh = False
            if not ep.poll(0.2):
                continue
            if inner is not None and not inner.poll(0):
                stats["spurious"] += 1
                continue
            stats["wakeups"] += 1
            fresh = True
            message()
            answer(take())
    else:
        p = select.poll()
        p.register(fd, select.POLLIN)
        while running():
            if held:
                # Holding answers keeps the ring readable (level-triggered): sleep instead.
                time.sleep(min(0.002, max(0.0, first + HOLD_WINDOW - time.time())))
            elif ignored:
                # So does a request it does not answer.
                time.sleep(0.001)
            elif no_poll or (guess_sector is not None and not guessing["done"]):
                # A poll would put a staged write on the ring before the peer sees it staged.
                time.sleep(0.001)
            else:
                p.poll(50 if later else 200)
            message()
            new = take()
            now = time.time()
            if hold:
                if new and not held:
                    first = now
                held += new
                if held and (len(held) >= hold or now - first >= HOLD_WINDOW):
                    batch = held[::-1] if stats["batches"] % 2 == 0 else rng.sample(held, len(held))
                    stats["batches"] += 1
                    stats["max"] = max(stats["max"], len(batch))
                    if len(batch) > 1:
                        stats["multi"] += 1
                        if batch != held:
                            stats["reordered"] += 1
                    answer(batch)
                    held = []
                continue
            later += [(now + delay, *a) for a in new]
            due = []
            while later and later[0][0] <= now:
                due.append(later.pop(0)[1:])
            answer(due)
    for _ in range(50):
        try:
            ioctl(fd, 207)
            break
        except OSError as e:
            say(f"remove: {e}")
            time.sleep(0.1)
    say("ops " + " ".join(f"{k}={v}" for k, v in names(ops).items()))
    if hold:
        say("hold " + " ".join(f"{k}={stats[k]}" for k in ("batches", "multi", "max", "reordered")))
    if epoll_mode:
        say(f"epoll wakeups={stats['wakeups']} spurious={stats['spurious']}")
    if req_event:
        say(f"req_event rechecks={stats['rechecks']}")
    if pages != SEGS or violations:
        say(f"large={ops_large[0]} violations={len(violations)}")
    m.close()
    os.close(fd)
    if violations:
        sys.exit(4)


def names(ops):
    return {{READ: "read", WRITE: "write", FLUSH: "flush", DISCARD: "discard",
             WRITE_FUA: "fua"}.get(k, k): v for k, v in ops.items()}


if __name__ == "__main__":
    main()
