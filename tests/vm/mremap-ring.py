#!/usr/bin/env python3
"""Minimal reproducer: move a ring mapping with mremap, then unmap it, close it, free the tap.

    mremap-ring.py MINOR

Prints one line per step: `STEP RESULT` (OK or the errno name). The tap must be allocated.
"""
import ctypes, errno, os, sys

PAGE = 4096
LEN = (1 + 32 * 11) * PAGE
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.syscall.restype = ctypes.c_long
MAP_FAILED = ctypes.c_void_p(-1).value
SYS_MREMAP = 25
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2


def res(ret):
    if ret in (-1, None, MAP_FAILED):
        return errno.errorcode[ctypes.get_errno()]
    return "OK"


def out(step, r):
    print(f"{step} {r}", flush=True)


minor = int(sys.argv[1])
fd = os.open(f"/dev/xen/blktap-2/blktap{minor}", os.O_RDWR)
addr = libc.mmap(None, LEN, 3, 1, fd, 0)  # RW, MAP_SHARED
out("mmap", res(addr))
# A free place to move it to: reserve, then move over the reservation.
target = libc.mmap(None, LEN, 0, 0x22, -1, 0)  # PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS
new = libc.syscall(SYS_MREMAP, ctypes.c_void_p(addr), ctypes.c_size_t(LEN), ctypes.c_size_t(LEN),
                   MREMAP_MAYMOVE | MREMAP_FIXED, ctypes.c_void_p(target))
out("mremap-move", res(new))
where = target if new != -1 else addr
out("respond-after-move", res(libc.ioctl(fd, ctypes.c_ulong(1), ctypes.c_ulong(0))))
out("munmap", res(libc.munmap(ctypes.c_void_p(where), LEN)))
os.close(fd)
out("close", "OK")
ctl = os.open("/dev/xen/blktap-2/control", os.O_RDWR)
out("free", res(libc.ioctl(ctl, ctypes.c_ulong(201), ctypes.c_ulong(minor))))
