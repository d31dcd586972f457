#!/usr/bin/env python3
"""Probes the ring device's error handling; prints one line per probe: `NAME RESULT`.

    ringprobe.py MINOR

RESULT is OK or the errno name. The caller (t65-ring-errors.sh) compares them with the ABI.
"""
import ctypes, errno, mmap, os, select, struct, sys

from probe import PAGE, info, ioctl, libc, out, res

PAGES = 1 + 32 * 11
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def mmap_raw(fd, length, offset=0):
    addr = libc.mmap(None, length, 3, 1, fd, offset)  # RW, MAP_SHARED
    if addr in (None, ctypes.c_void_p(-1).value):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return addr


minor = int(sys.argv[1])
fd = os.open(f"/dev/xen/blktap-2/blktap{minor}", os.O_RDWR)
p0 = select.poll()
p0.register(fd, select.POLLIN)
out("poll-before-mmap", "POLLERR" if any(ev & select.POLLERR for _, ev in p0.poll(0)) else "0")
out("create-before-mmap", res(lambda: ioctl(fd, 208, info(2048))))
out("respond-before-mmap", res(lambda: ioctl(fd, 1)))
out("mmap-too-small", res(lambda: mmap_raw(fd, PAGE * (PAGES - 1))))
out("mmap-too-big", res(lambda: mmap_raw(fd, PAGE * (PAGES + 1))))
out("mmap-offset", res(lambda: mmap_raw(fd, PAGE * PAGES, PAGE)))
m = mmap.mmap(fd, PAGE * PAGES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
out("ring-page-zeroed", "OK" if m[:PAGE] == bytes(PAGE) else "DIRTY")
m[0:8] = b"\xff" * 8  # scribble on the header
out("mmap-twice", res(lambda: mmap_raw(fd, PAGE * PAGES)))
out("partial-munmap", "OK" if libc.munmap(ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(m)) + PAGE), PAGE) == 0 else errno.errorcode[ctypes.get_errno()])
out("create-capacity-0", res(lambda: ioctl(fd, 208, info(0))))
out("create-sector-1000", res(lambda: ioctl(fd, 208, info(2048, 1000, 1024))))
out("create-sector-8192", res(lambda: ioctl(fd, 208, info(2048, 8192, 8192))))
out("create-physical-256", res(lambda: ioctl(fd, 208, info(2048, 512, 256))))
out("create-unknown-flag", res(lambda: ioctl(fd, 208, info(2048, flags=0x400))))
out("create-bad-pointer", res(lambda: ioctl(fd, 208, ctypes.c_void_p(16))))
# The byte size must fit loff_t, and be a whole number of logical blocks.
out("create-capacity-loff-max", res(lambda: ioctl(fd, 208, info((2**63 - 1) // 512 + 1))))
out("create-capacity-partial-block", res(lambda: ioctl(fd, 208, info(2049, 4096, 4096))))
out("create-physical-128k", res(lambda: ioctl(fd, 208, info(2048, 512, 128 * 1024))))
out("create-fua-without-flush", res(lambda: ioctl(fd, 208, info(2048, flags=0x20))))
out("compat-create-sector-1000", res(lambda: ioctl(fd, 202, ctypes.create_string_buffer(struct.pack("256sQQ", b"x", 4096, 1000)))))
out("compat-create-capacity-0", res(lambda: ioctl(fd, 202, ctypes.create_string_buffer(struct.pack("256sQQ", b"x", 0, 512)))))
# The mapping cannot grow (VM_DONTEXPAND): mremap in place answers EFAULT.
libc.syscall.restype = ctypes.c_long
maddr = ctypes.addressof(ctypes.c_char.from_buffer(m))
grown = libc.syscall(25, ctypes.c_void_p(maddr), ctypes.c_size_t(PAGE * PAGES), ctypes.c_size_t(PAGE * (PAGES + 1)), 0)
out("mremap-grow", "OK" if grown != -1 else errno.errorcode[ctypes.get_errno()])
# Nor move (vm_ops->mremap refuses): EINVAL, and the ring stays mapped and usable.
target = libc.mmap(None, PAGE * PAGES, 0, 0x22, -1, 0)  # PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS
moved = libc.syscall(25, ctypes.c_void_p(maddr), ctypes.c_size_t(PAGE * PAGES), ctypes.c_size_t(PAGE * PAGES), 3, ctypes.c_void_p(target))
out("mremap-move", "OK" if moved != -1 else errno.errorcode[ctypes.get_errno()])
libc.munmap(ctypes.c_void_p(target), PAGE * PAGES)
out("respond-after-mremap", res(lambda: ioctl(fd, 1)))
# A pause asked through sysfs with no disk: refused, the ring message stays clear, and the
# ring does not poll readable for it; PAUSE itself answers ENODEV.
pause_attr = f"/sys/class/blktap2/blktap!blktap{minor}/pause"
def write_pause(v):
    a = os.open(pause_attr, os.O_WRONLY)
    try:
        os.write(a, v)
    finally:
        os.close(a)
out("sysfs-pause-without-disk", res(lambda: write_pause(b"1")))
out("msg-after-refused-pause", m[16])
p = select.poll()
p.register(fd, select.POLLIN)
out("poll-without-disk", p.poll(0) or "0")
m[16] = 1  # a stale message (as an old driver could leave): PAUSE clears it, even with ENODEV
out("pause-ioctl-without-disk", res(lambda: ioctl(fd, 204)))
out("msg-after-pause-ioctl", m[16])
out("unknown-ring-ioctl", res(lambda: ioctl(fd, 203)))
out("remove-without-disk", res(lambda: ioctl(fd, 207)))
out("create", res(lambda: ioctl(fd, 208, info(2048))))
out("create-again", res(lambda: ioctl(fd, 208, info(2048))))
pid = os.fork()
if pid == 0:
    # A child shares the fd but not the mapping (no copy on fork): refused.
    print(f"child-respond {res(lambda: ioctl(fd, 1))}", flush=True)
    print(f"child-remove {res(lambda: ioctl(fd, 207))}", flush=True)
    print(f"child-pause {res(lambda: ioctl(fd, 204))}", flush=True)
    print(f"child-resume {res(lambda: ioctl(fd, 206))}", flush=True)
    print(f"child-create {res(lambda: ioctl(fd, 208, info(2048)))}", flush=True)
    print(f"child-compat-create {res(lambda: ioctl(fd, 202, ctypes.create_string_buffer(struct.pack('256sQQ', b'x', 4096, 512))))}", flush=True)
    os._exit(0)
os.waitpid(pid, 0)
# Nor is the mapping copied on fork (VM_DONTCOPY): a child touching it faults.
pid = os.fork()
if pid == 0:
    os.dup2(os.open("/dev/null", os.O_WRONLY), 2)
    m[100]  # SIGSEGV without a copy
    os._exit(0)
_, st = os.waitpid(pid, 0)
out("child-touches-mapping", "SIGSEGV" if os.WIFSIGNALED(st) and os.WTERMSIG(st) == 11 else f"status-{st}")
bd = os.open(f"/dev/xen/blktap-2/tapdev{minor}", os.O_RDONLY | os.O_NONBLOCK)
out("remove-while-open", res(lambda: ioctl(fd, 207)))
os.close(bd)
out("remove", res(lambda: ioctl(fd, 207)))
out("compat-create", res(lambda: ioctl(fd, 202, ctypes.create_string_buffer(struct.pack("256sQQ", b"x", 4096, 512)))))
out("remove-compat", res(lambda: ioctl(fd, 207)))
m.close()
out("respond-after-munmap", res(lambda: ioctl(fd, 1)))
os.close(fd)
