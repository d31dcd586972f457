# VHD chains and tapdisk crashes through real tapdevs:
# 1. a depth-30 chain made by vhd-util snapshot under a live tap (pause, snapshot, unpause onto
#    the new leaf), every level written through the tapdev (so each owns blocks), served with a
#    reader checking the chain's data against a model and a verifying fio writer at once;
#    vhd-util check on every level; coalesced level by level, qemu-img reads the base as the
#    tapdev read the chain;
# 2. a child resized after its snapshot (its parent smaller): zeros past the parent's end,
#    writes across it, coalesce;
# 3. kill -9 of tapdisk on a vhd: leaf under two fsync'ing writers: with recovery (tap-ctl
#    recover; fio verifies every block) and without (the writers get errors, destroy, a new
#    tapdisk; every acknowledged record reads back, every other sector is old or new data).
#    vhd-util check after each; no tap or minor left.
. tests/vm/lib.sh
load
VHDUTIL=$REPO/userspace/target/release/vhd-util
T="$CLASS/blktap!blktap0"
D=/tmp/t98
rm -rf $D; mkdir -p $D; cd $D
T0=$(now)
DEPTH=30

# put DEV AT COUNT: COUNT x 4 KiB of random data at 4 KiB block AT, through the tapdev and into
# the model.
put() {
    head -c $(($3 * 4096)) /dev/urandom > piece
    dd if=piece of=$1 bs=4k seek=$2 oflag=direct status=none &&
        dd if=piece of=model.raw bs=4k seek=$2 conv=notrunc status=none
}

# level DEV I: what level I writes: 96 KiB at I x 64 KiB (each piece overlaps the next level's)
# and 16 KiB in a block of its own from 4 MiB on: all within the first 20 MiB.
level() { put $1 $(($2 * 16)) 24 && put $1 $((1024 + $2 * 128 + $2 % 7)) 4; }

# --- 1. A depth-30 chain -----------------------------------------------------------------------
check "vhd-util create: a 64 MiB base" $VHDUTIL create -n c0.vhd -s 64
truncate -s 64M model.raw
dev=$($TAPCTL create -a vhd:$D/c0.vhd)
pid=$(cat $T/task)
check "create -a vhd: prints tapdev0" is "$dev" "$DEVDIR/tapdev0"
check "level 0 written" level $dev 0
t=$(now)
bad=""
for i in $(seq 1 $DEPTH); do
    { $TAPCTL pause -p $pid -m 0 &&
        $VHDUTIL snapshot -n c$i.vhd -p c$((i - 1)).vhd &&
        $TAPCTL unpause -p $pid -m 0 -a vhd:$D/c$i.vhd &&
        level $dev $i; } > chain.log 2>&1 || { bad="$bad $i"; cat chain.log; }
done
echo "# $DEPTH live snapshots, each level written, in $(since $t) s"
check "$DEPTH live snapshots (pause, vhd-util snapshot, unpause), each level written" is "$bad" ""
check "list names the leaf" sh -c "$TAPCTL list -m 0 | grep -q 'args=vhd:$D/c$DEPTH.vhd'"
check "query: the chain is $((DEPTH + 1)) deep" is "$($VHDUTIL query -n c$DEPTH.vhd -d)" "chain depth: $((DEPTH + 1))"
head -c 20M model.raw > model20
check "the tapdev reads the chain as the model" sh -c \
    "dd if=$dev bs=1M count=20 iflag=direct status=none | cmp - model20"

# A reader checking the chain's 20 MiB against the model and a verifying writer on 32-44 MiB,
# at once.
reader() {
    n=0
    while [ $n -lt 2 ] || [ -e /proc/$1 ]; do
        dd if=$dev bs=1M count=20 iflag=direct status=none | cmp - model20 || return 1
        n=$((n + 1))
    done
    echo "# $n reads of the chain's 20 MiB, all equal to the model"
}
run_fio cw --filename=$dev --ioengine=io_uring --direct=1 --rw=randwrite --bsrange=4k-64k \
    --iodepth=16 --offset=32M --size=12M --verify=crc32c --verify_fatal=1
w=$!
i=0; while [ ! -s /tmp/fio-cw.pid ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
reader "$(cat /tmp/fio-cw.pid)" > reader.out 2>&1
rr=$?
wait $w
check "the reader read the chain's data throughout" sh -c "cat reader.out; test $rr = 0"
check "the writer verified its data on the depth-$((DEPTH + 1)) chain" fio_ok cw
dd if=$dev of=chain.img bs=1M count=64 iflag=direct status=none
check "destroy" $TAPCTL destroy -m 0
bad=""
for i in $(seq 0 $DEPTH); do $VHDUTIL check -n c$i.vhd > check.out 2>&1 || { bad="$bad $i"; cat check.out; }; done
check "vhd-util check: every level clean" is "$bad" ""
check "every level owns blocks" sh -c \
    "for i in \$(seq 1 $DEPTH); do test \$(stat -c %s c\$i.vhd) -gt \$((2 * 1024 * 1024)) || { echo c\$i; exit 1; }; done"
t=$(now)
bad=""
for i in $(seq $DEPTH -1 1); do $VHDUTIL coalesce -n c$i.vhd > co.out 2>&1 || { bad="$bad $i"; cat co.out; }; done
echo "# $DEPTH coalesces in $(since $t) s"
check "coalesce every level into its parent, leaf first" is "$bad" ""
check "vhd-util check on the base: clean" $VHDUTIL check -n c0.vhd
check "qemu-img reads the coalesced base as the tapdev read the chain" sh -c \
    "qemu-img convert -f vpc -O raw c0.vhd c0.raw && cmp c0.raw chain.img"
rm -f c*.vhd c0.raw chain.img
echo "# part 1 done at $(since $T0) s"

# --- 2. A child resized after its snapshot ----------------------------------------------------
check "a 6 MiB base" $VHDUTIL create -n r0.vhd -s 6
head -c 6M /dev/urandom > r.bin
dev=$($TAPCTL create -a vhd:$D/r0.vhd)
check "the base written" dd if=r.bin of=$dev bs=1M oflag=direct status=none
check "destroy" $TAPCTL destroy -m 0
check "snapshot" $VHDUTIL snapshot -n r1.vhd -p r0.vhd
check "vhd-util resize the child to 16 MiB" $VHDUTIL resize -n r1.vhd -s 16 -j r1.journal
check "vhd-util check accepts the chain" $VHDUTIL check -n r1.vhd
dev=$($TAPCTL create -a vhd:$D/r1.vhd)
check "the disk is 16 MiB" is "$(cat /sys/block/tda/size)" 32768
check "the parent's data, then zeros past its end" sh -c \
    "cp r.bin rmodel && truncate -s 16M rmodel && dd if=$dev bs=1M iflag=direct status=none | cmp - rmodel"
head -c 3M /dev/urandom > x.bin
check "3 MiB written across the parent's end" sh -c \
    "dd if=x.bin of=$dev bs=1M seek=5 oflag=direct status=none &&
     dd if=x.bin of=rmodel bs=1M seek=5 conv=notrunc status=none &&
     dd if=$dev bs=1M iflag=direct status=none | cmp - rmodel"
check "destroy" $TAPCTL destroy -m 0
check "vhd-util check: clean" $VHDUTIL check -n r1.vhd
check "coalesce grows the parent to 16 MiB" sh -c \
    "$VHDUTIL coalesce -n r1.vhd && test \$($VHDUTIL query -n r0.vhd -v) = 16 && $VHDUTIL check -n r0.vhd"
check "qemu-img reads the coalesced parent as the tapdev read the child" sh -c \
    "qemu-img convert -f vpc -O raw r0.vhd r0.raw && cmp r0.raw rmodel"
echo "# part 2 done at $(since $T0) s"

# --- 3. kill -9 of tapdisk under fsync'ing writers ----------------------------------------------
check "a 128 MiB base and a leaf over it" sh -c \
    "$VHDUTIL create -n k0.vhd -s 128 && $VHDUTIL snapshot -n k1.vhd -p k0.vhd"

# flowing: waits (up to 5 s) until disk tda has done some I/O.
flowing() {
    st=/sys/block/tda/stat
    i=0; while [ $i -lt 100 ] && [ "$(awk '{print $1 + $5}' $st)" = 0 ]; do sleep 0.05; i=$((i + 1)); done
}
# dead: waits (up to 10 s) until tap 0 has no tapdisk.
dead() { i=0; while [ -n "$(cat $T/task)" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done; test -z "$(cat $T/task)"; }
# running NAME...: every fio job NAME is still running.
running() { for n in "$@"; do [ -e /proc/$(cat /tmp/fio-$n.pid) ] || return 1; done; }

# 3a. With recovery: two fio writers with fsync=1 (0-8 MiB, 8-16 MiB), each verifying; tapdisk
# is killed three times and recovered each time; the writers see no error and every block
# verifies.
dev=$($TAPCTL create --recovery -a vhd:$D/k1.vhd)
check "a recovery tap on the vhd: leaf" grep -qx 'recovery: on' "$T/debug"
run_fio ka --filename=$dev --ioengine=io_uring --direct=1 --rw=randwrite --bsrange=4k-32k \
    --iodepth=8 --fsync=1 --offset=0 --size=8M --rate=1m --verify=crc32c --verify_fatal=1
a=$!
run_fio kb --filename=$dev --ioengine=libaio --direct=1 --rw=randwrite --bsrange=4k-32k \
    --iodepth=8 --fsync=1 --offset=8M --size=8M --rate=1m --verify=crc32c --verify_fatal=1
b=$!
flowing
kills=0; bad=0
for k in 1 2 3; do
    sleep 0.$((2 + k * 2))
    running ka kb || break
    # Stopped first, so that the writers' requests pile up on the ring and the kill finds
    # them in flight.
    victim=$(cat $T/task)
    kill -STOP "$victim"
    sleep 0.5
    kill -9 "$victim"
    dead || { echo "tapdisk still there after kill $k"; bad=1; break; }
    grep -qx 'recovery: waiting for a tapdisk' "$T/debug" || { echo "not waiting at $k"; cat "$T/debug"; bad=1; }
    $TAPCTL recover -m 0 -a vhd:$D/k1.vhd > /dev/null || { echo "recover $k failed"; bad=1; }
    kills=$((kills + 1))
done > kills.log 2>&1
wait $a $b
echo "# $kills kill -9s under the fio writers, each recovered"
check "tapdisk killed 3 times under the writers, recovered each time" sh -c "cat kills.log; test $bad = 0 && test $kills = 3"
check "writer 1 (io_uring, fsync=1): no error, every block verified" fio_ok ka
check "writer 2 (libaio, fsync=1): no error, every block verified" fio_ok kb
# Kept requests on the ring are re-issued (debug's reissued), staged writes handed over staged;
# the writers' verify shows they all completed.
check "some kill found requests in flight, and they were kept" sh -c "dmesg | grep -Eq 'blktap0: ring unmapped; keeping the disk and [1-9][0-9]* requests'"
dd if=$dev of=ka.img bs=1M count=16 iflag=direct status=none
check "destroy the recovered tap" $TAPCTL destroy -m 0
check "vhd-util check after the kills: clean" $VHDUTIL check -n k1.vhd

# 3b. Without recovery, 3 rounds: two writers of 64 KiB records (O_DIRECT|O_DSYNC, then fsync),
# each recording the records acknowledged, in a region of 16 MiB of its own; tapdisk is killed;
# the writers must stop on an error; destroy; a new tapdisk on the leaf reads back every
# acknowledged record of this round and the rounds before.
cat > ackw.py <<'PY'
import hashlib, mmap, os, sys
dev, name, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def record(i):
    return hashlib.sha256(f"{name}:{i}".encode()).digest() * 2048
fd = os.open(dev, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)
buf = mmap.mmap(-1, 65536)
with open(f"ack-{name}", "w") as ack:
    for i in range(first, first + count):
        buf.seek(0); buf.write(record(i))
        try:
            os.pwrite(fd, buf, i * 65536)
            os.fsync(fd)
        except OSError as e:
            print(f"{name}: record {i}: {e.strerror}")
            sys.exit(3)
        ack.write(f"{i}\n"); ack.flush()
print(f"{name}: all {count} records written")
PY
cat > ackv.py <<'PY'
# ackv.py DEV NAME FIRST COUNT: every acknowledged record reads back; in every other record each
# sector is zeros (never written) or the record's own data (a write cut by the kill).
import hashlib, os, sys
dev, name, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
acked = {int(l) for l in open(f"ack-{name}")}
fd = os.open(dev, os.O_RDONLY)
bad = torn = 0
for i in range(first, first + count):
    want = hashlib.sha256(f"{name}:{i}".encode()).digest() * 2048
    got = os.pread(fd, 65536, i * 65536)
    if i in acked:
        if got != want:
            bad += 1; print(f"{name}: acknowledged record {i} does not read back")
        continue
    for s in range(0, 65536, 512):
        if got[s:s + 512] not in (want[s:s + 512], bytes(512)):
            bad += 1; print(f"{name}: record {i} sector {s // 512}: neither old nor new data"); break
    else:
        torn += got != bytes(65536)
print(f"# {name}: {len(acked)} acknowledged records read back, {torn} unacknowledged partly written")
sys.exit(1 if bad or not acked else 0)
PY
# ends PID: its status, or 124 if it still runs after 30 s (then it is killed).
ends() {
    i=0; while kill -0 $1 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
    if kill -0 $1 2>/dev/null; then kill -9 $1; wait $1; return 124; fi
    wait $1
}
acks() { cat ack-$1 2>/dev/null | wc -l; }
done_names=""
for r in 0 1 2; do
    fa=$((256 + r * 512)); fb=$((fa + 256))
    dev=$($TAPCTL create -a vhd:$D/k1.vhd)
    check "round $r: a tap on the leaf, on tapdev0 (no minor leaked)" is "$dev" "$DEVDIR/tapdev0"
    # Each writer its own output file: a '>' and a '>>' on one file race (the '>' writes
    # at its own offset, over the other's line).
    python3 ackw.py $dev a$r $fa 256 > wa.out 2>&1 &
    a=$!
    python3 ackw.py $dev b$r $fb 256 > wb.out 2>&1 &
    b=$!
    i=0; while [ $i -lt 200 ] && { [ $(acks a$r) -lt $((8 + r * 8)) ] || [ $(acks b$r) -lt $((8 + r * 8)) ]; }; do
        sleep 0.05; i=$((i + 1)); done
    kill -9 "$(cat $T/task)"
    ends $a; ra=$?
    ends $b; rb=$?
    echo "# round $r: killed after $(acks a$r) and $(acks b$r) acknowledged records"
    # A write in flight when tapdisk dies fails with EIO; one issued after the dead disk is
    # gone meets the block layer's zero capacity: ENOSPC. Either is the death, seen.
    check "round $r: both writers stopped on an I/O error (no hang)" sh -c \
        "cat wa.out wb.out; test $ra = 3 && test $rb = 3 && grep -Eq 'Input/output error|No space left on device' wa.out && grep -Eq 'Input/output error|No space left on device' wb.out"
    check "round $r: destroy the dead tap" sh -c "timeout 20 $TAPCTL destroy -m 0 || timeout 20 $TAPCTL free -m 0"
    check "round $r: no tap or minor left" sh -c "test -z \"\$($TAPCTL list)\" && ! ls $CLASS | grep '^blktap!'"
    check "round $r: vhd-util check after the kill: clean" $VHDUTIL check -n k1.vhd
    done_names="$done_names a$r:$fa b$r:$fb"
    dev=$($TAPCTL create -a vhd:$D/k1.vhd)
    bad=""
    for nf in $done_names; do
        python3 ackv.py $dev ${nf%:*} ${nf#*:} 256 > v.out 2>&1 || bad="$bad ${nf%:*}"
        [ ${nf%:*} = a$r ] || [ ${nf%:*} = b$r ] && grep '^#' v.out
        [ -z "$bad" ] || cat v.out
    done
    check "round $r: a new tapdisk reads back every acknowledged record (this round's and before), nothing else wrong" is "$bad" ""
    check "round $r: the fio writers' data of 3a reads back" sh -c \
        "dd if=$dev bs=1M count=16 iflag=direct status=none | cmp - ka.img"
    check "round $r: destroy" $TAPCTL destroy -m 0
done
check "vhd-util check: clean" $VHDUTIL check -n k1.vhd
check "no tap left" is "$($TAPCTL list)" ""
check "no tapdisk left" sh -c "! pgrep -x tapdisk"
echo "# t98 total $(since $T0) s"
cd /
rm -rf $D
check "rmmod" unload
finish
