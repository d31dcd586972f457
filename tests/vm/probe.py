"""What the ring probes share (ringprobe.py, largeprobe.py): results as errno names, the raw
ioctl, CREATE_DEVICE's blktap_device_info, one output line per probe. Imported, never run."""
import ctypes, errno, os, struct

PAGE = 4096
CREATE_DEVICE = 208
libc = ctypes.CDLL(None, use_errno=True)


def res(f):
    """Runs F: "OK", or the name of the errno it raised."""
    try:
        f()
        return "OK"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def ioctl(fd, cmd, arg=0):
    if libc.ioctl(fd, ctypes.c_ulong(cmd), arg) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def info(capacity=2048, ss=512, pss=512, flags=0):
    """A struct blktap_device_info: capacity (sectors), sector sizes, flags."""
    return ctypes.create_string_buffer(struct.pack("QIIQ4Q", capacity, ss, pss, flags, 0, 0, 0, 0))


def out(name, r):
    print(f"{name} {r}", flush=True)
