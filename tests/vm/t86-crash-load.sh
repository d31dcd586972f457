# Crash under load: 100 kill -9s (x BLKTAP_STRESS_SCALE) of tapdisk while fio runs on its tapdev,
# two taps at a time, no recovery. fio must end with I/O errors (bounded by timeout: no hang),
# tap-ctl destroy then cleans up. Afterwards: no tap, no module reference, rmmod works, and no
# memory leaked: free memory (MemFree and the per-CPU free lists, after dropping caches) within 16 MiB and unreclaimable slab within
# 4 MiB of the start (one leaked ring is 1.4 MiB of pages; a leak per kill would be >100 MiB).
. tests/vm/lib.sh
. tests/vm/stress.sh
load
T0=$(date +%s)
meminfo() { sync; echo 3 > /proc/sys/vm/drop_caches; awk -v k="$1:" '$1 == k {print $2}' /proc/meminfo; }
# free: MemFree plus the free pages parked on the per-CPU lists (/proc/zoneinfo "count:"),
# which MemFree leaves out and which move it by several MiB on their own (as the bench counts).
free_kib() {
    sync; echo 3 > /proc/sys/vm/drop_caches
    awk '$1 == "MemFree:" {m = $2} END {print m}' /proc/meminfo > /tmp/t86-mf
    echo $(( $(cat /tmp/t86-mf) + $(awk '$1 == "count:" {c += $2} END {print c + 0}' /proc/zoneinfo) * 4 ))
}
# Warm-up round: first-use allocations (fio, tapdisk, the module's caches) are not leaks.
dev=$($TAPCTL create -a ram:8M); timeout 30 fio --name=w --filename=$dev --ioengine=io_uring \
    --direct=1 --rw=randrw --bs=4k --size=1M --output=/dev/null >/dev/null 2>&1; $TAPCTL destroy -m 0
free0=$(free_kib); slab0=$(meminfo SUnreclaim)

KILLS=$(scaled 100)
PER=$(( (KILLS + 1) / 2 ))
# worker W: PER rounds of create, fio, kill -9 tapdisk, wait for fio, destroy.
worker() {
    w=$1; hung=0; noerr=0; left=0; nocreate=0
    for i in $(seq 1 $PER); do
        if [ $((i % 2)) = 0 ]; then img=null:64M; else img=ram:16M; fi
        # (A create can fail with EEXIST while the other worker frees a tap: the ALLOC_TAP/
        # FREE_TAP race that t84 reproduces.)
        dev=$($TAPCTL create -a $img) || { nocreate=$((nocreate+1)); continue; }
        m=${dev##*tapdev}
        pid=$(cat "$CLASS/blktap!blktap$m/task")
        timeout 60 fio --name=crash$w --filename=$dev --ioengine=io_uring --direct=1 --rw=randrw \
            --bs=4k --iodepth=16 --time_based --runtime=30 --output=/tmp/fio-$w.out \
            >/dev/null 2>&1 &
        fio=$!
        # Kill once fio's I/O is flowing (its start-up takes a while under TCG), at a varying
        # moment after that.
        st=/sys/dev/block/$(stat -L -c '%t %T' $dev | { read a b; echo $((0x$a)):$((0x$b)); })/stat
        t=0; while [ $t -lt 100 ] && [ "$(awk '{print $1 + $5}' $st 2>/dev/null || echo 0)" = 0 ]; do
            sleep 0.05; t=$((t+1)); done
        sleep 0.$((i % 3))
        kill -9 $pid
        wait $fio; rc=$?
        [ $rc = 124 ] && hung=$((hung+1))
        grep -Eq 'err=[ ]*[1-9]|Input/output error' /tmp/fio-$w.out || noerr=$((noerr+1))
        timeout 20 $TAPCTL destroy -m $m 2>/dev/null || timeout 20 $TAPCTL free -m $m || left=$((left+1))
    done
    echo "$hung $noerr $left $nocreate" > /tmp/crash-$w.res
}
worker 1 & worker 2 &
wait
echo "# $((PER * 2)) kills in $(elapsed $T0) s; worker results (hung noerr left nocreate): $(cat /tmp/crash-1.res), $(cat /tmp/crash-2.res)"
sum() { awk -v c=$1 '{s += $c} END {print s}' /tmp/crash-1.res /tmp/crash-2.res; }
check "fio never hangs after kill -9 ($((PER * 2)) kills)" is "$(sum 1)" 0
check "fio always sees I/O errors" is "$(sum 2)" 0
check "every tap destroyed" is "$(sum 3)" 0
check "every tap created" is "$(sum 4)" 0
check "no tap left" no_taps_left
check "no tapdisk left" sh -c "! pgrep -x tapdisk"
check "no module reference left" refcnt_zero
free1=$(free_kib); slab1=$(meminfo SUnreclaim)
echo "# free (MemFree + per-CPU lists) ${free0} -> ${free1} kB, SUnreclaim ${slab0} -> ${slab1} kB"
check "no pages leaked (free memory within 16 MiB)" test $((free0 - free1)) -lt 16384
if dmesg | grep -q 'KernelAddressSanitizer initialized'; then
    # KASAN's quarantine keeps freed slab objects (counted in SUnreclaim) for a while: 25
    # rounds grew it by 16 MiB on the debug kernel, where the default kernel stays within 4 MiB
    # after 100. Only the pages are checked there.
    echo "# KASAN kernel: the slab delta is not checked (quarantine)"
else
    check "no slab leaked (SUnreclaim within 4 MiB)" test $((slab1 - slab0)) -lt 4096
fi
check "rmmod" unload
echo "# crash-load total $(elapsed $T0) s"
finish
