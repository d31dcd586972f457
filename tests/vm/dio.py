#!/usr/bin/env python3
"""One direct I/O call on a block device; prints what the application sees.

    dio.py DEV read OFFSET LEN          OK and the distinct byte values read (hex), or the errno
    dio.py DEV write|fua OFFSET LEN HEX  writes LEN bytes of value HEX (fua: O_DSYNC, sent as FUA)
    dio.py DEV fsync                    fsync (a flush on a disk with a write cache)
    dio.py DEV discard OFFSET LEN       BLKDISCARD
    dio.py DEV reads N                  N reads of 4 KiB at once (threads), at 4 KiB apart; prints
                                        each result, sorted, counted (`12 EIO`, ...)

The result is OK or the errno's name (EIO, EOPNOTSUPP, ...). Exit status 0 either way.
"""
import collections, errno, fcntl, mmap, os, struct, sys, threading

BLKDISCARD = 0x1277


def name(e):
    if e.errno == errno.EOPNOTSUPP:
        return "EOPNOTSUPP"  # Python names 95 ENOTSUP, its alias
    return errno.errorcode.get(e.errno, str(e.errno))


def read(dev, off, ln):
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, ln)
    try:
        n = os.preadv(fd, [buf], off)
        if n != ln:
            return f"SHORT {n}"
        return "OK " + ",".join(f"{b:02x}" for b in sorted(set(buf[:ln])))
    except OSError as e:
        return name(e)
    finally:
        os.close(fd)


def main():
    dev, op = sys.argv[1], sys.argv[2]
    args = sys.argv[3:]
    if op == "read":
        print(read(dev, int(args[0]), int(args[1])))
    elif op in ("write", "fua"):
        off, ln, val = int(args[0]), int(args[1]), int(args[2], 16)
        flags = os.O_WRONLY | os.O_DIRECT | (os.O_DSYNC if op == "fua" else 0)
        fd = os.open(dev, flags)
        buf = mmap.mmap(-1, ln)
        buf.write(bytes([val]) * ln)
        try:
            n = os.pwritev(fd, [buf], off)
            print("OK" if n == ln else f"SHORT {n}")
        except OSError as e:
            print(name(e))
        finally:
            os.close(fd)
    elif op == "fsync":
        fd = os.open(dev, os.O_WRONLY)
        try:
            os.fsync(fd)
            print("OK")
        except OSError as e:
            print(name(e))
        finally:
            os.close(fd)
    elif op == "discard":
        fd = os.open(dev, os.O_WRONLY)
        try:
            fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", int(args[0]), int(args[1])))
            print("OK")
        except OSError as e:
            print(name(e))
        finally:
            os.close(fd)
    elif op == "reads":
        n = int(args[0])
        results = [None] * n

        def one(i):
            results[i] = read(dev, i * 4096, 4096).split()[0]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for what, count in sorted(collections.Counter(results).items()):
            print(f"{count} {what}")
    else:
        sys.exit(f"dio.py: unknown operation {op}")


if __name__ == "__main__":
    main()
