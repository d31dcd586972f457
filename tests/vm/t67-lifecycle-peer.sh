# The lifecycle extensions against the independent Python peer: negotiated flush, FUA and
# discard; request deadlines with late answers; pause and resume through the ring's message
# byte; recovery of a disk whose peer died.
. tests/vm/lib.sh
insmod "$KO" request_timeout=7
$TAPCTL allocate >/dev/null
T="$CLASS/blktap!blktap0"
D=$DEVDIR/tapdev0

debug_is() { grep -qx "$1" "$T/debug" || { cat "$T/debug"; false; }; }
ops() { kill -USR1 "$1"; sleep 0.3; cat /tmp/pytap-0.ops; }

# --- Negotiation -----------------------------------------------------------------------------
check "the module parameter sets the deadline of new taps" is "$(cat $T/deadline)" 7
python3 - <<'PY' > /tmp/neg.out 2>&1
import ctypes, errno, mmap, os, struct
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open("/dev/xen/blktap-2/blktap0", os.O_RDWR)
m = mmap.mmap(fd, 4096 * 353, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
def create(flags):
    buf = ctypes.create_string_buffer(struct.pack("QIIQ4Q", 2048, 512, 512, flags, 0, 0, 0, 0))
    r = libc.ioctl(fd, ctypes.c_ulong(208), buf)
    return "OK" if r == 0 else errno.errorcode[ctypes.get_errno()]
def ioc(cmd):
    r = libc.ioctl(fd, ctypes.c_ulong(cmd), 0)
    return "OK" if r == 0 else errno.errorcode[ctypes.get_errno()]
print("pause-nodisk", ioc(204))
print("resume-nodisk", ioc(206))
print("fua-without-flush", create(0x20))
print("unknown-flag", create(0x10))
print("all", create(0x4 | 0x8 | 0x20 | 0x40))
print("pause", ioc(204))
print("pause-again", ioc(204))
print("resume", ioc(206))
print("remove", ioc(207))
PY
check "PAUSE without a disk: ENODEV" grep -qx 'pause-nodisk ENODEV' /tmp/neg.out
check "RESUME without a disk: ENODEV" grep -qx 'resume-nodisk ENODEV' /tmp/neg.out
check "FUA without FLUSH: EINVAL" grep -qx 'fua-without-flush EINVAL' /tmp/neg.out
check "an unknown flag: EINVAL" grep -qx 'unknown-flag EINVAL' /tmp/neg.out
check "every extension at once" grep -qx 'all OK' /tmp/neg.out
check "PAUSE, twice, and RESUME" sh -c "grep -qx 'pause OK' /tmp/neg.out && grep -qx 'pause-again OK' /tmp/neg.out && grep -qx 'resume OK' /tmp/neg.out"
check "REMOVE_DEVICE after them" grep -qx 'remove OK' /tmp/neg.out

python3 tests/vm/pytap.py 0 65536 --flags 0x2c > /tmp/pytap.log 2>&1 &
peer=$!
check "a negotiating peer's disk appears" wait_node
check "write cache advertised" is "$(cat /sys/block/tda/queue/write_cache)" "write back"
check "FUA advertised" is "$(cat /sys/block/tda/queue/fua)" 1
check "discard advertised, 1 GiB at most" is "$(cat /sys/block/tda/queue/discard_max_hw_bytes)" 1073741824
check "debug shows the features" debug_is "features: flush=1 fua=1 discard=1 staged_writes=0 req_event=0 large=0"
check "write data" dd if=/dev/urandom of=$D bs=44k count=100 oflag=direct status=none
check "fsync reaches the peer as FLUSH" python3 -c "import os; fd=os.open('$D', os.O_RDWR); os.write(fd, b'x'*4096); os.fsync(fd)"
check "O_DSYNC direct writes reach the peer as FUA" dd if=/dev/zero of=$D bs=4k count=4 oflag=direct,dsync status=none
check "blkdiscard of 8 MiB" blkdiscard -o 0 -l 8M $D
check "the discarded range reads as zeros" cmp -n 8M /dev/zero $D
o=$(ops $peer)
check "the peer saw FLUSH" sh -c "echo '$o' | grep -q 'flush=[1-9]'"
check "the peer saw FUA writes" sh -c "echo '$o' | grep -q 'fua=[1-9]'"
check "the peer saw DISCARD" sh -c "echo '$o' | grep -q 'discard=[1-9]'"
check "and nothing it did not ask for" sh -c "echo '$o' | grep -q 'other=0 '"
stop_peer $peer

# --- Deadlines -------------------------------------------------------------------------------
python3 tests/vm/pytap.py 0 65536 --delay 10 > /tmp/pytap.log 2>&1 &
peer=$!
wait_node
echo 1 > $T/deadline
check "deadline reads back" is "$(cat $T/deadline)" 1
check "deadline 0 is refused" is "$(write_attr $T/deadline 0)" EINVAL
check "deadline above a day is refused" is "$(write_attr $T/deadline 86401)" EINVAL
start=$(date +%s)
check "a read the peer answers late fails with EIO" sh -c "! dd if=$D of=/dev/null bs=4k count=1 iflag=direct 2>/tmp/dd.err && grep -q 'Input/output error' /tmp/dd.err"
check "within the deadline, not the peer's delay" test $(( $(date +%s) - start )) -lt 8
check "debug counts the timeout" debug_is "timed_out: 1"
check "the slot stays reserved while the peer may write into it" debug_is "late: 1"
check "the timeout is logged" sh -c "dmesg | grep -q 'blktap0: request in slot 0 (op 0) timed out after 1 s'"
i=0; while ! grep -qx 'late: 0' "$T/debug" && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
check "the late answer is dropped cleanly" sh -c "grep -qx 'late: 0' '$T/debug' && grep -qx 'late_answers: 1' '$T/debug' && grep -qx 'refused: 0' '$T/debug'"
echo 30 > $T/deadline
check "with a longer deadline the slow peer's answer arrives" dd if=$D of=/dev/null bs=4k count=1 iflag=direct status=none
stop_peer $peer
check "the tap's other counters are sane" debug_is "pending: 0"

# --- Pause and resume ------------------------------------------------------------------------
python3 tests/vm/pytap.py 0 65536 > /tmp/pytap.log 2>&1 &
peer=$!
wait_node
check "pause reads 0 while running" is "$(cat $T/pause)" 0
dd if=/dev/urandom of=/tmp/pdata bs=4k count=3072 status=none
dd if=/tmp/pdata of=$D bs=4k skip=2048 seek=2048 count=1024 oflag=direct status=none
rm -f /tmp/resumed
# Two writers (each its own 4 MiB) and a reader checking a third 4 MiB, each going round until
# the tap has resumed, so that all three are mid-I/O when the pause lands however fast the guest
# runs; any failed or short pass ends its loop with an error.
pwriter() {
    while :; do
        dd if=/tmp/pdata of=$D bs=4k skip=$1 seek=$1 count=1024 oflag=direct conv=notrunc \
            status=none || exit 1
        [ -e /tmp/resumed ] && exit 0
    done
}
preader() {
    while :; do
        dd if=$D bs=4k skip=2048 count=1024 iflag=direct status=none > /tmp/pread || exit 1
        dd if=/tmp/pdata bs=4k skip=2048 count=1024 status=none | cmp - /tmp/pread || exit 1
        [ -e /tmp/resumed ] && exit 0
    done
}
pwriter 0 2>/tmp/pdd0.err &
w0=$!
pwriter 1024 2>/tmp/pdd1.err &
w1=$!
preader 2>/tmp/prd.err &
r0=$!
sleep 0.5
check "the writers and the reader are running before the pause" kill -0 $w0 $w1 $r0
echo 1 > $T/pause
i=0; while [ "$(cat $T/pause)" != 1 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
check "the peer paused on the ring message" is "$(cat $T/pause)" 1
check "debug shows it" debug_is "paused: yes"
sleep 0.5
a=$(ops $peer | sed 's/.*read=\([0-9]*\).*write=\([0-9]*\).*/\1 \2/')
sleep 1.5
b=$(ops $peer | sed 's/.*read=\([0-9]*\).*write=\([0-9]*\).*/\1 \2/')
check "no request reaches the ring while paused" is "$b" "$a"
check "the writers and the reader wait, none is failed" kill -0 $w0 $w1 $r0
check "nothing pending on the ring" debug_is "pending: 0"
echo 0 > $T/pause
i=0; while [ "$(cat $T/pause)" != 0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
check "the peer resumed" is "$(cat $T/pause)" 0
touch /tmp/resumed
check "the first writer finishes without an error" wait $w0
check "the second writer finishes without an error" wait $w1
check "the reader read its data whole throughout" wait $r0
check "the data is whole" sh -c "dd if=$D bs=4k count=3072 iflag=direct status=none | cmp - /tmp/pdata"
check "pause accepts only 0 and 1" is "$(write_attr $T/pause 2)" EINVAL
stop_peer $peer
check "pause without a ring mapped: ENXIO" is "$(write_attr $T/pause 1)" ENXIO

# --- Recovery --------------------------------------------------------------------------------
echo 30 > $T/deadline
truncate -s 32M /tmp/rec.img
# The first peer answers each request 50 ms late, so both writers (each its own half) are surely
# mid-request when the peer is killed; the second answers at once.
python3 tests/vm/pytap.py 0 65536 --flags 0x40 --file /tmp/rec.img --delay 0.05 > /tmp/pytap.log 2>&1 &
peer=$!
wait_node
check "debug shows recovery on" debug_is "recovery: on"
dd if=/dev/urandom of=/tmp/rdata bs=4k count=1024 status=none
dd if=/tmp/rdata of=$D bs=4k count=512 oflag=direct status=none 2>/tmp/rdd.err &
writer=$!
dd if=/tmp/rdata of=$D bs=4k skip=512 seek=512 count=512 oflag=direct conv=notrunc status=none \
    2>/tmp/rdd2.err &
writer2=$!
sleep 1
check "both writers are running when the peer is killed" kill -0 $writer $writer2
kill -9 $peer; wait $peer 2>/dev/null
sleep 0.5
check "the disk stays when the peer dies" test -b $D
check "the requests in flight are kept" sh -c "dmesg | grep -Eq 'keeping the disk and [12] requests for recovery'"
check "debug waits for a tapdisk" debug_is "recovery: waiting for a tapdisk"
check "the writers wait" kill -0 $writer $writer2
python3 - <<'PY' > /tmp/rec.out 2>&1
import ctypes, errno, mmap, os, struct
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open("/dev/xen/blktap-2/blktap0", os.O_RDWR)
m = mmap.mmap(fd, 4096 * 353, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
buf = ctypes.create_string_buffer(struct.pack("QIIQ4Q", 65536, 512, 512, 0x40, 0, 0, 0, 0))
r = libc.ioctl(fd, ctypes.c_ulong(208), buf)
print("create", "OK" if r == 0 else errno.errorcode[ctypes.get_errno()])
print("reissued", struct.unpack_from("I", m, 0)[0])
PY
check "CREATE_DEVICE on a recovering tap: EEXIST" grep -qx 'create EEXIST' /tmp/rec.out
check "a peer that maps the ring gets the kept requests" grep -qx 'reissued [1-9][0-9]*' /tmp/rec.out
check "and when it goes without answering, they are kept again" debug_is "recovery: waiting for a tapdisk"
python3 tests/vm/pytap.py 0 65536 --recover --file /tmp/rec.img > /tmp/pytap2.log 2>&1 &
peer=$!
check "the first writer finishes without an error after a new peer attaches" wait $writer
check "so does the second" wait $writer2
check "they wrote everything" sh -c "! test -s /tmp/rdd.err && ! test -s /tmp/rdd2.err"
check "every byte arrived" sh -c "dd if=$D bs=4k count=1024 iflag=direct status=none | cmp - /tmp/rdata"
check "the kept requests were re-issued" sh -c "dmesg | grep -q 'blktap0: ring mapped again; re-issued'"
check "debug shows recovery on again" debug_is "recovery: on"
# Nobody attaches: the kept requests fail at the deadline.
echo 1 > $T/deadline
kill -9 $peer; wait $peer 2>/dev/null
check "the disk stays again" test -b $D
start=$(date +%s)
check "without a new peer, I/O fails at the deadline" sh -c "! dd if=$D of=/dev/null bs=4k count=1 iflag=direct 2>/tmp/dd.err && grep -q 'Input/output error' /tmp/dd.err"
check "within a few seconds" test $(( $(date +%s) - start )) -lt 6
check "the timeout names the missing tapdisk" sh -c "dmesg | grep -q 'timed out after 1 s (no tapdisk attached)'"
check "freeing the tap removes the kept disk" $TAPCTL free -m 0
check "the disk is gone" sh -c "sleep 0.3; test ! -e $D"
check "no tap left" sh -c "! ls $CLASS | grep -q 'blktap!'"
check "rmmod" unload
finish
