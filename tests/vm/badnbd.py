#!/usr/bin/env python3
"""A misbehaving NBD server on a unix socket, for t97-nbd-client.

    badnbd.py SOCKET MODE [--once] [--size BYTES]
    badnbd.py --expect OFFSET LENGTH    (prints the bytes the server serves there)

The export (4 MiB by default) holds a pattern: each 8-byte word is its own offset, little-endian;
writes change it (in memory). Handshake modes break the handshake of every connection (opening
the export must fail):

    bad-magic        the greeting's first magic is not NBDMAGIC
    oldstyle         an oldstyle greeting (not newstyle)
    short-greeting   four bytes, then the connection is closed
    huge-opt-reply   the reply to the first option claims 2 GiB of data
    refused          NBD_OPT_GO answered NBD_REP_ERR_UNKNOWN, with a message
    no-size          NBD_OPT_GO acknowledged without NBD_INFO_EXPORT
    greeting-stall   nothing is ever sent

Reply modes handshake properly (structured replies acknowledged) and serve every request well,
except reads that touch the trap, [1 MiB, 2 MiB), which are answered wrongly (with --once: only on
the first connection that gets such a read; later connections answer them properly):

    reply-magic      a reply header with a bad magic
    short-reply      a data chunk announcing the whole range, half of it sent, then close
    oversized        a data chunk claiming 2 GiB
    unknown-cookie   the reply carries a cookie the client never sent
    outside          a data chunk at an offset outside the request's range
    partial          half the range, then the reply ends (NONE, DONE): a successful read that
                     leaves part of the range without data
    stall            no reply at all
    error            an NBD_REPLY_TYPE_ERROR chunk (EIO): a server's legitimate error

It logs one line per connection and per fault on stderr.
"""

import array
import os
import socket
import struct
import sys
import threading

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OLDSTYLE = 0x00420281861253
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
CHUNK_MAGIC = 0x668E33EF
OPT_GO, OPT_STRUCTURED = 7, 8
REP_ACK, REP_INFO, REP_ERR_UNSUP, REP_ERR_UNKNOWN = 1, 3, (1 << 31) | 1, (1 << 31) | 6
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_WRITE_ZEROES = 0, 1, 2, 3, 6
CHUNK_NONE, CHUNK_DATA, CHUNK_ERROR = 0, 1, (1 << 15) | 1
DONE = 1
# HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_WRITE_ZEROES
TFLAGS = 1 | 4 | 8 | 64
TRAP = (1 << 20, 2 << 20)

HANDSHAKE_MODES = {"bad-magic", "oldstyle", "short-greeting", "huge-opt-reply", "refused",
                   "no-size", "greeting-stall"}
REPLY_MODES = {"reply-magic", "short-reply", "oversized", "unknown-cookie", "outside", "partial",
               "stall", "error"}


def pattern(offset, length):
    """The export's initial bytes at [offset, offset + length) (8-byte aligned)."""
    return array.array("Q", range(offset, offset + length, 8)).tobytes()


def log(msg):
    print(f"badnbd: {msg}", file=sys.stderr, flush=True)


def recv_exact(s, n):
    b = bytearray()
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError
        b += c
    return bytes(b)


class Server:
    def __init__(self, path, mode, once, size):
        self.mode, self.once, self.size = mode, once, size
        self.data = bytearray(pattern(0, size))
        self.lock = threading.Lock()
        self.faulted = False
        self.conns = 0
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)

    def run(self):
        while True:
            c, _ = self.sock.accept()
            self.conns += 1
            n = self.conns
            log(f"connection {n}")
            threading.Thread(target=self.serve, args=(c, n), daemon=True).start()

    def opt_reply(self, c, opt, typ, data=b""):
        c.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, typ, len(data)) + data)

    def serve(self, c, n):
        try:
            self.handshake(c) and self.transmission(c, n)
        except (EOFError, OSError) as e:
            log(f"connection {n}: {type(e).__name__}")
        finally:
            c.close()

    def stall(self, c):
        while c.recv(4096):
            pass
        return False

    def handshake(self, c):
        m = self.mode
        if m == "greeting-stall":
            return self.stall(c)
        if m == "short-greeting":
            c.sendall(struct.pack(">Q", NBDMAGIC)[:4])
            return False
        if m == "bad-magic":
            c.sendall(struct.pack(">QQH", 0x0123456789ABCDEF, IHAVEOPT, 3))
            return self.stall(c)
        if m == "oldstyle":
            c.sendall(struct.pack(">QQQI", NBDMAGIC, OLDSTYLE, self.size, TFLAGS) + bytes(124))
            return self.stall(c)
        c.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
        recv_exact(c, 4)
        while True:
            magic, opt, length = struct.unpack(">QII", recv_exact(c, 16))
            if magic != IHAVEOPT or length > 4096:
                return False
            recv_exact(c, length)
            if m == "huge-opt-reply":
                c.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, REP_ACK, 0x7FFFFFFF))
                return self.stall(c)
            if opt == OPT_STRUCTURED:
                self.opt_reply(c, opt, REP_ACK)
            elif opt == OPT_GO:
                if m == "refused":
                    self.opt_reply(c, opt, REP_ERR_UNKNOWN, b"no such export here")
                    continue
                if m != "no-size":
                    self.opt_reply(c, opt, REP_INFO, struct.pack(">HQH", 0, self.size, TFLAGS))
                self.opt_reply(c, opt, REP_ACK)
                return True
            else:
                self.opt_reply(c, opt, REP_ERR_UNSUP)

    def chunk(self, typ, cookie, payload, flags=DONE, length=None):
        return struct.pack(">IHHQI", CHUNK_MAGIC, flags, typ, cookie,
                           len(payload) if length is None else length) + payload

    def transmission(self, c, n):
        while True:
            magic, flags, typ, cookie, off, length = struct.unpack(">IHHQQI", recv_exact(c, 28))
            if magic != REQUEST_MAGIC:
                return
            if typ == CMD_WRITE:
                data = recv_exact(c, length)
            if typ == CMD_DISC:
                return
            ok = off + length <= self.size
            if typ == CMD_READ and off < TRAP[1] and off + length > TRAP[0] and self.mode in REPLY_MODES:
                with self.lock:
                    fault = not (self.once and self.faulted)
                    self.faulted = True
                if fault:
                    log(f"connection {n}: {self.mode} for a read of {length} at {off}")
                    if self.fault(c, cookie, off, length) is False:
                        return
                    continue
            if not ok:
                c.sendall(self.chunk(CHUNK_ERROR, cookie, struct.pack(">IH", 22, 0)))
                continue
            with self.lock:
                if typ == CMD_WRITE:
                    self.data[off:off + length] = data
                elif typ == CMD_WRITE_ZEROES:
                    self.data[off:off + length] = bytes(length)
                body = bytes(self.data[off:off + length]) if typ == CMD_READ else None
            if body is not None:
                c.sendall(self.chunk(CHUNK_DATA, cookie, struct.pack(">Q", off) + body))
            else:
                c.sendall(struct.pack(">IIQ", SIMPLE_MAGIC, 0, cookie))

    def fault(self, c, cookie, off, length):
        m = self.mode
        with self.lock:
            body = bytes(self.data[off:off + length])
        if m == "reply-magic":
            c.sendall(struct.pack(">IIQ", 0xBADBAD00, 0, cookie) + body)
        elif m == "short-reply":
            c.sendall(self.chunk(CHUNK_DATA, cookie, struct.pack(">Q", off) + body[:length // 2],
                                 length=8 + length))
            return False
        elif m == "oversized":
            c.sendall(self.chunk(CHUNK_DATA, cookie, struct.pack(">Q", off) + body,
                                 length=0x7FFFFFFF))
        elif m == "unknown-cookie":
            c.sendall(self.chunk(CHUNK_DATA, cookie ^ 0x5A5A0000, struct.pack(">Q", off) + body))
        elif m == "outside":
            c.sendall(self.chunk(CHUNK_DATA, cookie, struct.pack(">Q", off + length) + body))
        elif m == "partial":
            half = length // 2
            c.sendall(self.chunk(CHUNK_DATA, cookie, struct.pack(">Q", off) + body[:half], flags=0)
                      + self.chunk(CHUNK_NONE, cookie, b""))
        elif m == "error":
            c.sendall(self.chunk(CHUNK_ERROR, cookie, struct.pack(">IH", 5, 4) + b"oops"))
        # stall: nothing
        return True


def main():
    a = sys.argv[1:]
    if a and a[0] == "--expect":
        sys.stdout.buffer.write(pattern(int(a[1]), int(a[2])))
        return
    once = "--once" in a
    size = 4 << 20
    if "--size" in a:
        size = int(a[a.index("--size") + 1])
    path, mode = a[0], a[1]
    if mode not in HANDSHAKE_MODES | REPLY_MODES | {"good"}:
        sys.exit(f"badnbd: unknown mode {mode}")
    Server(path, mode, once, size).run()


if __name__ == "__main__":
    main()
