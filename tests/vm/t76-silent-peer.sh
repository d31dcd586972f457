# A live but silent peer: (a) a tap-ctl tapdisk stopped with SIGSTOP, under a mounted ext4;
# (b) the Python peer in --silent mode (it then reads the ring on its poll timeout as well);
# (c) the Python peer in --silent mode that then waits on an edge-triggered epoll, as tapdisk
# does. With a 2 s deadline: fio at depth 64 (more than the 32 ring slots) ends with EIO, and 64
# direct reads at once (dd) each end with EIO, all within a bound (3 x deadline + 5 s;
# measured); sync returns; the file system unmounts. Then the peer wakes up (SIGCONT, SIGUSR2):
# it must get the requests that went late while it slept and answer them; the late answers are
# dropped (late_answers > 0, refused 0), the disk is usable again (fio crc32c verify, 2 jobs)
# and removable. (d) A live peer that leaves one request unanswered (one late slot): batches of
# 32 reads (more than the free slots) must all succeed.
. tests/vm/lib.sh
load
mkdir -p /tmp/mnt
T="$CLASS/blktap!blktap0"
D=$DEVDIR/tapdev0
DL=2
# A request ends at most its deadline after it starts, plus up to a second (blk-mq's timeout
# timer); 64 direct reads at once need two rounds of the 32 tags.
BOUND=$((3 * DL + 5))
# fio at depth 64: the same two rounds, plus fio's own start-up (seconds under TCG).
FIO_BOUND=$((6 * DL + 8))

# within SECONDS T: `since T` is at most SECONDS.
within() { le "$(since $2)" $1; }
# le ELAPSED SECONDS: ELAPSED is at most SECONDS.
le() { awk -v s="$1" -v m="$2" 'BEGIN { exit !(s <= m) }' || { echo "took $1 s, more than $2 s"; false; }; }

# stuck_reads LABEL DEV: fio at depth 64 must end with EIO, and then 64 direct 4 KiB reads at
# once (64 dd processes) must each end with EIO; each within BOUND seconds.
stuck_reads() {
    t=$(now)
    bounded $FIO_BOUND fio --name=stuck --filename=$2 --ioengine=libaio --direct=1 --rw=randread \
        --bs=4k --iodepth=64 --iodepth_batch_submit=64 --size=32M --output=/tmp/stuck.out >/dev/null 2>&1
    rc=$? el=$(since $t)
    echo "# $1: fio at depth 64 ended in $el s, status $rc (deadline $DL s)"
    check "$1: fio at depth 64 ends within $FIO_BOUND s" le $el $FIO_BOUND
    check "$1: ... with EIO" sh -c "test $rc != 124 && grep -q 'err= 5' /tmp/stuck.out || { grep 'err=' /tmp/stuck.out; false; }"
    rm -f /tmp/dd-*
    t=$(now)
    for i in $(seq 1 64); do
        ( dd if=$2 of=/dev/null bs=4k count=1 skip=$((i * 16)) iflag=direct 2>/tmp/dd-$i.err
          echo $? > /tmp/dd-$i.rc ) &
    done
    i=0; while [ "$(ls /tmp/dd-*.rc 2>/dev/null | wc -l)" -lt 64 ] && [ $i -lt $((BOUND * 10)) ]; do
        sleep 0.1; i=$((i + 1)); done
    el=$(since $t)
    echo "# $1: $(ls /tmp/dd-*.rc 2>/dev/null | wc -l) of 64 direct reads ended in $el s"
    check "$1: 64 direct reads at once each end within $BOUND s" \
        sh -c "test \$(ls /tmp/dd-*.rc | wc -l) = 64 && awk 'BEGIN { exit !($el <= $BOUND) }'"
    check "$1: ... each with EIO" \
        sh -c "test \$(cat /tmp/dd-*.rc | grep -c '^1$') = 64 && test \$(grep -l 'Input/output error' /tmp/dd-*.err | wc -l) = 64"
    check "$1: no request is left waiting for a slot" is "$(counter parked)" 0
}

# woken LABEL: after the peer wakes up, the requests that went late are answered: every late
# slot frees, the late answers are dropped and none refused.
woken() {
    i=0; while [ "$(counter late)" != 0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    sed 's/^/# /' "$T/debug"
    check "$1: every late slot freed" is "$(counter late)" 0
    check "$1: the late answers were dropped" test "$(counter late_answers)" -ge 32
    check "$1: none refused" is "$(counter refused)" 0
}

# fio_verify DEV: two jobs at once on disjoint halves of the first 16 MiB, crc32c verify.
fio_verify() {
    fio --name=v1 --filename=$1 --ioengine=io_uring --direct=1 --rw=randwrite --bsrange=4k-44k \
        --iodepth=16 --offset=0 --size=8M --verify=crc32c --verify_fatal=1 --output=/tmp/v1.out >/dev/null 2>&1 &
    a=$!
    fio --name=v2 --filename=$1 --ioengine=libaio --direct=1 --rw=randwrite --bsrange=512-44k \
        --iodepth=32 --offset=8M --size=8M --verify=crc32c --verify_fatal=1 --output=/tmp/v2.out >/dev/null 2>&1
    rb=$?
    wait $a; ra=$?
    test $ra = 0 && test $rb = 0 && grep -q 'err= 0' /tmp/v1.out && grep -q 'err= 0' /tmp/v2.out \
        || { grep -h 'err=' /tmp/v1.out /tmp/v2.out; false; }
}

# usable LABEL: the disk serves fio verify again (a 10 s deadline: below the guest's 20 s
# hung-task limit even if it does not).
usable() {
    echo 10 > "$T/deadline"
    check "$1: the disk works again (fio crc32c verify, 2 jobs)" bounded 120 fio_verify $D
}

# --- (a) tapdisk stopped with SIGSTOP ---------------------------------------------------------
truncate -s 64M /tmp/s.raw
dev=$($TAPCTL create -a aio:/tmp/s.raw)
pid=$(cat "$T/task")
check "mkfs.ext4 and mount" sh -c "mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 $dev && mount -o no_prefetch_block_bitmaps $dev /tmp/mnt"
sync
echo $DL > "$T/deadline"
kill -STOP $pid
# (The file system is clean: no writeback competes with the reads for the 32 tags; each request
# ends at its deadline, but one that waits for a tag behind others has not started yet.)
stuck_reads "SIGSTOP" $dev
check "SIGSTOP: the 32 slots are late" is "$(counter late)" 32
# sync has a dirty file to write: its writes fail at their deadline.
head -c 4M /dev/urandom > /tmp/mnt/dirty
t=$(now)
bounded 60 sync
check "SIGSTOP: sync returns within 20 s" within 20 $t
echo "# SIGSTOP: sync took $(since $t) s"
t=$(now)
bounded 60 umount /tmp/mnt 2>/tmp/umount.err
check "SIGSTOP: umount returns within 20 s" within 20 $t
echo "# SIGSTOP: umount took $(since $t) s ($(cat /tmp/umount.err))"
check "SIGSTOP: the file system is unmounted" sh -c "! grep -q ' /tmp/mnt ' /proc/mounts"
check "SIGSTOP: requests timed out" test "$(counter timed_out)" -ge 64
kill -CONT $pid
woken "SIGCONT"
usable "SIGCONT"
check "SIGCONT: destroy" bounded 60 $TAPCTL destroy -m 0
if [ -e /proc/$pid ] && ! grep -q '^State:.*Z' /proc/$pid/status; then
    # Not destroyed: end the tapdisk, so that what follows starts from no tap.
    kill -9 $pid
    sleep 1
    bounded 30 $TAPCTL free -m 0
fi

# --- (b) a Python peer that does not answer until SIGUSR2 -----------------------------------------
# silent_peer LABEL ARGS...: the Python peer with --silent ARGS on tap 0; the checks above; SIGUSR2.
silent_peer() {
    label=$1; shift
    check "$label: tap 0 allocated" is "$($TAPCTL allocate)" $D
    python3 tests/vm/pytap.py 0 65536 --silent "$@" > /tmp/pytap.log 2>&1 &
    peer=$!
    i=0; while [ ! -b $D ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
    check "$label: the disk appears" test -b $D
    echo $DL > "$T/deadline"
    stuck_reads "$label" $D
    check "$label: the 32 slots are late" is "$(counter late)" 32
    # Buffered writes, then sync: their writeback fails at the deadline.
    t=$(now)
    bounded 60 dd if=/dev/urandom of=$D bs=64k count=32 status=none 2>/dev/null
    bounded 60 sync
    check "$label: write + sync return within 20 s" within 20 $t
    echo "# $label: write + sync took $(since $t) s"
    # A single direct write, too: EIO within the bound, not a hang.
    t=$(now)
    bounded $BOUND dd if=/dev/zero of=$D bs=4k count=1 oflag=direct 2>/tmp/dd.err
    rc=$? el=$(since $t)
    echo "# $label: a direct write ended in $el s, status $rc"
    check "$label: a direct write fails with EIO within $BOUND s" \
        sh -c "cat /tmp/dd.err; test $rc != 0 && test $rc != 124 && grep -q 'Input/output error' /tmp/dd.err && awk 'BEGIN { exit !($el <= $BOUND) }'"
    kill -USR2 $peer
    woken "$label, SIGUSR2"
    usable "$label, SIGUSR2"
    kill $peer
    i=0; while kill -0 $peer 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    kill -9 $peer 2>/dev/null
    wait $peer
    sed 's/^/# /' /tmp/pytap.log
    check "$label: the peer removed its disk" sh -c "sleep 0.5; test ! -e $D"
    check "$label: free the tap" bounded 30 $TAPCTL free -m 0
}
silent_peer "silent peer"
# --- (c) the same, then waiting on an edge-triggered epoll (as tapdisk does) ----------------------
silent_peer "silent peer, then epoll-et" --epoll-et

# --- (d) one late slot under a live peer: a batch larger than the free slots ---------------------
# The peer answers everything but the requests at sector 8, so one slot goes late while it is
# alive. fio then submits 32 reads at once (one batch, 32 free tags, 31 free slots): the one that
# finds no slot waits for one, and the 31 others go on the ring and are answered. None may fail.
label="one late slot"
check "$label: tap 0 allocated" is "$($TAPCTL allocate)" $D
python3 tests/vm/pytap.py 0 65536 --ignore-sector 8 > /tmp/pytap.log 2>&1 &
peer=$!
i=0; while [ ! -b $D ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
check "$label: the disk appears" test -b $D
echo $DL > "$T/deadline"
check "$label: the read the peer ignores fails with EIO" \
    sh -c "! dd if=$D of=/dev/null bs=4k count=1 skip=1 iflag=direct 2>/tmp/dd.err && grep -q 'Input/output error' /tmp/dd.err"
check "$label: its slot is late" is "$(counter late)" 1
bounded 60 fio --name=batch --filename=$D --ioengine=libaio --direct=1 --rw=randread --bs=4k \
    --offset=1M --size=8M --iodepth=32 --iodepth_batch_submit=32 --time_based --runtime=5 \
    --continue_on_error=all --output-format=json --output=/tmp/batch.json >/dev/null 2>&1
sed 's/^/# /' "$T/debug"
check "$label: fio's batches of 32 all succeed (none waits past its deadline)" python3 -c "
t = open('/tmp/batch.json').read()
import json
j = json.loads(t[t.index('{'):])['jobs'][0]
print('reads', j['read']['total_ios'], 'errors', j['total_err'])
assert j['total_err'] == 0 and j['read']['total_ios'] >= 64, j['total_err']"
kill -USR2 $peer
i=0; while [ "$(counter late)" != 0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
check "$label: the ignored request's late answer frees its slot" \
    sh -c "test \$(sed -n 's/^late: //p' '$T/debug') = 0 && test \$(sed -n 's/^late_answers: //p' '$T/debug') -ge 1"
kill $peer
i=0; while kill -0 $peer 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
kill -9 $peer 2>/dev/null
wait $peer
check "$label: free the tap" bounded 30 $TAPCTL free -m 0

check "no tap left" sh -c "test -z \"\$(ls $CLASS | grep '^blktap!')\""
check "rmmod" unload
finish
