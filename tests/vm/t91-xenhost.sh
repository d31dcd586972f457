# tapdisk and tap-ctl as drop-ins on a Xen host: the original process model (tapdisk with no
# arguments daemonizes and prints its socket), the storage manager's call sequence end to end
# (allocate, spawn, attach, open -t 120, list, stats, pause, unpause -a, close -t 120, detach,
# free) under two concurrent fio verify jobs, every binary request on a real tap from an
# independent Python client, and SIGHUP/SIGUSR1 under fio verify.
. tests/vm/lib.sh
load
TD=$REPO/userspace/target/release/tapdisk
CTL=/var/run/blktap-control

# fio_loop NAME DEV: passes of two concurrent jobs, each writing and verifying (crc32c) its own
# 12 MiB, until /tmp/stop-NAME exists; one line per pass; the status is that of the first
# failing pass, which shows fio's verify errors (its warning that "multiple writers may overwrite
# blocks that belong to other jobs" is generic: the jobs' ranges do not overlap).
fio_loop() {
    n=0
    while [ ! -e /tmp/stop-$1 ]; do
        n=$((n + 1))
        fio --name=v$n --filename="$2" --ioengine=io_uring --direct=1 --rw=randwrite \
            --bsrange=4k-44k --iodepth=8 --size=12M --numjobs=2 --offset_increment=12M \
            --verify=crc32c --do_verify=1 --verify_fatal=1 --randseed=$n \
            --output=/tmp/fio-$1.out >/tmp/fio-$1.err 2>&1 \
        && [ "$(grep -c 'err= 0' /tmp/fio-$1.out)" = 2 ] \
        || { echo "pass $n failed:"; grep -v 'state file' /tmp/fio-$1.err | head -5
             grep 'err=' /tmp/fio-$1.out; return 1; }
        echo "pass $n ok"
    done
}

gone() { ! test -e /proc/$1 || grep -q '^State:.*Z' /proc/$1/status 2>/dev/null; }

# --- The process model ------------------------------------------------------------------------
out=$($TD); rc=$?
dpid=${out##$CTL/ctl}
check "tapdisk with no arguments exits 0 and prints its socket's path" \
    sh -c "test $rc = 0 && echo '$out' | grep -Eqx '$CTL/ctl[0-9]+'"
check "the daemon listens there" test -S "$out"
check "the daemon is its own session leader" \
    sh -c "test \"\$(awk '{print \$6}' /proc/$dpid/stat)\" = $dpid"
check "tap-ctl list shows the idle tapdisk" is "$($TAPCTL list)" "pid=$dpid"
check "tap-ctl stats of a tap it lacks: ENODEV (19)" is "$(errno_of $TAPCTL stats -p $dpid -m 0)" 19
kill $dpid
i=0; while ! gone $dpid && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
check "SIGTERM stops it and removes its socket" sh -c "! test -e $out"

# --- The storage manager's sequence under fio ------------------------------------------------
truncate -s 24M /tmp/sm.raw
dev=$($TAPCTL allocate); m=${dev##*tapdev}
check "allocate" test -n "$m"
pid=$($TAPCTL spawn)
check "spawn prints the pid of a tapdisk listening on ctl<pid>" test -S "$CTL/ctl$pid"
check "attach" $TAPCTL attach -p "$pid" -m "$m"
check "open -a aio: -t 120" $TAPCTL open -p "$pid" -m "$m" -a aio:/tmp/sm.raw -t 120
check "list: pid, minor, state 0x0, args" is "$($TAPCTL list -m $m)" \
    "pid=$pid minor=$m state=0x0 args=aio:/tmp/sm.raw"
check "stats parses as the original's JSON" sh -c "$TAPCTL stats -p $pid -m $m | python3 -c '
import json, sys
d = json.load(sys.stdin)
assert d[\"name\"] == \"aio:/tmp/sm.raw\", d
assert d[\"images\"][0][\"name\"] == \"/tmp/sm.raw\" and d[\"images\"][0][\"driver\"][\"name\"] == \"aio\", d
assert d[\"tap\"][\"minor\"] == $m and len(d[\"secs\"]) == 2 and \"reqs_outstanding\" in d, d
'"
rm -f /tmp/stop-sm
fio_loop sm "$dev" > /tmp/loop-sm.log 2>&1 &
loop=$!
sleep 2
bad=0
for c in $(seq 1 8); do
    $TAPCTL pause -p "$pid" -m "$m" || { echo "pause $c failed"; bad=1; }
    st=$($TAPCTL list -m "$m")
    case "$st" in *state=0x2a*) ;; *) echo "not 0x2a while paused: $st"; bad=1;; esac
    if [ $c = 4 ]; then
        # A snapshot: the leaf is copied while paused, and the tap goes on on the copy.
        cp /tmp/sm.raw /tmp/sm2.raw || bad=1
        $TAPCTL unpause -p "$pid" -m "$m" -a aio:/tmp/sm2.raw || { echo "unpause -a failed"; bad=1; }
    else
        $TAPCTL unpause -p "$pid" -m "$m" || { echo "unpause $c failed"; bad=1; }
    fi
    sleep 1
done > /tmp/cycles-sm.log 2>&1
touch /tmp/stop-sm
wait $loop; st=$?
check "8 pause/unpause cycles (one onto a copy), each paused at 0x2a" sh -c "cat /tmp/cycles-sm.log; test $bad = 0"
check "both fio jobs verified their data in every pass" sh -c "cat /tmp/loop-sm.log; test $st = 0"
check "fio ran during the cycles" sh -c "test \$(grep -c ok /tmp/loop-sm.log) -ge 2"
check "list names the copy" sh -c "$TAPCTL list -m $m | grep -q 'args=aio:/tmp/sm2.raw$'"
check "close -t 120" $TAPCTL close -p "$pid" -m "$m" -t 120
check "list: attached, no image (0x2)" is "$($TAPCTL list -m $m)" "pid=$pid minor=$m state=0x2"
check "detach" $TAPCTL detach -p "$pid" -m "$m"
check "free" $TAPCTL free -m "$m"
i=0; while ! gone $pid && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
check "the tapdisk exited once idle" gone $pid
check "nothing is listed" is "$($TAPCTL list)" ""

# --- Every binary request on a real tap, from an independent client --------------------------
truncate -s 16M /tmp/a.raw /tmp/b.raw
dev=$($TAPCTL allocate); m=${dev##*tapdev}
pid=$($TAPCTL spawn --log /tmp/py.log)
check "tdmsg.py: malformed messages, before any tap" python3 tests/vm/tdmsg.py malformed "$CTL/ctl$pid"
check "tdmsg.py: every request on tap $m" \
    python3 tests/vm/tdmsg.py lifecycle "$CTL/ctl$pid" "$m" aio:/tmp/a.raw aio:/tmp/b.raw
check "the tapdisk logged the open without O_DIRECT and with its request timeout" \
    grep -q "opened aio:/tmp/a.raw without O_DIRECT, request timeout 120 s" /tmp/py.log
check "free" $TAPCTL free -m "$m"

# --- SIGHUP and SIGUSR1 under fio -------------------------------------------------------------
truncate -s 24M /tmp/sig.raw
dev=$($TAPCTL create -a aio:/tmp/sig.raw --log /tmp/td.log)
m=${dev##*tapdev}
pid=$(cat "$CLASS/blktap!blktap$m/task")
rm -f /tmp/stop-sig
fio_loop sig "$dev" > /tmp/loop-sig.log 2>&1 &
loop=$!
sleep 2
bad=0
for k in 1 2 3 4 5; do
    mv /tmp/td.log /tmp/td.log.$k          # what logrotate does
    kill -HUP "$pid"
    i=0; while ! grep -q 'SIGHUP: reopened /tmp/td.log' /tmp/td.log 2>/dev/null && [ $i -lt 50 ]; do
        sleep 0.1; i=$((i+1)); done
    grep -q 'SIGHUP: reopened /tmp/td.log' /tmp/td.log || { echo "no new log after HUP $k"; bad=1; }
    kill -USR1 "$pid"
    sleep 1
done > /tmp/sig-cycles.log 2>&1
touch /tmp/stop-sig
wait $loop; st=$?
check "5 SIGHUPs: the log reopened each time (logrotate)" sh -c "cat /tmp/sig-cycles.log; test $bad = 0"
check "both fio jobs verified their data through the signals" sh -c "cat /tmp/loop-sig.log; test $st = 0"
cat /tmp/td.log.* /tmp/td.log > /tmp/td-all.log
check "SIGUSR1 wrote every tap's state: ring indexes, slots, counters" sh -c "
    test \$(grep -c 'SIGUSR1: end of state' /tmp/td-all.log) = 5 &&
    grep -q 'tap $m: ring: req_prod' /tmp/td-all.log &&
    grep -q 'tap $m: slots in flight' /tmp/td-all.log &&
    grep -q 'tap $m: counters: IoStats' /tmp/td-all.log || { tail -40 /tmp/td-all.log; false; }"
check "the rotated logs hold the earlier lines" grep -q "listening on" /tmp/td.log.1
check "the tapdisk still serves the tap" is "$($TAPCTL list -m $m)" "pid=$pid minor=$m state=0x0 args=aio:/tmp/sig.raw"
check "I/O still works" dd if="$dev" of=/dev/null bs=64k count=16 iflag=direct status=none
kill -TERM "$pid"
i=0; while ! gone $pid && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
check "SIGTERM: the tapdisk exits" gone $pid
check "...after closing the tap cleanly (disk removed)" sh -c "! grep -q '^$m ' $CLASS/devices"
check "...and logging it" grep -q "SIGTERM: shutting down" /tmp/td.log
check "the tap can be freed" $TAPCTL free -m "$m"
check "no tap left" is "$($TAPCTL list)" ""
check "rmmod" unload
finish
