# Churn: 1,000 tap-ctl create/destroy cycles over 8 taps in parallel; races of open/close of a
# ring, FREE_TAP against ring opens, REMOVE_DEVICE (tap-ctl destroy) against tapdev opens; then
# 100 module reload cycles. Counts scale with BLKTAP_STRESS_SCALE. Under 4 minutes under TCG.
. tests/vm/lib.sh
. tests/vm/stress.sh
load
T0=$(date +%s)

# 0. The minimal reproducer of the ALLOC_TAP/FREE_TAP race: 4 processes allocating and freeing.
python3 tests/vm/alloc-free-race.py 4 $(scaled 8) > /tmp/afr.out 2>&1
sed 's/^/# alloc-free race: /' /tmp/afr.out
check "parallel ALLOC_TAP/FREE_TAP: every call succeeds" sh -c "cat /tmp/afr.out; ! grep -qv '^cycles' /tmp/afr.out"
check "no tap left after the alloc/free race" no_taps_left

# 1. create/destroy cycles, 8 workers.
CYCLES=$(scaled 1000)
PER=$(( (CYCLES + 7) / 8 ))
worker() {
    w=$1; fails=0
    for i in $(seq 1 $PER); do
        if [ $((i % 2)) = 0 ]; then img=null:4M; else img=ram:1M; fi
        dev=$($TAPCTL create -a $img 2>>/tmp/churn-$w.err) || { fails=$((fails+1)); continue; }
        $TAPCTL destroy -m ${dev##*tapdev} 2>>/tmp/churn-$w.err || fails=$((fails+1))
    done
    echo $fails > /tmp/churn-$w.fails
}
t=$(date +%s)
for w in 1 2 3 4 5 6 7 8; do worker $w & done
wait
echo "# $((PER * 8)) create/destroy cycles in $(elapsed $t) s"
check "create/destroy x$((PER * 8)) over 8 taps in parallel: no failure" \
    sh -c "cat /tmp/churn-*.err | head; test \$(cat /tmp/churn-*.fails | paste -sd+ | bc) = 0"
check "no tap left after the cycles" no_taps_left
check "no tapdisk left" sh -c "! pgrep -x tapdisk"

# 2. Races, each bounded in time.
RACE=$(scaled 8)
node=$DEVDIR/blktap0
# Ring open/close by two processes against FREE_TAP + ALLOCATE by a third.
$TAPCTL allocate >/dev/null
end=$(( $(date +%s) + RACE ))
# (`true 3<node` opens and closes the node, read-only so that it never creates a file when the
# node is gone; `true` is no special builtin, so a failed open does not end the shell.)
opener() { n=0; while [ $(date +%s) -lt $end ]; do if true 2>/dev/null 3<$node; then n=$((n+1)); fi; done; echo $n > /tmp/opens-$1; }
opener a & opener b &
frees=0
while [ $(date +%s) -lt $end ]; do
    if $TAPCTL free -m 0 2>/dev/null; then frees=$((frees+1)); $TAPCTL allocate >/dev/null; fi
done
wait
echo "# ring open race: $(cat /tmp/opens-a) + $(cat /tmp/opens-b) opens, $frees frees in ${RACE} s"
check "ring open/close vs FREE_TAP race: the tap is still consistent" sh -c "$TAPCTL free -m 0 || { sleep 1; $TAPCTL free -m 0; }"
check "no tap left after the open race" no_taps_left

# Ring mapping by the Python peer racing open/close (mmap, create, exit) with the fuzzer's
# minimum: many short-lived tapdisks on one tap, while others open the ring.
$TAPCTL allocate >/dev/null
end=$(( $(date +%s) + RACE ))
opener c &
n=0
while [ $(date +%s) -lt $end ]; do
    timeout 10 $REPO/userspace/target/release/rogue-tapdisk --minor 0 --mode good --count 0 >/dev/null 2>&1 &
    p=$!; sleep 0.05; kill $p 2>/dev/null; wait $p 2>/dev/null; n=$((n+1))
done
wait
echo "# $n short-lived peers against $(cat /tmp/opens-c) opens"
check "short-lived peers vs ring opens: tap freed" sh -c "$TAPCTL free -m 0 || { sleep 1; $TAPCTL free -m 0; }"

# tap-ctl destroy (REMOVE_DEVICE, ring close) against readers opening the tapdev.
end=$(( $(date +%s) + RACE ))
reader() { while [ $(date +%s) -lt $end ]; do dd if=$DEVDIR/tapdev0 of=/dev/null bs=4k count=1 iflag=direct status=none 2>/dev/null; done; }
reader & reader &
c=0; bad=0
while [ $(date +%s) -lt $end ]; do
    dev=$($TAPCTL create -a null:4M 2>>/tmp/race3.err) || { bad=$((bad+1)); sleep 0.1; continue; }
    sleep 0.1
    timeout 20 $TAPCTL destroy -m ${dev##*tapdev} 2>/dev/null || \
        { sleep 0.2; timeout 20 $TAPCTL destroy -m ${dev##*tapdev} 2>/dev/null; } || bad=$((bad+1))
    c=$((c+1))
done
wait
echo "# $c create/destroy against tapdev readers, $bad refused or retried"
sort /tmp/race3.err 2>/dev/null | uniq -c | head -n 5 | sed 's/^/# /'
check "the ring nodes are still char devices" sh -c "! find $DEVDIR -type f | grep ."
for m in $($TAPCTL list 2>/dev/null | sed -n 's/.*minor=\([0-9]*\).*/\1/p'); do timeout 20 $TAPCTL destroy -m $m; done
check "destroy vs tapdev open race: everything destroyed" no_taps_left
check "no module reference left" refcnt_zero

# 3. Module reload cycles.
RELOADS=$(scaled 100)
t=$(date +%s)
bad=0
for i in $(seq 1 $RELOADS); do
    unload || bad=$((bad+1))
    load || bad=$((bad+1))
done
echo "# $RELOADS reload cycles in $(elapsed $t) s"
check "rmmod/insmod x$RELOADS" test $bad = 0
$TAPCTL list; pgrep -a tapdisk | sed 's/^/# left: /'
check "the reloaded module works" sh -c "dev=\$($TAPCTL create -a ram:1M) && dd if=\$dev of=/dev/null bs=4k count=4 iflag=direct status=none && $TAPCTL destroy -m 0"
check "no tap left" no_taps_left
check "rmmod" unload
echo "# churn total $(elapsed $T0) s"
finish
