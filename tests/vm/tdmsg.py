#!/usr/bin/env python3
"""An independent client of the original tapdisk control protocol, written from the header's
facts (x86-64 `tapdisk_message_t`, 544 bytes), for testing the Rust tapdisk.

    tdmsg.py malformed SOCKET        malformed and unsupported messages: clear errors, no hang,
                                     the daemon keeps serving (needs no kernel: no taps)
    tdmsg.py lifecycle SOCKET MINOR IMAGE COPY
                                     every request on a real tap (needs the module and an
                                     allocated tap MINOR; IMAGE and COPY are type:path of the
                                     same size)
    tdmsg.py call SOCKET TYPE MINOR [PATH] [FLAGS] [TIMEOUT]
                                     one request; prints the answer

Each check prints `ok - ...` or `not ok - ...`; the status is 0 only if all passed.

Layout: u16 type @0, u16 cookie @2, union @8 (536 bytes). Union members (offsets from @8):
pid i32 @0; image {u64 sectors @0, u32 sector_size @8, u32 info @12}; params {u32 flags @0,
u32 devnum @4, u32 domid @8, char path[256] @12, u32 prt_devnum @268, u16 req_timeout @272,
char secondary[256] @274}; response {i32 error @0, char message[256] @4}; list {i32 count @0,
i32 minor @4, i32 state @8, char path[256] @12}; info {u16 type, u16 cookie, u64 length @8}.
"""

import json
import os
import socket
import struct
import sys
import threading
import time

SIZE = 544
U = 8

ERROR, RUNTIME_ERROR = 1, 2
PID, PID_RSP = 3, 4
ATTACH, ATTACH_RSP = 5, 6
OPEN, OPEN_RSP = 7, 8
PAUSE, PAUSE_RSP = 9, 10
RESUME, RESUME_RSP = 11, 12
CLOSE, CLOSE_RSP = 13, 14
DETACH, DETACH_RSP = 15, 16
LIST_MINORS, LIST_MINORS_RSP = 17, 18
LIST, LIST_RSP = 19, 20
STATS, STATS_RSP = 21, 22
FORCE_SHUTDOWN = 23
XENBLKIF_CONNECT, XENBLKIF_DISCONNECT = 24, 26
DISK_INFO, DISK_INFO_RSP = 28, 29
EXIT = 30

F_SHARED, F_RDONLY, F_ADD_CACHE, F_VHD_INDEX = 0x1, 0x2, 0x4, 0x8
F_ADD_LOG, F_ADD_LCACHE, F_REUSE_PRT, F_SECONDARY = 0x10, 0x20, 0x40, 0x80
F_STANDBY, F_NO_O_DIRECT, F_OPEN_ENCRYPTED = 0x100, 0x200, 0x400

EINVAL, ENODEV, EBUSY, EALREADY, EOPNOTSUPP, EEXIST = 22, 19, 16, 114, 95, 17


def cstr(s, n=256):
    b = s.encode() if isinstance(s, str) else s
    assert len(b) < n
    return b + bytes(n - len(b))


def message(mtype, cookie=0, body=b""):
    m = struct.pack("<HH4x", mtype, cookie) + body
    assert len(m) <= SIZE
    return m + bytes(SIZE - len(m))


def params(flags=0, devnum=0, path="", prt=0, timeout=0, secondary=""):
    return (struct.pack("<III", flags, devnum, 0) + cstr(path) +
            struct.pack("<IH", prt, timeout) + cstr(secondary))


class Answer:
    def __init__(self, raw):
        self.raw = raw
        self.type, self.cookie = struct.unpack_from("<HH", raw, 0)

    def error(self):
        err, = struct.unpack_from("<i", self.raw, U)
        msg = self.raw[U + 4:U + 260].split(b"\0")[0].decode(errors="replace")
        return err, msg

    def pid(self):
        return struct.unpack_from("<i", self.raw, U)[0]

    def image(self):
        return struct.unpack_from("<QII", self.raw, U)

    def list(self):
        count, minor, state = struct.unpack_from("<iii", self.raw, U)
        path = self.raw[U + 12:U + 268].split(b"\0")[0].decode(errors="replace")
        return count, minor, state, path

    def length(self):
        return struct.unpack_from("<Q", self.raw, U + 8)[0]

    def __repr__(self):
        if self.type == ERROR:
            return "ERROR%r" % (self.error(),)
        return "type %d cookie %d" % (self.type, self.cookie)


def connect(sock, timeout=10):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(sock)
    return s


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        d = s.recv(n - len(buf))
        if not d:
            raise EOFError("closed after %d of %d bytes" % (len(buf), n))
        buf += d
    return buf


def request(sock, data, timeout=10):
    """Sends raw bytes, reads one answer."""
    with connect(sock, timeout) as s:
        s.sendall(data)
        return Answer(recv_exact(s, SIZE))


def call(sock, mtype, cookie=0, body=b"", trailer=b"", timeout=120):
    return request(sock, message(mtype, cookie, body) + trailer, timeout)


def list_taps(sock):
    with connect(sock) as s:
        s.sendall(message(LIST, 0xffff))
        taps = []
        while True:
            a = Answer(recv_exact(s, SIZE))
            if a.type != LIST_RSP:
                raise AssertionError("LIST answered %r" % a)
            count, minor, state, path = a.list()
            if count == 0:
                return taps
            taps.append((count, minor, state, path))


def stats(sock, cookie):
    with connect(sock) as s:
        s.sendall(message(STATS, cookie))
        a = Answer(recv_exact(s, SIZE))
        if a.type != STATS_RSP:
            return a, None
        return a, json.loads(recv_exact(s, a.length()).decode())


# --- checks --------------------------------------------------------------------------------

passed = failed = 0


def check(what, cond, detail=""):
    global passed, failed
    if cond:
        passed += 1
        print("ok - " + what, flush=True)
    else:
        failed += 1
        print("not ok - " + what, flush=True)
        if detail:
            for line in str(detail).splitlines():
                print("#   " + line, flush=True)


def is_error(a, errno, word=None):
    if a.type != ERROR:
        return False
    err, msg = a.error()
    return err == errno and (word is None or word.lower() in msg.lower())


def closed_without_answer(sock, data, wait):
    """Sends data (maybe partial) and expects the tapdisk to close the connection, at the latest
    after `wait` seconds, without answering. Returns (closed, seconds)."""
    t0 = time.time()
    with connect(sock, wait) as s:
        if data:
            s.sendall(data)
        try:
            got = s.recv(SIZE)
        except socket.timeout:
            return False, time.time() - t0
        return got == b"", time.time() - t0


def alive(sock, pid):
    a = call(sock, PID, timeout=5)
    return a.type == PID_RSP and a.pid() == pid


def malformed(sock):
    """Needs no kernel: a tapdisk without taps."""
    a = call(sock, PID, timeout=5)
    check("PID answers PID_RSP with the daemon's pid", a.type == PID_RSP and a.pid() > 0, a)
    pid = a.pid()
    check("the socket is named after the pid", sock.endswith("ctl%d" % pid), sock)

    # A client that connects and sends nothing: the others are served meanwhile, and it is
    # closed after the read timeout.
    result = {}

    def silent():
        result["silent"] = closed_without_answer(sock, b"", 30)

    def partial():
        result["partial"] = closed_without_answer(sock, message(PID)[:100], 30)

    threads = [threading.Thread(target=silent), threading.Thread(target=partial)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    t0 = time.time()
    check("served while a silent and a half-sent client wait", alive(sock, pid))
    check("...at once", time.time() - t0 < 3)
    for t in threads:
        t.join()
    closed, secs = result["silent"]
    check("a client that sends nothing is closed after the timeout (%.1f s)" % secs,
          closed and secs < 20, result)
    closed, secs = result["partial"]
    check("a short message is closed after the timeout, unanswered (%.1f s)" % secs,
          closed and secs < 20, result)

    # Short write then close: no answer, nothing breaks.
    with connect(sock) as s:
        s.sendall(message(PID)[:300])
        s.shutdown(socket.SHUT_WR)
        got = s.recv(SIZE)
    check("a short message then EOF: closed without an answer", got == b"", got)

    # Too long: one request per connection, the rest ignored.
    with connect(sock) as s:
        s.sendall(message(PID) + bytes(200))
        a = Answer(recv_exact(s, SIZE))
        rest = s.recv(SIZE)
    check("a message with extra bytes: one answer, then closed",
          a.type == PID_RSP and rest == b"", (a, rest))

    for t in [0, 31, 999, 0x7fff]:
        a = call(sock, t, timeout=5)
        check("unknown type %d: EINVAL" % t, is_error(a, EINVAL, "unsupported"), a)
    for t in [ERROR, RUNTIME_ERROR, PID_RSP, OPEN_RSP, LIST_RSP, STATS_RSP, EXIT]:
        a = call(sock, t, timeout=5)
        check("type %d (no request): EINVAL" % t, is_error(a, EINVAL), a)
    for t in [XENBLKIF_CONNECT, XENBLKIF_DISCONNECT]:
        a = call(sock, t, 3, timeout=5)
        check("XENBLKIF type %d: EOPNOTSUPP naming the Xen backend" % t,
              is_error(a, EOPNOTSUPP, "xen userspace block backend"), a)

    # Unterminated paths.
    body = struct.pack("<III", 0, 3, 0) + b"a" * 256 + struct.pack("<IH", 0, 0) + cstr("")
    a = call(sock, OPEN, 3, body, timeout=5)
    check("OPEN with an unterminated path: EINVAL", is_error(a, EINVAL, "terminated"), a)
    a = call(sock, RESUME, 3, body, timeout=5)
    check("RESUME with an unterminated path: EINVAL", is_error(a, EINVAL, "terminated"), a)
    body = struct.pack("<III", 0, 3, 0) + cstr("aio:/x") + struct.pack("<IH", 0, 0) + b"s" * 256
    a = call(sock, OPEN, 3, body[:SIZE - U], timeout=5)
    check("OPEN with an unterminated secondary: EINVAL", is_error(a, EINVAL), a)

    # Unsupported features, each named; trailers are read (the answer comes after them).
    for flag, word in [(F_ADD_CACHE, "cache"), (F_VHD_INDEX, "index"),
                       (F_ADD_LCACHE, "local read cache"), (F_REUSE_PRT, "parent"),
                       (F_SECONDARY, "secondary"), (F_STANDBY, "standby")]:
        a = call(sock, OPEN, 3, params(flag, 3, "aio:/x"), timeout=5)
        check("OPEN flag %#x: EOPNOTSUPP naming '%s'" % (flag, word),
              is_error(a, EOPNOTSUPP, word), a)
    a = call(sock, OPEN, 3, params(F_ADD_LOG, 3, "aio:/x"), cstr("/var/log/cbt"), timeout=5)
    check("OPEN with ADD_LOG and its log path: EOPNOTSUPP naming the changed-block log",
          is_error(a, EOPNOTSUPP, "changed-block log"), a)
    a = call(sock, OPEN, 3, params(F_OPEN_ENCRYPTED, 3, "aio:/x"), bytes([32]) + b"k" * 32,
             timeout=5)
    check("OPEN encrypted with its key: EOPNOTSUPP naming encryption",
          is_error(a, EOPNOTSUPP, "encrypt"), a)
    a = call(sock, OPEN, 3, params(F_ADD_LOG | F_OPEN_ENCRYPTED, 3, "aio:/x"),
             cstr("/l") + bytes([64]) + b"k" * 64, timeout=5)
    check("OPEN with both trailers: answered after them", is_error(a, EOPNOTSUPP), a)
    closed, secs = closed_without_answer(sock, message(OPEN, 3, params(F_ADD_LOG, 3, "aio:/x")),
                                         30)
    check("OPEN whose log path never comes: closed after the timeout (%.1f s)" % secs,
          closed and secs < 20)
    a = call(sock, OPEN, 3, params(0x10000, 3, "aio:/x"), timeout=5)
    check("OPEN with an unknown flag: EINVAL", is_error(a, EINVAL, "unknown flags"), a)
    a = call(sock, RESUME, 3, params(F_SECONDARY, 3, "", secondary="aio:/m"), timeout=5)
    check("RESUME with a secondary: EOPNOTSUPP", is_error(a, EOPNOTSUPP, "secondary"), a)
    a = call(sock, RESUME, 3, params(F_ADD_LOG, 3, ""), cstr("/l"), timeout=5)
    check("RESUME with a log: EOPNOTSUPP", is_error(a, EOPNOTSUPP, "changed-block log"), a)

    # Taps it does not have: the original's errnos.
    a = call(sock, OPEN, 3, params(0, 3, "ram:1M"), timeout=5)
    check("OPEN of a tap not attached: EINVAL", is_error(a, EINVAL, "not attached"), a)
    a = call(sock, OPEN, 3, params(0, 3, ""), timeout=5)
    check("OPEN without an image: EINVAL", is_error(a, EINVAL), a)
    for t, name in [(CLOSE, "CLOSE"), (FORCE_SHUTDOWN, "FORCE_SHUTDOWN"), (DETACH, "DETACH"),
                    (PAUSE, "PAUSE"), (RESUME, "RESUME"), (DISK_INFO, "DISK_INFO")]:
        a = call(sock, t, 3, timeout=5)
        check("%s of a tap not attached: ENODEV" % name, is_error(a, ENODEV), a)
    a, st = stats(sock, 3)
    check("STATS of a tap not attached: ENODEV", is_error(a, ENODEV), a)
    a, st = stats(sock, 0xffff)
    check("STATS of every tap: an empty JSON list", a.type == STATS_RSP and st == [], (a, st))
    check("LIST with no taps: only the end marker", list_taps(sock) == [])
    with connect(sock) as s:
        s.sendall(message(LIST, 0xffff))
        end = Answer(recv_exact(s, SIZE))
    check("the end marker is count 0, minor -1, path ''",
          end.list()[0:2] == (0, -1) and end.list()[3] == "", end.list())
    a = call(sock, LIST_MINORS, timeout=5)
    check("LIST_MINORS: none", a.type == LIST_MINORS_RSP and a.pid() == 0, a)

    # Many clients at once, and JSON beside the binary protocol.
    errors = []

    def hammer():
        try:
            for _ in range(20):
                if not alive(sock, pid):
                    errors.append("bad PID answer")
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check("160 PID requests from 8 clients at once", not errors, errors)
    with connect(sock) as s:
        s.sendall(b'{"op":"list"}\n')
        line = s.makefile().readline()
    check("JSON still works on the same socket", json.loads(line) == {"ok": True, "taps": []},
          line)
    check("the daemon still serves after all that", alive(sock, pid))


def lifecycle(sock, minor, image, copy):
    """Every request on a real tap."""
    pid = call(sock, PID).pid()
    a = call(sock, ATTACH, minor)
    check("ATTACH", a.type == ATTACH_RSP and a.cookie == minor, a)
    a = call(sock, ATTACH, minor)
    check("ATTACH again: EEXIST", is_error(a, EEXIST), a)
    check("LIST: attached, closed (0x2), no image", list_taps(sock) == [(1, minor, 0x2, "")],
          list_taps(sock))
    a = call(sock, OPEN, minor, params(F_NO_O_DIRECT, minor, image, timeout=120))
    sectors = a.image()[0] if a.type == OPEN_RSP else 0
    check("OPEN (no O_DIRECT, 120 s request timeout) answers the image", a.type == OPEN_RSP
          and sectors > 0 and a.image()[1] == 512, a)
    a = call(sock, OPEN, minor, params(0, minor, image))
    check("OPEN again: EALREADY", is_error(a, EALREADY), a)
    a = call(sock, DETACH, minor)
    check("DETACH while open: EBUSY", is_error(a, EBUSY), a)
    a = call(sock, DISK_INFO, minor)
    check("DISK_INFO", a.type == DISK_INFO_RSP and a.image()[:2] == (sectors, 512), a)
    check("LIST: open (0)", list_taps(sock) == [(1, minor, 0, image)], list_taps(sock))
    a, st = stats(sock, minor)
    ok = a.type == STATS_RSP and st["name"] == image and st["tap"]["minor"] == minor
    check("STATS: header, then JSON in the original schema", ok and
          {"secs", "images", "reqs_outstanding", "read_caching"} <= set(st), st)
    check("STATS: the image leaf first, its driver named",
          st["images"][0]["name"] == image.split(":", 1)[1] and
          st["images"][0]["driver"]["name"] == image.split(":", 1)[0], st)
    a, allst = stats(sock, 0xffff)
    check("STATS of every tap: a JSON list", isinstance(allst, list) and len(allst) == 1, allst)
    a = call(sock, PAUSE, minor)
    check("PAUSE: answered once paused", a.type == PAUSE_RSP, a)
    check("LIST: paused (0x2a)", list_taps(sock)[0][2] == 0x2a, list_taps(sock))
    a = call(sock, RESUME, minor, params(0, minor, copy))
    check("RESUME onto another image of the same size", a.type == RESUME_RSP, a)
    check("LIST names the new image", list_taps(sock)[0][3] == copy, list_taps(sock))
    a = call(sock, PAUSE, minor)
    a = call(sock, RESUME, minor, params(0, minor, ""))
    check("PAUSE, RESUME on the same image", a.type == RESUME_RSP, a)
    a = call(sock, CLOSE, minor)
    check("CLOSE", a.type == CLOSE_RSP, a)
    a = call(sock, OPEN, minor, params(F_RDONLY, minor, image))
    check("OPEN read-only: VDISK_READONLY in the answer",
          a.type == OPEN_RSP and a.image()[2] & 0x4, a)
    a = call(sock, FORCE_SHUTDOWN, minor)
    check("FORCE_SHUTDOWN closes (answered CLOSE_RSP)", a.type == CLOSE_RSP, a)
    a = call(sock, DETACH, minor)
    check("DETACH", a.type == DETACH_RSP, a)
    # Its last tap gone, the tapdisk exits (as the original) and removes its socket.
    t0 = time.time()
    while os.path.exists(sock) and time.time() - t0 < 10:
        time.sleep(0.1)
    check("the tapdisk exits once its last tap is detached", not os.path.exists(sock))
    return pid


def main():
    cmd, sock = sys.argv[1], sys.argv[2]
    if cmd == "malformed":
        malformed(sock)
    elif cmd == "lifecycle":
        lifecycle(sock, int(sys.argv[3]), sys.argv[4], sys.argv[5])
    elif cmd == "call":
        t, minor = int(sys.argv[3]), int(sys.argv[4])
        path = sys.argv[5] if len(sys.argv) > 5 else ""
        flags = int(sys.argv[6], 0) if len(sys.argv) > 6 else 0
        timeout = int(sys.argv[7]) if len(sys.argv) > 7 else 0
        a = call(sock, t, minor, params(flags, minor, path, timeout=timeout))
        print(a)
        return 0 if a.type != ERROR else 1
    else:
        print(__doc__)
        return 2
    print("# %d passed, %d failed" % (passed, failed))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
