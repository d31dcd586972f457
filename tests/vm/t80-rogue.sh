# A rogue tapdisk sends each malformed response in turn; the kernel refuses each, logs it, and
# the disk stays usable (the rogue then answers correctly) or fails cleanly.
#
# Each mode answers the first read badly and then (--then-good) correctly. The kernel must
# refuse the bad answer itself, for its own reason (the log line and RESPOND's errno say which),
# count exactly that one refusal and the 8 reads as completed, and the application must read the
# good answer's data (rogue-tapdisk's pattern), never what the bad answer left in the pages.
. tests/vm/lib.sh
load
ROGUE=$REPO/userspace/target/release/rogue-tapdisk
debug_is() { grep -qx "$1" "$CLASS/blktap!blktap0/debug" || { cat "$CLASS/blktap!blktap0/debug"; false; }; }
# The good answer's data for sectors 0..N-1 (rogue-tapdisk's `pattern`).
pattern() {
    python3 -c "import struct, sys
sys.stdout.buffer.write(b''.join(struct.pack('<Q', s | 0x5a5a << 48) * 64 for s in range($1)))"
}
pattern 64 > /tmp/pattern-64
# Per mode: the kernel's log line for the refusal, and RESPOND's answer to the bad response.
why() {
    case $1 in
        bad-id) echo "refused response: bad id 1000" ;;
        free-slot) echo "refused response: slot [0-9]* has no request" ;;
        wrong-op) echo "refused response: wrong op 1 for slot 0" ;;
        duplicate) echo "refused response: slot 0 has no request" ;;
        rsp-ahead) echo "refused rsp_prod [0-9]*: more than a ring from rsp_cons" ;;
        garbage) echo "refused" ;;
    esac
}
respond_errno() {
    case $1 in
        rsp-ahead) echo "EIO" ;;
        garbage) echo "EIO\|EINVAL" ;;
        *) echo "EINVAL" ;;
    esac
}

for mode in bad-id free-slot wrong-op duplicate rsp-ahead garbage; do
    $TAPCTL allocate >/dev/null
    $ROGUE --minor 0 --mode $mode --count 1 --then-good > /tmp/rogue.log 2>&1 &
    rogue=$!
    check "$mode: the rogue creates its disk" wait_node
    dmesg -c >/dev/null
    # A request stuck in the kernel cannot be interrupted: if the reads do not end, the rogue
    # is killed, which must fail them, and the check fails.
    dd if=$DEVDIR/tapdev0 of=/tmp/read bs=4k count=8 iflag=direct status=none &
    reader=$!
    t=0; while kill -0 $reader 2>/dev/null && [ $t -lt 100 ]; do sleep 0.1; t=$((t+1)); done
    check "$mode: the reads end" fails kill -0 $reader
    check "$mode: the application read the good answer's data" cmp /tmp/read /tmp/pattern-64
    check "$mode: the kernel refused and logged it" sh -c "dmesg | grep -q 'blktap0: refused'"
    check "$mode: for its reason" sh -c "dmesg | grep -q 'blktap0: $(why $mode)' || { dmesg | grep blktap; false; }"
    check "$mode: RESPOND answered the bad response with $(respond_errno $mode)" \
        sh -c "grep '$mode: ' /tmp/rogue.log | grep -q 'RESPOND failed: .*\($(respond_errno $mode)\)' || { cat /tmp/rogue.log; false; }"
    check "$mode: refusals are counted" sh -c "! grep -qx 'refused: 0' '$CLASS/blktap!blktap0/debug'"
    if [ $mode != garbage ]; then
        check "$mode: exactly one refusal" debug_is "refused: 1"
    fi
    check "$mode: the 8 reads completed, once each" debug_is "completed: 8"
    kill -9 $rogue 2>/dev/null
    wait $reader
    wait $rogue
    # The same again, answered well: the disk stays usable after a rogue's bad answers.
    $ROGUE --minor 0 --mode good > /tmp/rogue-good.log 2>&1 &
    rogue=$!
    sleep 0.2
    check "$mode: then a good peer on the same tap serves I/O" sh -c "wait_node() { i=0; while [ ! -b $DEVDIR/tapdev0 ] && [ \$i -lt 200 ]; do sleep 0.1; i=\$((i+1)); done; }; wait_node; timeout 20 dd if=$DEVDIR/tapdev0 of=/tmp/read bs=4k count=8 iflag=direct status=none && cmp /tmp/read /tmp/pattern-64"
    kill $rogue 2>/dev/null; wait $rogue
    check "$mode: the tap is freed" $TAPCTL free -m 0
done
check "rmmod" unload
finish
