# Large requests (BLKTAP_DEVICE_LARGE_REQUESTS, 0x200): a tapdisk that maps 1 + 32 x S pages
# (S data pages per slot, 12..128) and sets the flag gets requests of up to S pages.
# (a) the mapping sizes and the negotiation, probed on the ring (largeprobe.py): refused lengths,
#     the flag refused on a standard mapping, the queue's limits following S, a remap while the
#     disk lives must keep S;
# (b) the Rust tapdisk with BLKTAP_MAX_SEGMENTS=128 and 64, and by default (11): two verifying
#     jobs at once (1 MiB sequential writes with reads behind them, and a randrw job of 4 KiB to
#     1 MiB), the block layer's mean request size past 44 KiB only with the flag;
# (c) the Python peer, with and without staged writes, checking every large request's
#     nr_segments and nr_sectors: the same two jobs.
. tests/vm/lib.sh
. tests/vm/stress.sh
load
T="$CLASS/blktap!blktap0"
D=$DEVDIR/tapdev0
large_is() { grep -q "^features: .* large=$1\$" "$T/debug" || { cat "$T/debug"; false; }; }
both_ok() { fio_ok l1 && fio_ok l2; }
# mean_kib R|W: the block layer's mean request size so far, in KiB, for reads or writes
# (/sys/block/tda/stat: read I/Os and sectors are fields 1 and 3, writes 5 and 7).
mean_kib() {
    awk -v w=$1 '{ n = (w == "W") ? $5 : $1; s = (w == "W") ? $7 : $3; print (n ? int(s / n / 2) : 0) }' \
        /sys/block/tda/stat
}

# large2 LABEL DEV: a 1 MiB sequential writer with verifying reads behind it (io_uring, QD8) and
# a verifying randrw job of 4 KiB to 1 MiB (libaio, QD8), at once on disjoint regions.
large2() {
    rm -f /tmp/fio-l1.rc /tmp/fio-l2.rc
    run_fio l1 --filename=$2 --ioengine=io_uring --direct=1 --rw=write --bs=1M --iodepth=8 \
        --offset=0 --size=16M --loops=2 --verify=crc32c --verify_backlog=4 --verify_fatal=1
    run_fio l2 --filename=$2 --ioengine=libaio --direct=1 --rw=randrw --bsrange=4k-1M \
        --iodepth=8 --offset=24M --size=24M --verify=crc32c --verify_backlog=8 --verify_fatal=1
    wait_fio_pair l1 l2 180 "$1"
    check "$1: a 1 MiB verifying writer and a verifying randrw job (4 KiB - 1 MiB) at once" both_ok
}

# --- (a) the mapping and the negotiation -----------------------------------------------------
$TAPCTL allocate >/dev/null
python3 tests/vm/largeprobe.py 0 > /tmp/large.txt 2>&1
sed 's/^/# /' /tmp/large.txt
expect() { check "$1: $2" is "$(awk -v k="$1" '$1 == k {print $2}' /tmp/large.txt)" "$2"; }
expect mmap-10-per-slot EINVAL
expect mmap-129-per-slot EINVAL
expect mmap-64-per-slot-plus-1 EINVAL
expect mmap-not-a-slot-multiple EINVAL
expect mmap-11-after-refusals OK
expect create-large-on-11 EINVAL
expect create-plain-on-11 OK
expect max-kib-plain-11 44
expect remove-plain-11 OK
expect mmap-64 OK
expect slot-pages-64 64
expect data-pages-zeroed OK
expect create-large-64 OK
expect max-kib-large-64 256
expect features-large flush=0,fua=0,discard=0,staged_writes=0,req_event=0,large=1
expect remap-11-with-disk-64 EINVAL
expect remap-128-with-disk-64 EINVAL
expect remap-64-with-disk-64 OK
expect remove-large-64 OK
expect mmap-128 OK
expect create-plain-on-128 OK
expect max-kib-plain-128 44
expect remove-plain-128 OK
expect mmap-11-again OK
expect slot-pages-11 11
check "(a) free the tap" $TAPCTL free -m 0

# --- (b) the Rust tapdisk --------------------------------------------------------------------
for s in 128 64 default; do
    case $s in
        default) dev=$($TAPCTL create -a ram:64M); want=0; kib=44 ;;
        *) dev=$(BLKTAP_MAX_SEGMENTS=$s $TAPCTL create -a ram:64M); want=1; kib=$((s * 4)) ;;
    esac
    check "tapdisk ($s): large=$want in debug" large_is $want
    check "tapdisk ($s): requests of up to $kib KiB" is "$(cat /sys/block/tda/queue/max_hw_sectors_kb)" $kib
    large2 "tapdisk ($s)" $dev
    r=$(mean_kib R); w=$(mean_kib W)
    echo "# tapdisk ($s): mean request $r KiB read, $w KiB written"
    if [ $want = 1 ]; then
        check "tapdisk ($s): requests larger than 44 KiB both ways" sh -c "test $r -gt 44 && test $w -gt 44"
    else
        check "tapdisk ($s): no request larger than 44 KiB" sh -c "test $r -le 44 && test $w -le 44"
    fi
    check "tapdisk ($s): none refused or timed out" \
        sh -c "test $(counter refused) = 0 && test $(counter timed_out) = 0"
    check "tapdisk ($s): destroy" $TAPCTL destroy -m 0
done

# --- (c) the Python peer ---------------------------------------------------------------------
$TAPCTL allocate >/dev/null
for flags in 0x200 0x280; do
    python3 tests/vm/pytap.py 0 131072 --flags $flags --max-segments 128 > /tmp/pytap.log 2>&1 &
    peer=$!
    check "pytap $flags: the disk appears" wait_node
    check "pytap $flags: large requests negotiated" large_is 1
    large2 "pytap $flags" $D
    check "pytap $flags: none refused or timed out" \
        sh -c "test $(counter refused) = 0 && test $(counter timed_out) = 0"
    stop_peer $peer
    sed 's/^/# /' /tmp/pytap.log | tail -n 5
    check "pytap $flags: the peer saw requests of more than 11 pages, each well formed" \
        sh -c "grep -Eq 'large=[1-9][0-9]* violations=0' /tmp/pytap.log && ! grep -q VIOLATION /tmp/pytap.log"
    check "pytap $flags: the disk is gone with the peer" node_gone
done
check "free the tap" $TAPCTL free -m 0
check "no tap left" no_taps_left
check "rmmod" unload
finish
