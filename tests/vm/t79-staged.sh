# Staged writes (BLKTAP_DEVICE_STAGED_WRITES, 0x80): a write's data is copied into its slot in
# tapdisk's context (its poll of the ring, RESPOND, PAUSE, REMOVE_DEVICE), not in queue_rq.
# (a) the Rust tapdisk negotiates it (and does not with BLKTAP_STAGED_WRITES=false or
#     --no-extensions); two verifying fio jobs at once with each setting;
# (b) the Python peer with 0x80 polling, on an edge-triggered epoll without ever reading the
#     header's `staged` (the poll must fetch the writes), and holding answers (RESPOND when
#     `staged` says so): two verifying fio jobs at once;
# (c) a hostile peer that answers the slot of a staged write before the write is on the ring
#     (in the room a read it holds leaves): the answer is refused (EINVAL, counted, logged); the
#     write then succeeds when the peer really answers it, and its data reads back;
# (d) a silent peer with 0x80: staged writes fail with EIO at their deadline, and were never
#     carried out (the region keeps its old data once the peer serves again); their slots are
#     free at once (no late slot);
# (e) the peer killed with writes staged: they fail at once, and the disk goes;
# (f) with RECOVERY: writes staged when the peer dies wait for the next peer, which learns of
#     them from the header (it does not poll) and fetches them (with their data) by RESPOND;
#     the writer sees success and the data reads back.
. tests/vm/lib.sh
. tests/vm/stress.sh
load
T="$CLASS/blktap!blktap0"
D=$DEVDIR/tapdev0
# staged_is N: the disk was made with staged writes (1) or without (0).
staged_is() { grep -q "^features: .* staged_writes=$1 " "$T/debug" || { cat "$T/debug"; false; }; }
both_ok() { fio_ok s1 && fio_ok s2; }
# bg_dd ARGS...: dd in the background; its status goes to /tmp/dd.rc, its messages to /tmp/dd.err.
bg_dd() { rm -f /tmp/dd.rc; ( dd "$@" status=none 2>/tmp/dd.err; echo $? > /tmp/dd.rc ) & }
# dd_done SECONDS: waits up to SECONDS for it; prints its status (124 if still running).
dd_done() {
    i=0; while [ ! -s /tmp/dd.rc ] && [ $i -lt $(($1 * 10)) ]; do sleep 0.1; i=$((i + 1)); done
    cat /tmp/dd.rc 2>/dev/null || echo 124
}

# verify2 LABEL DEV: a verifying writer (io_uring, QD16) and a verifying randrw job (libaio,
# QD32) at once on disjoint regions, both with crc32c.
verify2() {
    rm -f /tmp/fio-s1.rc /tmp/fio-s2.rc
    run_fio s1 --filename=$2 --ioengine=io_uring --direct=1 --rw=randwrite --bsrange=4k-44k \
        --iodepth=16 --offset=0 --size=6M --verify=crc32c --verify_fatal=1
    run_fio s2 --filename=$2 --ioengine=libaio --direct=1 --rw=randrw --bsrange=512-44k \
        --iodepth=32 --offset=8M --size=6M --verify=crc32c --verify_backlog=8 --verify_fatal=1
    # Bounded: a staged write nobody fetches would stall them.
    wait_fio_pair s1 s2 120 "$1"
    check "$1: a verifying writer and a verifying randrw job at once, within 120 s" both_ok
}

# --- (a) the Rust tapdisk --------------------------------------------------------------------
for setting in default false no-ext; do
    case $setting in
        default) dev=$($TAPCTL create -a ram:32M); want=1 ;;
        false) dev=$(BLKTAP_STAGED_WRITES=false $TAPCTL create -a ram:32M); want=0 ;;
        no-ext) dev=$($TAPCTL create --no-extensions -a ram:32M); want=0 ;;
    esac
    check "tapdisk ($setting): staged_writes=$want in debug" staged_is $want
    verify2 "tapdisk ($setting)" $dev
    check "tapdisk ($setting): nothing staged, refused or timed out" \
        sh -c "grep -qx 'staged: 0' '$T/debug' && grep -qx 'refused: 0' '$T/debug' && grep -qx 'timed_out: 0' '$T/debug'"
    check "tapdisk ($setting): destroy" $TAPCTL destroy -m 0
done

$TAPCTL allocate >/dev/null

# --- (b) the Python peer with staged writes ----------------------------------------------------
# (--poll-only: the peer never reads `staged`; its epoll's poll of the ring must fetch them.)
for mode in plain "epoll-et --poll-only" "hold 16"; do
    case $mode in plain) extra= ;; hold*) extra="--hold 16" ;; *) extra="--$mode" ;; esac
    python3 tests/vm/pytap.py 0 32768 --flags 0x80 $extra > /tmp/pytap.log 2>&1 &
    peer=$!
    check "pytap $mode: the disk appears" wait_node
    check "pytap $mode: staged writes negotiated" staged_is 1
    # One write alone: nothing else brings the peer to RESPOND.
    check "pytap $mode: a lone direct write completes within 10 s" \
        bounded 10 dd if=/dev/urandom of=$D bs=4k count=1 seek=4000 oflag=direct status=none
    verify2 "pytap $mode" $D
    check "pytap $mode: none refused, none timed out, none left staged" \
        sh -c "test $(counter refused) = 0 && test $(counter timed_out) = 0 && test $(counter staged) = 0"
    stop_peer $peer
    sed 's/^/# /' /tmp/pytap.log
    check "pytap $mode: the peer saw the writes" grep -Eq 'ops read=[1-9][0-9]* write=[1-9]' /tmp/pytap.log
    check "pytap $mode: the disk is gone with the peer" node_gone
done

# --- (c) a peer that answers a staged write's slot before the write is on the ring -----------
head -c 4K /dev/urandom > /tmp/w4k
python3 tests/vm/pytap.py 0 32768 --flags 0x80 --guess-staged 800 > /tmp/pytap.log 2>&1 &
peer=$!
check "guess: the disk appears" wait_node
# The peer holds the read of sector 800 ...
rm -f /tmp/rd.rc
( dd if=$D of=/tmp/r4k bs=4k skip=100 count=1 iflag=direct status=none; echo $? > /tmp/rd.rc ) &
i=0; while [ "$(counter pending)" != 1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
check "guess: the peer holds a read" is "$(counter pending)" 1
# ... and answers the slot of this write while it is staged.
bg_dd if=/tmp/w4k of=$D bs=4k seek=200 count=1 oflag=direct
rc=$(dd_done 20)
i=0; while [ ! -s /tmp/rd.rc ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
sed 's/^/# /' /tmp/pytap.log
check "guess: the kernel refused the guessed answer (EINVAL)" grep -Eq '^pytap: guessed slot [0-9]+: EINVAL$' /tmp/pytap.log
check "guess: ... counted" is "$(counter refused)" 1
check "guess: ... logged: the slot has no request on the ring" \
    sh -c "dmesg | grep -Eq 'blktap0: refused response: slot [0-9]+ has no request'"
check "guess: the write then succeeds, answered by the peer" test "$rc" = 0
check "guess: the held read succeeds" is "$(cat /tmp/rd.rc)" 0
check "guess: the write's data reads back" \
    sh -c "dd if=$D bs=4k skip=200 count=1 iflag=direct status=none | cmp - /tmp/w4k"
check "guess: nothing staged or pending" sh -c "test $(counter staged) = 0 && test $(counter pending) = 0"
stop_peer $peer
check "guess: the disk is gone with the peer" node_gone

# --- (d) a silent peer: staged writes time out and are never carried out ----------------------
head -c 64K /dev/urandom > /tmp/old
truncate -s 16M /tmp/st.img
python3 tests/vm/pytap.py 0 32768 --flags 0x80 --file /tmp/st.img > /tmp/pytap.log 2>&1 &
peer=$!
check "silent: the disk appears" wait_node
check "silent: write the old data" dd if=/tmp/old of=$D bs=64K seek=16 oflag=direct status=none
stop_peer $peer
check "silent: the disk is gone" node_gone
python3 tests/vm/pytap.py 0 32768 --flags 0x80 --file /tmp/st.img --silent > /tmp/pytap.log 2>&1 &
peer=$!
check "silent: the disk appears again" wait_node
echo 2 > "$T/deadline"
t=$(now)
bounded 20 dd if=/dev/zero of=$D bs=64K seek=16 count=1 oflag=direct status=none 2>/tmp/dd.err
rc=$?
el=$(since $t)
echo "# silent: the write ended after $el s with status $rc: $(cat /tmp/dd.err)"
check "silent: the staged write fails with EIO" sh -c "test $rc = 1 && grep -q 'Input/output error' /tmp/dd.err"
check "silent: ... within 2 x deadline + 5 s" awk "BEGIN { exit !($el <= 9) }"
check "silent: it timed out staged (counted, logged)" \
    sh -c "test $(counter timed_out) -ge 1 && dmesg | grep -q 'blktap0: staged write in slot [0-9]* (op 1) timed out after 2 s'"
check "silent: its slot is free, not late; nothing staged" sh -c "test $(counter late) = 0 && test $(counter staged) = 0"
kill -USR2 $peer
echo 30 > "$T/deadline"
check "silent: once the peer serves, the region still holds the old data" \
    sh -c "dd if=$D bs=64K skip=16 count=1 iflag=direct status=none | cmp - /tmp/old"
verify2 "silent, woken" $D
stop_peer $peer
check "silent: the disk is gone with the peer" node_gone

# --- (e) the peer dies with writes staged ---------------------------------------------------
python3 tests/vm/pytap.py 0 32768 --flags 0x80 --silent > /tmp/pytap.log 2>&1 &
peer=$!
check "death: the disk appears" wait_node
bg_dd if=/dev/urandom of=$D bs=4k count=8 oflag=direct
i=0; while [ "$(counter staged)" = 0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
check "death: a write is staged" test "$(counter staged)" -ge 1
t=$(now)
kill -9 $peer; wait $peer 2>/dev/null
rc=$(dd_done 20)
el=$(since $t)
echo "# death: the writer ended $el s after the peer's death, status $rc: $(cat /tmp/dd.err)"
check "death: the staged write fails with EIO, at once" \
    sh -c "test $rc = 1 && grep -q 'Input/output error' /tmp/dd.err && awk 'BEGIN { exit !($el <= 10) }'"
check "death: the disk goes" node_gone

# --- (f) recovery: staged writes wait for the next peer ----------------------------------------
head -c 256K /dev/urandom > /tmp/rec
python3 tests/vm/pytap.py 0 32768 --flags 0xc0 --silent > /tmp/pytap.log 2>&1 &
peer=$!
check "recovery: the disk appears" wait_node
# The disk's first reads (partition scan) go late and are dropped with the peer: then only
# the staged writes are left for the next one (no answer of another request fetches them).
echo 2 > "$T/deadline"
i=0; while [ "$(counter pending)" != 0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo 30 > "$T/deadline"
check "recovery: nothing on the ring before the write" is "$(counter pending)" 0
bg_dd if=/tmp/rec of=$D bs=64K seek=4 oflag=direct
i=0; while [ "$(counter staged)" = 0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
check "recovery: a write is staged" test "$(counter staged)" -ge 1
kill -9 $peer; wait $peer 2>/dev/null
sleep 1
check "recovery: the disk stays, the write waits" \
    sh -c "test -b $D && test ! -e /tmp/dd.rc && grep -qx 'recovery: waiting for a tapdisk' '$T/debug' && grep -Eqx 'staged: [1-9][0-9]*' '$T/debug'"
# The new peer never polls: the header's staged count must tell it.
python3 tests/vm/pytap.py 0 32768 --flags 0xc0 --recover --no-poll > /tmp/pytap2.log 2>&1 &
peer=$!
rc=$(dd_done 30)
check "recovery: only the staged writes were kept" sh -c "! dmesg | grep -q 'blktap0: ring mapped again; re-issued'"
check "recovery: the writer succeeds once the new peer maps the ring" sh -c "test $rc = 0 || { cat /tmp/dd.err; false; }"
check "recovery: the data reads back" sh -c "dd if=$D bs=64K skip=4 count=4 iflag=direct status=none | cmp - /tmp/rec"
verify2 "recovery" $D
stop_peer $peer
sed 's/^/# /' /tmp/pytap2.log
check "free the tap" $TAPCTL free -m 0
check "no tap left" no_taps_left
check "rmmod" unload
finish
