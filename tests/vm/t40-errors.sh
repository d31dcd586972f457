# Bad requests get the errno the ABI documents, and leave nothing behind.
. tests/vm/lib.sh
load
C=$DEVDIR/control

check "allocate tap 0" is "$($TAPCTL allocate)" "$DEVDIR/tapdev0"
check "free tap 0" $TAPCTL free -m 0
check "double free: ENODEV" is "$(ioctl $C 201 0)" ENODEV
check "tap-ctl exits with ENODEV (19) on a double free" is "$(errno_of $TAPCTL free -m 0)" 19
check "tap-ctl names the errno" sh -c "$TAPCTL free -m 0 2>&1 | grep -q 'ENODEV (No such device)'"
check "free of a never-allocated minor: ENODEV" is "$(ioctl $C 201 77)" ENODEV
check "free of minor 16384 (out of range): EINVAL" is "$(ioctl $C 201 16384)" EINVAL
check "free of minor 2^32+1 (out of range): EINVAL" is "$(ioctl $C 201 4294967297)" EINVAL
check "free of minor -1: EINVAL" is "$(ioctl $C 201 -1)" EINVAL
check "tap-ctl exits with EINVAL (22) out of range" is "$(errno_of $TAPCTL free -m 20000)" 22

check "unknown control ioctl 0: ENOTTY" is "$(ioctl $C 0 0)" ENOTTY
check "unknown control ioctl 202: ENOTTY" is "$(ioctl $C 202 0)" ENOTTY
check "unknown control ioctl _IOR(0xC8,...): ENOTTY" is "$(ioctl $C 2147795144 0)" ENOTTY
check "ALLOC_TAP to a bad pointer: EFAULT" is "$(ioctl $C 200 16)" EFAULT
check "...and it leaks no minor" is "$($TAPCTL allocate)" "$DEVDIR/tapdev0"

R=$DEVDIR/blktap0
check "unknown ring ioctl: ENOTTY" is "$(ioctl $R 99 0)" ENOTTY
# Hold the ring open from a background process.
sleep 30 < $R &
holder=$!
sleep 0.2
check "second open of a ring: EBUSY" is "$(ioctl $R 99 0)" open:EBUSY
check "free while the ring is open: EBUSY" is "$(ioctl $C 201 0)" EBUSY
check "tap-ctl exits with EBUSY (16)" is "$(errno_of $TAPCTL free -m 0)" 16
check "task shows the ring holder's pid" is "$(cat "$CLASS/blktap!blktap0/task")" "$holder"
check "tap-ctl list shows it as the tap's pid" is "$($TAPCTL list -m 0)" "pid=$holder minor=0"
kill $holder
wait $holder 2>/dev/null
check "task is empty once the ring is closed" is "$(cat "$CLASS/blktap!blktap0/task")" ""
check "free after the ring closed" $TAPCTL free -m 0
check "open of an unallocated ring: ENXIO" sh -c "mknod /tmp/ring5 c $(awk '$2 == "blktap2" {print $1}' /proc/devices) 5 && python3 -c \"
import os, errno
try:
    os.open('/tmp/ring5', os.O_RDWR)
except OSError as e:
    assert e.errno == errno.ENXIO, e
else:
    raise SystemExit('opened')
\""
check "rmmod" unload
finish
