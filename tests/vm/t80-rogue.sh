# A rogue tapdisk sends each malformed response in turn; the kernel refuses each, logs it, and
# the disk stays usable (the rogue then answers correctly) or fails cleanly.
. tests/vm/lib.sh
load
ROGUE=$REPO/userspace/target/release/rogue-tapdisk
wait_node() { i=0; while [ ! -b $DEVDIR/tapdev0 ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done; test -b $DEVDIR/tapdev0; }

for mode in bad-id free-slot wrong-op duplicate rsp-ahead garbage; do
    $TAPCTL allocate >/dev/null
    $ROGUE --minor 0 --mode $mode --count 1 --then-good > /tmp/rogue.log 2>&1 &
    rogue=$!
    check "$mode: the rogue creates its disk" wait_node
    dmesg -c >/dev/null
    # A request stuck in the kernel cannot be interrupted: if the reads do not end, the rogue
    # is killed, which must fail them, and the check fails.
    dd if=$DEVDIR/tapdev0 of=/dev/null bs=4k count=8 iflag=direct status=none &
    reader=$!
    t=0; while kill -0 $reader 2>/dev/null && [ $t -lt 100 ]; do sleep 0.1; t=$((t+1)); done
    check "$mode: the reads end" fails kill -0 $reader
    kill -9 $rogue 2>/dev/null
    wait $reader
    check "$mode: the kernel refused and logged it" sh -c "dmesg | grep -q 'blktap0: refused'"
    check "$mode: refusals are counted" sh -c "! grep -qx 'refused: 0' '$CLASS/blktap!blktap0/debug'"
    wait $rogue
    # The same again, answered well: the disk stays usable after a rogue's bad answers.
    $ROGUE --minor 0 --mode good > /tmp/rogue-good.log 2>&1 &
    rogue=$!
    sleep 0.2
    check "$mode: then a good peer on the same tap serves I/O" sh -c "wait_node() { i=0; while [ ! -b $DEVDIR/tapdev0 ] && [ \$i -lt 200 ]; do sleep 0.1; i=\$((i+1)); done; }; wait_node; timeout 20 dd if=$DEVDIR/tapdev0 of=/dev/null bs=4k count=8 iflag=direct status=none"
    kill $rogue 2>/dev/null; wait $rogue
    check "$mode: the tap is freed" $TAPCTL free -m 0
done
check "rmmod" unload
finish
