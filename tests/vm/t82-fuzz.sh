# The ioctl and mmap fuzzer (userspace/blktap-fuzz): 100,000 calls (x BLKTAP_STRESS_SCALE) of
# random and edge-case ioctls, mmaps, munmaps, mremaps, ring contents and interleavings on the
# control and ring nodes, each answer checked against the ABI; then no tap, no module reference
# is left, and the module unloads. The seed is printed; BLKTAP_FUZZ_SEED replays it.
. tests/vm/lib.sh
. tests/vm/stress.sh
load
# Opening a device number nobody serves makes the kernel run modprobe (char-major-M-N,
# block-major-M-N), which costs ~0.5 s under TCG: no module loading in this guest.
echo > /proc/sys/kernel/modprobe
FUZZ=$REPO/userspace/target/release/blktap-fuzz
CALLS=$(scaled 100000)
SEED=${BLKTAP_FUZZ_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
echo "# fuzzer seed $SEED, $CALLS calls (replay: BLKTAP_FUZZ_SEED=$SEED scripts/test --filter t82)"
t0=$(date +%s)
timeout 150 "$FUZZ" --seed "$SEED" --calls "${BLKTAP_FUZZ_CALLS:-$CALLS}" > /tmp/fuzz.out 2>&1
rc=$?
echo "# fuzzer: exit $rc after $(elapsed $t0) s"
sed 's/^/# /' /tmp/fuzz.out | grep -v '^# MISMATCH' | tail -n 30
check "fuzzer (seed $SEED): every answer allowed by the ABI" \
    sh -c "grep -E 'MISMATCH|child|seed' /tmp/fuzz.out | head -n 18; test $rc = 0"
check "no tap left" no_taps_left
check "no module reference left" refcnt_zero
check "rmmod" unload
check "module gone" fails grep -q '^blktap ' /proc/modules
finish
