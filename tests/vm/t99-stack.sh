# The image stack through real tapdevs: copy-on-write overlays (in memory, in a file) over aio:,
# vhd: and nbd: bases, and the trace filter; every data path with a verifying writer and a
# checking reader at once; the bases untouched; a file overlay kept across a pause and a new
# tap; the layers in `stats`; bad stacks refused with a clear error.
. tests/vm/lib.sh
load
VHDUTIL=$REPO/userspace/target/release/vhd-util
D=/tmp/t99
rm -rf $D; mkdir -p $D; cd $D
T0=$(now)

# A 64 MiB base: random data in 0-32 MiB, a hole after.
head -c 32M /dev/urandom > base.raw
truncate -s 64M base.raw
base_sum=$(sha256sum < base.raw)
dd if=base.raw of=base-r.bin bs=1M skip=16 count=8 status=none

# jobs LABEL DEV: a writer verifying its region (0-12 MiB, over base data) and a reader checking
# the base's 16-24 MiB against what the base holds, again and again, while the writer runs;
# then a second writer on the hole (40-52 MiB) with a mixed verifying job (56-64 MiB).
jobs() {
    rm -f /tmp/fio-w$1.rc
    run_fio w$1 --filename=$2 --ioengine=io_uring --direct=1 --rw=randwrite --bsrange=512-44k \
        --iodepth=16 --offset=0 --size=12M --verify=crc32c --verify_fatal=1
    w=$!
    (n=0; while [ $n = 0 ] || ! [ -e /tmp/fio-w$1.rc ]; do
        dd if=$2 bs=1M skip=16 count=8 iflag=direct status=none | cmp - base-r.bin || exit 1
        n=$((n + 1)); done; echo "# $n reads of the base's 8 MiB, all equal") > r$1.out 2>&1 &
    r=$!
    wait $w; wait $r; rr=$?
    cat r$1.out
    fio_ok w$1 && [ $rr = 0 ] || return 1
    run_fio h$1 --filename=$2 --ioengine=libaio --direct=1 --rw=randwrite --bsrange=4k-64k \
        --iodepth=32 --offset=40M --size=12M --verify=crc32c --verify_fatal=1
    a=$!
    run_fio m$1 --filename=$2 --ioengine=io_uring --direct=1 --rw=randrw --bsrange=4k-44k \
        --iodepth=8 --offset=56M --size=8M --verify=crc32c --verify_backlog=16 --verify_fatal=1
    b=$!
    wait $a $b
    fio_ok h$1 && fio_ok m$1
}

# --- cow:ram over aio: ----------------------------------------------------------------------
dev=$($TAPCTL create -a cow:ram:aio:$D/base.raw)
check "create -a cow:ram:aio: prints the tapdev" is "$dev" "$DEVDIR/tapdev0"
check "the disk has the base's size" is "$(cat /sys/block/tda/size)" 131072
check "a verifying writer and a checking reader, then two more jobs, on cow:ram" jobs ram $dev
pid=$(cat "$CLASS/blktap!blktap0/task")
sock=/var/run/blktap-control/nbd$pid.0
check "the export's map: data where the base or the overlay has it, the base's hole elsewhere" \
    sh -c "nbdinfo --map 'nbd+unix:///?socket=$sock' | tee map.out &&
           grep -Eq '^ *0 +33554432 +0 +data' map.out && grep -Eq '^ *33554432 .*hole' map.out"
dd if=$dev of=ram.img bs=1M count=64 iflag=direct status=none
check "stats: the layers, top first (cow, its memory, the base)" sh -c \
    "$TAPCTL stats -p $pid -m 0 | python3 -c '
import json, sys
s = json.load(sys.stdin)
names = [(i[\"driver\"][\"name\"], i[\"name\"]) for i in s[\"images\"]]
print(names)
assert names == [(\"cow\", \"memory\"), (\"ram\", \"memory\"), (\"aio\", \"$D/base.raw\")], names
assert s[\"images\"][2][\"hits\"][1] == 0 and s[\"images\"][2][\"hits\"][0] > 0
assert s[\"images\"][1][\"hits\"][1] > 0'"
check "destroy" $TAPCTL destroy -m 0
check "the base is untouched" is "$(sha256sum < base.raw)" "$base_sum"
check "the overlay held what was written: the image differs from the base" fails cmp -s ram.img base.raw

# --- an overlay file over vhd:, kept across a pause and a new tap ----------------------------
check "vhd-util create: a 64 MiB dynamic VHD" $VHDUTIL create -n base.vhd -s 64
dev=$($TAPCTL create -a vhd:$D/base.vhd)
check "fill the VHD with the base's data" dd if=base.raw of=$dev bs=1M count=32 oflag=direct status=none
check "destroy" $TAPCTL destroy -m 0
vhd_sum=$(sha256sum < base.vhd)
dev=$($TAPCTL create -a cow:$D/ov.cow:vhd:$D/base.vhd)
pid=$(cat "$CLASS/blktap!blktap0/task")
check "a verifying writer and a checking reader, then two more jobs, on cow:FILE:vhd:" jobs file $dev
dd if=$dev of=file.img bs=1M count=64 iflag=direct status=none
check "pause" $TAPCTL pause -p $pid -m 0
check "unpause (the overlay reopened from its file)" $TAPCTL unpause -p $pid -m 0
check "after the pause the disk reads as before" sh -c \
    "dd if=$dev bs=1M count=64 iflag=direct status=none | cmp - file.img"
check "destroy" $TAPCTL destroy -m 0
dev=$($TAPCTL create -a cow:$D/ov.cow:vhd:$D/base.vhd)
check "a new tap on the same overlay reads the same disk" sh -c \
    "dd if=$dev bs=1M count=64 iflag=direct status=none | cmp - file.img"
check "destroy" $TAPCTL destroy -m 0
check "the VHD base is untouched" is "$(sha256sum < base.vhd)" "$vhd_sum"
check "and checks clean" $VHDUTIL check -n base.vhd
check "an overlay made for another disk is refused, with a clear error" sh -c \
    "truncate -s 32M small.raw && ! $TAPCTL create -a cow:$D/ov.cow:aio:$D/small.raw 2> small.err;
     cat small.err; grep -q 'made for a disk of' small.err"
check "a relative overlay path is refused, with a clear error" sh -c \
    "! $TAPCTL create -a cow:ov.cow:aio:$D/base.raw 2> rel.err; cat rel.err; grep -q 'absolute path' rel.err"
check "and no tap is left" is "$($TAPCTL list)" ""

# --- trace: over aio: -----------------------------------------------------------------------
cp base.raw tr.raw
dev=$($TAPCTL create --log $D/trace.log -a trace:aio:$D/tr.raw)
run_fio tw --filename=$dev --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
    --iodepth=8 --offset=0 --size=4M --verify=crc32c --verify_fatal=1
a=$!
run_fio tm --filename=$dev --ioengine=libaio --direct=1 --rw=randrw --bs=8k \
    --iodepth=8 --offset=8M --size=4M --verify=crc32c --verify_fatal=1
b=$!
wait $a $b
check "a verifying writer through trace:" fio_ok tw
check "a verifying mixed job through trace: at once" fio_ok tm
check "a flush through trace:" sh -c "dd if=/dev/zero of=$dev bs=4k count=1 seek=4096 oflag=direct conv=fsync status=none"
check "destroy" $TAPCTL destroy -m 0
check "the log has a line per request: writes, reads with sector, length, latency" sh -c \
    "grep -E 'trace aio:$D/tr.raw: write sector [0-9]+ len 8 latency [0-9]+us ok' trace.log | head -2 &&
     grep -Eq 'trace aio:$D/tr.raw: read sector [0-9]+ len 16 latency [0-9]+us ok' trace.log &&
     grep -Eq 'trace aio:$D/tr.raw: flush latency [0-9]+us ok' trace.log"
check "at least one line per 4 KiB write of the writer (1024)" sh -c \
    "test \$(grep -c 'write sector .* len 8 ' trace.log) -ge 1024"

# --- trace: over an overlay over vhd: --------------------------------------------------------
dev=$($TAPCTL create --log $D/trace2.log -a trace:cow:ram:vhd:$D/base.vhd)
check "a verifying writer and a checking reader, then two more jobs, on trace:cow:ram:vhd:" jobs tv $dev
check "destroy" $TAPCTL destroy -m 0
check "the trace names the overlay below it, with reads and writes" sh -c \
    "grep -Eq 'trace cow:ram:vhd:$D/base.vhd: write sector [0-9]+ len [0-9]+ latency [0-9]+us ok' trace2.log &&
     grep -Eq 'trace cow:ram:vhd:$D/base.vhd: read sector [0-9]+ len [0-9]+ latency [0-9]+us ok' trace2.log"
check "the VHD under the trace and the overlay is untouched" is "$(sha256sum < base.vhd)" "$vhd_sum"

# --- cow over a remote read-only base: nbd: --------------------------------------------------
cp base.raw nb.raw
nbdkit --unix $D/nbdkit.sock --pidfile $D/nbdkit.pid --readonly file $D/nb.raw
check "nbdkit serves the base read-only" sh -c \
    "for i in \$(seq 50); do test -S $D/nbdkit.sock && exit 0; sleep 0.1; done; exit 1"
dev=$($TAPCTL create -a "cow:ram:nbd:nbd+unix:///?socket=$D/nbdkit.sock")
check "a verifying writer and a checking reader, then two more jobs, on cow:ram:nbd:" jobs nbd $dev
check "destroy" $TAPCTL destroy -m 0
kill $(cat $D/nbdkit.pid)
check "the server's file is untouched" is "$(sha256sum < nb.raw)" "$base_sum"

echo "# t99 total $(since $T0) s"
check "rmmod" unload
finish
