# Concurrent independent submitters on ONE tap, every byte read checked (issue 9: RESPOND freed
# a read's ring slot before copying its data out, and a concurrent write took the slot and put
# its data in the same pages). Several fio processes at once per tap:
#  - two verify-only readers (crc32c headers written beforehand; 4-44 KiB, depths 16 and 32,
#    libaio and io_uring) while a writer writes random 4 KiB blocks at depth 16 on a disjoint
#    region;
#  - three mixed random read/write jobs on disjoint regions (512 B-44 KiB), each verifying its
#    own region as it goes (verify_backlog) and at the end;
# on aio:, on ram:, and on the Python peer, plain and with --hold (many answers in one RESPOND,
# out of order); and on aio: over storage with 4 KiB sectors (a file on ext4 and the device), where
# odd transfers go through the page cache and aligned ones stay direct. Every fio must exit 0 with err=0 and print no verify error.
# Rounds scale with BLKTAP_STRESS_SCALE.
. tests/vm/lib.sh
. tests/vm/stress.sh
load
T0=$(date +%s)
ROUNDS=$(scaled 3)
PYROUNDS=$(scaled 2)

# fio's report of a bad block ("verify: bad magic header", "crc32c: verify failed", ...).
# reader_job DEV OFFSET SIZE SEED ENGINE DEPTH: the job whose headers the readers check.
reader_job() {
    echo "--filename=$1 --direct=1 --rw=randwrite --bsrange=4k-44k --offset=$2 --size=$3" \
         "--randseed=$4 --ioengine=$5 --iodepth=$6 --verify=crc32c"
}

# readers_and_writer LABEL DEV R1_OFF R2_OFF RSIZE W_OFF W_SIZE ROUNDS: prefills two regions,
# then ROUNDS times reads both back (verify-only, at once) while a writer writes a third.
# Prints one line per round and checks them all.
readers_and_writer() {
    label=$1 dev=$2 r1=$3 r2=$4 rs=$5 wo=$6 ws=$7 rounds=$8
    bad=0 fails=0 errs=0
    run_fio pre1 $(reader_job $dev $r1 $rs 11 libaio 16) --do_verify=0
    a=$!
    run_fio pre2 $(reader_job $dev $r2 $rs 12 io_uring 32) --do_verify=0
    wait $a $!
    fio_ok pre1 && fio_ok pre2 || bad=1
    for r in $(seq 1 $rounds); do
        run_fio writer --filename=$dev --direct=1 --rw=randwrite --bs=4k --offset=$wo --size=$ws \
            --ioengine=io_uring --iodepth=16 --time_based --runtime=600 --randseed=$r
        w=$!
        run_fio r1 $(reader_job $dev $r1 $rs 11 libaio 16) --verify_only --continue_on_error=verify
        a=$!
        run_fio r2 $(reader_job $dev $r2 $rs 12 io_uring 32) --verify_only --continue_on_error=verify
        b=$!
        wait $a $b
        kill -INT $(cat /tmp/fio-writer.pid)
        wait $w
        e=$(( $(bad_blocks r1) + $(bad_blocks r2) ))
        ok=1
        fio_ok r1 >/tmp/why 2>&1 && fio_ok r2 >>/tmp/why 2>&1 || ok=0
        # The writer runs until the readers are done; SIGINT ends it with status 128.
        fio_ok writer 128 >>/tmp/why 2>&1 || { ok=0; bad=1; }
        grep -q 'issued rwts: total=0,[1-9]' /tmp/fio-writer.out || { echo "the writer wrote nothing" >>/tmp/why; ok=0; bad=1; }
        if [ $ok = 1 ]; then
            echo "# $label round $r: readers clean ($(grep -h 'READ:' /tmp/fio-r1.out | sed 's/.*io=\([^ ]*\).*run=\([^ ]*\)/\1 in \2/'))"
        else
            fails=$((fails + 1)); errs=$((errs + e))
            echo "# $label round $r: FAILED, $e bad blocks"
            sed 's/^/#   /' /tmp/why
        fi
    done
    echo "# $label: reader rounds failed: $fails/$rounds ($errs bad blocks)"
    check "$label: 2 verify-only readers + a writer at once, $rounds rounds: every block read intact" test $fails = 0
    check "$label: prefill and writer exited cleanly" test $bad = 0
}

# mixed LABEL DEV SIZE ROUNDS: three randrw jobs on disjoint regions of SIZE at once, each
# verifying its own region (crc32c) as it goes and at the end.
mixed() {
    label=$1 dev=$2 size=$3 rounds=$4
    fails=0
    for r in $(seq 1 $rounds); do
        common="--filename=$dev --direct=1 --rw=randrw --bsrange=512-44k --size=$size --verify=crc32c --verify_backlog=16 --verify_fatal=1 --do_verify=1"
        run_fio m1 $common --offset=0 --ioengine=libaio --iodepth=16 --randseed=$((r * 3))
        a=$!
        run_fio m2 $common --offset=$size --ioengine=io_uring --iodepth=32 --randseed=$((r * 3 + 1))
        b=$!
        run_fio m3 $common --offset=$((2 * ${size%M}))M --ioengine=io_uring --iodepth=16 --randseed=$((r * 3 + 2))
        wait $a $b $!
        if fio_ok m1 >/tmp/why 2>&1 && fio_ok m2 >>/tmp/why 2>&1 && fio_ok m3 >>/tmp/why 2>&1; then
            echo "# $label mixed round $r: clean"
        else
            fails=$((fails + 1))
            echo "# $label mixed round $r: FAILED, $(( $(bad_blocks m1) + $(bad_blocks m2) + $(bad_blocks m3) )) bad blocks"
            sed 's/^/#   /' /tmp/why
        fi
    done
    echo "# $label: mixed rounds failed: $fails/$rounds"
    check "$label: 3 mixed randrw jobs with crc32c verify at once, $rounds rounds: no error" test $fails = 0
}

T="$CLASS/blktap!blktap0"
no_refusal() { grep -qx 'refused: 0' "$T/debug" && grep -qx 'timed_out: 0' "$T/debug" || { cat "$T/debug"; false; }; }

# --- aio: --------------------------------------------------------------------------------------
t=$(date +%s)
truncate -s 96M /tmp/c.raw
dev=$($TAPCTL create -a aio:/tmp/c.raw)
check "aio: tap created" test -b "$dev"
readers_and_writer aio $dev 0 32M 32M 64M 32M $ROUNDS
mixed aio $dev 16M $ROUNDS
check "aio: no refused answer, no timeout" no_refusal
check "aio: destroy" $TAPCTL destroy -m 0
echo "# aio: $(elapsed $t) s"

# --- aio: on 4 KiB-sector storage ---------------------------------------------------------------
# A null_blk with 4 KiB logical blocks: O_DIRECT takes only 4 KiB-aligned transfers. At once, on
# disjoint regions, each verifying: 4 KiB random writes, 4-44 KiB random reads and writes on
# 4 KiB boundaries, and 512 B-8 KiB ones on any sector. The odd job's transfers go through the
# page cache one by one; the aligned jobs stay direct: their 32 MiB have no page cached (a
# fall-back of the whole image to buffered I/O would cache them). On ext4 (a file SR's layout)
# and on the device itself (an LVM SR's). The test kernels have no posix_fadvise, so nothing
# drops pages behind the count.
NB=$BLKTAP_KDIR/drivers/block/null_blk/null_blk.ko
four_k_ok() { fio_ok k1 && fio_ok k2 && fio_ok k3; }
# four_k_n LABEL DEV IMAGE: the three jobs on DEV, then the image's cached pages counted.
four_k_n() {
    label=$1 dev=$2 img=$3
    common="--filename=$dev --direct=1 --verify=crc32c --verify_backlog=16 --verify_fatal=1 --do_verify=1"
    run_fio k1 $common --rw=randwrite --bs=4k --offset=0 --size=16M --ioengine=io_uring --iodepth=16 --randseed=41
    a=$!
    run_fio k2 $common --rw=randrw --bsrange=4k-44k --blockalign=4k --offset=16M --size=16M --ioengine=libaio --iodepth=16 --randseed=42
    b=$!
    run_fio k3 $common --rw=randrw --bsrange=512-8k --offset=48M --size=16M --ioengine=io_uring --iodepth=8 --randseed=43
    wait $a $b $!
    check "$label: two 4 KiB-aligned jobs and a 512 B-8 KiB one at once, each verifying: no error" four_k_ok
    aligned=$(python3 tests/vm/resident.py $img 0 33554432)
    odd=$(python3 tests/vm/resident.py $img 50331648 67108864)
    echo "# $label: pages cached: $aligned in the aligned jobs' 32 MiB, $odd in the odd job's 16 MiB"
    check "$label: the aligned jobs' transfers went direct (none of their pages cached)" is "$aligned" 0
    check "$label: the odd job's went through the page cache" test "$odd" -gt 0
}
t=$(date +%s)
check "4Kn: a null_blk with 4 KiB blocks" insmod $NB nr_devices=1 memory_backed=1 bs=4096 gb=1 irqmode=0 queue_mode=2
check "4Kn: its logical block size is 4096" is "$(cat /sys/block/nullb0/queue/logical_block_size)" 4096
mkdir -p /tmp/4kn
check "4Kn: ext4 on it" sh -c "mkfs.ext4 -q -F /dev/nullb0 && mount /dev/nullb0 /tmp/4kn"
truncate -s 96M /tmp/4kn/c.raw
dev=$($TAPCTL create -a aio:/tmp/4kn/c.raw)
check "4Kn file: aio: tap created" test -b "$dev"
four_k_n "4Kn file" $dev /tmp/4kn/c.raw
check "4Kn file: no refused answer, no timeout" no_refusal
check "4Kn file: destroy" $TAPCTL destroy -m 0
check "4Kn: umount" umount /tmp/4kn
# mkfs wrote through the device's page cache: gone before the count.
sync; echo 3 > /proc/sys/vm/drop_caches
dev=$($TAPCTL create -a aio:/dev/nullb0)
check "4Kn device: aio: tap created" test -b "$dev"
four_k_n "4Kn device" $dev /dev/nullb0
check "4Kn device: no refused answer, no timeout" no_refusal
check "4Kn device: destroy" $TAPCTL destroy -m 0
check "4Kn: rmmod null_blk" rmmod null_blk
echo "# aio on 4Kn: $(elapsed $t) s"

# --- ram: --------------------------------------------------------------------------------------
t=$(date +%s)
dev=$($TAPCTL create -a ram:96M)
check "ram: tap created" test -b "$dev"
readers_and_writer ram $dev 0 32M 32M 64M 32M $ROUNDS
mixed ram $dev 16M $ROUNDS
check "ram: no refused answer, no timeout" no_refusal
check "ram: destroy" $TAPCTL destroy -m 0
echo "# ram: $(elapsed $t) s"

# --- the Python peer, plain and holding answers ------------------------------------------------
$TAPCTL allocate >/dev/null
for mode in plain "hold 16" "hold 32"; do
    t=$(date +%s)
    case $mode in plain) extra= ;; *) extra="--${mode% *} ${mode#* }" ;; esac
    python3 tests/vm/pytap.py 0 65536 $extra > /tmp/pytap.log 2>&1 &
    peer=$!
    check "pytap $mode: the disk appears" wait_node
    readers_and_writer "pytap $mode" $DEVDIR/tapdev0 0 8M 8M 16M 16M $PYROUNDS
    mixed "pytap $mode" $DEVDIR/tapdev0 8M $PYROUNDS
    check "pytap $mode: no refused answer, no timeout" no_refusal
    kill $peer; wait $peer
    cat /tmp/pytap.log | sed 's/^/# /'
    check "pytap $mode: the peer saw only READ and WRITE" grep -q 'flush=0 discard=0 fua=0 other=0 ' /tmp/pytap.log
    if [ "$mode" != plain ]; then
        # The point of --hold: several answers per RESPOND, in another order than the ring's.
        check "pytap $mode: answers were batched and reordered" \
            sh -c "grep -Eq 'hold batches=[0-9]+ multi=[1-9][0-9]* max=([2-9]|[1-9][0-9]) reordered=[1-9]' /tmp/pytap.log"
    fi
    echo "# pytap $mode: $(elapsed $t) s"
done
check "free the tap" $TAPCTL free -m 0
check "no tap left" no_taps_left
check "rmmod" unload
echo "# concurrent total $(elapsed $T0) s"
finish
