# vhd: images and NBD through real tapdevs, every data path with two jobs at once, each checking
# its data: a VHD chain made by vhd-util, a live snapshot under I/O (pause, snapshot, unpause
# onto the new leaf), check and qemu-img on the result; a tap's NBD export used by nbdinfo,
# nbdcopy and qemu-io beside a tapdev writer; and an nbd: image on nbdkit.
. tests/vm/lib.sh
load
VHDUTIL=$REPO/userspace/target/release/vhd-util
cd /tmp

# two_jobs LABEL DEV: a writer verifying its region (8-24 MiB) and a mixed job verifying its own
# (40-56 MiB), at once.
two_jobs() {
    run_fio w$1 --filename=$2 --ioengine=io_uring --direct=1 --rw=randwrite --bsrange=512-44k \
        --iodepth=16 --offset=8M --size=16M --verify=crc32c --verify_fatal=1
    a=$!
    run_fio m$1 --filename=$2 --ioengine=libaio --direct=1 --rw=randrw --bsrange=4k-44k \
        --iodepth=32 --offset=40M --size=16M --verify=crc32c --verify_backlog=16 --verify_fatal=1
    b=$!
    wait $a $b
    fio_ok w$1 && fio_ok m$1
}

# --- A VHD chain ------------------------------------------------------------------------------
check "vhd-util create: a 96 MiB dynamic VHD" $VHDUTIL create -n base.vhd -s 96
dev=$($TAPCTL create -a vhd:/tmp/base.vhd)
check "create -a vhd: prints the tapdev" is "$dev" "$DEVDIR/tapdev0"
check "the disk is 96 MiB" is "$(cat /sys/block/tda/size)" 196608
check "two fio jobs verify their data on vhd:" two_jobs base $dev
vpid=$(cat "$CLASS/blktap!blktap0/task")
check "the export's map: the VHD's unallocated blocks are holes, its written ones data" sh -c \
    "nbdinfo --map 'nbd+unix:///?socket=/var/run/blktap-control/nbd$vpid.0' | tee vmap.out &&
     grep -Eq '^ *0 +8388608 +3 +hole,zero' vmap.out && grep -Eq '^ *8388608 +16777216 +0 +data' vmap.out"
head -c 4M /dev/urandom > a.bin
check "4 MiB more at 64 MiB" dd if=a.bin of=$dev bs=64k seek=1024 oflag=direct status=none
dd if=$dev of=base.img bs=1M count=96 iflag=direct status=none
check "destroy" $TAPCTL destroy -m 0
check "vhd-util check: clean" $VHDUTIL check -n base.vhd
check "qemu-img reads what the tapdev wrote, byte for byte" sh -c \
    "qemu-img convert -f vpc -O raw base.vhd base.raw && cmp base.raw base.img"

check "vhd-util snapshot: a leaf over the base" $VHDUTIL snapshot -n leaf.vhd -p base.vhd
base_sum=$(sha256sum < base.vhd)
dev=$($TAPCTL create -a vhd:/tmp/leaf.vhd)
pid=$(cat "$CLASS/blktap!blktap0/task")
check "the leaf reads the base's data" sh -c "dd if=$dev bs=1M count=96 iflag=direct status=none | cmp - base.img"
check "stats: the chain's images, leaf first, the base with the sectors read from it" sh -c \
    "$TAPCTL stats -p $pid -m 0 | python3 -c '
import json, sys
s = json.load(sys.stdin)
names = [(i[\"driver\"][\"name\"], i[\"driver\"][\"type\"], i[\"name\"]) for i in s[\"images\"]]
print(names, [i[\"hits\"] for i in s[\"images\"]])
assert names == [(\"vhd\", 4, \"/tmp/leaf.vhd\"), (\"vhd\", 4, \"/tmp/base.vhd\")], names
assert s[\"images\"][1][\"hits\"][0] >= 2 * 4 * 2048 and s[\"images\"][1][\"hits\"][1] == 0'"

# A live snapshot under I/O: a reader verifying the base's region 8-24 MiB and a writer on
# 72-88 MiB run while the tap pauses, a second leaf is made and the tap goes on on it.
dd if=base.img of=base-r.bin bs=1M skip=8 count=16 status=none
# reader SECONDS: reads 8-24 MiB again and again for SECONDS, comparing it with the base's data.
reader() {
    end=$(($(date +%s) + $1)); n=0
    while [ $(date +%s) -lt $end ]; do
        dd if=$dev bs=1M skip=8 count=16 iflag=direct status=none | cmp - base-r.bin || return 1
        n=$((n + 1))
    done
    echo "# $n reads of 16 MiB, all equal"
}
reader 12 > live-r.out 2>&1 &
r=$!
run_fio live-w --filename=$dev --ioengine=io_uring --direct=1 --rw=randwrite --bsrange=4k-44k \
    --iodepth=16 --offset=72M --size=16M --verify=crc32c --verify_fatal=1 --rate=2m
w=$!
sleep 3
check "I/O runs when the tap pauses" kill -0 $r
check "pause" $TAPCTL pause -p $pid -m 0
leaf_sum=$(sha256sum < leaf.vhd)
check "snapshot the paused leaf" $VHDUTIL snapshot -n leaf2.vhd -p leaf.vhd
check "unpause onto the new leaf" $TAPCTL unpause -p $pid -m 0 -a vhd:/tmp/leaf2.vhd
check "list names the new leaf" sh -c "$TAPCTL list -m 0 | grep -q 'args=vhd:/tmp/leaf2.vhd'"
wait $r; rr=$?
wait $w
check "the reader read the base's data throughout" sh -c "cat live-r.out; test $rr = 0"
check "the writer verified every block across the snapshot" fio_ok live-w
check "the old leaf is unchanged since the snapshot" is "$(sha256sum < leaf.vhd)" "$leaf_sum"
check "the base is unchanged" is "$(sha256sum < base.vhd)" "$base_sum"
dd if=$dev of=leaf2.img bs=1M count=96 iflag=direct status=none
check "destroy" $TAPCTL destroy -m 0
check "vhd-util check on the new leaf: clean" $VHDUTIL check -n leaf2.vhd
check "query: the chain is 3 deep" sh -c "$VHDUTIL query -n leaf2.vhd -d | grep -q 3"
# qemu's vpc driver does not follow VHD parents: the chain is coalesced into the base first.
check "coalesce the new leaf into the old, then the old into the base" sh -c \
    "$VHDUTIL coalesce -n leaf2.vhd && $VHDUTIL coalesce -n leaf.vhd"
check "vhd-util check on the base: clean" $VHDUTIL check -n base.vhd
check "qemu-img reads the coalesced base as the tapdev read the chain" sh -c \
    "qemu-img convert -f vpc -O raw base.vhd base2.raw && cmp base2.raw leaf2.img"
check "a corrupt VHD is refused with a clear error" sh -c \
    "cp base.vhd bad.vhd && printf 'xxxxxxxx' | dd of=bad.vhd bs=1 seek=0 conv=notrunc status=none &&
     truncate -s -512 bad.vhd && ! $TAPCTL create -a vhd:/tmp/bad.vhd 2> bad.err && cat bad.err && test -s bad.err"
check "and no tap is left" is "$($TAPCTL list)" ""
# A resize cut short leaves NAME.journal: tapdisk refuses the image, naming the way out.
check "an image beside a leftover resize journal is refused, naming vhd-util revert" sh -c \
    "echo left-over > base.vhd.journal && ! $TAPCTL create -a vhd:/tmp/base.vhd 2> jr.err && cat jr.err &&
     grep -q 'vhd-util revert' jr.err"
check "vhd-util check fails, naming the journal" sh -c \
    "if $VHDUTIL check -n base.vhd > jr.out 2>&1; then false; else cat jr.out; grep -q journal jr.out; fi"
check "without the journal it opens again" sh -c \
    "rm base.vhd.journal && $TAPCTL create -a vhd:/tmp/base.vhd > /dev/null && $TAPCTL destroy -m 0"
check "and no tap is left after them" is "$($TAPCTL list)" ""

# --- A tap's NBD export -----------------------------------------------------------------------
truncate -s 64M ex.raw
dev=$($TAPCTL create -a aio:/tmp/ex.raw)
pid=$(cat "$CLASS/blktap!blktap0/task")
sock=/var/run/blktap-control/nbd$pid.0
check "the tap is exported on nbd<pid>.<minor>" test -S $sock
uri="nbd+unix:///?socket=$sock"
check "nbdinfo: the export's size" sh -c "nbdinfo --size '$uri' | grep -qx 67108864"
# NBD writes on 0-4 MiB and a tapdev writer on 8-24 MiB at once, each checked.
head -c 4M /dev/urandom > n.bin
run_fio exw --filename=$dev --ioengine=io_uring --direct=1 --rw=randwrite --bsrange=4k-44k \
    --iodepth=16 --offset=8M --size=16M --verify=crc32c --verify_fatal=1
w=$!
nbdcopy n.bin "$uri" > ncopy.out 2>&1; nrc=$?
wait $w
check "nbdcopy into the export, while the tapdev writes" sh -c "cat ncopy.out; test $nrc = 0"
check "the tapdev writer verified its data" fio_ok exw
check "the tapdev reads what NBD wrote" sh -c "dd if=$dev bs=1M count=4 iflag=direct status=none | cmp - n.bin"
check "qemu-io through the export reads what the tapdev wrote" sh -c \
    "dd if=$dev of=t.bin bs=1M skip=8 count=16 iflag=direct status=none &&
     qemu-io -f raw -c 'write -P 0x5a 32M 1M' '$uri' >/dev/null &&
     dd if=$dev bs=1M skip=32 count=1 iflag=direct status=none | tr -d '\132' | wc -c | grep -qx 0 &&
     nbdcopy '$uri' whole.bin && dd if=whole.bin bs=1M skip=8 count=16 status=none | cmp - t.bin"
check "destroy" $TAPCTL destroy -m 0
check "the export's socket is gone" test ! -e $sock

# --- An nbd: image on nbdkit ------------------------------------------------------------------
truncate -s 64M nk.raw
nbdkit --unix /tmp/nbdkit.sock --pidfile /tmp/nbdkit.pid file /tmp/nk.raw
check "nbdkit serves a file" sh -c "for i in \$(seq 50); do test -S /tmp/nbdkit.sock && exit 0; sleep 0.1; done; exit 1"
dev=$($TAPCTL create -a "nbd:nbd+unix:///?socket=/tmp/nbdkit.sock")
check "create -a nbd: prints the tapdev" is "$dev" "$DEVDIR/tapdev0"
check "two fio jobs verify their data on nbd:" two_jobs nbd $dev
check "flush reaches the server" sync
dd if=$dev of=nk.img bs=1M count=64 iflag=direct status=none
check "destroy" $TAPCTL destroy -m 0
check "the server's file holds what the tapdev wrote" cmp nk.raw nk.img
kill $(cat /tmp/nbdkit.pid)

check "rmmod" unload
finish
