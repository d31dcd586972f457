# nbd: images through real tapdevs, every server on a unix socket in the guest:
#  - nbdkit memory (behind the log filter), qemu-nbd serving a raw file and a qcow2 file: a
#    writer verifying its region and a verify-only reader on another at once, then the server's
#    data against what the tapdev reads;
#  - flush and discard reach the server (its log shows Flush, and Zero with trim=1: a discard is
#    sent as a write-zeroes that may punch holes), and the range reads back as zeros both ways;
#  - the server killed (-9) under two verifying jobs and restarted within the tap's deadline (no
#    error, the data verifies), then killed for good (EIO within the deadline, no hang, destroy
#    works, no minor leaked);
#  - malformed servers (tests/vm/badnbd.py): a broken handshake fails create/open with one line;
#    broken replies to reads mean EIO within a bound or, once the server behaves, its data, never
#    other bytes; the tapdisk and its other tap live on.
. tests/vm/lib.sh
load
cd /tmp
T0=$(now)
BAD=$REPO/tests/vm/badnbd.py

# wait_sock PATH: a server's socket is there (5 s at most).
wait_sock() {
    for i in $(seq 50); do test -S "$1" && return 0; sleep 0.1; done
    echo "no socket $1"; return 1
}
uri() { echo "nbd+unix:///?socket=$1"; }

# region_job DEV OFFSET SEED: 4 MiB of crc32c-headed blocks at OFFSET (the verify-only reader
# checks what the same job wrote).
region_job() {
    echo "--filename=$1 --direct=1 --rw=randwrite --bsrange=4k-64k --offset=$2 --size=4M" \
         "--randseed=$3 --ioengine=libaio --iodepth=16 --verify=crc32c"
}

# prefill LABEL DEV: the reader's region, 24-28 MiB.
prefill() {
    run_fio pre$1 $(region_job $2 24M 7) --do_verify=0
    wait $!
    fio_ok pre$1
}

# start_two LABEL DEV [FIO ARGS...]: a writer verifying as it goes on 8-12 MiB and a verify-only
# reader of 24-28 MiB, in the background ($a and $b).
start_two() {
    l=$1 d=$2; shift 2
    run_fio w$l --filename=$d --ioengine=io_uring --direct=1 --rw=randwrite --bsrange=512-64k \
        --iodepth=16 --offset=8M --size=4M --verify=crc32c --verify_backlog=16 --verify_fatal=1 "$@"
    a=$!
    run_fio r$l $(region_job $d 24M 7) --verify_only --verify_fatal=1 "$@"
    b=$!
}

# start_looping LABEL DEV: as start_two, with the writer rate-limited to 1 MiB/s and the reader
# verifying its region again and again (fio does not throttle a verify-only job) until
# /tmp/stop-rLABEL exists or a pass fails; every pass's report goes to /tmp/fio-rLABEL.out.
start_looping() {
    l=$1 d=$2
    run_fio w$l --filename=$d --ioengine=io_uring --direct=1 --rw=randwrite --bsrange=512-64k \
        --iodepth=16 --offset=8M --size=4M --verify=crc32c --verify_backlog=16 --verify_fatal=1 \
        --rate=1m
    a=$!
    rm -f /tmp/fio-r$l.rc /tmp/fio-r$l.out /tmp/fio-r$l.err /tmp/stop-r$l
    {
        rc=0 p=0
        while [ ! -e /tmp/stop-r$l ] && [ $rc = 0 ] && [ $p -lt 200 ]; do
            fio --name=r$l $(region_job $d 24M 7) --verify_only --verify_fatal=1 \
                --output=/tmp/fio-r$l.pass >/dev/null 2>>/tmp/fio-r$l.err
            rc=$?; p=$((p + 1))
            cat /tmp/fio-r$l.pass >> /tmp/fio-r$l.out
        done
        echo "# r$l: $p passes" >> /tmp/fio-r$l.out
        echo $rc > /tmp/fio-r$l.rc
    } &
    b=$!
}

# two_jobs LABEL DEV: both jobs, to the end; both verify.
two_jobs() {
    start_two $1 $2
    wait $a $b
    fio_ok w$1 && fio_ok r$1
}

# --- nbdkit memory, behind the log filter ---------------------------------------------------------
S=/tmp/mem.sock
nbdkit --unix $S --pidfile /tmp/mem.pid --filter=log memory 64M logfile=/tmp/mem.log
check "nbdkit memory is up" wait_sock $S
dev=$($TAPCTL create -a "nbd:$(uri $S)")
check "create -a nbd: on nbdkit memory prints the tapdev" is "$dev" "$DEVDIR/tapdev0"
check "the disk is 64 MiB" is "$(cat /sys/block/tda/size)" 131072
check "nbdkit memory: the reader's region is written" prefill mem $dev
check "nbdkit memory: a writer and a verify-only reader at once, both verify" two_jobs mem $dev
check "nbdkit memory: the server holds what the tapdev reads" sh -c \
    "nbdcopy '$(uri $S)' /tmp/mem.srv && dd if=$dev of=/tmp/mem.tap bs=1M iflag=direct status=none && cmp /tmp/mem.srv /tmp/mem.tap"

# Flush: an fsync of the disk, and fio fsyncing every 4 writes.
flushes() { grep -c ' Flush id=' /tmp/mem.log; }
f0=$(flushes)
head -c 1M /dev/urandom > /tmp/one.bin
check "a write with fsync on the tapdev" dd if=/tmp/one.bin of=$dev bs=64k seek=640 oflag=direct conv=fsync status=none
f1=$(flushes)
check "the fsync reached the server as NBD_CMD_FLUSH ($f0 -> $f1)" test "$f1" -gt "$f0"
check "fio, an fsync every 4 of 64 writes" fio --name=fsync --filename=$dev --rw=write --bs=4k \
    --offset=44M --size=256k --fsync=4 --ioengine=psync --direct=1 --output=/tmp/fio-fsync.out
f2=$(flushes)
# (the block layer may merge a flush into one in flight: not one per fsync, but most)
check "the fsyncs reached the server ($f1 -> $f2, at least 8 more)" test "$f2" -ge $((f1 + 8))
# Discard: 1 MiB at 40 MiB, written with data first.
check "1 MiB of data at 40 MiB" dd if=/tmp/one.bin of=$dev bs=64k seek=640 oflag=direct status=none
check "blkdiscard 1 MiB at 40 MiB" blkdiscard -o 40M -l 1M $dev
check "the discard reached the server as a write-zeroes that may trim" \
    grep -Eq ' Zero id=[0-9]+ offset=0x2800000 count=0x100000 trim=1' /tmp/mem.log
check "the tapdev reads the discarded range as zeros" sh -c \
    "dd if=$dev bs=64k skip=640 count=16 iflag=direct status=none | cmp - /dev/zero 2>&1 | grep -q EOF"
check "so does the server" sh -c \
    "nbdcopy '$(uri $S)' /tmp/mem.srv && dd if=/tmp/mem.srv bs=64k skip=640 count=16 status=none | cmp - /dev/zero 2>&1 | grep -q EOF &&
     dd if=$dev of=/tmp/mem.tap bs=1M iflag=direct status=none && cmp /tmp/mem.srv /tmp/mem.tap"
check "destroy" $TAPCTL destroy -m 0
kill $(cat /tmp/mem.pid)

# --- qemu-nbd: a raw file and a qcow2 file ---------------------------------------------------------
truncate -s 64M /tmp/q.raw
qemu-img create -q -f qcow2 /tmp/q.qcow2 64M
for f in raw qcow2; do
    S=/tmp/q$f.sock
    qemu-nbd --fork -t -k $S -f $f --discard=unmap --pid-file /tmp/q$f.pid /tmp/q.$f
    check "qemu-nbd serves the $f file" wait_sock $S
    dev=$($TAPCTL create -a "nbd:$(uri $S)")
    check "create -a nbd: on qemu-nbd ($f)" is "$dev" "$DEVDIR/tapdev0"
    check "qemu-nbd $f: the reader's region is written" prefill q$f $dev
    check "qemu-nbd $f: a writer and a verify-only reader at once, both verify" two_jobs q$f $dev
    check "qemu-nbd $f: blkdiscard 1 MiB, which reads back as zeros" sh -c \
        "dd if=/tmp/one.bin of=$dev bs=64k seek=640 oflag=direct status=none && blkdiscard -o 40M -l 1M $dev &&
         dd if=$dev bs=64k skip=640 count=16 iflag=direct status=none | cmp - /dev/zero 2>&1 | grep -q EOF"
    dd if=$dev of=/tmp/q$f.tap bs=1M iflag=direct status=none
    check "destroy" $TAPCTL destroy -m 0
    kill $(cat /tmp/q$f.pid)
    check "qemu-nbd ($f) exits" sh -c "for i in \$(seq 50); do test -e /proc/$(cat /tmp/q$f.pid) || exit 0; sleep 0.1; done; exit 1"
    check "qemu-img compare: the $f file holds what the tapdev read" \
        qemu-img compare -q -f $f -F raw /tmp/q.$f /tmp/q$f.tap
done

# --- The server killed under I/O --------------------------------------------------------------------
# nbdkit file; the tap's deadline is 8 s (-t), which is also how long the client waits for a
# request's answer (the tap's deadline bounds the client's, 30 s by default).
truncate -s 64M /tmp/k.raw
S=/tmp/k.sock
serve_k() { rm -f $S; nbdkit --unix $S --pidfile /tmp/k.pid file /tmp/k.raw && wait_sock $S; }
check "nbdkit file is up" serve_k
dev=$($TAPCTL create -a "nbd:$(uri $S)" -t 8 --log /tmp/td-k.log)
check "create -a nbd: -t 8 on nbdkit file" is "$dev" "$DEVDIR/tapdev0"
check "the reader's region is written" prefill k $dev
start_looping k1 $dev
sleep 1.5
check "both jobs run when the server is killed" sh -c "kill -0 $a && kill -0 $b"
kill -9 $(cat /tmp/k.pid)
sleep 2
check "the server is restarted on the same socket and file, 2 s later" serve_k
wait $a
touch /tmp/stop-rk1
wait $b
grep '^# rk1' /tmp/fio-rk1.out
check "the writer saw no error and verified every block" fio_ok wk1
check "the reader saw no error and verified every block" fio_ok rk1
check "tapdisk reconnected and sent the unanswered requests again" grep -q 'reconnected, sending' /tmp/td-k.log
dd if=$dev of=/tmp/k.tap bs=1M iflag=direct status=none
check "the file holds what the tapdev reads" cmp /tmp/k.raw /tmp/k.tap

# Killed for good: both jobs end with EIO within the deadline plus a bound.
start_looping k2 $dev
sleep 1.5
check "both jobs run when the server is killed for good" sh -c "kill -0 $a && kill -0 $b"
kill -9 $(cat /tmp/k.pid)
t=$(now)
# eio_by NAME SECONDS: fio NAME ended SECONDS after the kill at most, failing with EIO, and no
# block was bad.
eio_by() {
    while [ ! -e /tmp/fio-$1.rc ] && [ "$(since $t | cut -d. -f1)" -lt $2 ]; do sleep 0.1; done
    test -e /tmp/fio-$1.rc || { echo "fio $1 still running"; return 1; }
    cat /tmp/fio-$1.out /tmp/fio-$1.err | grep -E 'err=|error' | head -n 4
    test "$(cat /tmp/fio-$1.rc)" != 0 && grep -Eq 'err= *5|Input/output error' /tmp/fio-$1.out /tmp/fio-$1.err &&
        test "$(bad_blocks $1)" = 0
}
check "the writer ends with EIO within 8 + 12 s, no block bad" eio_by wk2 20
check "the reader ends with EIO within 8 + 12 s, no block bad" eio_by rk2 20
echo "# both jobs ended within $(since $t) s of the kill"
# fails_by SECONDS CMD...: CMD fails (not a timeout) within SECONDS.
fails_by() { bounded "$@"; rc=$?; echo "# exit $rc"; test $rc != 0 && test $rc != 124; }
check "a direct read fails with EIO within 8 + 7 s" fails_by 15 \
    dd if=$dev of=/dev/null bs=4k count=1 iflag=direct status=none
check "sync returns" bounded 15 sync
check "destroy returns and works" bounded 20 $TAPCTL destroy -m 0
check "no tap left" is "$($TAPCTL list)" ""
check "and no minor leaked" sh -c "$TAPCTL allocate | grep -qx $DEVDIR/tapdev0 && $TAPCTL free -m 0"

# --- Malformed servers --------------------------------------------------------------------------
# One tapdisk: tap A on ram: beside, and a tap per malformed server.
tpid=$($TAPCTL spawn)
ma=$($TAPCTL allocate); ma=${ma##*tapdev}
$TAPCTL attach -p $tpid -m $ma && $TAPCTL open -p $tpid -m $ma -a ram:4M
head -c 256k /dev/urandom > /tmp/ram.bin
check "tapdisk $tpid serves tap $ma on ram:" \
    dd if=/tmp/ram.bin of=$DEVDIR/tapdev$ma bs=64k oflag=direct status=none
# alive: the tapdisk lives and tap A reads back what was written to it.
alive() {
    kill -0 $tpid && dd if=$DEVDIR/tapdev$ma bs=64k count=4 iflag=direct status=none | cmp - /tmp/ram.bin
}
# only_tap_a: tap-ctl list shows tap A alone (no other tap, no minor left allocated).
only_tap_a() { $TAPCTL list; test "$($TAPCTL list | wc -l)" = 1 && $TAPCTL list | grep -q "minor=$ma "; }
# fails_one_line FILE CMD...: CMD fails (within 15 s) with one line of error naming the server.
fails_one_line() {
    f=$1; shift
    bounded 15 "$@" 2>$f; rc=$?
    cat $f; echo "# exit $rc"
    test $rc != 0 && test $rc != 124 && test "$(wc -l < $f)" = 1 && grep -q 'NBD server' $f
}
# bad_up NAME ARGS...: badnbd.py ARGS on /tmp/bad-NAME.sock; bad_down NAME.
bad_up() {
    n=$1; shift
    rm -f /tmp/bad-$n.sock
    python3 $BAD /tmp/bad-$n.sock "$@" 2>/tmp/bad-$n.log &
    echo $! > /tmp/bad-$n.pid
    wait_sock /tmp/bad-$n.sock
}
bad_down() { kill $(cat /tmp/bad-$1.pid); }

for mode in bad-magic oldstyle short-greeting huge-opt-reply refused no-size greeting-stall; do
    bad_up $mode $mode
    check "$mode: tap-ctl create fails with one line" fails_one_line /tmp/create-$mode.err \
        $TAPCTL create -a "nbd:$(uri /tmp/bad-$mode.sock)"
    echo "# $(head -c 300 /tmp/create-$mode.err)"
    check "$mode: no tap left, no minor leaked" only_tap_a
    m=$($TAPCTL allocate); m=${m##*tapdev}
    $TAPCTL attach -p $tpid -m $m
    check "$mode: open on tapdisk $tpid fails with one line" fails_one_line /tmp/open-$mode.err \
        $TAPCTL open -p $tpid -m $m -a "nbd:$(uri /tmp/bad-$mode.sock)"
    check "$mode: the tap detaches and frees" sh -c "$TAPCTL detach -p $tpid -m $m && $TAPCTL free -m $m"
    check "$mode: tapdisk $tpid and tap $ma live" alive
    bad_down $mode
done

# Broken replies to reads of 1-2 MiB (the trap), after a good handshake; -t 3: the tap's
# deadline. "always": the fault on every connection; "once": on the first only (not for stall:
# a request unanswered past the deadline fails).
EXPECT=/tmp/expect.bin
python3 $BAD --expect $((1 << 20)) 65536 > $EXPECT
python3 $BAD --expect 0 65536 > /tmp/expect0.bin
REPLY_MODES="reply-magic short-reply oversized unknown-cookie outside partial stall error"
NAMES=
for mode in $REPLY_MODES; do
    NAMES="$NAMES $mode-always"
    bad_up $mode-always $mode
    [ $mode = stall ] && continue
    NAMES="$NAMES $mode-once"
    bad_up $mode-once $mode --once
done
for n in $NAMES; do
    m=$($TAPCTL allocate); m=${m##*tapdev}
    echo $m > /tmp/minor-$n
    $TAPCTL attach -p $tpid -m $m
    check "$n: open -t 3 on tap $m" $TAPCTL open -p $tpid -m $m -a "nbd:$(uri /tmp/bad-$n.sock)" -t 3
done
# Every tap reads its trap at once.
t=$(now)
for n in $NAMES; do
    ( dd if=$DEVDIR/tapdev$(cat /tmp/minor-$n) of=/tmp/read-$n bs=64k skip=16 count=1 iflag=direct \
          status=none 2>/tmp/read-$n.err
      echo $? > /tmp/read-$n.rc ) &
done
# read_ended NAME: the trap read of NAME ended (12 s at most after they began).
read_ended() {
    while [ ! -e /tmp/read-$1.rc ] && [ "$(since $t | cut -d. -f1)" -lt 12 ]; do sleep 0.1; done
    cat /tmp/read-$1.err
    test -e /tmp/read-$1.rc || { echo "still reading"; return 1; }
}
trap_eio() {
    read_ended $1 && test "$(cat /tmp/read-$1.rc)" = 1 && grep -q 'Input/output error' /tmp/read-$1.err &&
        test ! -s /tmp/read-$1
}
trap_data() { read_ended $1 && test "$(cat /tmp/read-$1.rc)" = 0 && cmp /tmp/read-$1 $EXPECT; }
for n in $NAMES; do
    case $n in
    *-always) check "$n: the read fails with EIO within 3 + 9 s, nothing read" trap_eio $n ;;
    *-once) check "$n: the read gets the server's data after the fault" trap_data $n ;;
    esac
done
echo "# the trap reads ended within $(since $t) s"
# close_tap MINOR: close (within 15 s), detach and free.
close_tap() { bounded 15 $TAPCTL close -p $tpid -m $1 && $TAPCTL detach -p $tpid -m $1 && $TAPCTL free -m $1; }
for n in $NAMES; do
    m=$(cat /tmp/minor-$n)
    check "$n: outside the trap the tap reads the server's data" sh -c \
        "dd if=$DEVDIR/tapdev$m bs=64k count=1 iflag=direct status=none | cmp - /tmp/expect0.bin"
    check "$n: close, detach and free the tap" close_tap $m
    echo "# $n: $(grep -c '^badnbd: connection [0-9]*$' /tmp/bad-$n.log) connections"
    bad_down $n
done
check "tapdisk $tpid and tap $ma live after every malformed server" alive
check "destroy tap $ma" $TAPCTL destroy -p $tpid -m $ma
check "no tap left" is "$($TAPCTL list)" ""
check "the tapdisk exits when idle" sh -c \
    "for i in \$(seq 50); do test -e /proc/$tpid && ! grep -q '^State:.*Z' /proc/$tpid/status || exit 0; sleep 0.1; done; exit 1"

echo "# t97 took $(since $T0) s"
check "rmmod" unload
finish
