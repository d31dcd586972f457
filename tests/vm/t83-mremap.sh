# Moving a ring mapping with mremap (found by blktap-fuzz). The mapping's vma is copied to the
# new place and the old one closed: the driver's vma close must not run twice for one mapping
# (it drops the mapping's tap reference: twice is a refcount underflow, then a use-after-free).
# The reproducer is tests/vm/mremap-ring.py; t82's fuzzer moves rings at random as well.
. tests/vm/lib.sh
. tests/vm/stress.sh
load
$TAPCTL allocate >/dev/null
python3 tests/vm/mremap-ring.py 0 > /tmp/mremap.txt 2>&1
sed 's/^/# /' /tmp/mremap.txt
step() { awk -v k="$1" '$1 == k {print $2}' /tmp/mremap.txt; }
check "mmap the ring" is "$(step mmap)" OK
check "mremap moves it, or refuses" sh -c "echo $(step mremap-move) | grep -Eqx 'OK|EINVAL|EFAULT'"
check "the ring is usable after the move, or still unmoved" is "$(step respond-after-move)" OK
check "munmap" is "$(step munmap)" OK
check "the tap is freed" is "$(step free)" OK
check "no tap left" no_taps_left
check "no module reference left" refcnt_zero
check "no refcount warning" sh -c "! dmesg | grep -E 'refcount_t|use-after-free'"
check "rmmod" unload
finish
