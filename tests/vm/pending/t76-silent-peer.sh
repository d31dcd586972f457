# A live but silent peer: (a) a tap-ctl tapdisk stopped with SIGSTOP, under a mounted ext4;
# (b) the Python peer in --silent mode. With a 2 s deadline, 64 direct reads at once (fio,
# iodepth 64: more than the 32 ring slots, which all go late) each end with EIO within a bound
# (3 x deadline + 5 s; measured), sync returns, the file system unmounts; then the peer wakes
# up (SIGCONT, SIGUSR2): its late answers are dropped (late_answers > 0, refused 0), the disk
# is usable again (fio crc32c verify, 2 jobs) and removable.
. tests/vm/lib.sh
load
mkdir -p /tmp/mnt
T="$CLASS/blktap!blktap0"
DL=2
BOUND=$((3 * DL + 5))

now() { date +%s.%N; }
# since T: seconds since T (a `now` value), one decimal.
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# within SECONDS T: `since T` is at most SECONDS.
within() { awk -v s="$(since $2)" -v m="$1" 'BEGIN { exit !(s <= m) }' || { echo "took $(since $2) s, more than $1 s"; false; }; }
counter() { sed -n "s/^$1: //p" "$T/debug"; }
# bounded SECONDS CMD...: runs CMD, waiting at most SECONDS for it; status 124 if it did not end
# by then (it is left behind: a request that never ends cannot be killed).
bounded() {
    s=$1; shift
    "$@" &
    b=$!
    i=0; while kill -0 $b 2>/dev/null && [ $i -lt $((s * 10)) ]; do sleep 0.1; i=$((i + 1)); done
    if kill -0 $b 2>/dev/null; then echo "# still running after $s s: $*"; return 124; fi
    wait $b
}

# stuck_reads LABEL DEV: 64 direct random 4 KiB reads at once (fio, iodepth 64, libaio): every
# one must fail with EIO, all within BOUND seconds.
stuck_reads() {
    t=$(now)
    bounded $((BOUND + 30)) fio --name=stuck --filename=$2 --ioengine=libaio --direct=1 \
        --rw=randread --bs=4k --iodepth=64 --iodepth_batch_submit=64 --number_ios=64 \
        --continue_on_error=all --output-format=json --output=/tmp/stuck.json >/dev/null 2>&1
    echo "# $1: 64 reads at depth 64 ended in $(since $t) s (deadline $DL s)"
    check "$1: fio at depth 64 ends within $BOUND s" within $BOUND $t
    check "$1: every one of the 64 reads failed with EIO" python3 -c "
import json
t = open('/tmp/stuck.json').read()
j = json.loads(t[t.index('{'):])['jobs'][0]
print(j['total_err'], j['first_error'], j['read']['total_ios'])
assert j['total_err'] == 64 and j['first_error'] == 5, j"
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

# --- (a) tapdisk stopped with SIGSTOP ---------------------------------------------------------
truncate -s 64M /tmp/s.raw
dev=$($TAPCTL create -a aio:/tmp/s.raw)
pid=$(cat "$T/task")
check "mkfs.ext4 and mount" sh -c "mkfs.ext4 -q -F $dev && mount $dev /tmp/mnt"
head -c 4M /dev/urandom > /tmp/mnt/dirty
echo $DL > "$T/deadline"
kill -STOP $pid
stuck_reads "SIGSTOP" $dev
check "SIGSTOP: the 32 slots are late" is "$(counter late)" 32
# sync has the dirty file to write: its writes fail at their deadline.
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
i=0; while [ "$(counter late)" != 0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
sed 's/^/# /' "$T/debug"
check "SIGCONT: every late slot freed" is "$(counter late)" 0
check "SIGCONT: the late answers were dropped" test "$(counter late_answers)" -ge 32
check "SIGCONT: none refused" is "$(counter refused)" 0
echo 30 > "$T/deadline"
check "SIGCONT: the disk works again (fio crc32c verify, 2 jobs)" fio_verify $dev
check "SIGCONT: destroy" $TAPCTL destroy -m 0
check "the tapdisk exits" sh -c "sleep 0.5; ! test -e /proc/$pid || grep -q '^State:.*Z' /proc/$pid/status"

# --- (b) a Python peer that never answers, until SIGUSR2 ----------------------------------------
$TAPCTL allocate >/dev/null
python3 tests/vm/pytap.py 0 65536 --silent > /tmp/pytap.log 2>&1 &
peer=$!
D=$DEVDIR/tapdev0
i=0; while [ ! -b $D ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
check "silent peer: the disk appears" test -b $D
echo $DL > "$T/deadline"
stuck_reads "silent peer" $D
check "silent peer: the 32 slots are late" is "$(counter late)" 32
# Buffered writes, then sync: their writeback fails at the deadline.
t=$(now)
bounded 60 dd if=/dev/urandom of=$D bs=64k count=32 status=none 2>/dev/null
bounded 60 sync
check "silent peer: sync returns within 20 s" within 20 $t
echo "# silent peer: write + sync took $(since $t) s"
# A single direct write, too: EIO within the bound, not a hang.
t=$(now)
bounded $BOUND dd if=/dev/zero of=$D bs=4k count=1 oflag=direct 2>/tmp/dd.err
rc=$?
echo "# silent peer: a direct write ended in $(since $t) s, status $rc"
check "silent peer: a direct write fails with EIO within $BOUND s" \
    sh -c "cat /tmp/dd.err; test $rc != 0 && test $rc != 124 && grep -q 'Input/output error' /tmp/dd.err"
kill -USR2 $peer
i=0; while [ "$(counter late)" != 0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
sed 's/^/# /' "$T/debug"
check "SIGUSR2: every late slot freed" is "$(counter late)" 0
check "SIGUSR2: the late answers were dropped" test "$(counter late_answers)" -ge 32
check "SIGUSR2: none refused" is "$(counter refused)" 0
echo 30 > "$T/deadline"
check "SIGUSR2: the disk works again (fio crc32c verify, 2 jobs)" fio_verify $D
kill $peer; wait $peer
sed 's/^/# /' /tmp/pytap.log
check "the peer removed its disk" test ! -e $D
check "free the tap" $TAPCTL free -m 0
check "no tap left" sh -c "test -z \"\$(ls $CLASS | grep '^blktap!')\""
check "rmmod" unload
finish
