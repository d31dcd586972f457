# The data path against the independent Python peer (an old-style tapdisk): data integrity,
# only READ and WRITE reach it, and its death fails I/O cleanly.
. tests/vm/lib.sh
load
$TAPCTL allocate >/dev/null

python3 tests/vm/pytap.py 0 65536 > /tmp/pytap.log 2>&1 &
peer=$!
check "the disk appears" wait_node
check "devices lists it" is "$(cat $CLASS/devices)" "0 0"
check "debug shows the disk" sh -c "grep -qx 'disk: tapdev0' '$CLASS/blktap!blktap0/debug'"
check "size is 32 MiB" is "$(cat /sys/block/tda/size)" 65536
check "at most 11 segments" is "$(cat /sys/block/tda/queue/max_segments)" 11
check "segments of a page" is "$(cat /sys/block/tda/queue/max_segment_size)" 4096
check "44 KiB per request" is "$(cat /sys/block/tda/queue/max_hw_sectors_kb)" 44
check "no write cache advertised" is "$(cat /sys/block/tda/queue/write_cache)" "write through"
check "no discard advertised" is "$(cat /sys/block/tda/queue/discard_max_bytes)" 0
check "no FUA advertised" is "$(cat /sys/block/tda/queue/fua)" 0
check "no I/O scheduler by default" grep -q "\[none\]" /sys/block/tda/queue/scheduler
head -c 8M /dev/urandom > /tmp/in
check "write 8 MiB (direct, 44 KiB)" dd if=/tmp/in of=$DEVDIR/tapdev0 bs=44k oflag=direct status=none
check "read it back (buffered)" dd if=$DEVDIR/tapdev0 of=/tmp/out bs=1M count=8 status=none
check "same bytes" cmp /tmp/in /tmp/out
check "sync and fsync" sh -c "sync && python3 -c \"import os; fd=os.open('$DEVDIR/tapdev0', os.O_RDWR); os.write(fd, b'x'*4096); os.fsync(fd)\""
check "blkdiscard is refused (not advertised)" fails blkdiscard $DEVDIR/tapdev0
kill $peer; wait $peer
check "the peer removed the disk" test ! -e $DEVDIR/tapdev0
check "the peer saw only READ and WRITE" grep -q 'flush=0 discard=0 fua=0 other=0 ' /tmp/pytap.log

# Death under load: the peer is killed while a writer runs.
python3 tests/vm/pytap.py 0 65536 > /tmp/pytap.log 2>&1 &
peer=$!
wait_node
dd if=/dev/zero of=$DEVDIR/tapdev0 bs=4k count=100000 oflag=direct 2>/tmp/dd.err &
writer=$!
sleep 1
kill -9 $peer
wait $writer
check "the writer saw an I/O error" grep -q 'Input/output error' /tmp/dd.err
check "the disk is gone with the ring" sh -c "sleep 0.5; test ! -e $DEVDIR/tapdev0"
check "debug shows no pending requests" sh -c "grep -qx 'pending: 0' '$CLASS/blktap!blktap0/debug'"
check "the tap can be freed" $TAPCTL free -m 0
check "and its minor reused" is "$($TAPCTL allocate)" "$DEVDIR/tapdev0"
check "free again" $TAPCTL free -m 0
check "rmmod" unload
finish
