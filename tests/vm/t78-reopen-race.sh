# Ring close against a new opener of the same minor (issue 9, cause 4): a tapdisk is killed
# (kill -9) while a mounted ext4 on its tapdev is being written, and at once
#  A. a new tapdisk takes the same minor (spawned beforehand; tap-ctl attach retried while the
#     old ring is still open: EBUSY; then tap-ctl open);
#  B. the Python peer, spinning on open() of the same ring (EBUSY) since before the kill, maps it
#     and creates its disk;
#  C. the Python peer, spinning on FREE_TAP (EBUSY) since before the kill, frees the tap,
#     allocates it again (ALLOC_TAP), maps the new ring and creates its disk.
# Every round: CREATE_DEVICE never fails (no EEXIST; the runner fails the test on sysfs's stack
# dump too), the new peer sees no request it did not cause (the old file system keeps trying to
# write: no WRITE may reach the new ring), the old file system unmounts, the new disk works.
# Rounds scale with BLKTAP_STRESS_SCALE.
. tests/vm/lib.sh
. tests/vm/stress.sh
load
T0=$(date +%s)
ROUNDS=$(scaled 5)
T="$CLASS/blktap!blktap0"
D=$DEVDIR/tapdev0
mkdir -p /tmp/mnt
truncate -s 64M /tmp/r.raw /tmp/r2.raw
head -c 256k /dev/urandom > /tmp/probe

# wait_log PATTERN SECONDS: waits until /tmp/pytap.log has a line matching PATTERN.
wait_log() {
    i=0; while ! grep -Eq "$1" /tmp/pytap.log && [ $i -lt $(($2 * 10)) ]; do sleep 0.1; i=$((i + 1)); done
    grep -Eq "$1" /tmp/pytap.log
}

# old_tap: a tapdisk on tap 0 (allocated) with ext4 mounted and 2 writers writing files with
# fsync in a loop (going on after errors) until /tmp/stop exists. Sets pid and writers.
old_tap() {
    dev=$($TAPCTL create -m 0 -a aio:/tmp/r.raw) || return 1
    pid=$(cat "$T/task")
    mkfs.ext4 -q -F $dev && mount $dev /tmp/mnt || return 1
    rm -f /tmp/stop
    writers=
    for w in 1 2; do
        (
            i=0
            while [ ! -e /tmp/stop ]; do
                i=$((i + 1))
                dd if=/tmp/probe of=/tmp/mnt/w$w-$((i % 8)) bs=64k conv=fsync status=none 2>/dev/null \
                    || sleep 0.05
            done
        ) &
        writers="$writers $!"
    done
    sleep 1
}

# end_old: stops the writers and unmounts the old file system; counts what did not end.
end_old() {
    touch /tmp/stop
    for w in $writers; do
        i=0; while kill -0 $w 2>/dev/null && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
        kill -0 $w 2>/dev/null && { echo "# a writer is stuck"; stuck=$((stuck + 1)); }
    done
    bounded 30 umount /tmp/mnt 2>/dev/null || { echo "# umount failed"; stuck=$((stuck + 1)); }
}

# new_disk_works: 256 KiB written and read back through tapdev0.
new_disk_works() {
    bounded 20 dd if=/tmp/probe of=$D bs=64k oflag=direct status=none &&
        bounded 20 dd if=$D of=/tmp/probe.out bs=64k count=4 iflag=direct status=none &&
        cmp /tmp/probe /tmp/probe.out
}

# peer_ops: the op counts of the running Python peer.
peer_ops() { rm -f /tmp/pytap-0.ops; kill -USR1 $peer; i=0; while [ ! -s /tmp/pytap-0.ops ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done; cat /tmp/pytap-0.ops; }

$TAPCTL allocate >/dev/null

# --- A. a new tapdisk through tap-ctl -----------------------------------------------------------
# A second tapdisk is spawned beforehand and `tap-ctl attach` (which opens and maps the ring)
# retried while the old tapdisk holds the ring (EBUSY) from before the kill; then `tap-ctl open`
# creates the disk.
stuck=0; setup=0; noattach=0; eexist=0; other=0; broken=0; raced=0
for r in $(seq 1 $ROUNDS); do
    old_tap || { setup=$((setup + 1)); continue; }
    tpid=$($TAPCTL spawn)
    (
        n=0
        while :; do
            rc=$(errno_of $TAPCTL attach -p $tpid -m 0)
            [ $rc = 16 ] && [ $n -lt 1000 ] || break
            n=$((n + 1))
        done
        echo "$rc $n" > /tmp/attach.res
    ) &
    att=$!
    sleep 0.5
    kill -9 $pid
    wait $att
    read arc n < /tmp/attach.res
    [ $n -gt 0 ] && raced=$((raced + 1))
    orc=$(errno_of $TAPCTL open -p $tpid -m 0 -a aio:/tmp/r2.raw)
    echo "# A round $r: tap-ctl attach: status $arc after $n EBUSY retries; open: status $orc"
    [ $arc = 0 ] || noattach=$((noattach + 1))
    case $orc in 0) ;; 17) eexist=$((eexist + 1)) ;; *) other=$((other + 1)) ;; esac
    end_old
    [ $orc = 0 ] && { new_disk_works || broken=$((broken + 1)); }
    timeout 30 $TAPCTL destroy -p $tpid -m 0 2>/dev/null || timeout 30 $TAPCTL free -m 0
    $TAPCTL allocate >/dev/null
done
check "A: every round set up (tapdisk, ext4, writers)" test $setup = 0
echo "# A: the attach met EBUSY first (a race) in $raced of $ROUNDS rounds"
check "A: the new tapdisk's attach raced the dying one (EBUSY first)" test $raced -gt 0
check "A: tap-ctl attach to the minor of a killed tapdisk always succeeded" test $noattach = 0
check "A: tap-ctl open (CREATE_DEVICE) on it: never EEXIST" test $eexist = 0
check "A: ... and no other failure" test $other = 0
check "A: the new disk works" test $broken = 0
check "A: the old file system's writers ended and it unmounted" test $stuck = 0

# --- B. the Python peer opening the same ring ---------------------------------------------------
stuck=0; setup=0; nocreate=0; stray=0; broken=0
for r in $(seq 1 $ROUNDS); do
    old_tap || { setup=$((setup + 1)); continue; }
    python3 tests/vm/pytap.py 0 65536 --open-retry 30 > /tmp/pytap.log 2>&1 &
    peer=$!
    wait_log '^pytap: opening the ring' 20
    sleep 0.3
    kill -9 $pid
    if wait_log '^pytap: serving' 30; then
        sleep 1  # the old file system's writers go on meanwhile
        ops=$(peer_ops)
        echo "# B round $r: $(grep 'busy tries' /tmp/pytap.log | sed 's/pytap: //'); new ring: $ops"
        echo "$ops" | grep -q ' write=0 ' || stray=$((stray + 1))
    else
        nocreate=$((nocreate + 1))
        echo "# B round $r: no disk:"; sed 's/^/#   /' /tmp/pytap.log
    fi
    end_old
    new_disk_works || broken=$((broken + 1))
    kill $peer 2>/dev/null; wait $peer
    i=0; while [ -b $D ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
done
check "B: every round set up" test $setup = 0
check "B: the peer waiting on the ring's open always created its disk" test $nocreate = 0
check "B: no WRITE reached the new ring that its peer did not cause" test $stray = 0
check "B: the new disk works" test $broken = 0
check "B: the old file system's writers ended and it unmounted" test $stuck = 0

# --- C. FREE_TAP + ALLOC_TAP by the Python peer --------------------------------------------------
stuck=0; setup=0; nocreate=0; stray=0; broken=0
for r in $(seq 1 $ROUNDS); do
    old_tap || { setup=$((setup + 1)); continue; }
    python3 tests/vm/pytap.py 0 65536 --free-alloc --open-retry 30 > /tmp/pytap.log 2>&1 &
    peer=$!
    wait_log '^pytap: freeing' 20
    sleep 0.3
    kill -9 $pid
    if wait_log '^pytap: serving' 30; then
        sleep 1
        ops=$(peer_ops)
        echo "# C round $r: $(grep 'freed tap' /tmp/pytap.log | sed 's/pytap: //'); new ring: $ops"
        echo "$ops" | grep -q ' write=0 ' || stray=$((stray + 1))
    else
        nocreate=$((nocreate + 1))
        echo "# C round $r: no disk:"; sed 's/^/#   /' /tmp/pytap.log
    fi
    end_old
    new_disk_works || broken=$((broken + 1))
    kill $peer 2>/dev/null; wait $peer
    i=0; while [ -b $D ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
done
check "C: every round set up" test $setup = 0
check "C: FREE_TAP, ALLOC_TAP and CREATE_DEVICE against the dying ring never failed" test $nocreate = 0
check "C: no WRITE reached the new ring that its peer did not cause" test $stray = 0
check "C: the new disk works" test $broken = 0
check "C: the old file system's writers ended and it unmounted" test $stuck = 0

check "free the tap" $TAPCTL free -m 0
check "no tap left" no_taps_left
check "no tapdisk left" sh -c "! pgrep -x tapdisk"
check "rmmod" unload
echo "# reopen races total $(elapsed $T0) s"
finish
