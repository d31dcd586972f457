# Flush, FUA and discard with the Rust tapdisk: negotiated when it creates the disk, carried to
# the backends (blkdiscard frees space on ram: and on a file; sync and fsync reach the image),
# and never sent to a tapdisk that did not negotiate them.
. tests/vm/lib.sh
load
mkdir -p /tmp/mnt

# stat PID MINOR FIELD: one field of `tap-ctl stats`.
stat() {
    $TAPCTL stats -p "$1" -m "$2" | python3 -c "
import json, sys
d = json.load(sys.stdin)
d = d.get('stats', d)
print(d['$3'])"
}
pid_of() { cat "$CLASS/blktap!blktap$1/task"; }
MiB=1048576

# --- ram: ------------------------------------------------------------------------------------
dev=$($TAPCTL create -a ram:64M)
pid=$(pid_of 0)
check "ram: negotiates a write cache" is "$(cat /sys/block/tda/queue/write_cache)" "write back"
check "ram: negotiates FUA" is "$(cat /sys/block/tda/queue/fua)" 1
check "ram: negotiates discard" sh -c "test $(cat /sys/block/tda/queue/discard_max_bytes) -gt 0"
check "write 32 MiB" dd if=/dev/urandom of="$dev" bs=1M count=32 oflag=direct status=none
a=$(stat $pid 0 allocated_bytes)
check "ram: holds at least 32 MiB" test "$a" -ge $((32 * MiB))
check "blkdiscard the whole ram: tap" blkdiscard "$dev"
b=$(stat $pid 0 allocated_bytes)
check "ram: freed the space ($a -> $b bytes)" test "$b" -le $((a - 30 * MiB))
check "ram: counts the discards" sh -c "test $(stat $pid 0 discards) -ge 1 && test $(stat $pid 0 discarded_bytes) -ge $((64 * MiB))"
check "the discarded tap reads zeros" sh -c "dd if=$dev bs=1M count=64 iflag=direct status=none | cmp - /dev/zero 2>&1 | grep -q EOF"
check "destroy" $TAPCTL destroy -m 0

# --- aio: on a file --------------------------------------------------------------------------
truncate -s 64M /tmp/x.raw
dev=$($TAPCTL create -a aio:/tmp/x.raw)
pid=$(pid_of 0)
check "aio: negotiates a write cache" is "$(cat /sys/block/tda/queue/write_cache)" "write back"
check "write 32 MiB" dd if=/dev/urandom of="$dev" bs=1M count=32 oflag=direct status=none
a=$(du -k /tmp/x.raw | cut -f1)
check "the image takes 32 MiB" test "$a" -ge 32768
check "blkdiscard 16 MiB" blkdiscard -o 0 -l 16M "$dev"
b=$(du -k /tmp/x.raw | cut -f1)
check "the image shrank by 16 MiB ($a -> $b KiB)" test "$b" -le $((a - 16000))
check "the discarded range reads zeros, the rest is kept" sh -c "cmp -n 16M /tmp/x.raw /dev/zero && ! cmp -s -i 16M:0 -n 1M /tmp/x.raw /dev/zero"
f0=$(stat $pid 0 flushes)
check "fsync on the tapdev" python3 -c "import os; fd=os.open('$dev', os.O_RDWR); os.write(fd, b'y'*4096); os.fsync(fd)"
check "fsync reaches the backend as a flush" test "$(stat $pid 0 flushes)" -gt "$f0"
u0=$(stat $pid 0 fua_writes)
check "O_DSYNC direct writes" dd if=/dev/zero of="$dev" bs=4k count=8 seek=4096 oflag=direct,dsync status=none
check "reach the backend as FUA writes" test "$(stat $pid 0 fua_writes)" -gt "$u0"
check "mkfs.ext4 and mount" sh -c "mkfs.ext4 -q -F $dev && mount $dev /tmp/mnt"
f1=$(stat $pid 0 flushes); u1=$(stat $pid 0 fua_writes)
check "write a file and sync" sh -c "head -c 1M /dev/urandom > /tmp/mnt/f && sync"
check "sync reaches the backend (flush or FUA)" test $(( $(stat $pid 0 flushes) + $(stat $pid 0 fua_writes) )) -gt $((f1 + u1))
check "fstrim frees the file system's free space" sh -c "fstrim -v /tmp/mnt"
check "umount" umount /tmp/mnt
check "destroy" $TAPCTL destroy -m 0
check "the image fscks clean" fsck.ext4 -n -f /tmp/x.raw

# --- a tapdisk that does not negotiate -------------------------------------------------------
dev=$($TAPCTL create --no-extensions -a ram:16M)
pid=$(pid_of 0)
check "no write cache advertised" is "$(cat /sys/block/tda/queue/write_cache)" "write through"
check "no FUA advertised" is "$(cat /sys/block/tda/queue/fua)" 0
check "no discard advertised" is "$(cat /sys/block/tda/queue/discard_max_bytes)" 0
check "blkdiscard is refused" fails blkdiscard "$dev"
check "fsync still works" python3 -c "import os; fd=os.open('$dev', os.O_RDWR); os.write(fd, b'z'*4096); os.fsync(fd)"
check "O_DSYNC still works" dd if=/dev/zero of="$dev" bs=4k count=8 oflag=direct,dsync status=none
check "the tapdisk saw only READ and WRITE" sh -c "test $(stat $pid 0 flushes) = 0 && test $(stat $pid 0 fua_writes) = 0 && test $(stat $pid 0 discards) = 0 && test $(stat $pid 0 unsupported) = 0"
check "debug shows no features" grep -qx 'features: flush=0 fua=0 discard=0 staged_writes=0 req_event=0 large=0' "$CLASS/blktap!blktap0/debug"
check "destroy" $TAPCTL destroy -m 0
check "rmmod" unload
finish
