# The random hostile tapdisk (rogue-tapdisk --mode random): seeded random answers, garbage,
# rsp_prod anywhere, message bytes, duplicates, late or missing RESPONDs, while fio reads and
# writes the tapdev with errors tolerated. fio must end (no request is stuck once the rogue
# settles), and then a good peer serves I/O on the same tap. 3 seeds (x BLKTAP_STRESS_SCALE).
. tests/vm/lib.sh
. tests/vm/stress.sh
load
ROGUE=$REPO/userspace/target/release/rogue-tapdisk
RUNS=$(scaled 3)
BASE=${BLKTAP_FUZZ_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
for r in $(seq 1 $RUNS); do
    seed=$((BASE + r))
    $TAPCTL allocate >/dev/null
    $ROGUE --minor 0 --mode random --count 300 --seed $seed --then-good > /tmp/rogue.log 2>&1 &
    rogue=$!
    check "seed $seed: the random rogue creates its disk" wait_node
    t0=$(date +%s)
    timeout 90 fio --name=chaos --filename=$DEVDIR/tapdev0 --ioengine=io_uring --direct=1 \
        --rw=randrw --bsrange=512-44k --iodepth=8 --continue_on_error=all --time_based \
        --runtime=6 --size=1M --output=/tmp/fio-chaos.out >/dev/null 2>&1
    rc=$?
    echo "# seed $seed: fio exit $rc after $(elapsed $t0) s; $(grep -c ' #[0-9]' /tmp/rogue.log) random actions logged"
    check "seed $seed: fio ends (no stuck request)" test $rc != 124
    check "seed $seed: the kernel refused bad answers" \
        sh -c "! grep -qx 'refused: 0' '$CLASS/blktap!blktap0/debug'"
    kill $rogue 2>/dev/null
    t=0; while kill -0 $rogue 2>/dev/null && [ $t -lt 100 ]; do sleep 0.1; t=$((t+1)); done
    check "seed $seed: the rogue exits on SIGTERM" fails kill -0 $rogue
    kill -9 $rogue 2>/dev/null; wait $rogue
    grep -E 'seed|given|settled' /tmp/rogue.log | head -n 5 | sed 's/^/# /'
    $ROGUE --minor 0 --mode good > /tmp/rogue-good.log 2>&1 &
    rogue=$!
    check "seed $seed: then a good peer on the same tap serves I/O" sh -c \
        "i=0; while [ ! -b $DEVDIR/tapdev0 ] && [ \$i -lt 200 ]; do sleep 0.1; i=\$((i+1)); done; timeout 20 dd if=$DEVDIR/tapdev0 of=/dev/null bs=4k count=16 iflag=direct status=none"
    kill $rogue 2>/dev/null; wait $rogue
    check "seed $seed: the tap is freed" $TAPCTL free -m 0
done
check "no tap left" no_taps_left
check "no module reference left" refcnt_zero
check "rmmod" unload
finish
