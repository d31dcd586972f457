#!/usr/bin/env python3
"""Probes the mapping sizes and the LARGE_REQUESTS (0x200) negotiation of a tap's ring; prints one
line per probe: `NAME RESULT` (OK or the errno name, or a value). The caller is t87-large.sh.

    largeprobe.py MINOR
"""
import errno, mmap, os, sys

from probe import PAGE, info, ioctl, out, res

LARGE, RECOVERY = 0x200, 0x40


def pages(s):
    return 1 + 32 * s


def with_map(fd, s):
    """Maps S pages per slot; returns the mapping or the errno name."""
    try:
        return mmap.mmap(fd, PAGE * pages(s), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


minor = int(sys.argv[1])
node = f"/dev/xen/blktap-2/blktap{minor}"
disk = f"/sys/block/td{chr(ord('a') + minor)}/queue"
debug = f"/sys/class/blktap2/blktap!blktap{minor}/debug"


def debug_line(key):
    for line in open(debug):
        if line.startswith(key + ": "):
            return line.split(": ", 1)[1].strip().replace(" ", ",")
    return "none"


fd = os.open(node, os.O_RDWR)
for name, length in [("mmap-10-per-slot", pages(10)), ("mmap-129-per-slot", pages(129)),
                     ("mmap-64-per-slot-plus-1", pages(64) + 1), ("mmap-not-a-slot-multiple", pages(11) + 31)]:
    out(name, res(lambda: mmap.mmap(fd, PAGE * length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)))
# A refused length leaves the file mappable.
m = with_map(fd, 11)
out("mmap-11-after-refusals", "OK" if isinstance(m, mmap.mmap) else m)
out("create-large-on-11", res(lambda: ioctl(fd, 208, info(flags=LARGE))))
out("create-plain-on-11", res(lambda: ioctl(fd, 208, info())))
out("max-kib-plain-11", open(f"{disk}/max_hw_sectors_kb").read().strip())
out("remove-plain-11", res(lambda: ioctl(fd, 207)))
m.close()
os.close(fd)

# A new mapping of another size, with no disk: new pages.
fd = os.open(node, os.O_RDWR)
m = with_map(fd, 64)
out("mmap-64", "OK" if isinstance(m, mmap.mmap) else m)
out("slot-pages-64", debug_line("slot_pages"))
# The data pages of slot 31 are the last 64 pages, zeroed.
out("data-pages-zeroed", "OK" if m[PAGE * (pages(64) - 64):] == bytes(PAGE * 64) else "DIRTY")
out("create-large-64", res(lambda: ioctl(fd, 208, info(flags=LARGE | RECOVERY))))
out("max-kib-large-64", open(f"{disk}/max_hw_sectors_kb").read().strip())
out("features-large", debug_line("features"))
m.close()
os.close(fd)
# The disk stays (recovery); a new mapping must have its size.
fd = os.open(node, os.O_RDWR)
m = with_map(fd, 11)
out("remap-11-with-disk-64", m if isinstance(m, str) else "OK")
m = with_map(fd, 128)
out("remap-128-with-disk-64", m if isinstance(m, str) else "OK")
m = with_map(fd, 64)
out("remap-64-with-disk-64", "OK" if isinstance(m, mmap.mmap) else m)
out("remove-large-64", res(lambda: ioctl(fd, 207)))
m.close()
os.close(fd)

# Without a disk again, any size: 128, and back to the standard 11 (an old tapdisk next).
fd = os.open(node, os.O_RDWR)
m = with_map(fd, 128)
out("mmap-128", "OK" if isinstance(m, mmap.mmap) else m)
out("create-plain-on-128", res(lambda: ioctl(fd, 208, info())))
out("max-kib-plain-128", open(f"{disk}/max_hw_sectors_kb").read().strip())
out("remove-plain-128", res(lambda: ioctl(fd, 207)))
m.close()
os.close(fd)
fd = os.open(node, os.O_RDWR)
m = with_map(fd, 11)
out("mmap-11-again", "OK" if isinstance(m, mmap.mmap) else m)
out("slot-pages-11", debug_line("slot_pages"))
m.close()
os.close(fd)
