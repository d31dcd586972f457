#!/usr/bin/env python3
"""resident.py PATH START END: how many pages of PATH (a file or a block device) between byte
offsets START and END (page-aligned) are in the page cache, from mincore(2) over a shared
read-only mapping. Mapping a file does not read it: the count is what other I/O left."""
import ctypes
import os
import sys

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident(path, start, end):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    length = end - start
    if start % PAGE or length <= 0 or length % PAGE:
        raise SystemExit(f"resident.py: [{start}, {end}) is not a page-aligned range")
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, length, 1, 1, fd, start)  # PROT_READ, MAP_SHARED
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        vec = (ctypes.c_ubyte * (length // PAGE))()
        try:
            if libc.mincore(addr, length, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
        finally:
            libc.munmap(addr, length)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    print(resident(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
