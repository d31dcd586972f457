# The lifecycle with the Rust tapdisk and tap-ctl: fio with verification across 20 pause/unpause
# cycles (one of them swapping to a copy of the image), across 10 kill -9s each followed by a
# recovery, and request deadlines with a backend that stalls on purpose.
. tests/vm/lib.sh
load
T="$CLASS/blktap!blktap0"

# fio_loop NAME DEV: runs passes of two fio jobs at once, each writing and verifying its own
# 12 MiB (0-12 and 16-28 MiB), until /tmp/stop-NAME exists; fails at the first pass with an
# error or a failed verify in either job.
fio_loop() {
    n=0
    while [ ! -e /tmp/stop-$1 ]; do
        n=$((n + 1))
        fio --filename="$2" --ioengine=io_uring --direct=1 --rw=randwrite --bsrange=4k-44k \
            --iodepth=8 --size=12M --verify=crc32c --do_verify=1 --verify_fatal=1 --randseed=$n \
            --output=/tmp/fio-$1.out --name=a$n --offset=0 --name=b$n --offset=16M >/dev/null 2>&1 \
        && [ "$(grep -c 'err= 0' /tmp/fio-$1.out)" = 2 ] \
        || { echo "pass $n failed"; cat /tmp/fio-$1.out; return 1; }
        echo "pass $n ok"
    done
}

wait_paused() { # wait_paused 0|1
    i=0; while [ "$(cat $T/pause)" != "$1" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    test "$(cat $T/pause)" = "$1"
}

# --- 20 pause/unpause cycles under fio ------------------------------------------------------
truncate -s 32M /tmp/p.raw
dev=$($TAPCTL create -a aio:/tmp/p.raw)
pid=$(cat "$T/task")
rm -f /tmp/stop-p
fio_loop p "$dev" > /tmp/loop-p.log 2>&1 &
loop=$!
sleep 2
bad=0
for c in $(seq 1 20); do
    $TAPCTL pause -p "$pid" -m 0 || { echo "pause $c failed"; bad=1; }
    wait_paused 1 || { echo "not paused at $c"; bad=1; }
    if [ $c = 10 ]; then
        # The image is released while paused: copy it, and go on on the copy.
        cp /tmp/p.raw /tmp/p2.raw || bad=1
        $TAPCTL unpause -p "$pid" -m 0 -a aio:/tmp/p2.raw || { echo "unpause -a failed"; bad=1; }
    else
        sleep 0.2
        $TAPCTL unpause -p "$pid" -m 0 || { echo "unpause $c failed"; bad=1; }
    fi
    wait_paused 0 || { echo "not resumed at $c"; bad=1; }
    sleep 0.5
done > /tmp/cycles.log 2>&1
touch /tmp/stop-p
wait $loop; st=$?
check "20 pause/unpause cycles, each acknowledged" sh -c "cat /tmp/cycles.log; test $bad = 0"
check "fio saw no error and verify passed in every pass" sh -c "cat /tmp/loop-p.log; test $st = 0"
check "fio ran during the cycles" sh -c "test \$(grep -c ok /tmp/loop-p.log) -ge 2"
check "list names the copy after the swap" sh -c "$TAPCTL list -m 0 | grep -q 'aio:/tmp/p2.raw'"
check "unpause onto a smaller image is refused, and the tap stays paused" sh -c "
    truncate -s 16M /tmp/small.raw && $TAPCTL pause -p $pid -m 0 &&
    ! $TAPCTL unpause -p $pid -m 0 -a aio:/tmp/small.raw && test \$(cat $T/pause) = 1 &&
    $TAPCTL unpause -p $pid -m 0"
check "destroy" $TAPCTL destroy -p "$pid" -m 0
check "the copy holds what fio wrote last" sh -c "! cmp -s /tmp/p.raw /tmp/p2.raw"

# --- 10 kill -9s with recovery under fio ------------------------------------------------------
truncate -s 32M /tmp/r.raw
dev=$($TAPCTL create --recovery -a aio:/tmp/r.raw)
check "a recovery tap" grep -qx 'recovery: on' "$T/debug"
rm -f /tmp/stop-r
fio_loop r "$dev" > /tmp/loop-r.log 2>&1 &
loop=$!
bad=0
for k in $(seq 1 10); do
    sleep 1.5
    pid=$(cat "$T/task")
    [ -n "$pid" ] || { echo "no tapdisk at $k"; bad=1; continue; }
    # Stopped first, so that the jobs' requests pile up on the ring: the kill finds them in
    # flight (unless fio is between passes), however fast the backend answers.
    kill -STOP "$pid"
    sleep 0.5
    kill -9 "$pid"
    i=0; while [ -n "$(cat $T/task)" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    grep -qx 'recovery: waiting for a tapdisk' "$T/debug" || { echo "not waiting at $k"; cat "$T/debug"; bad=1; }
    $TAPCTL recover -m 0 -a aio:/tmp/r.raw > /dev/null || { echo "recover $k failed"; bad=1; }
done > /tmp/kills.log 2>&1
sleep 1
touch /tmp/stop-r
wait $loop; st=$?
check "10 kill -9s, each followed by a recovery" sh -c "cat /tmp/kills.log; test $bad = 0"
check "fio saw no I/O error and verify passed" sh -c "cat /tmp/loop-r.log; test $st = 0"
# A kill that finds requests in flight keeps them: those on the ring are written again for the
# next tapdisk (debug's reissued), staged writes are handed over staged (not counted there);
# that they all reached it and completed is what fio's verify above shows.
check "some kill found requests in flight, and they were kept" sh -c "dmesg | grep -Eq 'blktap0: ring unmapped; keeping the disk and [1-9][0-9]* requests'"
check "destroy the recovered tap" $TAPCTL destroy -m 0
check "no tap left" is "$($TAPCTL list)" ""

# --- Deadlines with a stalling backend --------------------------------------------------------
dev=$($TAPCTL create -a stall:10000:8M)
echo 1 > "$T/deadline"
start=$(date +%s)
check "a request the backend stalls fails at the deadline" sh -c "! dd if=$dev of=/dev/null bs=4k count=1 iflag=direct 2>/tmp/dd.err && grep -q 'Input/output error' /tmp/dd.err"
check "at the deadline, not the backend's delay" test $(( $(date +%s) - start )) -lt 8
check "its slot stays reserved" grep -qx 'late: 1' "$T/debug"
i=0; while ! grep -qx 'late: 0' "$T/debug" && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
check "tapdisk's late answer is dropped cleanly" sh -c "grep -qx 'late: 0' '$T/debug' && grep -qx 'late_answers: 1' '$T/debug' && grep -qx 'refused: 0' '$T/debug'"
echo 30 > "$T/deadline"
check "with a longer deadline the stalled request completes" dd if=$dev of=/dev/null bs=4k count=1 iflag=direct status=none
check "destroy" $TAPCTL destroy -m 0
check "rmmod" unload
finish
