#!/usr/bin/env python3
"""A stand-in for the original (blktap 3.x) tapdisk's control side, for testing tap-ctl against
it: it speaks only the binary `tapdisk_message_t` protocol, as the original did, and serves no
I/O (its taps are bookkeeping: no ring is mapped, no disk created).

    origtapdisk.py [-D]

As the original: no arguments but -D (anything else: usage, exit 22); it daemonizes (unless -D),
listens on <dir>/ctl<pid> where dir is compiled in (/var/run/blktap-control; here
$ORIG_TAPDISK_CTL_DIR may say another, as a build with another BLKTAP2_CONTROL_DIR would),
prints that path on stdout, and exits once its last tap is gone. Each connection carries one
message, read with a 2 s timeout (then closed without an answer: a JSON client gets EOF); errors
are ERROR answers with a positive errno and no message. SIGTERM ends it.
"""

import json
import os
import signal
import socket
import struct
import sys

SIZE = 544
U = 8
ERROR, PID, ATTACH, OPEN, PAUSE, RESUME, CLOSE, DETACH = 1, 3, 5, 7, 9, 11, 13, 15
LIST, STATS, FORCE_SHUTDOWN, DISK_INFO = 19, 21, 23, 28
F_RDONLY, F_ADD_LOG, F_OPEN_ENCRYPTED = 0x2, 0x10, 0x400
EINVAL, ENODEV, EBUSY, EEXIST, EALREADY = 22, 19, 16, 17, 114

vbds = {}  # minor -> {"name": "type:path" or None, "state": int, "sectors": int, "ro": bool}
had_vbds = False


def answer(mtype, cookie, body=b""):
    m = struct.pack("<HH4x", mtype, cookie) + body
    return m + bytes(SIZE - len(m))


def error(cookie, errno):
    return answer(ERROR, cookie, struct.pack("<i", errno))


def cstr(raw):
    return raw.split(b"\0")[0].decode(errors="replace")


def sectors_of(name):
    kind, _, arg = name.partition(":")
    try:
        if kind == "aio":
            return os.stat(arg).st_size // 512
        if kind in ("ram", "null"):
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(arg[-1:], 1)
            return int(arg.rstrip("KMG")) * mult // 512
    except (OSError, ValueError):
        pass
    return 2048


def recv(conn, n):
    buf = b""
    while len(buf) < n:
        d = conn.recv(n - len(buf))
        if not d:
            raise EOFError
        buf += d
    return buf


def stats_json(minor, v):
    kind, _, path = (v["name"] or ":").partition(":")
    return {"name": v["name"], "secs": [0, 0],
            "images": [{"name": path, "hits": [0, 0], "fail": [0, 0],
                        "driver": {"type": 4 if kind == "vhd" else 0, "name": kind,
                                   "status": None}}] if v["name"] else [],
            "tap": {"minor": minor, "reqs": [0, 0], "kicks": [0, 0]},
            "FIXME_enospc_redirect_count": 0, "nbd_mirror_failed": 0, "reqs_outstanding": 0,
            "read_caching": "false"}


def handle(conn):
    global had_vbds
    msg = recv(conn, SIZE)
    mtype, cookie = struct.unpack_from("<HH", msg, 0)
    flags, = struct.unpack_from("<I", msg, U)
    if mtype in (OPEN, RESUME) and flags & F_ADD_LOG:
        recv(conn, 256)
    if mtype == OPEN and flags & F_OPEN_ENCRYPTED:
        recv(conn, recv(conn, 1)[0])
    path = cstr(msg[U + 12:U + 268])
    v = vbds.get(cookie)
    if mtype == PID:
        return answer(PID + 1, cookie, struct.pack("<i", os.getpid()))
    if mtype == ATTACH:
        if v:
            return error(cookie, EEXIST)
        vbds[cookie] = {"name": None, "state": 0x2, "sectors": 0, "ro": False}
        had_vbds = True
        return answer(ATTACH + 1, cookie)
    if mtype == OPEN:
        if not v:
            return error(cookie, EINVAL)
        if v["name"]:
            return error(cookie, EALREADY)
        v.update(name=path, state=0, sectors=sectors_of(path), ro=bool(flags & F_RDONLY))
        return answer(OPEN + 1, cookie, struct.pack("<QII", v["sectors"], 512,
                                                    4 if v["ro"] else 0))
    if mtype in (CLOSE, FORCE_SHUTDOWN):
        if not v:
            return error(cookie, ENODEV)
        v.update(name=None, state=0x2)
        return answer(CLOSE + 1, cookie)
    if mtype == DETACH:
        if not v:
            return error(cookie, ENODEV)
        if v["name"]:
            return error(cookie, EBUSY)
        del vbds[cookie]
        return answer(DETACH + 1, cookie)
    if mtype == PAUSE:
        if not v:
            return error(cookie, ENODEV)
        v["state"] = 0x2a
        return answer(PAUSE + 1, cookie)
    if mtype == RESUME:
        if not v:
            return error(cookie, ENODEV)
        if path:
            v["name"] = path
        v["state"] = 0
        return answer(RESUME + 1, cookie)
    if mtype == LIST:
        out = b""
        n = len(vbds)
        for minor, v in vbds.items():
            name = (v["name"] or "").encode()
            out += answer(LIST + 1, cookie, struct.pack("<iii", n, minor, v["state"]) +
                          name + bytes(256 - len(name)))
            n -= 1
        return out + answer(LIST + 1, cookie, struct.pack("<iii", 0, -1, 0))
    if mtype == STATS:
        if cookie == 0xffff:
            data = [stats_json(m, v) for m, v in vbds.items()]
        elif not v:
            return error(cookie, ENODEV)
        else:
            data = stats_json(cookie, v)
        text = json.dumps(data).encode()
        return answer(STATS + 1, cookie, struct.pack("<HH4xQ", 0, 0, len(text))) + text
    if mtype == DISK_INFO:
        if not v:
            return error(cookie, ENODEV)
        return answer(DISK_INFO + 1, cookie, struct.pack("<QII", v["sectors"], 512, 0))
    return error(cookie, EINVAL)


def main():
    args = sys.argv[1:]
    if args not in ([], ["-D"]):
        sys.stderr.write("usage: %s <-u uuid> <-c control socket>\n" % sys.argv[0])
        return EINVAL
    ctl_dir = os.environ.get("ORIG_TAPDISK_CTL_DIR", "/var/run/blktap-control")
    out = os.fdopen(os.dup(1), "w")
    if not args:
        if os.fork():
            os._exit(0)
        os.setsid()
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
    os.makedirs(ctl_dir, exist_ok=True)
    path = "%s/ctl%d" % (ctl_dir, os.getpid())
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(32)
    signal.signal(signal.SIGTERM, lambda *_: (os.unlink(path), os._exit(0)))
    out.write(path + "\n")
    out.close()
    while not (had_vbds and not vbds):
        conn, _ = srv.accept()
        conn.settimeout(2)
        try:
            conn.sendall(handle(conn))
        except (OSError, EOFError):
            pass
        conn.close()
    os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
