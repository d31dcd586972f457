# The Rust tapdisk serving tapdevs through tap-ctl: fio with verification on aio: and ram:, a
# file system, byte-for-byte images, read-only taps, and kill -9 under load.
. tests/vm/lib.sh
load
mkdir -p /tmp/mnt

# fio_verify NAME DEV DEPTH: random writes then verified reads, 512 B to 44 KiB blocks, 64 MiB.
fio_verify() {
    fio --name=verify --filename="$2" --ioengine=io_uring --direct=1 --rw=randwrite \
        --bsrange=512-44k --iodepth="$3" --size=64M --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --output=/tmp/fio-$1.out >/dev/null 2>&1 \
    || { cat /tmp/fio-$1.out; return 1; }
    grep -q 'err= 0' /tmp/fio-$1.out
}

truncate -s 96M /tmp/a.raw
dev=$($TAPCTL create -a aio:/tmp/a.raw)
check "create -a aio: prints the tapdev" is "$dev" "$DEVDIR/tapdev0"
check "the node is a block device" test -b "$dev"
pid=$(cat "$CLASS/blktap!blktap0/task")
check "list shows pid, minor, state and image" sh -c "$TAPCTL list | grep -q '^pid=$pid minor=0 state=0x[0-9a-f]* args=aio:/tmp/a.raw$'"
check "the disk is 96 MiB" is "$(cat /sys/block/tda/size)" 196608
ram=$($TAPCTL create -a ram:96M)
check "create -a ram:" is "$ram" "$DEVDIR/tapdev1"
check "two taps, two tapdisks" is "$($TAPCTL list | wc -l)" 2
# The aio: and ram: runs go side by side (two tapdisks, two vCPUs).
for depth in 1 32; do
    fio_verify aio "$dev" $depth > /tmp/v-aio 2>&1 &
    a=$!
    fio_verify ram "$ram" $depth > /tmp/v-ram 2>&1 &
    r=$!
    wait $a; ra=$?
    wait $r; rr=$?
    check "fio verify on aio:, depth $depth" sh -c "cat /tmp/v-aio; test $ra = 0"
    check "fio verify on ram:, depth $depth" sh -c "cat /tmp/v-ram; test $rr = 0"
done
check "stats is JSON naming the image" sh -c "$TAPCTL stats -p $pid -m 0 | python3 -c 'import json,sys; d=json.load(sys.stdin); assert \"a.raw\" in json.dumps(d), d'"
check "destroy" $TAPCTL destroy -p "$pid" -m 0
check "the aio: tap is gone" is "$($TAPCTL list -m 0)" ""
check "tapdisk exited" sh -c "sleep 0.5; ! test -e /proc/$pid || grep -q '^State:.*Z' /proc/$pid/status"
check "destroy the ram: tap (by minor)" $TAPCTL destroy -m 1
check "no tap left" is "$($TAPCTL list)" ""

# One tapdisk serving two taps, driven step by step.
tpid=$($TAPCTL spawn)
check "spawn prints a pid" test -n "$tpid"
m0=$($TAPCTL allocate); m0=${m0##*tapdev}
m1=$($TAPCTL allocate); m1=${m1##*tapdev}
check "attach tap $m0" $TAPCTL attach -p "$tpid" -m "$m0"
check "attach tap $m1" $TAPCTL attach -p "$tpid" -m "$m1"
check "open tap $m0 on ram:" $TAPCTL open -p "$tpid" -m "$m0" -a ram:8M
check "open tap $m1 on null:" $TAPCTL open -p "$tpid" -m "$m1" -a null:8M
check "both taps are served by the same tapdisk" is "$($TAPCTL list -p "$tpid" | wc -l)" 2
check "I/O on the first" sh -c "dd if=/dev/urandom of=/tmp/r bs=64k count=16 status=none && dd if=/tmp/r of=$DEVDIR/tapdev$m0 bs=64k oflag=direct status=none && dd if=$DEVDIR/tapdev$m0 bs=64k count=16 iflag=direct status=none | cmp - /tmp/r"
check "null: reads zeros on the second" sh -c "dd if=$DEVDIR/tapdev$m1 bs=64k count=4 iflag=direct status=none | cmp - /dev/zero 2>&1 | grep -q EOF"
check "close and detach the first" sh -c "$TAPCTL close -p $tpid -m $m0 && $TAPCTL detach -p $tpid -m $m0 && $TAPCTL free -m $m0"
check "the second still works" dd if=$DEVDIR/tapdev$m1 of=/dev/null bs=4k count=4 iflag=direct status=none
check "destroy the second" $TAPCTL destroy -p "$tpid" -m "$m1"
check "the tapdisk exits when idle" sh -c "sleep 0.5; ! test -e /proc/$tpid || grep -q '^State:.*Z' /proc/$tpid/status"

# A file system, and the image byte for byte.
truncate -s 64M /tmp/fs.raw
dev=$($TAPCTL create -a aio:/tmp/fs.raw)
check "mkfs.ext4" mkfs.ext4 -q -F "$dev"
check "mount" mount "$dev" /tmp/mnt
for i in 1 2 3 4; do head -c $((i * 700))k /dev/urandom > /tmp/mnt/f$i; done
(cd /tmp/mnt && sha256sum f1 f2 f3 f4) > /tmp/sums
check "umount" umount /tmp/mnt
check "fsck is clean" fsck.ext4 -n -f "$dev"
check "mount again" mount "$dev" /tmp/mnt
check "checksums match" sh -c "cd /tmp/mnt && sha256sum -c --quiet /tmp/sums"
check "umount again" umount /tmp/mnt
check "destroy" $TAPCTL destroy -m 0
check "the image alone fscks clean" fsck.ext4 -n -f /tmp/fs.raw

truncate -s 32M /tmp/b.raw
head -c 16M /dev/urandom > /tmp/data
dev=$($TAPCTL create -a aio:/tmp/b.raw)
check "write 16 MiB through the tapdev" dd if=/tmp/data of="$dev" bs=44k oflag=direct status=none
check "destroy" $TAPCTL destroy -m 0
check "the backing file holds the bytes" cmp -n 16777216 /tmp/data /tmp/b.raw

dev=$($TAPCTL create -R -a aio:/tmp/b.raw)
check "a read-only tap" is "$(cat /sys/block/tda/ro)" 1
check "refuses writes" fails dd if=/dev/zero of="$dev" bs=4k count=1 oflag=direct status=none
check "serves reads" sh -c "dd if=$dev bs=1M count=16 status=none | cmp - /tmp/data"
check "destroy" $TAPCTL destroy -m 0
check "the image is unchanged" cmp -n 16777216 /tmp/data /tmp/b.raw

# kill -9 tapdisk while fio runs: errors, no hang, clean destroy, minor reused.
dev=$($TAPCTL create -a aio:/tmp/a.raw)
pid=$(cat "$CLASS/blktap!blktap0/task")
fio --name=load --filename="$dev" --ioengine=io_uring --direct=1 --rw=randrw --bs=4k \
    --iodepth=32 --time_based --runtime=60 --output=/tmp/fio-kill.out >/dev/null 2>&1 &
fio=$!
sleep 3
kill -9 "$pid"
t=0; while kill -0 $fio 2>/dev/null && [ $t -lt 300 ]; do sleep 0.1; t=$((t+1)); done
check "fio ends within 30 s of the kill" fails kill -0 $fio
wait $fio
check "fio saw I/O errors" grep -Eq 'err=[ ]*[1-9]|Input/output error' /tmp/fio-kill.out
check "destroy after the crash" $TAPCTL destroy -m 0
check "no tap left" is "$($TAPCTL list)" ""
check "the minor is reused" is "$($TAPCTL create -a ram:1M)" "$DEVDIR/tapdev0"
check "destroy" $TAPCTL destroy -m 0
check "rmmod" unload
finish
