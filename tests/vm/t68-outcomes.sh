# What the application sees, against tests/vm/errpeer.py (a peer whose answers the test steers):
# every error status ends the request with EIO (EOPNOTSUPP for -2), for reads and writes, plain
# and FUA, flush and discard; the deadline the disk runs with; a late slot and the ring's death;
# REMOVE_DEVICE while requests are on the ring or wait for a slot; requests that wait for a slot
# (they fail at their deadline, get a slot a late answer frees, and stay out of the ring while
# the disk is paused); a recovery tapdisk's death ends a pause; a read-only disk.
. tests/vm/lib.sh
insmod "$KO" request_timeout=5
$TAPCTL allocate >/dev/null
T="$CLASS/blktap!blktap0"
D=$DEVDIR/tapdev0
CTL=/tmp/errpeer-0.ctl

debug_is() { grep -qx "$1" "$T/debug" || { cat "$T/debug"; false; }; }
# debug_becomes LINE: waits up to 10 s for a line of debug.
debug_becomes() { i=0; while ! grep -qx "$1" "$T/debug" && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; debug_is "$1"; }
# ctl LINE...: the peer's control file, replaced at once.
ctl() { printf '%s\n' "$@" > $CTL.new; mv $CTL.new $CTL; sleep 0.3; }
# ended PID SECS: the process ends within SECS seconds (a request stuck in the kernel does not).
ended() { i=0; while kill -0 "$1" 2>/dev/null && [ $i -lt $(($2 * 10)) ]; do sleep 0.1; i=$((i+1)); done; ! kill -0 "$1" 2>/dev/null; }
# dio ARGS...: tests/vm/dio.py on the tapdev; prints its result, or STUCK if it has not ended
# within 40 s (longer than any deadline here), so a request the kernel never ends fails a check
# instead of hanging the script.
dio() {
    o=$(mktemp)
    python3 tests/vm/dio.py $D "$@" > $o 2>&1 &
    if ended $! 40; then cat $o; else echo STUCK; fi
}
peer_said() { grep -q "$1" /tmp/errpeer.log || { tail -n 20 /tmp/errpeer.log; false; }; }
start_peer() { rm -f $CTL; python3 tests/vm/errpeer.py 0 65536 "$@" >> /tmp/errpeer.log 2>&1 & peer=$!; wait_node; }
# all_late: every slot held by a late request (the peer holds its answers; deadline 1 s).
all_late() {
    ctl "hold 1"
    echo 1 > $T/deadline
    dio reads 32 > /tmp/reads.out
    check "32 held reads fail at the deadline" is "$(cat /tmp/reads.out)" "32 EIO"
    check "every slot is late" debug_is "late: 32"
}

# --- The deadline the disk runs with ---------------------------------------------------------
start_peer
check "the disk appears" test -b $D
check "the disk's timeout is the module parameter's deadline" is "$(cat /sys/block/tda/queue/io_timeout)" 5000
echo 2 > $T/deadline
check "and follows the sysfs deadline" is "$(cat /sys/block/tda/queue/io_timeout)" 2000
echo 30 > $T/deadline

# --- Statuses --------------------------------------------------------------------------------
check "a write answered 0 succeeds" is "$(dio write 0 65536 5a)" OK
check "and reads back" is "$(dio read 0 65536)" "OK 5a"
check "a FUA write answered 0 succeeds" is "$(dio fua 1048576 45056 a5)" OK
check "the peer got it as FUA" peer_said "answer op=fua sector=2048 status=0"
check "and its data arrived" is "$(dio read 1048576 45056)" "OK a5"
for st in -1 1 -5 32767 -32768; do
    ctl "read $st"
    check "a read answered $st fails with EIO" is "$(dio read 0 4096)" EIO
done
ctl "read -2"
check "a read answered -2 fails with EOPNOTSUPP" is "$(dio read 0 4096)" EOPNOTSUPP
ctl "write -1"
check "a write answered -1 fails with EIO" is "$(dio write 0 4096 11)" EIO
ctl "write 3"
check "a write answered 3 fails with EIO" is "$(dio write 0 4096 11)" EIO
ctl "write -2"
check "a write answered -2 fails with EOPNOTSUPP" is "$(dio write 0 4096 11)" EOPNOTSUPP
ctl "fua -1"
check "a FUA write answered -1 fails with EIO" is "$(dio fua 0 4096 11)" EIO
ctl "flush -1"
check "a flush answered -1 fails fsync with EIO" is "$(dio fsync)" EIO
ctl "flush -2"
check "a flush answered -2: fsync succeeds (the block layer's choice)" is "$(dio fsync)" OK
ctl "discard -1"
check "a discard answered -1 fails with EIO" is "$(dio discard 0 1048576)" EIO
ctl "discard -2"
check "a discard answered -2: BLKDISCARD succeeds (the block layer's choice)" is "$(dio discard 0 1048576)" OK
ctl "read 0"
check "the failed writes left the data alone" is "$(dio read 0 65536)" "OK 5a"
check "a flush answered 0 succeeds" is "$(dio fsync)" OK
check "a discard answered 0 succeeds" is "$(dio discard 0 65536)" OK
check "and the range reads zeros" is "$(dio read 0 65536)" "OK 00"
check "error statuses are answers, not refusals" debug_is "refused: 0"

# --- REMOVE_DEVICE with a request on the ring ------------------------------------------------
echo 30 > $T/deadline
ctl "hold 1"
dio read 0 4096 > /tmp/held.out &
r=$!
check "a held request is pending" debug_becomes "pending: 1"
ctl "hold 1" "remove 1"
check "REMOVE_DEVICE while it is on the ring: EBUSY" peer_said "remove 1: EBUSY"
ctl "hold 0"
check "answered, it ends" ended $r 10
check "with its data" is "$(cat /tmp/held.out)" "OK 00"
# The same with a buffered write's writeback at the writer's last close (it syncs while it
# still counts as an opener).
ctl "hold 1"
dd if=/dev/urandom of=$D bs=4k count=1 seek=100 status=none &
w=$!
check "the writeback at the last close is pending" debug_becomes "pending: [1-9][0-9]*"
ctl "hold 1" "remove 3"
check "REMOVE_DEVICE with it on the ring: EBUSY" peer_said "remove 3: EBUSY"
ctl "hold 0"
check "answered, the writeback ends" ended $w 10

# --- A late slot, and the ring's death -------------------------------------------------------
ctl "hold 1"
echo 1 > $T/deadline
check "a held read fails at the deadline" is "$(dio read 0 4096)" EIO
check "its slot stays late" debug_is "late: 1"
kill -9 $peer; wait $peer 2>/dev/null
check "the disk goes with the ring" node_gone
check "the ring's death frees the late slot" debug_is "late: 0"

# --- Requests waiting for a slot -------------------------------------------------------------
start_peer
all_late
echo 3 > $T/deadline
to=$(sed -n 's/^timed_out: //p' $T/debug)
dio read 0 4096 > /tmp/parked.out &
r=$!
check "a request that finds every slot late waits for one" debug_becomes "parked: 1"
ctl "hold 1" "remove 2"
check "REMOVE_DEVICE while a request waits for a slot: EBUSY" peer_said "remove 2: EBUSY"
check "the waiting request ends" ended $r 15
check "with EIO at its deadline" is "$(cat /tmp/parked.out)" EIO
check "it counts as timed out" debug_is "timed_out: $((to + 1))"
check "nothing waits any more" debug_is "parked: 0"

echo 30 > $T/deadline
dio read 0 4096 > /tmp/parked.out &
r=$!
check "another request waits" debug_becomes "parked: 1"
ctl "hold 0"
check "the late answers free the slots" debug_becomes "late: 0"
check "and are dropped" debug_is "late_answers: 32"
check "the waiting request gets a slot and ends" ended $r 10
check "with its data" is "$(cat /tmp/parked.out)" "OK 00"

all_late
echo 30 > $T/deadline
dd if=/dev/urandom of=$D bs=4k count=1 seek=100 status=none &
w=$!
check "a writeback at the last close waits for a slot" debug_becomes "parked: 1"
ctl "hold 1" "remove 4"
check "REMOVE_DEVICE with it waiting for a slot: EBUSY" peer_said "remove 4: EBUSY"
ctl "hold 0"
check "the late answers free a slot for it, and it ends" ended $w 10

all_late
echo 30 > $T/deadline
dio read 0 4096 > /tmp/parked.out &
r=$!
check "a request waits for a slot again" debug_becomes "parked: 1"
echo 1 > $T/pause
check "the peer pauses the disk" debug_becomes "paused: yes"
ctl "hold 0"
check "the late answers free the slots" debug_becomes "late: 0"
sleep 0.5
check "the waiting request stays out of the paused ring" sh -c "grep -qx 'parked: 1' '$T/debug' && grep -qx 'pending: 0' '$T/debug' || { cat '$T/debug'; false; }"
check "it has not ended" kill -0 $r
echo 0 > $T/pause
check "the peer resumes the disk" debug_becomes "paused: no"
check "at RESUME the waiting request gets a slot and ends" ended $r 10
check "with its data" is "$(cat /tmp/parked.out)" "OK 00"
kill $peer; wait $peer
check "the peer removed the disk" node_gone

# --- A recovery tapdisk's death ends a pause and frees late slots -----------------------------
start_peer --flags 0x6c
check "a recovery disk" debug_is "recovery: on"
ctl "hold 1"
echo 1 > $T/deadline
check "a held read fails at the deadline" is "$(dio read 0 4096)" EIO
check "its slot stays late" debug_is "late: 1"
echo 30 > $T/deadline
echo 1 > $T/pause
check "paused" debug_becomes "paused: yes"
kill -9 $peer; wait $peer 2>/dev/null
check "the disk stays when the peer dies" debug_becomes "recovery: waiting for a tapdisk"
check "the pause ended with it" sh -c "grep -qx 'paused: no' '$T/debug' && test \$(cat $T/pause) = 0"
check "and the late slot is free (nobody is left to answer it)" debug_is "late: 0"
rm -f $CTL
python3 tests/vm/errpeer.py 0 65536 --recover >> /tmp/errpeer.log 2>&1 &
peer=$!
check "a new peer attaches" debug_becomes "recovery: on"
check "and serves I/O at once" sh -c "timeout 10 python3 tests/vm/dio.py $D write 0 4096 77 | grep -qx OK"
kill $peer; wait $peer
check "the disk is removed" node_gone

# --- A read-only disk ------------------------------------------------------------------------
start_peer --flags 0x1
check "read-only" is "$(cat /sys/block/tda/ro)" 1
check "refuses writes" fails dd if=/dev/zero of=$D bs=4k count=1 oflag=direct status=none
check "serves reads" is "$(dio read 0 4096)" "OK 00"
kill $peer; wait $peer
node_gone

check "free the tap" $TAPCTL free -m 0
check "rmmod" unload
finish
