# The ring device's ABI errors, probed by tests/vm/ringprobe.py.
. tests/vm/lib.sh
load
$TAPCTL allocate >/dev/null
python3 tests/vm/ringprobe.py 0 > /tmp/probe.txt 2>&1
expect() { check "$1: $2" is "$(awk -v k="$1" '$1 == k {print $2}' /tmp/probe.txt)" "$2"; }
expect poll-before-mmap POLLERR
expect create-before-mmap EACCES
expect respond-before-mmap EACCES
expect mmap-too-small EINVAL
expect mmap-too-big EINVAL
expect mmap-offset EINVAL
expect ring-page-zeroed OK
expect mmap-twice EBUSY
expect partial-munmap EINVAL
expect create-capacity-0 EINVAL
expect create-sector-1000 EINVAL
expect create-sector-8192 EINVAL
expect create-physical-256 EINVAL
expect create-unknown-flag EINVAL
expect create-bad-pointer EFAULT
expect create-capacity-loff-max EINVAL
expect create-capacity-partial-block EINVAL
expect create-physical-128k EINVAL
expect create-fua-without-flush EINVAL
expect compat-create-sector-1000 EINVAL
expect compat-create-capacity-0 EINVAL
expect mremap-grow EFAULT
expect mremap-move EINVAL
expect respond-after-mremap OK
expect sysfs-pause-without-disk ENODEV
expect msg-after-refused-pause 0
expect poll-without-disk 0
expect pause-ioctl-without-disk ENODEV
expect msg-after-pause-ioctl 0
expect unknown-ring-ioctl ENOTTY
expect remove-without-disk ENODEV
expect create OK
expect create-again EEXIST
expect child-respond EACCES
expect child-remove EACCES
expect child-pause EACCES
expect child-resume EACCES
expect child-create EACCES
expect child-compat-create EACCES
expect child-touches-mapping SIGSEGV
expect remove-while-open EBUSY
expect remove OK
expect compat-create OK
expect remove-compat OK
expect respond-after-munmap EACCES
check "the ring page is zeroed again at the next mapping" sh -c \
    "python3 tests/vm/ringprobe.py 0 | grep -qx 'ring-page-zeroed OK'"
check "free the tap" $TAPCTL free -m 0
check "rmmod" unload
finish
