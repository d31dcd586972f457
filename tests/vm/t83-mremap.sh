# Moving a ring mapping with mremap (found by blktap-fuzz). The mapping's vma is copied to the
# new place and the old one closed: the driver's vma close must not run twice for one mapping
# (it drops the mapping's tap reference: twice is a refcount underflow, then a use-after-free).
# The reproducer is tests/vm/mremap-ring.py; then the fuzzer runs with mremap enabled.
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
# Once the reproducer passes, the fuzzer with mremap enabled (it would only hang a corrupted
# kernel otherwise).
if [ "$_fail" = 0 ]; then
    SEED=${BLKTAP_FUZZ_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
    CALLS=$(scaled 30000)
    echo "# fuzzer with mremap: seed $SEED, $CALLS calls"
    timeout 100 "$REPO/userspace/target/release/blktap-fuzz" --seed "$SEED" --calls "$CALLS" > /tmp/fuzz.out 2>&1
    rc=$?
    sed 's/^/# /' /tmp/fuzz.out | grep -v '^# MISMATCH' | tail -n 5
    check "fuzzer with mremap (seed $SEED)" sh -c "grep -E 'MISMATCH|child|seed' /tmp/fuzz.out | head -n 18; test $rc = 0"
    check "no tap left after the fuzzer" no_taps_left
fi
check "rmmod" unload
finish
