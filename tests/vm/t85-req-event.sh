# Wake-up suppression (BLKTAP_DEVICE_REQ_EVENT, 0x100): the kernel signals the ring's poll queue
# of new requests only when the header's req_event asks for it (in (old, new] of what it
# publishes; req_prod + 1 for a staged write; always while req_event is 0).
# (a) the Rust tapdisk negotiates it with BLKTAP_REQ_EVENT=true (not by default): two verifying fio jobs
#     at full speed, and two paced ones (a pause before every request: tapdisk sleeps between
#     them and each must wake it), with and without; suppressed signals are counted (`quiet`)
#     only with it; the same without the spin-wait hint in tapdisk's watch of the rings
#     (BLKTAP_POLL_PAUSE=false);
# (b) the Python peer, with and without staged writes, on an edge-triggered epoll that arms
#     req_event once after serving (a lost signal stalls the disk): the same four jobs;
# (c) a peer that negotiates it and never writes req_event (0): every request is signalled;
# (d) a hostile peer that keeps req_event far ahead: it is never signalled; the application's
#     requests fail with EIO at the deadline (counted, logged); its disk goes with it.
. tests/vm/lib.sh
. tests/vm/stress.sh
load
T="$CLASS/blktap!blktap0"
D=$DEVDIR/tapdev0
# req_event_is N: the disk was made with req_event (1) or without (0).
req_event_is() { grep -q "^features: .* req_event=$1 " "$T/debug" || { cat "$T/debug"; false; }; }
both_ok() { fio_ok s1 && fio_ok s2; }

# verify2 LABEL DEV: a verifying writer (io_uring, QD16) and a verifying randrw job (libaio,
# QD32) at once on disjoint regions, both with crc32c.
verify2() {
    rm -f /tmp/fio-s1.rc /tmp/fio-s2.rc
    run_fio s1 --filename=$2 --ioengine=io_uring --direct=1 --rw=randwrite --bsrange=4k-44k \
        --iodepth=16 --offset=0 --size=6M --verify=crc32c --verify_fatal=1
    run_fio s2 --filename=$2 --ioengine=libaio --direct=1 --rw=randrw --bsrange=512-44k \
        --iodepth=32 --offset=8M --size=6M --verify=crc32c --verify_backlog=8 --verify_fatal=1
    wait_fio_pair s1 s2 120 "$1"
    check "$1: a verifying writer and a verifying randrw job at once, within 120 s" both_ok
}

# paced2 LABEL DEV: the same pair with 3 ms of think time before each request (QD1 and QD2):
# the server sleeps between requests, so each one must be signalled.
paced2() {
    rm -f /tmp/fio-s1.rc /tmp/fio-s2.rc
    run_fio s1 --filename=$2 --ioengine=io_uring --direct=1 --rw=randwrite --bsrange=4k-16k \
        --iodepth=1 --offset=16M --size=512K --thinktime=3000 --verify=crc32c --verify_fatal=1
    run_fio s2 --filename=$2 --ioengine=libaio --direct=1 --rw=randrw --bs=4k --iodepth=2 \
        --offset=20M --size=512K --thinktime=3000 --verify=crc32c --verify_backlog=4 --verify_fatal=1
    wait_fio_pair s1 s2 120 "$1"
    check "$1: two paced verifying jobs (each request after a pause), within 120 s" both_ok
}

# --- (a) the Rust tapdisk --------------------------------------------------------------------
for setting in true default nopause; do
    case $setting in
        true) dev=$(BLKTAP_REQ_EVENT=true $TAPCTL create -a ram:32M); want=1 ;;
        nopause) dev=$(BLKTAP_POLL_PAUSE=false $TAPCTL create -a ram:32M); want=0 ;;
        default) dev=$($TAPCTL create -a ram:32M); want=0 ;;
    esac
    check "tapdisk ($setting): req_event=$want in debug" req_event_is $want
    if [ $setting = nopause ]; then
        check "tapdisk ($setting): the tapdisk serving it has BLKTAP_POLL_PAUSE=false" \
            sh -c 'tr "\0" "\n" < /proc/$(pgrep -n -x tapdisk)/environ | grep -qx BLKTAP_POLL_PAUSE=false'
    fi
    verify2 "tapdisk ($setting)" $dev
    paced2 "tapdisk ($setting)" $dev
    check "tapdisk ($setting): none refused or timed out" \
        sh -c "test $(counter refused) = 0 && test $(counter timed_out) = 0"
    q=$(counter quiet)
    echo "# tapdisk ($setting): $q signals suppressed, $(counter completed) requests"
    if [ $want = 1 ]; then
        check "tapdisk ($setting): signals were suppressed while it polled" test "$q" -gt 0
    else
        check "tapdisk ($setting): every request signalled" is "$q" 0
    fi
    check "tapdisk ($setting): destroy" $TAPCTL destroy -m 0
done

$TAPCTL allocate >/dev/null

# --- (b) the Python peer, armed, with and without staged writes --------------------------------
for flags in 0x100 0x180; do
    python3 tests/vm/pytap.py 0 65536 --flags $flags --epoll-et --req-event armed > /tmp/pytap.log 2>&1 &
    peer=$!
    check "pytap $flags: the disk appears" wait_node
    check "pytap $flags: req_event negotiated" req_event_is 1
    check "pytap $flags: a lone direct read completes within 10 s" \
        bounded 10 dd if=$D of=/dev/null bs=4k count=1 skip=1000 iflag=direct status=none
    check "pytap $flags: a lone direct write completes within 10 s" \
        bounded 10 dd if=/dev/urandom of=$D bs=4k count=1 seek=3000 oflag=direct status=none
    verify2 "pytap $flags" $D
    paced2 "pytap $flags" $D
    check "pytap $flags: none refused or timed out" \
        sh -c "test $(counter refused) = 0 && test $(counter timed_out) = 0"
    stop_peer $peer
    sed 's/^/# /' /tmp/pytap.log
    check "pytap $flags: the peer was woken, and found requests when it looked once more" \
        sh -c "grep -Eq 'epoll wakeups=[1-9]' /tmp/pytap.log && grep -Eq 'req_event rechecks=[0-9]+' /tmp/pytap.log"
    check "pytap $flags: the disk is gone with the peer" node_gone
done

# --- (c) a peer that never writes req_event --------------------------------------------------
python3 tests/vm/pytap.py 0 65536 --flags 0x100 --epoll-et --req-event never > /tmp/pytap.log 2>&1 &
peer=$!
check "never: the disk appears" wait_node
# (The counters are the tap's, over its disks: compare with what they were.)
q0=$(counter quiet); t0=$(counter timed_out)
paced2 "never" $D
check "never: every request signalled (none suppressed), none timed out" \
    sh -c "test $(counter quiet) = $q0 && test $(counter timed_out) = $t0"
stop_peer $peer
check "never: the disk is gone with the peer" node_gone

# --- (d) a hostile peer that keeps req_event ahead: never signalled ------------------------------
python3 tests/vm/pytap.py 0 65536 --flags 0x100 --epoll-et --req-event ahead > /tmp/pytap.log 2>&1 &
peer=$!
check "ahead: the disk appears" wait_node
q0=$(counter quiet); t0=$(counter timed_out)
echo 3 > "$T/deadline"
# The partition scan's reads time out first; then the application's.
i=0; while [ "$(counter pending)" != 0 ] && [ "$(counter late)" = 0 ] && [ $i -lt 150 ]; do
    sleep 0.1; i=$((i + 1)); done
t=$(now)
bounded 30 dd if=$D of=/dev/null bs=4k count=1 skip=77 iflag=direct status=none 2>/tmp/dd.err
rc=$?
el=$(since $t)
echo "# ahead: the read ended after $el s with status $rc: $(cat /tmp/dd.err)"
check "ahead: the read fails with EIO" sh -c "test $rc = 1 && grep -q 'Input/output error' /tmp/dd.err"
check "ahead: ... after the deadline, within 2 x deadline + 5 s" awk "BEGIN { exit !($el >= 2 && $el <= 11) }"
check "ahead: it timed out unanswered (counted, logged), the signals suppressed" \
    sh -c "test $(counter timed_out) -gt $t0 && test $(counter quiet) -gt $q0 && dmesg | grep -q 'blktap0: request in slot [0-9]* (op 0) timed out after 3 s (tapdisk has not answered)'"
stop_peer $peer
check "ahead: the disk is gone with the peer" node_gone
check "free the tap" $TAPCTL free -m 0
check "no tap left" no_taps_left
check "rmmod" unload
